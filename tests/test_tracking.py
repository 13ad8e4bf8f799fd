"""Tracking (issue 15.1): one TensorBoard log per level of each run, inside the run, with the
loss and learning rate of every step, the eval metrics, the sparsity and the hparams; two runs
and two levels never mix."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from ticketlab.experiments.baselines import run_branch
from ticketlab.hparams import Runtime
from ticketlab.imp import find_ticket
from ticketlab.tracking import flat_hparams, level_log_dir, open_level_log

TB = Runtime(progress=False, save_weights=False, report_to="tensorboard")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] read back from the real event files in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def hparams_of(folder: Path) -> dict:
    [yml] = list(folder.rglob("hparams.yml"))
    return yaml.safe_load(yml.read_text())


def test_two_runs_and_two_levels_log_into_their_own_folders(tiny_hparams, tmp_path) -> None:
    root = tmp_path / "runs"
    runs = [find_ticket(tiny_hparams(target_sparsity=0.1, train={"lr": lr}), root, TB,
                        Console(quiet=True)) for lr in (1e-3, 5e-4)]
    assert runs[0].path != runs[1].path
    assert not (root / "logs").exists()  # nothing shared at the store's root any more
    for run, lr in zip(runs, (1e-3, 5e-4), strict=True):
        assert sorted(p.name for p in (run.path / "logs").iterdir()) == ["level_0", "level_1"]
        for level in (0, 1):
            rec = run.metrics(level)
            tags = scalars(level_log_dir(run.path, level))
            steps = rec["train"]["steps"]
            # one loss and lr per optimizer step of *this* level: nothing from the other level
            assert [s for s, _ in tags["train/loss"]] == list(range(1, steps + 1))
            assert [s for s, _ in tags["train/lr"]] == list(range(1, steps + 1))
            assert tags["train/lr"][0][1] == pytest.approx(lr * (steps - 1) / steps, rel=1e-5)
            assert sum(v for _, v in tags["train/loss"]) / steps == pytest.approx(
                rec["train"]["loss"], rel=1e-5)
            for metric, value in rec["metrics"].items():
                assert tags[f"eval/{metric}"] == [(steps, pytest.approx(value, rel=1e-6))]
            assert tags["sparsity/overall"] == [(steps, pytest.approx(rec["sparsity"]))]
            for role, value in rec["sparsity_by_role"].items():
                assert tags[f"sparsity/{role}"] == [(steps, pytest.approx(value))]
            hp = hparams_of(level_log_dir(run.path, level))
            assert hp["run"] == run.path.name and hp["level"] == level
            assert hp["train/lr"] == lr and hp["data/task"] == "sst2"
        assert scalars(level_log_dir(run.path, 1))["sparsity/overall"][0][1] == \
            pytest.approx(0.1, abs=1e-3)
    # the two runs' level 0 losses are their own (different learning rates)
    a, b = (scalars(level_log_dir(r.path, 0))["train/loss"] for r in runs)
    assert a != b

    branch = run_branch(runs[0], 1, "random", 0, TB, Console(quiet=True))
    tags = scalars(level_log_dir(branch.path, 1))
    assert branch.path.parent.name == "branches" and "eval/accuracy" in tags
    assert sorted(p.name for p in (runs[0].path / "logs").iterdir()) == ["level_0", "level_1"]


def test_a_level_trained_again_starts_its_log_afresh(tmp_path) -> None:
    """A level interrupted and trained again must not show two overlapping curves."""
    run = tmp_path / "sst2-abc"
    for attempt in range(2):
        log = open_level_log("tensorboard", run, 0, {"train": {"lr": 0.1}})
        for step in range(1, 4):
            log.log({"train/loss": float(attempt)}, step)
        log.finish()
    assert scalars(level_log_dir(run, 0))["train/loss"] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    assert len(list(level_log_dir(run, 0).rglob("hparams.yml"))) == 1


def test_wandb_gets_one_named_run_per_level(tmp_path, monkeypatch) -> None:
    """W&B: accelerate's WandBTracker with a run per level, grouped by the run id (a stand-in
    wandb module records the calls; the real package is optional)."""
    calls: dict = {"init": [], "log": [], "config": {}}

    class FakeRun:
        def log(self, values, step=None):
            calls["log"].append((values, step))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    fake.config = types.SimpleNamespace(update=lambda v, allow_val_change: calls["config"]
                                        .update(v))
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # find_spec sees it installed
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = open_level_log("wandb", tmp_path / "sst2-abc", 2, {"train": {"lr": 0.1}})
    log.log_level({"metrics": {"accuracy": 0.8}, "sparsity": 0.2,
                   "sparsity_by_role": {"Q": 0.3}}, 7)
    log.finish()
    [init] = calls["init"]
    assert init["project"] == "ticketlab" and init["name"] == "sst2-abc/level_2"
    assert init["group"] == "sst2-abc" and init["dir"] == str(tmp_path / "sst2-abc/logs/level_2")
    assert calls["config"] == {"run": "sst2-abc", "level": 2, "train/lr": 0.1}
    assert calls["log"] == [({"eval/accuracy": 0.8, "sparsity/overall": 0.2,
                              "sparsity/Q": 0.3}, 7)]
    assert calls["finished"]


def test_hparams_are_flattened_for_tensorboard() -> None:
    flat = flat_hparams({"data": {"task": "sst2", "max_train_samples": None,
                                  "options": (("text_column", "t"),)},
                         "prune": {"include": (), "prune_pooler": False}})
    assert flat == {"data/task": "sst2", "data/max_train_samples": "null",
                    "data/options": '[["text_column", "t"]]', "prune/include": "[]",
                    "prune/prune_pooler": False}


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_runs(
        tiny_hparams, tmp_path, monkeypatch) -> None:
    import importlib.util

    from ticketlab.errors import TicketlabError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(TicketlabError, match="--report-to wandb needs the wandb package") as e:
        find_ticket(tiny_hparams(), tmp_path / "runs",
                    Runtime(progress=False, report_to="wandb"), Console(quiet=True))
    assert e.value.fix == "Run: pip install wandb"
    assert not (tmp_path / "runs").exists()  # nothing half-written
