"""Safe files and safe failure: no pickle, no eval, atomic writes that survive a full disk."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest

import ticketlab
from ticketlab.errors import TicketlabError
from ticketlab.store import Run, atomic_write_bytes, atomic_write_json

PACKAGE = Path(ticketlab.__file__).parent


def test_package_has_no_pickle_eval_or_unsafe_torch_load() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bimport\s+pickle\b|\bpickle\.|\bcPickle\b|\bdill\b", code):
                offenders.append(f"{path.name}:{n}: pickle")
            if re.search(r"(?<![\w.])eval\(", code):
                offenders.append(f"{path.name}:{n}: eval(")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{n}: torch.load without weights_only=True")
            if re.search(r"trust_remote_code\s*=\s*True", code):
                offenders.append(f"{path.name}:{n}: trust_remote_code forced on")
    assert offenders == []


def test_trust_remote_code_is_off_by_default() -> None:
    from ticketlab.hparams import ModelHparams

    assert ModelHparams().trust_remote_code is False


def test_full_disk_gives_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"score": 1})

    monkeypatch.setattr("os.fdopen", lambda fd, mode: _FullFile(fd))
    with pytest.raises(TicketlabError, match="No space left"):
        atomic_write_bytes(target, b'{"score": 2}')
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"score": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


class _FullFile:
    """A file object whose writes fail like a full disk."""

    def __init__(self, fd: int) -> None:
        import os

        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_run_from_an_incompatible_store_version_is_refused(tmp_path) -> None:
    run = Run(tmp_path / "sst2-abc")
    run.path.mkdir()
    (run.path / "hparams.json").write_text(json.dumps({"format": 99, "hparams": {}}))
    with pytest.raises(TicketlabError, match="incompatible ticketlab store format"):
        run.read_hparams()


def test_hand_edited_hparams_json_is_refused(tmp_path) -> None:
    run = Run(tmp_path / "sst2-abc")
    run.path.mkdir()
    (run.path / "hparams.json").write_text("{not json")
    with pytest.raises(TicketlabError, match="not valid JSON"):
        run.read_hparams()


def test_nan_loss_stops_without_touching_stored_levels(tiny_hparams, tmp_path, monkeypatch):
    from rich.console import Console

    import ticketlab.imp as imp
    import ticketlab.levels as levels
    from ticketlab.train import Runtime

    quiet = Console(file=open("/dev/null", "w"))  # noqa: SIM115
    hp = tiny_hparams(target_sparsity=0.1)
    run = imp.find_ticket(hp, tmp_path, Runtime(progress=False), quiet)
    stored = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    real_train = levels.train

    def poisoned(model, *args, **kwargs):
        import torch

        with torch.no_grad():
            model.classifier.weight.fill_(float("nan"))
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(levels, "train", poisoned)
    with pytest.raises(TicketlabError, match=r"loss became nan at step 1 \(learning rate"):
        imp.find_ticket(tiny_hparams(target_sparsity=0.2), tmp_path, Runtime(progress=False),
                        quiet)
    for path, blob in stored.items():
        assert path.read_bytes() == blob
    assert run.levels() == [0, 1]
