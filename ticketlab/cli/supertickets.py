"""SuperTickets on the command line: ``supertickets`` (the search), ``supertickets-export``,
``supertickets-bench`` and ``supertickets-compare``.

The options come from the declarations as everywhere else: every training option of the core
sections (less IMP's rewinding) and every field of
:class:`~ticketlab.supertickets.hparams.SuperHparams`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ticketlab.cli.app import app, console, friendly, say
from ticketlab.cli.options import (
    ROOT_HELP,
    TRAINING,
    _wrap,
    make_runtime,
    parameters,
    resolve_root,
    runtime_parameters,
)
from ticketlab.errors import TicketlabError
from ticketlab.hparams import Runtime, build_hparams, build_section, dataclass_options, options
from ticketlab.supertickets.hparams import SuperHparams

PANEL = "SuperTickets"
SECTION = "supertickets"
#: IMP's rewinding options: a single training run has no use for them.
IMP_ONLY = ("rewind_step", "keep_trained_head")


def _core_specs() -> list[Any]:
    return [s for s in options(TRAINING).values() if s.key not in IMP_ONLY]


def with_super_options(extra_keys: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Every training option and SuperHparams option; the command receives ``values`` (the
    flat core options given, for :func:`~ticketlab.hparams.build_hparams`), ``sp``,
    ``runtime`` and ``root``."""
    core = _core_specs()
    own = list(dataclass_options(SuperHparams, SECTION).values())

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        extra = parameters(core) + parameters(own) + runtime_parameters()

        def body(opts: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            values = {s.key: opts[s.key] for s in core if opts.get(s.key) is not None}
            sp = build_section(SuperHparams, {s.key: opts[s.key] for s in own}, SECTION)
            return {"values": values, "sp": sp, "runtime": make_runtime(opts),
                    "root": resolve_root(opts["root"])}

        return _wrap(func, extra, ("values", "sp", "runtime", "root"), body)

    return decorate


@app.command(rich_help_panel=PANEL)
@with_super_options()
def supertickets(
    values: dict[str, Any],
    sp: SuperHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help="Task to search on (as `ticketlab find`)."),
) -> None:
    """SuperTickets: search heads/FFN neurons (or CNN channels) and prune weights in one run.

    Gates on every head and FFN neuron (MobileNetV2: every expansion channel, gated by its
    depthwise BatchNorm scale) under an L1 penalty; every --interval steps the lowest gates
    are removed (towards --head-target/--ffn-target, or --channel-target) and the weights
    pruned by global magnitude, --rate more each time, up to --target-sparsity. Resumable."""
    from ticketlab.supertickets.search import find_superticket

    hp = build_hparams(task, values)
    run = find_superticket(hp, sp, root, runtime, console)
    say("[green]done[/green]: {}  (ticketlab show {}; ticketlab supertickets-export {} --to "
        "DIR)", run.path, run.path.name, run.path.name)


@app.command("supertickets-export", rich_help_panel=PANEL)
@friendly
def supertickets_export(
    run: str = typer.Argument(..., help="SuperTickets run id (or unique prefix) or path."),
    to: Path = typer.Option(..., "--to", help="Output folder (new or empty, or an earlier "
                            "export of ticketlab's)."),
    level: int | None = typer.Option(None, help="Interval to export (default: the last, the "
                                     "SuperTicket)."),
    force: bool = typer.Option(False, help="Replace an earlier export in --to.", metavar=""),
    root: Path | None = typer.Option(None, help=ROOT_HELP),
) -> None:
    """Export a SuperTicket as a plain HF folder: FFN physically cut, removed heads (a CNN's
    removed channels) zero, the structure in ticket.json
    (ticketlab.supertickets.load_superticket deletes the zeros too)."""
    from ticketlab.hub import AUTO_CLASSES
    from ticketlab.supertickets.hparams import KIND_BY_NAME
    from ticketlab.supertickets.physical import export_superticket

    info = export_superticket(run, to, resolve_root(root), level=level, force=force)
    result = info["export"]
    verb = "already exported" if result.unchanged else "exported"
    kept = ", ".join(f"{info[k + '_kept']}/{info[k + '_total']} {k}"
                     for k in (KIND_BY_NAME[kind].plural for kind in info["kinds"]))
    width = f", FFN width {info['ffn_width']}" if "ffn_width" in info else ""
    say("[green]{}[/green] {} interval {} ({} sparse; {} kept{}) to {}", verb, info["run"],
        info["level"], f"{info['ticket_sparsity']:.1%}", kept, width, to)
    auto = AUTO_CLASSES.get(info.get("head", ""), "AutoModel")
    say("Load with transformers: {}.from_pretrained({!r}); at its smallest: "
        "ticketlab.supertickets.load_superticket({!r}).", auto, str(to), str(to))


@app.command("supertickets-bench", rich_help_panel=PANEL)
@friendly
def supertickets_bench(
    run: str = typer.Argument(..., help="SuperTickets run id (or unique prefix) or path."),
    imp: str | None = typer.Option(None, help="An IMP run to set beside it, as RUN:LEVEL."),
    batch_sizes: str = typer.Option("1,32", help="Batch sizes."),
    seq_len: int = typer.Option(128, help="Tokens per sequence (text models; an image model "
                                "is fed images of its run's size)."),
    threads: str | None = typer.Option(None, help="Thread counts (default: 1 and torch's)."),
    reps: int = typer.Option(5, help="Timed calls per variant (interleaved; best kept)."),
    root: Path | None = typer.Option(None, help=ROOT_HELP),
) -> None:
    """Time the SuperTicket dense at full size, physically smaller in plain PyTorch, and
    smaller on ticketlab's sparse kernels (and an IMP ticket on them), side by side."""
    from rich.table import Table

    from ticketlab.commands.ship import parse_int_list
    from ticketlab.supertickets.bench import bench_superticket

    if seq_len < 1 or reps < 1:
        raise TicketlabError("--seq-len and --reps must be at least 1.", "Pass positive values.")
    ref = None
    if imp is not None:
        name, _, lvl = imp.rpartition(":")
        if not name or not lvl.isdigit():
            raise TicketlabError(f"--imp {imp!r} is not RUN:LEVEL.", "Write e.g. --imp "
                                 "sst2-1a2b3c:2.")
        ref = (name, int(lvl))
    out = bench_superticket(run, resolve_root(root), imp=ref,
                            batch_sizes=tuple(parse_int_list([batch_sizes], [], "batch-sizes")),
                            seq_len=seq_len, reps=reps,
                            threads=tuple(parse_int_list([threads], [], "threads")) if threads
                            else None)
    table = Table(title=f"{out['run']} interval {out['level']} ({out['sparsity']:.1%} sparse)")
    for col in ("threads", "batch", "clock", "dense ms", "structured", "structured+sparse",
                out["reference"], "max |Δ logit|"):
        table.add_column(col, justify="right")
    for r in out["rows"]:
        table.add_row(str(r["threads"]), str(r["batch"]), r["clock"], f"{r['dense_ms']:.1f}",
                      f"{r['structured_ms']:.1f} ms ({r['structured_speedup']:.2f}x)",
                      f"{r['structured+sparse_ms']:.1f} ms "
                      f"({r['structured+sparse_speedup']:.2f}x)",
                      f"{r['reference_ms']:.1f} ms ({r['reference_speedup']:.2f}x)",
                      f"{r['max_abs_logit_diff']:.1e}")
    console.print(table)
    p = out["parameters"]
    say("parameters: {} at full size, {} structured ({}x)", f"{p['full']:,}",
        f"{p['structured']:,}", f"{p['structured'] / p['full']:.3f}")


@app.command("supertickets-compare", rich_help_panel=PANEL)
@with_super_options()
def supertickets_compare(
    values: dict[str, Any],
    sp: SuperHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help="Task both methods search on."),
    seeds: int = typer.Option(2, help="Seeds, counted from --seed.", rich_help_panel=PANEL),
    imp_rate: float | None = typer.Option(None, help="IMP's rate per level (default: --rate).",
                                          rich_help_panel=PANEL),
    imp_epochs: float | None = typer.Option(None, help="IMP's epochs per level, also the "
                                            "transfer fine-tunes' (default: the SuperTickets "
                                            "run's length).", rich_help_panel=PANEL),
    transfer_to: str | None = typer.Option(None, help="Second task the tickets' masks are "
                                           "fine-tuned on.", rich_help_panel=PANEL),
    bench: bool = typer.Option(False, help="Also time the first seed's structured ticket.",
                               rich_help_panel=PANEL, metavar=""),
    out: Path = typer.Option(Path("ticketlab-reports"), help="Folder for "
                             "supertickets-<task>.json/.md.", rich_help_panel=PANEL),
) -> None:
    """SuperTickets vs IMP at equal overall sparsity on the same task and seeds: score,
    training cost (steps, CPU and wall time), a transfer to a second task, and speed.
    Every cell is stored and resumes; the table is rebuilt from the store."""
    from ticketlab.experiments.common import seed_list
    from ticketlab.supertickets.compare import Comparison, compare, write_report

    first = int(values.get("seed") or 0)
    spec = Comparison(task=task, values=values, sp=sp, seeds=tuple(seed_list(first, seeds)),
                      imp_rate=imp_rate, imp_epochs=imp_epochs, transfer=transfer_to,
                      bench=bench)
    spec.super_hparams(first)  # every option checked before anything trains
    spec.imp_hparams(first)
    if transfer_to:
        spec.transfer_hparams(first)
    results = compare(spec, root, runtime, console)
    js, md = write_report(results, out)
    console.print(md.read_text(), highlight=False, markup=False)
    say("written: {} and {}", md, js)
