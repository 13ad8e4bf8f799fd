"""Tables for the terminal: runs, levels, the prunable set, and the demo's summary."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ticketlab.errors import TicketlabError
from ticketlab.levels import roles_of
from ticketlab.models import MatrixStats
from ticketlab.store import Run

#: The matrix roles, in the order a BERT layer computes them (other families' roles after).
ROLE_ORDER = ("Q", "K", "V", "attn-out", "ffn-in", "ffn-out", "pooler", "other")


def level_records(run: Run) -> list[dict[str, Any]]:
    return [run.metrics(level) for level in run.levels()]


def within(records: list[dict[str, Any]], tolerance: float) -> list[bool]:
    """Which levels score within ``tolerance`` (a fraction: 0.01 = 1 point) of level 0.

    With a single seed this is the demo's "within 1 point" rule; the paper's matching rule needs
    the standard deviation over seeds.
    """
    if not records or records[0]["level"] != 0:
        return [False] * len(records)
    full = records[0]["score"]
    return [r["score"] >= full - tolerance for r in records]


def best_within(records: list[dict[str, Any]], tolerance: float) -> dict[str, Any] | None:
    ok = [r for r, w in zip(records, within(records, tolerance), strict=True) if w]
    return max(ok, key=lambda r: r["sparsity"]) if ok else None


def levels_table(records: list[dict[str, Any]], tolerance: float = 0.01,
                 title: str | None = None) -> Table:
    table = Table(title=title)
    metric = records[0]["main_metric"] if records else "score"
    for col in ("level", "sparsity", f"{metric} (%)", "Δ vs full", f"within {tolerance*100:g} pt",
                "pooler", "steps", "train s"):
        table.add_column(col, justify="right")
    full = records[0]["score"] if records and records[0]["level"] == 0 else None
    for rec, ok in zip(records, within(records, tolerance), strict=True):
        pooler = roles_of(rec).get("pooler")
        table.add_row(
            str(rec["level"]), f"{rec['sparsity'] * 100:.1f}%", f"{rec['score'] * 100:.2f}",
            "" if full is None or rec["level"] == 0 else f"{(rec['score'] - full) * 100:+.2f}",
            "full model" if rec["level"] == 0 else ("yes" if ok else "no"),
            "dense" if pooler is None else f"{pooler * 100:.0f}%",
            str(rec["train"]["steps"]), f"{rec['train']['seconds']:.0f}",
        )
    return table


def runs_table(runs: list[Run], tolerance: float = 0.01) -> Table:
    table = Table(title="ticketlab runs")
    for col in ("run", "kind", "task", "model", "levels", "sparsity reached", "full score",
                f"sparsest within {tolerance*100:g} pt"):
        table.add_column(col, no_wrap=col == "run")
    for run in runs:
        try:
            record = run.read_hparams()
        except TicketlabError as e:  # listed, not trusted: show says why
            table.add_row(run.path.name, "invalid", "-", "-", "-", "-", "-",
                          "hparams.json edited or renamed" if "does not match" in e.problem
                          else e.problem[:40])
            continue
        hp = record["hparams"]
        hp = hp.get("finetune", hp)
        records = level_records(run)
        best = best_within(records, tolerance)
        table.add_row(
            run.path.name, record.get("kind", "?"), hp["data"]["task"],
            hp["model"]["model"].rstrip("/").split("/")[-1], str(len(records)),
            f"{max(r['sparsity'] for r in records) * 100:.1f}%" if records else "-",
            f"{records[0]['score'] * 100:.2f}" if records else "-",
            f"level {best['level']} ({best['sparsity'] * 100:.0f}%)"
            if best and record.get("kind") == "imp" else "-",
        )
    return table


def matrices_table(record: dict[str, Any]) -> Table:
    table = Table(title=f"level {record['level']}: sparsity per matrix")
    table.add_column("matrix", no_wrap=True)
    table.add_column("sparsity", justify="right")
    for name, s in record["sparsity_by_matrix"].items():
        table.add_row(name, f"{s * 100:.1f}%")
    return table


def describe_table(stats: list[MatrixStats], at: dict[float, dict[str, float]]) -> Table:
    """The prunable set with magnitudes, and how much of each matrix one global ranking of θ0
    would remove at a few overall sparsities (``at``: sparsity -> name -> matrix sparsity)."""
    table = Table(title="prunable set")
    for col in ("matrix", "kind", "shape", "weights", "mean |w|", "std"):
        table.add_column(col, justify="left" if col in ("matrix", "kind") else "right",
                         no_wrap=col == "matrix")
    for s in at:
        table.add_column(f"global@{s:.0%}", justify="right")
    for r in stats:
        style = "bold red" if r.outlier else None
        table.add_row(r.name, r.role, "×".join(map(str, r.shape)), f"{r.numel:,}",
                      f"{r.mean_abs:.4f}", f"{r.std:.4f}",
                      *(f"{at[s][r.name] * 100:.0f}%" for s in at), style=style)
    return table
