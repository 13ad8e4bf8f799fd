"""Matching subnetworks over seeds, and Table 2.

The paper's definitions (Section 3): a subnetwork is *matching* when its score, averaged over
seeds, is within one standard deviation of the full model's mean score; *strictly matching*
when it is at least the full model's mean. Table 2 reports, per task, the full model, IMP at the
highest sparsity that is matching, and the baselines at that same sparsity.

Here the seeds are whole IMP runs (``--seed s`` for each s): every level of every seed is an
independent search-and-train, so the spread includes the variance of the mask itself. The
baselines are branches of the first seed's run (see :mod:`.baselines`), over the same seeds.
The std is the sample standard deviation (n - 1); with one seed it is 0 and "matching" reduces
to "at least the full model's score".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.experiments.baselines import KIND_LABELS, branch_records, run_branch
from ticketlab.experiments.common import (
    SeedGroup,
    Stats,
    chance_score,
    group_of,
    seed_groups,
    with_seed,
)
from ticketlab.hparams import RunHparams
from ticketlab.imp import find_ticket
from ticketlab.reports.figures import plot_curves
from ticketlab.reports.tables import (
    Table2Column,
    table2_csv,
    table2_latex,
    table2_markdown,
    table2_records,
)
from ticketlab.store import atomic_write_bytes, atomic_write_json
from ticketlab.tasks import task_label
from ticketlab.train import Runtime


def is_matching(level: Stats, full: Stats) -> bool:
    """Matching: the mean is within one std of the full model's mean (or above it)."""
    return level.mean >= full.mean - full.std


def is_strictly_matching(level: Stats, full: Stats) -> bool:
    """Strictly matching: the mean is at least the full model's mean."""
    return level.mean >= full.mean


@dataclass(frozen=True)
class LevelSummary:
    level: int
    sparsity: float
    stats: Stats
    matching: bool
    strictly: bool


@dataclass
class MatchingSummary:
    """One task's IMP levels over seeds, judged against its full model (level 0)."""

    task: str
    metric: str
    seeds: list[int]
    full: Stats
    levels: list[LevelSummary]  # the pruned levels (1, 2, ...)

    @property
    def highest(self) -> LevelSummary | None:
        """The sparsest matching level (None when no pruned level matches)."""
        ok = [s for s in self.levels if s.matching]
        return max(ok, key=lambda s: s.sparsity) if ok else None

    @property
    def highest_strict(self) -> LevelSummary | None:
        ok = [s for s in self.levels if s.strictly]
        return max(ok, key=lambda s: s.sparsity) if ok else None

    def to_dict(self) -> dict[str, Any]:
        def level(s: LevelSummary | None) -> dict[str, Any] | None:
            return None if s is None else {"level": s.level, "sparsity": s.sparsity,
                                           **s.stats.to_dict(), "matching": s.matching,
                                           "strictly_matching": s.strictly}

        return {"task": self.task, "metric": self.metric, "seeds": self.seeds,
                "full": self.full.to_dict(), "levels": [level(s) for s in self.levels],
                "highest_matching": level(self.highest),
                "highest_strictly_matching": level(self.highest_strict)}


def summarize(task: str, metric: str, seeds: Sequence[int],
              scores: dict[int, tuple[float, list[float]]]) -> MatchingSummary:
    """Apply the matching rule to ``level -> (sparsity, scores over seeds)``; level 0 is the
    full model and must be present."""
    if 0 not in scores:
        raise ValueError("level 0 (the full model) is needed to judge matching")
    full = Stats.of(scores[0][1])
    levels = []
    for level in sorted(scores):
        if level == 0:
            continue
        sparsity, values = scores[level]
        stats = Stats.of(values)
        levels.append(LevelSummary(level, sparsity, stats, is_matching(stats, full),
                                   is_strictly_matching(stats, full)))
    return MatchingSummary(task, metric, list(seeds), full, levels)


def summarize_group(group: SeedGroup, key: str = "score") -> MatchingSummary | None:
    """The matching summary of a group of seeded runs on ``key`` (``score``; ``robust_score``
    for robust accuracy) — None until every seed has level 0 with that key."""
    scores = group.level_scores(key)
    if 0 not in scores:
        return None
    metric = group.main_metric()
    return summarize(group.task, metric if key == "score" else f"robust {metric}",
                     group.seeds, scores)


@dataclass
class DoubleWin:
    """Double-Win matching (Double-Win LTH, ICML 2022): a level is double-win when it is
    matching on standard AND on robust accuracy, each within one std of the full model's."""

    standard: MatchingSummary
    robust: MatchingSummary

    @property
    def levels(self) -> list[int]:
        robust = {s.level: s for s in self.robust.levels}
        return [s.level for s in self.standard.levels
                if s.matching and s.level in robust and robust[s.level].matching]

    @property
    def highest(self) -> LevelSummary | None:
        """The sparsest double-win level (its standard-accuracy summary)."""
        wins = set(self.levels)
        ok = [s for s in self.standard.levels if s.level in wins]
        return max(ok, key=lambda s: s.sparsity) if ok else None

    def to_dict(self) -> dict[str, Any]:
        best = self.highest
        return {"standard": self.standard.to_dict(), "robust": self.robust.to_dict(),
                "double_win_levels": self.levels,
                "highest_double_win": None if best is None else
                {"level": best.level, "sparsity": best.sparsity}}


def double_win(group: SeedGroup) -> DoubleWin | None:
    """The Double-Win summary of a group whose runs were scored under an evaluation attack
    (``--eval-attack``); None when they were not."""
    standard, robust = summarize_group(group), summarize_group(group, "robust_score")
    if standard is None or robust is None:
        return None
    return DoubleWin(standard, robust)


def run_matching(
    hp: RunHparams,
    seeds: Sequence[int],
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
    baselines: Sequence[str] = (),
) -> tuple[MatchingSummary, SeedGroup]:
    """IMP over ``seeds`` (each resumable), the matching summary, and the ``baselines`` at the
    highest matching level (level 1 when no pruned level matches) over the same seeds."""
    console = console or Console()
    for seed in seeds:
        console.rule(f"{hp.data.task}: IMP seed {seed}")
        find_ticket(with_seed(hp, seed), root, runtime, console)
    group = group_of(hp, seeds, root)
    summary = summarize_group(group)
    assert summary is not None  # every seed has just finished level 0
    level = baseline_level(summary)
    for kind in baselines:
        for seed in seeds:
            run_branch(group.reference, level, kind, seed, runtime, console)
    return summary, group


def baseline_level(summary: MatchingSummary) -> int:
    """Where the baselines go: IMP's highest matching level, else the first pruned level."""
    best = summary.highest
    return best.level if best is not None else 1


# --- Table 2 --------------------------------------------------------------------------------
def table2_column(group: SeedGroup) -> Table2Column | None:
    summary = summarize_group(group)
    if summary is None:
        return None
    level = baseline_level(summary)
    found: dict[str, list[float]] = {}
    for rec in branch_records(group.reference):
        if rec["level"] == level and rec["branch"]["seed"] in group.runs:
            found.setdefault(rec["branch"]["kind"], []).append(rec["score"])
    baselines = {k: Stats.of(v) for k, v in found.items()}
    hp = RunHparams.from_dict(group.reference.read_hparams()["hparams"])
    wins = double_win(group)
    return Table2Column(group.task, summary.metric, summary.seeds, summary.full,
                        summary.highest, summary.highest_strict, level, baselines,
                        chance_score(hp), labels=dict(KIND_LABELS),
                        robust_full=None if wins is None else wins.robust.full,
                        robust_matching=None if wins is None else wins.robust.highest,
                        double_win=None if wins is None else wins.highest)


def table2_columns(root: Path, tasks: Sequence[str] | None = None, rewind_step: int = 0,
                   console: Console | None = None) -> list[Table2Column]:
    """One column per task from the store: the group of IMP runs with the most seeds (ties:
    the first by hash) among those that rewind to ``rewind_step``; other groups are named."""
    chosen: dict[str, SeedGroup] = {}
    for group in seed_groups(root):
        if group.rewind_step != rewind_step or (tasks and group.task not in tasks):
            continue
        if group.task in chosen:
            if console is not None:
                console.print(f"[dim]{group.task}: also found runs {group.key} over seeds "
                              f"{group.seeds}; the table uses {chosen[group.task].key}.[/dim]")
            continue
        chosen[group.task] = group
    order = list(tasks) if tasks else sorted(chosen)
    columns = [table2_column(chosen[t]) for t in order if t in chosen]
    return [c for c in columns if c is not None]


def write_table2(columns: Sequence[Table2Column], out: Path) -> dict[str, Path]:
    """Write ``table2.md``, ``table2.csv``, ``table2.tex`` and ``table2.json`` into ``out``."""
    paths = {fmt: out / f"table2.{fmt}" for fmt in ("md", "csv", "tex", "json")}
    atomic_write_bytes(paths["md"], table2_markdown(columns).encode())
    atomic_write_bytes(paths["csv"], table2_csv(columns).encode())
    atomic_write_bytes(paths["tex"], table2_latex(columns).encode())
    atomic_write_json(paths["json"], table2_records(columns))
    return paths


# --- sparsity-score curves --------------------------------------------------------------------
def curve_series(group: SeedGroup, key: str = "score"
                 ) -> tuple[Stats, dict[str, list[tuple[float, Stats]]]] | None:
    """IMP's score (``key``: ``score``, or ``robust_score`` under --eval-attack) at every level
    and each baseline's at the levels it was run, mean ± std over seeds (None until every seed
    has its full model scored that way)."""
    summary = summarize_group(group, key)
    if summary is None:
        return None
    series: dict[str, list[tuple[float, Stats]]] = {
        "IMP": [(s.sparsity, s.stats) for s in summary.levels]}
    found: dict[tuple[str, int], tuple[float, list[float]]] = {}
    for rec in branch_records(group.reference):
        if rec["branch"]["seed"] in group.runs and key in rec:
            cell = (rec["branch"]["kind"], rec["level"])
            found.setdefault(cell, (rec["sparsity"], []))[1].append(rec[key])
    for kind in KIND_LABELS:
        points = [(sp, Stats.of(v)) for (k, _), (sp, v) in sorted(found.items()) if k == kind]
        if points:
            series[KIND_LABELS[kind]] = points
    return summary.full, series


def write_curves(group: SeedGroup, out: Path) -> Path | None:
    """``curves_<task>.png``: score against sparsity for IMP and every baseline found (and,
    for runs scored under --eval-attack, robust score in a second panel)."""
    data = curve_series(group)
    if data is None:
        return None
    full, series = data
    path = out / f"curves_{group.task}.png"
    plot_curves(f"{task_label(group.task)}: score against sparsity "
                f"({len(group.seeds)} seed{'s' if len(group.seeds) > 1 else ''})",
                group.main_metric(), full, series, path,
                robust=curve_series(group, "robust_score"))
    return path
