"""Rewinding: IMP that resets the survivors to θ_i, the weights after i steps of training the
full model, instead of θ0 — for a sweep of i given as fractions of a level's training steps.

Every rewind point is its own group of IMP runs (``--rewind-step i``); each run's level 0 is the
same full-model training (it is where θ_i is snapshotted), so the matching rule compares every
point with the same full model. The plot shows the highest matching sparsity and the score at
one fixed sparsity against i.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.errors import TicketlabError
from ticketlab.experiments.common import Stats, group_of, level_of_sparsity, with_prune, with_seed
from ticketlab.experiments.matching import summarize_group
from ticketlab.hparams import RunHparams
from ticketlab.imp import find_ticket
from ticketlab.prepare import data_source
from ticketlab.reports.figures import plot_rewinding
from ticketlab.store import atomic_write_bytes, atomic_write_json
from ticketlab.tasks import get_task, task_label
from ticketlab.train import Runtime, planned_steps

#: The paper's rewind points, as fractions of the training steps.
DEFAULT_FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5)


def train_size(hp: RunHparams) -> int:
    """How many training examples a run of ``hp`` sees (the split, capped by the limit)."""
    source = data_source(hp)
    task = get_task(hp.data.task, source)
    n = len(task.load(source, task.train_split))
    return min(n, hp.data.max_train_samples) if hp.data.max_train_samples else n


def rewind_step(hp: RunHparams, fraction: float, n_train: int) -> int:
    """The step i for ``fraction`` of a level's training steps (at least 1 when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise TicketlabError(f"Rewind fraction {fraction} is outside [0, 1).",
                             "Use fractions of the training steps such as 0, 0.01, 0.05, 0.1.")
    steps = planned_steps(n_train, hp.train)
    step = max(1, round(fraction * steps)) if fraction > 0 else 0
    if step >= steps:
        raise TicketlabError(
            f"Rewind fraction {fraction} is step {step}, not below the {steps} training steps.",
            "Use a smaller fraction.")
    return step


def rewind_hparams(hp: RunHparams, fraction: float, n_train: int) -> RunHparams:
    return with_prune(hp, rewind_step=rewind_step(hp, fraction, n_train))


@dataclass
class RewindPoint:
    fraction: float
    step: int
    seeds: list[int]
    highest_matching: float | None  # sparsity; None: no pruned level matches (or no data)
    score_at: Stats | None  # at the fixed sparsity, when finished

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "step": self.step, "seeds": self.seeds,
                "highest_matching_sparsity": self.highest_matching,
                "score_at_sparsity": self.score_at.to_dict() if self.score_at else None}


def collect_rewinding(hp: RunHparams, fractions: Sequence[float], seeds: Sequence[int],
                      root: Path, sparsity: float | None = None, n_train: int | None = None
                      ) -> list[RewindPoint]:
    """The sweep's points from the store (unfinished levels are left out)."""
    n_train = train_size(hp) if n_train is None else n_train
    level = level_of_sparsity(hp, sparsity) if sparsity else None
    points = []
    for fraction in fractions:
        hp_f = rewind_hparams(hp, fraction, n_train)
        summary = summarize_group(group_of(hp_f, seeds, root))
        highest = score = None
        if summary is not None:
            highest = summary.highest.sparsity if summary.highest else None
            at = [s for s in summary.levels if s.level == level]
            score = at[0].stats if at else None
        points.append(RewindPoint(fraction, hp_f.prune.rewind_step, list(seeds), highest, score))
    return points


def run_rewinding(hp: RunHparams, fractions: Sequence[float], seeds: Sequence[int], root: Path,
                  runtime: Runtime = Runtime(), console: Console | None = None,
                  sparsity: float | None = None) -> list[RewindPoint]:
    """IMP for every rewind point and seed (each run resumable), then the points."""
    console = console or Console()
    n_train = train_size(hp)
    runs = [rewind_hparams(hp, f, n_train) for f in fractions]  # validate all first
    if sparsity:
        level_of_sparsity(hp, sparsity)
    for hp_f in runs:
        for seed in seeds:
            console.rule(f"{hp.data.task}: rewind to step {hp_f.prune.rewind_step}, seed {seed}")
            find_ticket(with_seed(hp_f, seed), root, runtime, console)
    return collect_rewinding(hp, fractions, seeds, root, sparsity, n_train)


def write_rewinding(task: str, points: Sequence[RewindPoint], sparsity: float | None,
                    out: Path) -> dict[str, Path]:
    """``rewinding.csv``, ``rewinding.json`` and ``rewinding.png`` into ``out``."""
    paths = {"csv": out / "rewinding.csv", "json": out / "rewinding.json",
             "png": out / "rewinding.png"}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "fraction", "rewind_step", "highest_matching_sparsity",
                "score_sparsity", "score_mean", "score_std", "n"])
    for p in points:
        s = p.score_at
        w.writerow([task, p.fraction, p.step,
                    "" if p.highest_matching is None else p.highest_matching,
                    sparsity or "", s.mean if s else "", s.std if s else "", s.n if s else 0])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    atomic_write_json(paths["json"], {"task": task, "sparsity": sparsity,
                                      "points": [p.to_dict() for p in points]})
    plot_rewinding(f"{task_label(task)}: rewinding to θ_i", points, sparsity, paths["png"])
    return paths
