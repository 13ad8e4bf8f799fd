"""Robust tickets transfer better? Vanilla vs adversarially found tickets, transferred.

*Robust Tickets Can Transfer Better* (DAC 2023) compares, at one sparsity, the IMP ticket of a
source task found with standard training against the one found with adversarial training
(``--adversarial pgd`` during the search), each transferred by fine-tuning on every target task;
*Double-Win Lottery Tickets* (ICML 2022) adds robust accuracy and adversarial fine-tuning on the
target side. Here both are one experiment: the source is searched twice (the shared options
with the source method switched off, and on), each mask is fine-tuned on every target with the
targets' options (standard fine-tuning unless ``--adversarial`` is given: adversarial transfer),
over seeds, beside the full model fine-tuned the same way; with ``--eval-attack`` every cell
also carries its robust accuracy. Every piece is an ordinary IMP run or fine-tune in the store,
so the experiment resumes like the others.
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
from ticketlab.experiments.common import Stats, level_of_sparsity, with_prune
from ticketlab.hparams import RunHparams, Runtime
from ticketlab.pruning import level_sparsity
from ticketlab.reports.figures import plot_robust_transfer
from ticketlab.store import atomic_write_bytes, atomic_write_json

#: The two tickets compared.
TICKETS = ("vanilla", "robust")

HparamsFor = Callable[[str, int], RunHparams]


@dataclass
class RobustTransfer:
    """Scores of the vanilla and robust tickets of one source on every target."""

    source: str
    targets: list[str]
    sparsity: float
    seeds: list[int]
    method: str
    #: (ticket or "full", target) -> stats of the main score / of the robust score
    scores: dict[tuple[str, str], Stats] = field(default_factory=dict)
    robust: dict[tuple[str, str], Stats] = field(default_factory=dict)

    def delta(self, ticket: str, target: str, robust: bool = False) -> float:
        table = self.robust if robust else self.scores
        if (ticket, target) not in table or ("full", target) not in table:
            return math.nan
        return table[ticket, target].mean - table["full", target].mean

    def rows(self) -> list[dict[str, Any]]:
        """One row per (ticket, target): mean, std, Δ vs the full model, robust likewise."""
        out = []
        for ticket in ("full", *TICKETS):
            for target in self.targets:
                s = self.scores.get((ticket, target))
                r = self.robust.get((ticket, target))
                out.append({"ticket": ticket, "target": target,
                            "score": None if s is None else s.mean,
                            "std": None if s is None else s.std,
                            "n": 0 if s is None else s.n,
                            "delta": None if ticket == "full" else self.delta(ticket, target),
                            "robust_score": None if r is None else r.mean,
                            "robust_std": None if r is None else r.std,
                            "robust_delta": None if ticket == "full" or r is None
                            else self.delta(ticket, target, robust=True)})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "targets": self.targets, "sparsity": self.sparsity,
                "seeds": self.seeds, "source_method": self.method, "rows": self.rows()}


def source_runs(vanilla: RunHparams, robust: RunHparams, sparsity: float
                ) -> dict[str, RunHparams]:
    """The two source searches (the same options built with the source method off and on),
    each run up to the level at ``sparsity``."""
    level = level_of_sparsity(vanilla, sparsity)
    target = level_sparsity(level, vanilla.prune.rate, vanilla.prune.schedule)
    if robust.train.adversarial == "none":
        raise TicketlabError("The robust source search needs an adversarial training method.",
                             "Pass --source-adversarial pgd (or fgsm-rs, freelb).")
    return {"vanilla": with_prune(vanilla, target_sparsity=target),
            "robust": with_prune(robust, target_sparsity=target)}


def run_robust_transfer(
    hp_for: HparamsFor,
    source_hparams: dict[str, RunHparams],
    source: str,
    targets: Sequence[str],
    sparsity: float,
    seeds: Sequence[int],
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
) -> RobustTransfer:
    """Search both source tickets, fine-tune each (and the full model) on every target."""
    from ticketlab.imp import find_ticket, finetune

    console = console or Console(quiet=True)
    robust_hp = source_hparams["robust"]
    level = level_of_sparsity(robust_hp, sparsity)
    result = RobustTransfer(source, list(targets), sparsity, list(seeds),
                            robust_hp.train.adversarial)
    masks: dict[str, Path | None] = {"full": None}
    for ticket in TICKETS:
        console.rule(f"{source}: {ticket} ticket search")
        run = find_ticket(source_hparams[ticket], root, runtime, console)
        masks[ticket] = run.level_dir(level) / "mask.safetensors"
    for target in targets:
        for ticket, mask in masks.items():
            scores, robust = [], []
            for seed in seeds:
                console.rule(f"{ticket} → {target} seed {seed}")
                rec = finetune(hp_for(target, seed), mask, root, runtime, console).metrics(0)
                scores.append(rec["score"])
                if "robust_score" in rec:
                    robust.append(rec["robust_score"])
            result.scores[ticket, target] = Stats.of(scores)
            if robust:
                result.robust[ticket, target] = Stats.of(robust)
    return result


def write_robust_transfer(result: RobustTransfer, out: Path) -> dict[str, Path]:
    """robust_transfer.{csv,json,png} in ``out``."""
    paths = {"csv": out / "robust_transfer.csv", "json": out / "robust_transfer.json",
             "png": out / "robust_transfer.png"}
    rows = result.rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    atomic_write_json(paths["json"], result.to_dict())
    plot_robust_transfer(result.targets, {t: [result.delta(t, g) for g in result.targets]
                                          for t in TICKETS},
                         {t: [result.delta(t, g, robust=True) for g in result.targets]
                          for t in TICKETS} if result.robust else None,
                         f"{result.source} tickets at {result.sparsity:.0%}, seeds "
                         f"{result.seeds}", paths["png"])
    return paths
