"""The run store under hostile conditions: edited files, orphaned temp files, unwritable roots,
file permissions (issue 10, items 5, 7, 11 and 13)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.imp import find_ticket
from ticketlab.store import Run, atomic_write_bytes, ensure_writable, list_runs
from ticketlab.train import Runtime

QUIET = Runtime(progress=False)
runner = CliRunner()


def quiet() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="module")
def tiny_run_template(tiny_bert_dir, glue_dir, tmp_path_factory) -> Run:
    from ticketlab.hparams import build_hparams

    hp = build_hparams("sst2", {"model": str(tiny_bert_dir), "data_dir": str(glue_dir),
                                "max_train_samples": 32, "max_eval_samples": 16,
                                "max_length": 32, "batch_size": 16, "epochs": 1, "lr": 1e-3,
                                "target_sparsity": 0.1})
    return find_ticket(hp, tmp_path_factory.mktemp("store") / "runs", QUIET, quiet())


@pytest.fixture()
def tiny_run(tiny_run_template, tmp_path) -> Run:
    import shutil

    return Run(Path(shutil.copytree(tiny_run_template.path,
                                    tmp_path / "runs" / tiny_run_template.path.name)))


# --- item 5: one identity check for every reader --------------------------------------------
def test_a_hand_edited_hparams_json_is_refused_by_every_reader(tiny_run) -> None:
    from ticketlab.experiments.baselines import run_branch

    record = json.loads(tiny_run.hparams_path.read_text())
    record["hparams"]["train"]["lr"] = 0.5
    tiny_run.hparams_path.write_text(json.dumps(record))
    with pytest.raises(TicketlabError, match="does not match its own hparams.json"):
        run_branch(tiny_run, 1, "random", 0, QUIET, quiet())
    assert not (tiny_run.path / "branches").exists()
    root = str(tiny_run.path.parent)
    result = runner.invoke(app, ["show", tiny_run.path.name, "--root", root])
    assert result.exit_code == 2 and "does not match its own hparams.json" in result.output
    assert "Traceback" not in result.output
    listing = runner.invoke(app, ["runs", "--root", root])  # the listing flags it, and goes on
    assert listing.exit_code == 0 and "edited or renamed" in listing.output


def test_a_branch_whose_copy_of_the_run_hparams_was_edited_is_refused(tiny_run) -> None:
    from ticketlab.experiments.baselines import branch_path, run_branch

    run_branch(tiny_run, 1, "random", 0, QUIET, quiet())
    branch = Run(branch_path(tiny_run, "random", 1, 0))
    record = json.loads(branch.hparams_path.read_text())
    record["hparams"]["run_hparams"]["train"]["lr"] = 0.5
    branch.hparams_path.write_text(json.dumps(record))
    with pytest.raises(TicketlabError, match="copy of the IMP run's hparams differs"):
        branch.read_hparams()


# --- item 7: damaged metrics.json -----------------------------------------------------------
@pytest.mark.parametrize("edit", [{"score": "high"}, {"sparsity": float("nan")},
                                  {"checksums": ["x"]}, {"level": "1"},
                                  {"metrics": {"accuracy": "good"}}])
def test_a_metrics_json_with_wrong_types_is_a_damaged_level(tiny_run, edit, monkeypatch):
    path = tiny_run.level_dir(1) / "metrics.json"
    record = json.loads(path.read_text())
    record.update(edit)
    path.write_text(json.dumps(record))
    assert not tiny_run.level_done(1) and tiny_run.levels() == [0]
    assert "metrics.json is damaged" in tiny_run.damaged_levels()[1]
    root = str(tiny_run.path.parent)
    shown = runner.invoke(app, ["show", tiny_run.path.name, "--root", root])
    assert shown.exit_code == 0 and "metrics.json is damaged" in shown.output
    assert runner.invoke(app, ["runs", "--root", root]).exit_code == 0


def test_find_redoes_a_level_whose_metrics_json_was_damaged(tiny_run) -> None:
    import dataclasses

    from ticketlab.hparams import RunHparams

    path = tiny_run.level_dir(1) / "metrics.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "score": "high"}))
    hp = RunHparams.from_dict(tiny_run.read_hparams()["hparams"])
    hp = dataclasses.replace(hp, prune=dataclasses.replace(hp.prune, target_sparsity=0.1))
    find_ticket(hp, tiny_run.path.parent, QUIET, quiet())
    assert tiny_run.level_done(1)
    assert tiny_run.metrics(1)["score"] == good["score"]


# --- item 7: --root that cannot be written --------------------------------------------------
def test_unwritable_roots_are_refused_before_any_work(tmp_path, monkeypatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TicketlabError, match="is not a folder"):
        ensure_writable(a_file / "runs")
    with pytest.raises(TicketlabError, match="cannot be written"):
        ensure_writable(Path("/proc/ticketlab-runs"))

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(TicketlabError, match="read-only"):
        ensure_writable(tmp_path / "runs")
    with pytest.raises(TicketlabError, match="Cannot write a file at .*read-only"):
        atomic_write_bytes(tmp_path / "x.json", b"{}")


def test_find_with_an_unwritable_root_is_one_clear_error(tiny_bert_dir, glue_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for root in (a_file, Path("/proc/ticketlab-runs")):
        result = runner.invoke(app, ["find", "--task", "sst2", "--data-dir", str(glue_dir),
                                     "--model", str(tiny_bert_dir), "--root", str(root),
                                     "--max-train-samples", "8", "--no-progress"])
        assert result.exit_code == 2, result.output
        assert "Error:" in result.output and "Traceback" not in result.output
    assert a_file.read_text() == "x" and list(tmp_path.iterdir()) == [a_file]


# --- item 11: orphaned temp files -----------------------------------------------------------
def test_orphaned_temp_files_are_removed_under_the_lock_and_nothing_else(tiny_run) -> None:
    orphans = [tiny_run.path / ".hparams.json.ab12cd34.tmp",
               tiny_run.level_dir(1) / ".model.safetensors.zz_9k2m1.tmp"]
    keep = [tiny_run.path / "notes.txt", tiny_run.path / ".hidden.tmp",
            tiny_run.level_dir(1) / ".mask.safetensors.tmp"]
    for f in orphans + keep:
        f.write_bytes(b"x" * 1000)
    busy = tiny_run.path / "branches" / "random-level1-seed0"
    busy.mkdir(parents=True)
    (busy / ".metrics.json.ab12cd34.tmp").write_bytes(b"x")  # another lock's business
    with tiny_run.lock():
        pass
    assert not any(f.exists() for f in orphans)
    assert all(f.exists() for f in keep) and (busy / ".metrics.json.ab12cd34.tmp").exists()


# --- item 13: the umask ---------------------------------------------------------------------
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a" / "file.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "file.bin").stat().st_mode) == mode


def test_a_stored_run_is_readable_by_others_under_umask_022(tiny_run_template) -> None:
    files = [p for p in tiny_run_template.path.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044
                         for p in files if p.name != ".lock")


def test_list_runs_of_a_store_with_a_renamed_run(tiny_run) -> None:
    renamed = tiny_run.path.with_name("sst2-000000000000")
    tiny_run.path.rename(renamed)
    [run] = list_runs(renamed.parent)
    with pytest.raises(TicketlabError, match="folder was renamed"):
        run.read_hparams()
