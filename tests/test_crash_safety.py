"""Crash safety: `ticketlab find` killed with SIGKILL at 22 moments still ends bit-identical.

Kill points come from two sources, both seeded: hooks at the write sites and in the loops
(``TICKETLAB_FAULT=site:n`` makes the process SIGKILL itself the n-th time it reaches the site:
a file written but not yet renamed, just renamed, after an optimizer step, after an evaluation
batch), and random delays after which the test kills the process from outside. After every kill
the run directory must hold only whole levels, the levels finished before the kill must be
untouched, and rerunning the same command must resume. At the end the masks and metrics must
equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ticketlab.store import Run, list_runs

SITES = ("step", "eval", "write", "renamed")


def command(model: Path, data: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "ticketlab.cli", "find", "--task", "csv", "--data-dir",
            str(data), "--model", str(model), "--batch-size", "16", "--epochs", "1",
            "--max-length", "16", "--lr", "1e-3", "--target-sparsity", "0.3", "--root",
            str(root), "--no-progress"]


def launch(cmd: list[str], fault: str | None = None, kill_after: float | None = None) -> int:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("TICKETLAB_FAULT", None)
    if fault:
        env["TICKETLAB_FAULT"] = fault
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"unexpected exit {proc.returncode}:\n{out.decode()}")
    return proc.returncode


def snapshot(run: Run) -> dict[int, bytes]:
    """The metrics.json bytes of every finished level."""
    return {k: (run.level_dir(k) / "metrics.json").read_bytes() for k in run.levels()}


def essentials(run: Run) -> dict:
    out = {}
    for k in run.levels():
        rec = run.metrics(k)
        out[k] = {"mask": (run.level_dir(k) / "mask.safetensors").read_bytes(),
                  "metrics": rec["metrics"], "score": rec["score"], "sparsity": rec["sparsity"],
                  "checksums": rec["checksums"]}
    return out


def kill_points(rng: random.Random):
    """Endless seeded kill points: every 4th a random delay, the others a hook at the sites in
    turn (all four within the first six points)."""
    i = hooks = 0
    while True:
        if i % 4 == 3:
            yield None, rng.uniform(1.0, 8.0)  # killed from outside, at any moment
        else:
            site = SITES[hooks % len(SITES)]
            hooks += 1
            limit = {"step": 10, "eval": 3, "write": 14, "renamed": 14}[site]
            yield f"{site}:{rng.randint(1, limit)}", None
        i += 1


@pytest.mark.integration
@pytest.mark.parametrize("wanted", [
    6,  # in the default suite (each kill is a fresh process: ~5 s)
    pytest.param(20, marks=pytest.mark.slow),  # the full count, with `-m slow`
])
def test_kill_minus_nine_at_random_points_loses_nothing(tiny_bert_dir, csv_task_dir, tmp_path,
                                                        wanted: int) -> None:
    data = csv_task_dir
    assert launch(command(tiny_bert_dir, data, tmp_path / "ref")) == 0
    [reference] = list_runs(tmp_path / "ref")
    assert reference.levels() == [0, 1, 2, 3]
    expected = essentials(reference)

    kills, finished, segment = 0, 0, 0
    points = kill_points(random.Random(1234))
    root = tmp_path / "killed-0"
    for _ in range(3 * wanted):
        if kills >= wanted:
            break
        fault, delay = next(points)
        run = Run(root / reference.path.name)
        before = snapshot(run) if run.path.exists() else {}
        code = launch(command(tiny_bert_dir, data, root), fault=fault, kill_after=delay)
        if run.path.exists():
            after = snapshot(run)
            for level, blob in before.items():  # finished levels are never redone or touched
                assert after[level] == blob, f"level {level} changed (kill at {fault or delay})"
            for level in run.levels():  # a level that claims to be done is whole
                rec = json.loads((run.level_dir(level) / "metrics.json").read_text())
                assert set(rec["checksums"]) >= {"mask.safetensors", "head.safetensors"}
        if code == -signal.SIGKILL:
            kills += 1
            continue
        # The run finished despite the kills before it: it must equal the uninterrupted run.
        assert essentials(run) == expected
        finished += 1
        segment += 1
        root = tmp_path / f"killed-{segment}"
    assert kills >= wanted

    assert launch(command(tiny_bert_dir, data, root)) == 0  # a killed owner's lock never blocks
    assert essentials(Run(root / reference.path.name)) == expected


def sweep_spec(path: Path, model: Path, data: Path) -> Path:
    path.write_text(f"""
name = "killed"

[hparams]
model = "{model}"
data_dir = "{data}"
max_length = 16
lr = 1e-3
batch_size = 16
epochs = 1
target_sparsity = 0.1

[grid]
tasks = ["csv"]
seeds = 3
""")
    return path


def finished_cells(root: Path) -> dict[str, bytes]:
    """metrics.json bytes of every finished level of every run under ``root``."""
    out = {}
    for run in list_runs(root):
        for level, blob in snapshot(run).items():
            out[f"{run.path.name}/{level}"] = blob
    return out


@pytest.mark.integration
def test_killed_sweep_redoes_only_unfinished_cells(tiny_bert_dir, csv_task_dir, tmp_path):
    spec = sweep_spec(tmp_path / "spec.toml", tiny_bert_dir, csv_task_dir)
    sweep = [sys.executable, "-m", "ticketlab.cli", "sweep", str(spec), "--no-progress"]
    assert launch([*sweep, "--root", str(tmp_path / "ref")]) == 0
    expected = {k: essentials(Run(tmp_path / "ref" / k)) for k in
                sorted({key.split("/")[0] for key in finished_cells(tmp_path / "ref")})}
    assert len(expected) == 3  # one IMP run a seed

    root = tmp_path / "killed"
    kills = 0
    for fault in ("step:2", "renamed:5", "step:3", "eval:2", "write:9"):
        before = finished_cells(root) if root.exists() else {}
        kills += launch([*sweep, "--root", str(root)], fault=fault) == -signal.SIGKILL
        after = finished_cells(root)
        assert all(after[k] == v for k, v in before.items())  # finished cells never redone
    assert kills >= 4
    assert launch([*sweep, "--root", str(root)]) == 0
    assert {k: essentials(Run(root / k)) for k in expected} == expected


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.integration
@pytest.mark.parametrize("compressed", [False, True])
def test_killed_export_leaves_nothing_half_written(tiny_bert_dir, csv_task_dir, tmp_path,
                                                   compressed):
    assert launch(command(tiny_bert_dir, csv_task_dir, tmp_path / "runs")) == 0
    [run] = list_runs(tmp_path / "runs")
    export = [sys.executable, "-m", "ticketlab.cli", "export", run.path.name, "--level", "2",
              "--root", str(tmp_path / "runs"), *(["--compressed"] if compressed else [])]
    assert launch([*export, "--to", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    for fault, delay in (("write:1", None), (None, 4.0), ("renamed:1", None)):
        code = launch([*export, "--to", str(out), "--force"], fault=fault, kill_after=delay)
        if code == -signal.SIGKILL and fault == "write:1":
            assert not out.exists()  # killed before the rename: nothing at the target
        if out.exists():  # whatever is at the target is a whole export
            assert folder_bytes(out) == folder_bytes(tmp_path / "ref")
    assert launch([*export, "--to", str(out), "--force"]) == 0
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")


@pytest.mark.integration
def test_a_run_killed_during_an_adversarial_level_resumes_bit_identically(
        tiny_bert_dir, csv_task_dir, tmp_path) -> None:
    """Issue 13: the attack's random starts come from the seeded training RNG and the
    evaluation attack from its own fixed seed, so a resumed adversarial level repeats exactly."""
    adversarial = ["--adversarial", "pgd", "--adv-norm", "l2", "--adv-eps", "0.3",
                   "--adv-step", "0.1", "--adv-steps", "2", "--eval-attack", "pgd",
                   "--eval-attack-steps", "2", "--target-sparsity", "0.2"]
    cmd = [*command(tiny_bert_dir, csv_task_dir, tmp_path / "ref"), *adversarial]
    assert launch(cmd) == 0
    [reference] = list_runs(tmp_path / "ref")
    expected = essentials(reference)
    assert all("robust_accuracy" in v["metrics"] for v in expected.values())
    killed = [*command(tiny_bert_dir, csv_task_dir, tmp_path / "killed"), *adversarial]
    for fault in ("step:4", "eval:2", "step:2"):  # inside level 1's training, its attack, ...
        assert launch(killed, fault=fault) == -signal.SIGKILL
    assert launch(killed) == 0
    assert essentials(Run(tmp_path / "killed" / reference.path.name)) == expected
