"""SuperTickets against IMP at equal overall sparsity, on the same task and seeds.

For every seed: IMP (``ticketlab.imp.find_ticket``) to the target with its own rate and
per-level budget, and one SuperTickets run (:func:`~ticketlab.supertickets.search.
find_superticket`) — the score at the target, and what each cost in optimizer steps and
training time (CPU and wall, from the records; IMP's cost is every level up to the ticket's,
since each level's mask needs the one before) — and the full model fine-tuned once for as long
as the SuperTickets run, so that a ticket beating IMP's full model (trained one level's
budget) is not mistaken for a method effect when it is a longer training. Optionally a
transfer: both tickets' masks
fine-tuned once on a second task from θ0 (``ticketlab.imp.finetune``, with IMP's per-level
budget), beside that task's dense model; and the structured ticket's speed
(:mod:`.bench`). Everything lands in the run store and resumes; the table is rebuilt from
it. Rendering is plain Markdown/JSON here, self-contained.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.experiments.common import Stats, chance_score, level_of_sparsity
from ticketlab.hparams import RunHparams, Runtime, build_hparams
from ticketlab.store import atomic_write_bytes, atomic_write_json
from ticketlab.supertickets.hparams import SuperHparams


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What to compare. ``values`` are the flat training options (CLI or spec) of the
    SuperTickets run; IMP takes the same ones except its ``rate`` and per-level ``epochs``
    (``imp_rate``/``imp_epochs``; None: the same as the SuperTickets run's)."""

    task: str
    values: Mapping[str, Any]
    sp: SuperHparams
    seeds: tuple[int, ...]
    imp_rate: float | None = None
    imp_epochs: float | None = None
    transfer: str | None = None
    bench: bool = False

    def imp_values(self) -> dict[str, Any]:
        out = dict(self.values)
        if self.imp_rate is not None:
            out["rate"] = self.imp_rate
        if self.imp_epochs is not None:
            out["epochs"], out["max_steps"] = self.imp_epochs, None
        return out

    def super_hparams(self, seed: int) -> RunHparams:
        return build_hparams(self.task, {**self.values, "seed": seed})

    def imp_hparams(self, seed: int) -> RunHparams:
        return build_hparams(self.task, {**self.imp_values(), "seed": seed})

    def transfer_hparams(self, seed: int) -> RunHparams:
        assert self.transfer is not None
        return build_hparams(self.transfer, {**_no_pruning(self.imp_values()), "seed": seed},
                             prune=False)

    def dense_hparams(self, seed: int) -> RunHparams:
        """The full model fine-tuned once for as long as the SuperTickets run: whether the
        ticket beats the dense model is then not a matter of training steps."""
        return build_hparams(self.task, {**_no_pruning(self.values), "seed": seed},
                             prune=False)


def _no_pruning(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items()
            if k not in ("target_sparsity", "rate", "schedule", "method")}


def training_cost(records: list[dict[str, Any]]) -> dict[str, float]:
    """Optimizer steps and training seconds (CPU, wall) summed over ``records`` (levels or
    intervals); evaluation is counted apart."""
    return {"steps": sum(r["train"]["steps"] for r in records),
            "cpu_seconds": sum(r["train"].get("cpu_seconds", 0.0) for r in records),
            "seconds": sum(r["train"]["seconds"] for r in records),
            "eval_seconds": sum(r.get("eval_seconds", 0.0) for r in records)}


def compare(spec: Comparison, root: Path, runtime: Runtime, console: Console,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every cell of the comparison; returns the results (JSON-able)."""
    from ticketlab.imp import find_ticket, finetune
    from ticketlab.supertickets.search import find_superticket

    say = progress or (lambda text: console.print(text, highlight=False))
    seeds = list(spec.seeds)
    target = spec.super_hparams(seeds[0]).prune.target_sparsity
    level = level_of_sparsity(spec.imp_hparams(seeds[0]), target)
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        say(f"[bold]seed {seed}[/bold]: IMP to level {level} ({target:.0%})")
        imp_run = find_ticket(spec.imp_hparams(seed), root, runtime, console)
        imp_records = [imp_run.metrics(k) for k in range(level + 1)]
        say(f"[bold]seed {seed}[/bold]: SuperTickets to {target:.0%}")
        st_run = find_superticket(spec.super_hparams(seed), spec.sp, root, runtime, console)
        st_records = [st_run.metrics(k) for k in st_run.levels()]
        final = st_records[-1]
        say(f"[bold]seed {seed}[/bold]: the full model, trained as long")
        dense_run = finetune(spec.dense_hparams(seed), None, root, runtime, console)
        dense = dense_run.metrics(0)
        cell: dict[str, Any] = {
            "seed": seed,
            "full": {"score": imp_records[0]["score"], "run": imp_run.path.name,
                     "cost": training_cost(imp_records[:1])},
            "full_long": {"score": dense["score"], "run": dense_run.path.name,
                          "cost": training_cost([dense])},
            "imp": {"score": imp_records[level]["score"], "sparsity":
                    imp_records[level]["sparsity"], "level": level, "run": imp_run.path.name,
                    "cost": training_cost(imp_records)},
            "super": {"score": final["score"], "sparsity": final["sparsity"],
                      "structural_sparsity": final["structural_sparsity"],
                      "structure": final["structure"], "run": st_run.path.name,
                      "intervals": len(st_records), "cost": training_cost(st_records),
                      "best_score": max(r["score"] for r in st_records)},
        }
        if spec.transfer:
            t_hp = spec.transfer_hparams(seed)
            masks = {"full": None,
                     "imp": imp_run.level_dir(level) / "mask.safetensors",
                     "super": st_run.level_dir(final["level"]) / "mask.safetensors"}
            cell["transfer"] = {}
            for name, mask in masks.items():
                say(f"[bold]seed {seed}[/bold]: transfer to {spec.transfer} ({name})")
                done = finetune(t_hp, mask, root, runtime, console)
                rec = done.metrics(0)
                cell["transfer"][name] = {"score": rec["score"], "sparsity": rec["sparsity"],
                                          "run": done.path.name}
        per_seed.append(cell)
    results: dict[str, Any] = {
        "task": spec.task, "transfer": spec.transfer, "seeds": seeds, "target": target,
        "imp_level": level, "main_metric": imp_records[0]["main_metric"],
        "chance": chance_score(spec.imp_hparams(seeds[0])),
        "transfer_chance": chance_score(spec.transfer_hparams(seeds[0]))
        if spec.transfer else None,
        "settings": {"values": {k: v for k, v in spec.values.items() if v is not None},
                     "supertickets": dataclasses.asdict(spec.sp), "imp_rate": spec.imp_rate,
                     "imp_epochs": spec.imp_epochs},
        "per_seed": per_seed,
    }
    if spec.bench:
        from ticketlab.supertickets.bench import bench_superticket

        say("bench: the first seed's SuperTicket against IMP's ticket")
        first = per_seed[0]
        results["bench"] = bench_superticket(first["super"]["run"], root,
                                             imp=(first["imp"]["run"], level))
    return results


# --- the table --------------------------------------------------------------------------------
def _stats(values: list[float]) -> Stats:
    return Stats.of(values)


def _cost(cells: list[dict[str, Any]], key: str, what: str) -> str:
    """Mean cost over seeds (their spread is timing noise, not worth a ± column)."""
    return f"{_stats([c[key]['cost'][what] for c in cells]).mean:.0f}"


def markdown(results: dict[str, Any]) -> str:
    """The comparison as a Markdown report: the table, per-seed rows, transfer and speed."""
    cells = results["per_seed"]
    metric, target = results["main_metric"], results["target"]
    chance = results.get("chance")
    full = _stats([c["full"]["score"] for c in cells])
    long = _stats([c["full_long"]["score"] for c in cells])
    long_steps = cells[0]["full_long"]["cost"]["steps"]
    imp = _stats([c["imp"]["score"] for c in cells])
    sup = _stats([c["super"]["score"] for c in cells])
    s0 = cells[0]["super"]["structure"]
    heads, ffn = s0.get("head", {}), s0.get("neuron", {})
    n = len(cells)
    lines = [
        f"# SuperTickets vs IMP on {results['task']} at {target:.0%} sparsity",
        "",
        f"{metric} on the dev set, mean ± std over {n} seed(s) "
        f"({', '.join(map(str, results['seeds']))}); "
        f"cost (mean over seeds) = training only (evaluation apart), summed over IMP's levels 0–"
        f"{results['imp_level']} and over the SuperTickets run's intervals.",
        "",
        f"| | full model (IMP level 0) | full model, {long_steps} steps | IMP | "
        "SuperTicket |",
        "|---|---:|---:|---:|---:|",
        f"| {metric} (%) | {full.fmt()} | {long.fmt()} | {imp.fmt()} | {sup.fmt()} |",
        f"| sparsity of the prunable set | 0% | 0% | {cells[0]['imp']['sparsity']:.1%} | "
        f"{cells[0]['super']['sparsity']:.1%} (structure "
        f"{cells[0]['super']['structural_sparsity']:.1%}) |",
        f"| heads / FFN neurons kept (seed {cells[0]['seed']}) | all | all | all | "
        f"{heads.get('kept', '-')}/{heads.get('total', '-')} / "
        f"{ffn.get('kept', '-')}/{ffn.get('total', '-')} |",
        *(f"| {label} | {_cost(cells, 'full', what)} | {_cost(cells, 'full_long', what)} | "
          f"{_cost(cells, 'imp', what)} | {_cost(cells, 'super', what)} |"
          for label, what in (("optimizer steps", "steps"), ("training CPU s", "cpu_seconds"),
                              ("training wall s", "seconds"),
                              ("evaluation wall s", "eval_seconds"))),
    ]
    if chance is not None:
        lines.append(f"| majority class (chance) | {chance * 100:.1f} | | | |")
    if results.get("transfer"):
        t = [c["transfer"] for c in cells]
        tf = _stats([x["full"]["score"] for x in t])
        ti = _stats([x["imp"]["score"] for x in t])
        ts = _stats([x["super"]["score"] for x in t])
        lines.append(f"| transfer to {results['transfer']} (%) | {tf.fmt()} | | {ti.fmt()} | "
                     f"{ts.fmt()} |")
        tc = results.get("transfer_chance")
        if tc is not None:
            lines.append(f"| {results['transfer']} majority class | {tc * 100:.1f} | | | |")
    lines += ["", "Per seed:", "",
              "| seed | full | full, as long | IMP | SuperTicket | best interval | IMP steps | "
              "ST steps | IMP CPU s | ST CPU s | heads kept | neurons kept |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        st = c["super"]["structure"]
        lines.append(
            f"| {c['seed']} | {c['full']['score'] * 100:.2f} | "
            f"{c['full_long']['score'] * 100:.2f} | {c['imp']['score'] * 100:.2f} | "
            f"{c['super']['score'] * 100:.2f} | {c['super']['best_score'] * 100:.2f} | "
            f"{c['imp']['cost']['steps']} | {c['super']['cost']['steps']} | "
            f"{c['imp']['cost']['cpu_seconds']:.0f} | {c['super']['cost']['cpu_seconds']:.0f} | "
            f"{st.get('head', {}).get('kept', '-')} | {st.get('neuron', {}).get('kept', '-')} |")
    if results.get("transfer"):
        lines += ["", f"Transfer to {results['transfer']} (masks on θ0, one fine-tune each):",
                  "", "| seed | dense | IMP mask | SuperTicket mask |", "|---:|---:|---:|---:|"]
        for c in cells:
            t = c["transfer"]
            lines.append(f"| {c['seed']} | {t['full']['score'] * 100:.2f} | "
                         f"{t['imp']['score'] * 100:.2f} | {t['super']['score'] * 100:.2f} |")
    bench = results.get("bench")
    if bench:
        p = bench["parameters"]
        lines += ["", f"Speed (seed {cells[0]['seed']}'s SuperTicket; sequence "
                  f"{bench['rows'][0]['seq_len']}; best of interleaved calls; one thread: CPU "
                  f"time, more: wall time). Parameters: {p['full']:,} at full size, "
                  f"{p['structured']:,} structured ({p['structured'] / p['full']:.3f}x).", "",
                  "| threads | batch | dense ms | structured ms (speed-up) | structured + "
                  f"sparse ms (speed-up) | {bench['reference']} ms (speed-up) | max abs Δ logit |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in bench["rows"]:
            lines.append(
                f"| {r['threads']} | {r['batch']} | {r['dense_ms']:.1f} | "
                f"{r['structured_ms']:.1f} ({r['structured_speedup']:.2f}x) | "
                f"{r['structured+sparse_ms']:.1f} ({r['structured+sparse_speedup']:.2f}x) | "
                f"{r['reference_ms']:.1f} ({r['reference_speedup']:.2f}x) | "
                f"{r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``supertickets-<task>.json`` and ``.md`` in ``out`` (atomic writes)."""
    out = Path(out)
    stem = f"supertickets-{results['task']}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    atomic_write_json(js, json.loads(json.dumps(results, default=str)))
    atomic_write_bytes(md, markdown(results).encode())
    return js, md

