"""What every experiment shares: changing one hparam, training a mask from given weights, the
groups of IMP runs that differ only in their seed, and mean ± std over seeds.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.errors import TicketlabError
from ticketlab.hparams import RunHparams, stable_hash
from ticketlab.pruning import level_sparsity
from ticketlab.store import Run, list_runs


def quiet_console() -> Console:
    """A console that prints nothing (library calls, tests, Ray workers)."""
    return Console(quiet=True)


# --- hparams --------------------------------------------------------------------------------
def with_seed(hp: RunHparams, seed: int) -> RunHparams:
    """The same experiment with another seed (head init γ0, data order, dropout)."""
    return dataclasses.replace(hp, train=dataclasses.replace(hp.train, seed=seed))


def with_task(hp: RunHparams, task: str) -> RunHparams:
    return dataclasses.replace(hp, data=dataclasses.replace(hp.data, task=task))


def with_prune(hp: RunHparams, **changes: Any) -> RunHparams:
    return dataclasses.replace(hp, prune=dataclasses.replace(hp.prune, **changes))


def seed_list(first: int, count: int) -> list[int]:
    """``count`` consecutive seeds from ``first`` (the run's own seed comes first)."""
    if count < 1:
        raise TicketlabError(f"--seeds {count} must be at least 1.",
                             "The paper uses 5 seeds; use 1 for a quick look.")
    return list(range(first, first + count))


def level_of_sparsity(hp: RunHparams, sparsity: float, tolerance: float = 5e-3) -> int:
    """The IMP level whose schedule sparsity is ``sparsity`` (10 % of the original per level:
    level 7 is 70 %). Refused when no level is within ``tolerance``."""
    if not 0 < sparsity < 1:
        raise TicketlabError(f"Sparsity {sparsity} is outside (0, 1).", "Use e.g. 0.7.")
    candidates: list[tuple[float, int, float]] = []  # (distance, level, its sparsity)
    for level in range(1, 1001):
        s = level_sparsity(level, hp.prune.rate, hp.prune.schedule)
        if s >= 1.0:
            break
        candidates.append((abs(s - sparsity), level, s))
        if s > sparsity:
            break
    gap, best, near = min(candidates)
    if gap > tolerance:
        raise TicketlabError(
            f"No IMP level has sparsity {sparsity:.3f} with --rate {hp.prune.rate} and the "
            f"{hp.prune.schedule!r} schedule (the nearest is level {best} at {near:.3f}).",
            f"Ask for a sparsity the schedule reaches, e.g. {near:.3f}.",
        )
    return best


# --- mean ± std over seeds --------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """Mean and sample standard deviation of one quantity over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        """``85.3 ± 0.4`` (the std only where there are several seeds)."""
        from ticketlab.reports.tables import mean_std

        return mean_std(self, scale, digits)

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def chance_score(hp: RunHparams) -> float | None:
    """The main metric of a model that learned nothing: always the training set's most frequent
    label, scored on the first evaluation split. None where no constant prediction has a score
    (regression, span extraction, MLM) or the data cannot be read.

    Why: a full model stuck at this score (MiniLM-L6 on CoLA at a small budget: MCC 0) makes
    every subnetwork "matching" trivially; Table 2 shows the row so a reader can tell.
    """
    from collections import Counter

    import numpy as np

    from ticketlab.prepare import data_source, train_subset
    from ticketlab.tasks import get_task

    try:
        source = data_source(hp)
        task = get_task(hp.data.task, source)
        if task.head not in ("sequence-classification", "image-classification"):
            return None
        train = train_subset(task.load(source, task.train_split), hp.data)
        n_labels = task.num_labels(train)
        if n_labels < 2:
            return None
        majority = Counter(ex["label"] for ex in train).most_common(1)[0][0]
        split = next(iter(task.eval_splits))
        examples = task.load(source, split)[: hp.data.max_eval_samples or None]
        logits = np.zeros((len(examples), n_labels), dtype=np.float32)
        logits[:, majority] = 1.0
        metrics = task.compute_metrics({"logits": logits},
                                       {"labels": [ex["label"] for ex in examples]}, examples)
    except (TicketlabError, OSError, KeyError, ValueError):
        return None
    return float(metrics[task.main_metric])


# --- groups of seeded runs --------------------------------------------------------------------
def group_key(identity: dict[str, Any]) -> str:
    """Hash of a run's identity without its seed: the runs of one replicated experiment."""
    ident = {k: dict(v) if isinstance(v, dict) else v for k, v in identity.items()}
    ident["train"] = {k: v for k, v in ident["train"].items() if k != "seed"}
    return stable_hash(ident)


@dataclass
class SeedGroup:
    """IMP runs that differ only in their seed: one experiment over several seeds."""

    key: str
    task: str
    identity: dict[str, Any]
    runs: dict[int, Run]  # seed -> run

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)

    @property
    def reference(self) -> Run:
        """The first seed's run: baselines are branches of it, transfer uses its masks."""
        return self.runs[self.seeds[0]]

    @property
    def rewind_step(self) -> int:
        return int(self.identity["prune"]["rewind_step"])

    def level_scores(self, key: str = "score") -> dict[int, tuple[float, list[float]]]:
        """level -> (sparsity, one ``key`` per seed: ``score``, or ``robust_score`` under the
        evaluation attack), for levels every run has finished with that key."""
        per_run = [{lvl: run.metrics(lvl) for lvl in run.levels()} for run in self.runs.values()]
        common = set.intersection(*(set(d) for d in per_run)) if per_run else set()
        common = {lvl for lvl in common if all(key in d[lvl] for d in per_run)}
        return {lvl: (per_run[0][lvl]["sparsity"], [d[lvl][key] for d in per_run])
                for lvl in sorted(common)}

    def main_metric(self) -> str:
        return str(self.reference.read_hparams().get("main_metric", "score"))


def seed_groups(root: Path, task: str | None = None) -> list[SeedGroup]:
    """Every group of IMP runs in ``root`` (optionally of one task), largest groups first."""
    groups: dict[str, SeedGroup] = {}
    for run in list_runs(root):
        record = run.read_hparams()
        if record.get("kind") != "imp":
            continue
        ident = record["hparams"]
        run_task = ident["data"]["task"]
        if task is not None and run_task != task:
            continue
        key = group_key(ident)
        group = groups.setdefault(key, SeedGroup(key, run_task, ident, {}))
        group.runs[int(ident["train"]["seed"])] = run
    return sorted(groups.values(), key=lambda g: (g.task, -len(g.runs), g.key))


def group_of(hp: RunHparams, seeds: Sequence[int], root: Path) -> SeedGroup:
    """The group of ``hp``'s runs over ``seeds`` (only the runs that exist)."""
    runs = {s: Run(root / with_seed(hp, s).run_id()) for s in seeds}
    runs = {s: r for s, r in runs.items() if r.exists()}
    ident = json_identity(hp)
    return SeedGroup(group_key(ident), hp.data.task, ident, runs)


def json_identity(hp: RunHparams) -> dict[str, Any]:
    """``hp.identity()`` as it reads back from hparams.json (tuples become lists)."""
    import json

    return json.loads(json.dumps(hp.identity()))
