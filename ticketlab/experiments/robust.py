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
from rich.table import Table

from ticketlab.errors import TicketlabError
from ticketlab.experiments.common import Stats, level_of_sparsity, with_prune
from ticketlab.hparams import RunHparams, Runtime
from ticketlab.pruning import level_sparsity
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
                            "delta": None if ticket == "full" else self.delta(ticket, target),
                            "robust_score": None if r is None else r.mean,
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


def robust_transfer_table(result: RobustTransfer) -> Table:
    table = Table(title=f"{result.source} tickets at {result.sparsity:.0%} "
                        f"(vanilla vs {result.method}), transferred")
    for col in ("ticket", *result.targets):
        table.add_column(col, justify="right")
    for ticket in ("full", *TICKETS):
        cells = []
        for target in result.targets:
            s = result.scores.get((ticket, target))
            text = "-" if s is None else s.fmt(digits=2)
            if ticket != "full" and s is not None:
                text += f" ({result.delta(ticket, target) * 100:+.2f})"
            r = result.robust.get((ticket, target))
            if r is not None:
                text += f" / robust {r.fmt(digits=2)}"
            cells.append(text)
        table.add_row("full model" if ticket == "full" else ticket, *cells)
    return table


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
    atomic_write_bytes(paths["png"], _plot(result))
    return paths


def _plot(result: RobustTransfer) -> bytes:
    """Grouped bars: Δ vs the full model per target, vanilla beside robust (robust accuracy in
    a second panel when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [False] + ([True] if result.robust else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.6 * len(result.targets),
                                                      3.6), squeeze=False)
    width = 0.38
    for ax, robust in zip(axes[0], panels, strict=True):
        xs = range(len(result.targets))
        for k, ticket in enumerate(TICKETS):
            values = [result.delta(ticket, t, robust) * 100 for t in result.targets]
            ax.bar([x + (k - 0.5) * width for x in xs], values, width, label=ticket)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), result.targets)
        ax.set_ylabel(("robust " if robust else "") + "score − full model (points)")
        ax.legend()
    fig.suptitle(f"{result.source} tickets at {result.sparsity:.0%}, seeds {result.seeds}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
