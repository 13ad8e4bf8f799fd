"""Tables: for the terminal (fitted to its width), for scripts (JSON, CSV), and Table 2.

A :class:`Table` is a list of *records* (plain values: fractions, counts, names) and the
:class:`Column` s that show them. The same records are what ``--json`` prints and ``--csv``
writes, so a script reads the numbers a person sees, unrounded.

Why tables are fitted here instead of by rich: rich shrinks every column of a table that is
wider than the terminal, so at 80 columns (or when the output is piped, where the width is 80)
each number became "…". :meth:`Table.to_rich` instead gives every number its full width, lets
the free-text columns (a model path, a matrix name) wrap, and leaves out the least useful
columns — named in the caption — until the rest fits.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rich.cells import cell_len
from rich.table import Table as RichTable

from ticketlab.errors import TicketlabError
from ticketlab.store import roles_of
from ticketlab.tasks import task_label


# --- numbers ----------------------------------------------------------------------------------
class MeanStd(Protocol):
    """Mean and sample std over seeds (:class:`ticketlab.experiments.common.Stats`)."""

    mean: float
    std: float
    n: int


def mean_std(s: MeanStd, scale: float = 100.0, digits: int = 1) -> str:
    """``85.3 ± 0.4`` (the std only where there are several seeds)."""
    if s.n > 1:
        return f"{s.mean * scale:.{digits}f} ± {s.std * scale:.{digits}f}"
    return f"{s.mean * scale:.{digits}f}"


def stats_dict(s: MeanStd) -> dict[str, float]:
    return {"mean": s.mean, "std": s.std, "n": s.n}


def pct(digits: int = 1) -> Callable[[Any], str]:
    """A fraction as a percentage (``0.7`` -> ``70.0%``); None -> empty."""
    return lambda v: "" if v is None else f"{v * 100:.{digits}f}%"


def points(digits: int = 2, signed: bool = False) -> Callable[[Any], str]:
    """A score fraction in points (``0.8512`` -> ``85.12``); None -> empty."""
    sign = "+" if signed else ""
    return lambda v: "" if v is None else f"{v * 100:{sign}.{digits}f}"


def fixed(spec: str, suffix: str = "") -> Callable[[Any], str]:
    """A number with a format spec (``fixed(".1f", "x")``); None -> ``–``."""
    return lambda v: "–" if v is None else f"{v:{spec}}{suffix}"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


# --- tables -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One column: the record ``key`` it shows, its ``header``, how a value reads (``fmt``).

    ``wrap``: free text that may fold onto several lines when the terminal is narrow (numbers
    and ids never do). ``drop``: 0 = always shown; when the terminal is too narrow the column
    with the highest ``drop`` is left out first.
    """

    key: str
    header: str
    fmt: Callable[[Any], str] = _text
    align: str = "right"
    wrap: bool = False
    drop: int = 0


#: Narrowest a wrapped column gets before columns are dropped instead; only when nothing is
#: left to drop does it shrink further, down to WRAP_FLOOR.
WRAP_MIN, WRAP_FLOOR = 24, 8
#: Per column: one space of padding each side and one border; plus the table's left edge.
_PADDING, _BORDER = 2, 1


@dataclass
class Table:
    """Records and the columns that show them; rendered for the terminal, JSON or CSV."""

    columns: list[Column]
    records: list[dict[str, Any]] = field(default_factory=list)
    title: str | None = None
    styles: list[str | None] = field(default_factory=list)

    def add(self, record: dict[str, Any], style: str | None = None) -> None:
        self.records.append(record)
        self.styles.append(style)

    def cells(self) -> list[list[str]]:
        return [[c.fmt(r.get(c.key)) for c in self.columns] for r in self.records]

    def layout(self, width: int) -> tuple[list[int], dict[int, int]]:
        """Which columns fit in ``width`` terminal cells, and each one's content width."""
        rows = self.cells()
        natural, minimum = [], []
        for i, col in enumerate(self.columns):
            body = max((cell_len(r[i]) for r in rows), default=0)
            head_word = max((cell_len(w) for w in col.header.split()), default=0)
            natural.append(max(body, cell_len(col.header), 1))
            minimum.append(min(natural[-1], WRAP_MIN) if col.wrap else max(body, head_word, 1))

        def need(cols: list[int], widths: Sequence[int]) -> int:
            return sum(widths[i] + _PADDING + _BORDER for i in cols) + _BORDER

        visible = list(range(len(self.columns)))
        droppable = sorted((i for i, c in enumerate(self.columns) if c.drop > 0),
                           key=lambda i: (-self.columns[i].drop, -i))
        while need(visible, minimum) > width and droppable:
            visible.remove(droppable.pop(0))
        for i in visible:  # nothing left to drop: the free text wraps tighter
            if self.columns[i].wrap and need(visible, minimum) > width:
                minimum[i] = max(min(natural[i], WRAP_FLOOR),
                                 minimum[i] - (need(visible, minimum) - width))
        widths = {i: minimum[i] for i in visible}
        spare = width - need(visible, minimum)
        # Headers unwrapped first, then the free text gets what is left.
        for group in ([i for i in visible if not self.columns[i].wrap],
                      [i for i in visible if self.columns[i].wrap]):
            for i in group:
                grow = max(0, min(spare, natural[i] - widths[i]))
                widths[i] += grow
                spare -= grow
        return visible, widths

    def to_rich(self, width: int) -> RichTable:
        """The table for a terminal ``width`` cells wide; columns left out are named."""
        visible, widths = self.layout(width)
        dropped = [c.header for i, c in enumerate(self.columns) if i not in visible]
        caption = None
        if dropped:
            caption = (f"left out to fit {width} columns: {', '.join(dropped)} "
                       "(a wider terminal or --json shows them)")
        table = RichTable(title=self.title, caption=caption, caption_justify="left")
        for i in visible:
            col = self.columns[i]
            table.add_column(col.header, justify=col.align,  # type: ignore[arg-type]
                             width=widths[i], overflow="fold")
        styles = self.styles + [None] * (len(self.records) - len(self.styles))
        for row, style in zip(self.cells(), styles, strict=True):
            table.add_row(*(row[i] for i in visible), style=style)
        return table

    def to_json(self) -> str:
        return json.dumps(self.records, indent=2, default=_jsonable)

    def to_csv(self) -> str:
        """Every key of the records (the columns' first), nested values as JSON."""
        keys = list(dict.fromkeys([c.key for c in self.columns]
                                  + [k for r in self.records for k in r]))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for r in self.records:
            w.writerow([_csv_value(r.get(k)) for k in keys])
        return buf.getvalue()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    return str(value)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_jsonable)
    return value


# --- runs and levels --------------------------------------------------------------------------
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
    """Every finished level of a run against its full model (level 0)."""
    metric = records[0]["main_metric"] if records else "score"
    yes_no = {True: "yes", False: "no", None: "full model"}
    robust = any("robust_score" in r for r in records)  # scored under --eval-attack
    robust_columns = [Column("robust_score", f"robust {metric} (%)", points()),
                      Column("robust_delta", "robust Δ", points(signed=True))] if robust else []
    table = Table([
        Column("level", "level"),
        Column("sparsity", "sparsity", pct()),
        Column("score", f"{metric} (%)", points()),
        Column("delta", "Δ vs full", points(signed=True)),
        *robust_columns,
        Column("within", f"within {tolerance * 100:g} pt", lambda v: yes_no[v]),
        Column("pooler_sparsity", "pooler", lambda v: "dense" if v is None else f"{v:.0%}",
               drop=1),
        Column("steps", "steps", drop=2),
        Column("train_seconds", "train s", fixed(".0f"), drop=3),
    ], title=title)
    full = records[0]["score"] if records and records[0]["level"] == 0 else None
    robust_full = records[0].get("robust_score") if full is not None else None
    for rec, ok in zip(records, within(records, tolerance), strict=True):
        first = rec["level"] == 0
        rob = rec.get("robust_score")
        table.add({
            "level": rec["level"], "sparsity": rec["sparsity"], "score": rec["score"],
            "main_metric": rec.get("main_metric"),
            "delta": None if full is None or first else rec["score"] - full,
            **({"robust_score": rob,
                "robust_delta": None if rob is None or robust_full is None or first
                else rob - robust_full} if robust else {}),
            "within": None if first else ok,
            "pooler_sparsity": roles_of(rec).get("pooler"),
            "steps": rec["train"]["steps"], "train_seconds": rec["train"]["seconds"],
        })
    return table


def run_record(run: Any, tolerance: float = 0.01) -> dict[str, Any]:
    """One run as ``runs --json`` lists it (``run`` is a :class:`ticketlab.store.Run`)."""
    base = {"run": run.path.name, "path": str(run.path)}
    try:
        record = run.read_hparams()
    except TicketlabError as e:  # listed, not trusted: show says why
        problem = ("hparams.json edited or renamed" if "does not match" in e.problem
                   else e.problem)
        return {**base, "kind": "invalid", "problem": problem}
    hp = record["hparams"]
    hp = hp.get("finetune", hp)
    records = run.records()
    best = best_within(records, tolerance) if record.get("kind") == "imp" else None
    return {
        **base, "kind": record.get("kind", "?"), "task": hp["data"]["task"],
        "model": hp["model"]["model"].rstrip("/").split("/")[-1],
        "levels": [r["level"] for r in records],
        "sparsity_reached": max((r["sparsity"] for r in records), default=None),
        "main_metric": records[0].get("main_metric") if records else None,
        "full_score": records[0]["score"] if records and records[0]["level"] == 0 else None,
        "best_level": best["level"] if best else None,
        "best_sparsity": best["sparsity"] if best else None,
    }


def runs_table(runs: Sequence[Any], tolerance: float = 0.01) -> Table:
    """Every stored run: what it is, how far it got, its sparsest level close to the full
    model."""
    def best(r: dict[str, Any]) -> str:
        if r.get("kind") == "invalid":
            return str(r.get("problem", ""))[:40]
        if r.get("best_level") is None:
            return "-"
        return f"level {r['best_level']} ({r['best_sparsity'] * 100:.0f}%)"

    table = Table([
        Column("run", "run", align="left"),
        Column("kind", "kind", align="left", drop=2),
        Column("task", "task", lambda v: v or "-", align="left"),
        Column("model", "model", lambda v: v or "-", align="left", wrap=True, drop=1),
        Column("levels", "levels", lambda v: "-" if v is None else str(len(v)), drop=3),
        Column("sparsity_reached", "sparsity reached", lambda v: "-" if v is None else
               f"{v * 100:.1f}%"),
        Column("full_score", "full score", lambda v: "-" if v is None else f"{v * 100:.2f}"),
        Column("best", f"sparsest within {tolerance * 100:g} pt", align="left"),
    ], title="ticketlab runs")
    for run in runs:
        rec = run_record(run, tolerance)
        table.add({**rec, "best": best(rec)})
    return table


def matrices_table(record: dict[str, Any]) -> Table:
    """A level's sparsity per prunable matrix."""
    table = Table([Column("matrix", "matrix", align="left", wrap=True),
                   Column("sparsity", "sparsity", pct())],
                  title=f"level {record['level']}: sparsity per matrix")
    for name, s in record["sparsity_by_matrix"].items():
        table.add({"matrix": name, "sparsity": s})
    return table


class MatrixInfo(Protocol):
    """What :func:`describe_table` reads of one matrix (:class:`ticketlab.models.MatrixStats`)."""

    name: str
    role: str
    shape: tuple[int, ...]
    numel: int
    mean_abs: float
    std: float
    outlier: bool


def describe_table(stats: Sequence[MatrixInfo], at: dict[float, dict[str, float]]) -> Table:
    """The prunable set with magnitudes, and how much of each matrix one global ranking of θ0
    would remove at a few overall sparsities (``at``: sparsity -> name -> matrix sparsity)."""
    columns = [
        Column("name", "matrix", align="left", wrap=True),
        Column("role", "kind", align="left"),
        Column("shape", "shape", lambda v: "×".join(map(str, v)), drop=2),
        Column("numel", "weights", lambda v: f"{v:,}", drop=1),
        Column("mean_abs", "mean |w|", fixed(".4f")),
        Column("std", "std", fixed(".4f"), drop=3),
        *(Column(f"global_{s:g}", f"global @{s:.0%}", pct(0)) for s in at),
    ]
    table = Table(columns, title="prunable set")
    for r in stats:
        table.add({"name": r.name, "role": r.role, "shape": list(r.shape), "numel": r.numel,
                   "mean_abs": r.mean_abs, "std": r.std, "outlier": r.outlier,
                   **{f"global_{s:g}": at[s][r.name] for s in at}},
                  style="bold red" if r.outlier else None)
    return table


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """``bench``: dense against accelerated, one record per (threads, batch)."""
    table = Table([
        Column("threads", "threads"),
        Column("batch", "batch"),
        Column("dense_ms", "dense ms", fixed(".1f")),
        Column("accel_ms", "accel ms", fixed(".1f")),
        Column("dense_seq_per_s", "dense seq/s", fixed(".1f"), drop=4),
        Column("accel_seq_per_s", "accel seq/s", fixed(".1f"), drop=4),
        Column("speedup", "speed-up", fixed(".2f", "x")),
        Column("cpu_speedup", "CPU-time speed-up", fixed(".2f", "x"), drop=1),
        Column("sparse_layers", "sparse layers", drop=2),
        Column("max_abs_logit_diff", "max |Δ logit|", fixed(".1e"), drop=3),
    ], title=title)
    for r in rows:
        table.add(r)
    return table


# --- experiments ------------------------------------------------------------------------------
def matching_table(summary: Mapping[str, Any]) -> Table:
    """Every level over seeds (a ``MatchingSummary.to_dict()``), for the terminal."""
    table = Table([Column("level", "level"), Column("sparsity", "sparsity", pct()),
                   Column("score", "mean ± std"), Column("matching", "matching"),
                   Column("strictly", "strictly")],
                  title=f"{summary['task']}: {summary['metric']} over seeds {summary['seeds']}")

    def fmt(s: Mapping[str, Any]) -> str:
        return mean_std(_Stats(s["mean"], s["std"], s["n"]), digits=2)

    table.add({"level": 0, "sparsity": 0.0, "score": fmt(summary["full"]),
               "matching": "full model", "strictly": ""})
    for s in summary["levels"]:
        table.add({"level": s["level"], "sparsity": s["sparsity"], "score": fmt(s),
                   "matching": "yes" if s["matching"] else "no",
                   "strictly": "yes" if s["strictly_matching"] else "no"})
    return table


@dataclass(frozen=True)
class _Stats:
    mean: float
    std: float
    n: int


def transfer_cell(delta: float, dark: bool) -> str:
    """One cell of the transfer matrix: transfer − full model in points, ■ when dark."""
    return "–" if math.isnan(delta) else f"{delta * 100:+.1f}" + (" ■" if dark else "")


def transfer_table(result: Mapping[str, Any], labels: Callable[[str], str] = str) -> Table:
    """The transfer matrix (a ``TransferResult.to_dict()``) for the terminal: transfer − full
    model in points, dark cells marked ■, the dark count on the right."""
    targets = result["targets"]
    columns = [Column("source", "source \\ target", labels, align="left"),
               *(Column(t, labels(t)) for t in targets), Column("dark_cells", "■")]
    table = Table(columns, title=f"transfer at {result['sparsity']:.0%} sparsity: score − "
                                 "full model (points; ■ = at least the target's own IMP "
                                 "subnetwork)")
    for source, row, dark, n in zip(result["sources"], result["matrix_delta"], result["dark"],
                                    result["dark_counts"], strict=True):
        table.add({"source": source, "dark_cells": n,
                   **{t: transfer_cell(v, d) for t, v, d in zip(targets, row, dark,
                                                                strict=True)}})
    return table


def robust_transfer_table(result: Mapping[str, Any]) -> Table:
    """Vanilla against robust tickets transferred (a ``RobustTransfer.to_dict()``): per target
    the score (Δ vs the full model) and, when measured, the robust score."""
    targets = result["targets"]
    table = Table([Column("ticket", "ticket"), *(Column(t, t) for t in targets)],
                  title=f"{result['source']} tickets at {result['sparsity']:.0%} (vanilla vs "
                        f"{result['source_method']}), transferred")
    rows = {(r["ticket"], r["target"]): r for r in result["rows"]}
    for ticket in dict.fromkeys(r["ticket"] for r in result["rows"]):
        cells: dict[str, Any] = {"ticket": "full model" if ticket == "full" else ticket}
        for target in targets:
            r = rows.get((ticket, target))
            if r is None or r["score"] is None:
                cells[target] = "-"
                continue
            text = mean_std(_Stats(r["score"], r["std"], r["n"]), digits=2)
            if r["delta"] is not None:
                text += f" ({r['delta'] * 100:+.2f})"
            if r["robust_score"] is not None:
                text += " / robust " + mean_std(_Stats(r["robust_score"], r["robust_std"],
                                                       r["n"]), digits=2)
            cells[target] = text
        table.add(cells)
    return table


# --- Table 2 ----------------------------------------------------------------------------------
class LevelScore(Protocol):
    """An IMP level over seeds (:class:`ticketlab.experiments.matching.LevelSummary`)."""

    level: int
    sparsity: float
    stats: MeanStd


@dataclass
class Table2Column:
    """One task's column of Table 2: the full model, IMP at its highest (strictly) matching
    sparsity, the baselines found at ``level``, and the majority-class score."""

    task: str
    metric: str
    seeds: list[int]
    full: MeanStd
    imp: LevelScore | None  # the highest matching level
    strict: LevelScore | None
    level: int  # where the baselines were looked up
    baselines: dict[str, MeanStd] = field(default_factory=dict)
    chance: float | None = None  # the majority-class score
    #: Baseline kind -> its row label, in the table's row order (kinds not named: their key).
    labels: dict[str, str] = field(default_factory=dict)
    #: Under --eval-attack: the full model's robust score, the highest robust-matching level
    #: (on robust scores) and the highest double-win level (matching on both; Double-Win LTH).
    robust_full: MeanStd | None = None
    robust_matching: LevelScore | None = None
    double_win: LevelScore | None = None

    @property
    def at_chance(self) -> bool:
        """The full model is no better than predicting the majority class: matching is vacuous."""
        return self.chance is not None and self.full.mean <= self.chance + 1e-9

    @property
    def title(self) -> str:
        return task_label(self.task)


def table2_rows(columns: Sequence[Table2Column]) -> list[tuple[str, list[str]]]:
    """(row name, one cell per task) for every row of Table 2."""
    labels: dict[str, str] = {}
    for c in columns:
        labels.update({k: v for k, v in c.labels.items() if k not in labels})
    kinds = [k for k in [*labels, *(k for c in columns for k in c.baselines)]
             if any(k in c.baselines for c in columns)]

    def pct_of(level: LevelScore | None) -> str:
        return "–" if level is None else f"{level.sparsity * 100:.0f}%"

    rows = [
        ("Full model", [mean_std(c.full) + (" (at chance)" if c.at_chance else "")
                        for c in columns]),
        ("Majority class (chance)", ["–" if c.chance is None else f"{c.chance * 100:.1f}"
                                     for c in columns]),
        ("Highest matching sparsity", [pct_of(c.imp) for c in columns]),
        ("IMP subnetwork at that sparsity",
         [mean_std(c.imp.stats) if c.imp else "–" for c in columns]),
        ("Highest strictly matching sparsity", [pct_of(c.strict) for c in columns]),
    ]
    if any(c.robust_full is not None for c in columns):
        rows += [
            ("Full model, robust", ["–" if c.robust_full is None else mean_std(c.robust_full)
                                    for c in columns]),
            ("Highest robust-matching sparsity",
             ["–" if c.robust_full is None else pct_of(c.robust_matching) for c in columns]),
            ("Highest double-win sparsity",
             ["–" if c.robust_full is None else pct_of(c.double_win) for c in columns]),
        ]
    for kind in dict.fromkeys(kinds):
        rows.append((labels.get(kind, kind),
                     [mean_std(c.baselines[kind]) if kind in c.baselines else "–"
                      for c in columns]))
    return rows


def table2_headers(columns: Sequence[Table2Column]) -> list[str]:
    return [f"{c.title} ({c.metric}, {len(c.seeds)} seed{'s' if len(c.seeds) > 1 else ''})"
            for c in columns]


def table2_notes(columns: Sequence[Table2Column]) -> list[str]:
    """What a reader must know to read the table: where no level matches, where the full
    model is at chance."""
    notes = []
    unmatched = [c.title for c in columns if c.imp is None]
    if unmatched:
        notes.append(f"No pruned level matches the full model for {', '.join(unmatched)}; "
                     "their baselines are at level 1.")
    vacuous = [c.title for c in columns if c.at_chance]
    if vacuous:
        notes.append(f"The full model of {', '.join(vacuous)} scores no better than always "
                     "predicting the majority class, so every subnetwork there is \"matching\" "
                     "trivially: train it longer before reading its column.")
    return notes


def table2_markdown(columns: Sequence[Table2Column]) -> str:
    """Table 2 as a Markdown table (scores in points, mean ± sample std over seeds)."""
    if not columns:
        return "_No finished IMP runs._\n"
    lines = ["| | " + " | ".join(table2_headers(columns)) + " |",
             "|---|" + "---:|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in table2_rows(columns)]
    text = "\n".join(lines) + "\n"
    for note in table2_notes(columns):
        text += "\n" + note + "\n"
    return text


def table2_csv(columns: Sequence[Table2Column]) -> str:
    """Table 2 in long form: one row per (task, entry), with mean, std and the seed count."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "metric", "entry", "level", "sparsity", "mean", "std", "n"])
    for c in columns:
        w.writerow([c.task, c.metric, "full", 0, 0.0, c.full.mean, c.full.std, c.full.n])
        if c.chance is not None:
            w.writerow([c.task, c.metric, "majority-class", "", "", c.chance, 0.0, 1])
        for entry, s in (("imp", c.imp), ("imp-strict", c.strict)):
            if s is not None:
                w.writerow([c.task, c.metric, entry, s.level, s.sparsity, s.stats.mean,
                            s.stats.std, s.stats.n])
        if c.robust_full is not None:
            w.writerow([c.task, c.metric, "full-robust", 0, 0.0, c.robust_full.mean,
                        c.robust_full.std, c.robust_full.n])
        for entry, s in (("imp-robust-matching", c.robust_matching),
                         ("imp-double-win", c.double_win)):
            if s is not None:
                w.writerow([c.task, c.metric, entry, s.level, s.sparsity, s.stats.mean,
                            s.stats.std, s.stats.n])
        sparsity = c.imp.sparsity if c.imp is not None else ""
        for kind, st in c.baselines.items():
            w.writerow([c.task, c.metric, kind, c.level, sparsity, st.mean, st.std, st.n])
    return buf.getvalue()


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"),
                 ("#", r"\#"), ("±", r"$\pm$"), ("θ0''", r"$\theta_0''$"),
                 ("θ0'", r"$\theta_0'$"), ("–", "--")):
        text = text.replace(a, b)
    return text


def table2_latex(columns: Sequence[Table2Column]) -> str:
    """Table 2 as a booktabs ``tabular``."""
    head = " & ".join(["", *(_latex_escape(h) for h in table2_headers(columns))]) + r" \\"
    body = [" & ".join([_latex_escape(name), *(_latex_escape(c) for c in cells)]) + r" \\"
            for name, cells in table2_rows(columns)]
    return "\n".join([r"\begin{tabular}{l" + "c" * len(columns) + "}", r"\toprule", head,
                      r"\midrule", *body, r"\bottomrule", r"\end{tabular}", ""])


def table2_records(columns: Sequence[Table2Column]) -> list[dict[str, Any]]:
    """Table 2 as JSON-able records (``table2.json``, ``table --format json``)."""
    def level(s: LevelScore | None) -> dict[str, Any] | None:
        return None if s is None else {"level": s.level, "sparsity": s.sparsity,
                                       **stats_dict(s.stats)}

    return [{"task": c.task, "metric": c.metric, "seeds": c.seeds, "full": stats_dict(c.full),
             "majority_class": c.chance, "full_at_chance": c.at_chance,
             "highest_matching": level(c.imp), "highest_strictly_matching": level(c.strict),
             "baseline_level": c.level,
             "baselines": {k: stats_dict(v) for k, v in c.baselines.items()},
             **({"full_robust": stats_dict(c.robust_full),
                 "highest_robust_matching": level(c.robust_matching),
                 "highest_double_win": level(c.double_win)} if c.robust_full is not None
                else {})}
            for c in columns]


TABLE2_FORMATS: dict[str, Callable[[Sequence[Table2Column]], str]] = {
    "markdown": table2_markdown, "csv": table2_csv, "latex": table2_latex,
    "json": lambda columns: json.dumps(table2_records(columns), indent=2) + "\n",
}
