"""Experiment tracking: TensorBoard or W&B, one log per level of each run, inside the run.

Layout (``--report-to tensorboard``)::

    <run>/logs/level_K/events.out.tfevents.*     train/loss, train/lr every optimizer step;
                                                 eval/<metric>, sparsity/overall and
                                                 sparsity/<role> once, at the level's last step
    <run>/logs/level_K/<timestamp>/              the hparams (TensorBoard's HParams tab, and
                                                 hparams.yml)
    <run>/branches/<kind>-levelK-seedS/logs/level_K/   a baseline's own log

so ``tensorboard --logdir <run>/logs`` shows one line per level, ``--logdir <root>`` every run,
and two runs or two levels never write into the same folder. A level that is trained again
(after an interruption) starts its log afresh. With ``--report-to wandb`` each level is a W&B
run named ``<run id>/level_K`` in the group ``<run id>`` (project ``ticketlab``), with its
files under ``<run>/logs``.

Why not accelerate's ``Accelerator(log_with=...)``: its trackers belong to the process's one
Accelerator, so every run and level of a process shared one folder (``level_1``'s loss also
landed in ``level_0/``). The trackers here are accelerate's own tracker classes, opened and
closed by the level lifecycle (:func:`ticketlab.levels.run_level`), on the main process only.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ticketlab.errors import TicketlabError

#: Where a run's logs live, relative to its folder.
LOGS = "logs"
#: What TensorBoard and accelerate write into a level's log folder (the only names a fresh
#: start of the level removes).
_TB_FILES = ("events.out.tfevents.*", "hparams.yml")
W_AND_B_PROJECT = "ticketlab"


def level_log_dir(run_path: Path, level: int) -> Path:
    return Path(run_path) / LOGS / f"level_{level}"


def flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 2e-5}}`` -> ``{"train/lr": 2e-5}``, with values TensorBoard's
    HParams accept (numbers, strings, booleans): None and tuples become strings."""
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def check_report_to(report_to: str) -> None:
    """Refuse a tracker whose package is missing before anything runs."""
    if report_to not in ("none", "tensorboard", "wandb"):
        raise TicketlabError(f"Unknown --report-to {report_to!r}.",
                             "Use none, tensorboard or wandb.")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise TicketlabError(f"--report-to {report_to} needs the {report_to} package.",
                             f"Run: pip install {report_to}")


class LevelLog:
    """One level's tracker: ``log(values, step)`` while it trains, ``finish()`` at its end."""

    def __init__(self, tracker: Any, folder: Path) -> None:
        self.tracker, self.folder = tracker, folder

    def log(self, values: Mapping[str, float], step: int) -> None:
        self.tracker.log(dict(values), step=step)

    def log_level(self, record: Mapping[str, Any], step: int) -> None:
        """The level's results: every eval metric, the overall and per-role sparsity."""
        values = {f"eval/{k}": float(v) for k, v in record["metrics"].items() if v is not None}
        values["sparsity/overall"] = float(record["sparsity"])
        values.update({f"sparsity/{role}": float(s)
                       for role, s in record.get("sparsity_by_role", {}).items()})
        self.log(values, step)

    def finish(self) -> None:
        self.tracker.finish()


def _clear(folder: Path) -> None:
    """Remove an earlier attempt's event files (a level trained again starts afresh)."""
    if not folder.is_dir():
        return
    for pattern in _TB_FILES:
        for f in folder.rglob(pattern):
            if f.is_file() and not f.is_symlink():
                f.unlink()
    for d in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        if not any(d.iterdir()):
            d.rmdir()


def open_level_log(report_to: str, run_path: Path, level: int,
                   hparams: Mapping[str, Any]) -> LevelLog | None:
    """The tracker of level ``level`` of the run at ``run_path`` (None for ``none``), its
    ``hparams`` (nested, e.g. ``RunHparams.to_dict()``) stored once. Call on the main process."""
    if report_to == "none":
        return None
    check_report_to(report_to)
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    folder = level_log_dir(run_path, level)
    config = {"run": Path(run_path).name, "level": level, **flat_hparams(hparams)}
    tracker: Any
    if report_to == "tensorboard":
        _clear(folder)
        tracker = TensorBoardTracker(folder.name, folder.parent)
        tracker.start()
        tracker.store_init_configuration(config)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        run_id = Path(run_path).name
        tracker = WandBTracker(W_AND_B_PROJECT, name=f"{run_id}/level_{level}", group=run_id,
                               dir=str(folder), reinit=True)
        tracker.start()
        tracker.store_init_configuration(config)
    return LevelLog(tracker, folder)
