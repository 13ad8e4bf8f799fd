"""Transfer between tasks: Figure 2.

Every source task's IMP mask at one sparsity (from the first seed's IMP run on that task), plus
one-shot magnitude pruning of θ0 (task-independent), is fine-tuned from θ0 on every target task
over seeds. The matrix holds *transfer − full model on the target*; a cell is dark when the
transfer is at least as good as the target's *own* IMP subnetwork at that sparsity (the
same-task score), and each row is labelled with its number of dark cells — the paper's layout.

Work is shared with the other experiments where the computation is literally the same: the
full model on a target with seed s is level 0 of that target's IMP run with seed s (when it
exists), and a task's own mask on itself with the first seed is that IMP run's level.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.errors import TicketlabError
from ticketlab.experiments.baselines import one_shot_mask
from ticketlab.experiments.common import Stats, level_of_sparsity, with_prune
from ticketlab.hparams import RunHparams, Runtime, stable_hash
from ticketlab.imp import find_ticket, finetune, finetune_run
from ticketlab.pruning import level_sparsity
from ticketlab.reports.figures import plot_transfer
from ticketlab.store import Run, atomic_write_bytes, atomic_write_json
from ticketlab.tasks import task_label

#: The row of one-shot magnitude pruning of θ0.
ONE_SHOT = "one-shot"

#: hparams of a task with a seed (each task may have its own data size, epochs, ...).
HparamsFor = Callable[[str, int], RunHparams]


def source_hparams(hp_for: HparamsFor, task: str, sparsity: float, seed: int
                   ) -> tuple[RunHparams, int]:
    """The IMP run of ``task`` that holds its mask at ``sparsity``, and that mask's level."""
    hp = hp_for(task, seed)
    level = level_of_sparsity(hp, sparsity)
    target = level_sparsity(level, hp.prune.rate, hp.prune.schedule)
    return with_prune(hp, target_sparsity=target), level


def source_mask(hp_for: HparamsFor, source: str, target: str, sparsity: float, seed: int,
                root: Path, runtime: Runtime = Runtime(), console: Console | None = None) -> Path:
    """The mask file of ``source`` at ``sparsity``: the IMP run's level (the run is continued
    up to that level when needed), or for :data:`ONE_SHOT` the magnitude mask of θ0."""
    if source == ONE_SHOT:
        return ensure_one_shot_mask(hp_for(target, seed), sparsity, root)
    hp, level = source_hparams(hp_for, source, sparsity, seed)
    run = Run(root / hp.run_id())
    if not run.level_done(level):
        run = find_ticket(hp, root, runtime, console or Console(quiet=True))
    return run.level_dir(level) / "mask.safetensors"


def one_shot_mask_path(hp: RunHparams, sparsity: float, root: Path) -> Path:
    """Where the one-shot mask of ``hp``'s model and prunable set lives (``root/_masks``)."""
    key = stable_hash({"model": hp.model.model, "sparsity": sparsity,
                       "method": hp.prune.method, "prune_pooler": hp.prune.prune_pooler,
                       "include": hp.prune.include, "exclude": hp.prune.exclude})
    return root / "_masks" / f"one-shot-{key}.safetensors"


def ensure_one_shot_mask(hp: RunHparams, sparsity: float, root: Path) -> Path:
    """Global magnitude pruning of θ0 (task-independent: the body is the same under any
    head), computed once. The mask carries θ0's fingerprint, so a fine-tune on changed model
    files refuses it."""
    from ticketlab.families import family_for
    from ticketlab.models import fingerprint, load_model, prunable_parameters

    path = one_shot_mask_path(hp, sparsity, root)
    if not path.is_file():
        family = family_for(hp.model.model)
        net = load_model(hp.model.model, family.default_head, num_labels=2,
                         trust_remote_code=hp.model.trust_remote_code)
        params = prunable_parameters(net, hp.prune.prune_pooler, hp.prune.include,
                                     hp.prune.exclude)
        mask = one_shot_mask(params, sparsity, hp.prune.method)
        mask.save(path, {"task": ONE_SHOT, "fingerprint": fingerprint(params),
                         "model": hp.model.model, "one_shot_sparsity": sparsity,
                         "family": family.name})
    return path


def stored_score(hp_for: HparamsFor, source: str | None, target: str, seed: int,
                 sparsity: float, seed0: int, root: Path, mask_path: Path | None
                 ) -> float | None:
    """A score the store already holds for this cell (IMP level or a finished fine-tune)."""
    hp = hp_for(target, seed)
    imp_run = Run(root / hp.run_id())
    if source is None and imp_run.level_done(0):
        return float(imp_run.metrics(0)["score"])
    if source == target and seed == seed0:
        src_hp, level = source_hparams(hp_for, source, sparsity, seed0)
        run = Run(root / src_hp.run_id())
        if run.level_done(level):
            return float(run.metrics(level)["score"])
    if mask_path is not None and not mask_path.is_file():
        return None
    run = finetune_run(hp, mask_path, root)
    return float(run.metrics(0)["score"]) if run.level_done(0) else None


def transfer_score(hp_for: HparamsFor, source: str | None, target: str, seed: int,
                   sparsity: float, seed0: int, root: Path, runtime: Runtime = Runtime(),
                   console: Console | None = None) -> float:
    """One cell: ``source``'s mask (None: the full model) fine-tuned on ``target`` with
    ``seed``; stored results are reused, missing ones trained (resumable)."""
    console = console or Console(quiet=True)
    mask_path = None if source is None else source_mask(hp_for, source, target, sparsity,
                                                        seed0, root, runtime, console)
    stored = stored_score(hp_for, source, target, seed, sparsity, seed0, root, mask_path)
    if stored is not None:
        return stored
    run = finetune(hp_for(target, seed), mask_path, root, runtime, console)
    return float(run.metrics(0)["score"])


@dataclass
class TransferResult:
    """The S×T transfer matrix with everything it is computed from."""

    sources: list[str]
    targets: list[str]
    sparsity: float
    seeds: list[int]
    transfer: dict[tuple[str, str], Stats] = field(default_factory=dict)
    full: dict[str, Stats] = field(default_factory=dict)
    same: dict[str, Stats] = field(default_factory=dict)

    def delta(self, source: str, target: str) -> float:
        """Transfer score minus the full model's score on the target (NaN when missing)."""
        if (source, target) not in self.transfer or target not in self.full:
            return math.nan
        return self.transfer[source, target].mean - self.full[target].mean

    def dark(self, source: str, target: str) -> bool:
        """The paper's dark cell: the transfer is at least the target's own IMP subnetwork."""
        if (source, target) not in self.transfer or target not in self.same:
            return False
        return self.transfer[source, target].mean >= self.same[target].mean

    def matrix(self) -> list[list[float]]:
        return [[self.delta(s, t) for t in self.targets] for s in self.sources]

    def dark_matrix(self) -> list[list[bool]]:
        return [[self.dark(s, t) for t in self.targets] for s in self.sources]

    def dark_counts(self) -> list[int]:
        return [sum(self.dark(s, t) for t in self.targets) for s in self.sources]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["source", "target", "sparsity", "transfer_mean", "transfer_std", "n",
                    "full_mean", "same_task_mean", "delta_vs_full", "dark"])
        for s in self.sources:
            for t in self.targets:
                st = self.transfer.get((s, t))
                full, same = self.full.get(t), self.same.get(t)
                w.writerow([s, t, self.sparsity, st.mean if st else "", st.std if st else "",
                            st.n if st else 0, full.mean if full else "",
                            same.mean if same else "",
                            "" if math.isnan(self.delta(s, t)) else self.delta(s, t),
                            int(self.dark(s, t))])
        return buf.getvalue()

    def matrix_csv(self) -> str:
        """The S×T matrix of (transfer − full) in points, rows = sources, with the dark count."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["source", *self.targets, "dark_cells"])
        for s, row, n in zip(self.sources, self.matrix(), self.dark_counts(), strict=True):
            w.writerow([s, *("" if math.isnan(v) else f"{v * 100:.2f}" for v in row), n])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"sources": self.sources, "targets": self.targets, "sparsity": self.sparsity,
                "seeds": self.seeds,
                "transfer": {f"{s}->{t}": v.to_dict() for (s, t), v in self.transfer.items()},
                "full": {t: v.to_dict() for t, v in self.full.items()},
                "same_task": {t: v.to_dict() for t, v in self.same.items()},
                "matrix_delta": self.matrix(), "dark": self.dark_matrix(),
                "dark_counts": self.dark_counts()}


def check_transfer(sources: Sequence[str], targets: Sequence[str], seeds: Sequence[int]) -> None:
    if not sources or not targets:
        raise TicketlabError("Transfer needs at least one source and one target task.",
                             "Pass e.g. --sources sst2,cola --targets sst2,cola.")
    if not seeds:
        raise TicketlabError("Transfer needs at least one seed.", "Pass --seeds 1 or more.")


def transfer_cells(sources: Sequence[str], targets: Sequence[str], seeds: Sequence[int],
                   one_shot: bool = True) -> list[tuple[str | None, str, int]]:
    """Every (source or None for the full model, target, seed) the matrix needs; the targets'
    own masks are always included (the same-task reference of the dark-cell rule)."""
    rows: list[str | None] = [None, *dict.fromkeys([*sources, *targets])]
    if one_shot:
        rows.append(ONE_SHOT)
    return [(src, tgt, seed) for tgt in targets for seed in seeds for src in rows]


def run_transfer(
    hp_for: HparamsFor,
    sources: Sequence[str],
    targets: Sequence[str],
    sparsity: float,
    seeds: Sequence[int],
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
    one_shot: bool = True,
) -> TransferResult:
    """Compute (or read) every cell, then the matrix."""
    check_transfer(sources, targets, seeds)
    console = console or Console()
    for task in dict.fromkeys([*sources, *targets]):  # validate every level before training
        source_hparams(hp_for, task, sparsity, seeds[0])
    for source, target, seed in transfer_cells(sources, targets, seeds, one_shot):
        console.rule(f"{source or 'full model'} → {target}, seed {seed}")
        transfer_score(hp_for, source, target, seed, sparsity, seeds[0], root, runtime, console)
    return collect_transfer(hp_for, sources, targets, sparsity, seeds, root, one_shot)


def collect_transfer(hp_for: HparamsFor, sources: Sequence[str], targets: Sequence[str],
                     sparsity: float, seeds: Sequence[int], root: Path, one_shot: bool = True
                     ) -> TransferResult:
    """The matrix from the store alone (cells not finished yet are left out)."""
    rows = [*sources, *([ONE_SHOT] if one_shot else [])]
    result = TransferResult(rows, list(targets), sparsity, list(seeds))
    masks: dict[str, Path | None] = {}
    for task in dict.fromkeys([*sources, *targets]):
        hp, level = source_hparams(hp_for, task, sparsity, seeds[0])
        masks[task] = Run(root / hp.run_id()).level_dir(level) / "mask.safetensors"

    def mask_of(source: str, target: str) -> Path | None:
        if source == ONE_SHOT:
            path = one_shot_mask_path(hp_for(target, seeds[0]), sparsity, root)
        else:
            path = masks[source]
        return path if path.is_file() else None

    def scores(source: str | None, target: str) -> list[float]:
        out = []
        for seed in seeds:
            path = None if source is None else mask_of(source, target)
            if source is not None and path is None:
                continue
            v = stored_score(hp_for, source, target, seed, sparsity, seeds[0], root, path)
            if v is not None:
                out.append(v)
        return out

    for target in targets:
        if full := scores(None, target):
            result.full[target] = Stats.of(full)
        if same := scores(target, target):
            result.same[target] = Stats.of(same)
        for source in rows:
            if values := scores(source, target):
                result.transfer[source, target] = Stats.of(values)
    return result


def write_transfer(result: TransferResult, out: Path) -> dict[str, Path]:
    """``transfer.csv`` (long), ``transfer_matrix.csv`` (S×T), ``transfer.json``,
    ``transfer.png`` (the heatmap)."""
    paths = {"csv": out / "transfer.csv", "matrix": out / "transfer_matrix.csv",
             "json": out / "transfer.json", "png": out / "transfer.png"}
    atomic_write_bytes(paths["csv"], result.to_csv().encode())
    atomic_write_bytes(paths["matrix"], result.matrix_csv().encode())
    atomic_write_json(paths["json"], result.to_dict())
    plot_transfer([task_label(s) for s in result.sources],
                  [task_label(t) for t in result.targets], result.matrix(),
                  result.dark_matrix(), result.sparsity, paths["png"])
    return paths
