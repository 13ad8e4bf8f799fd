"""The core commands: ``find``, ``finetune``, ``demo``, ``runs``, ``show``, ``describe``.

Each is a thin shell: options come from the hparams declarations (:mod:`.options`), the work
from the library (:mod:`ticketlab.imp`), the tables from :mod:`ticketlab.reports.tables`;
``runs``, ``show`` and ``describe`` also print ``--json`` (and ``--csv``) for scripts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ticketlab.cli.app import app, console, friendly, say
from ticketlab.cli.options import ROOT_HELP, resolve_root, with_options
from ticketlab.cli.output import csv_option, json_option, output_format, print_json, print_table
from ticketlab.errors import TicketlabError
from ticketlab.hparams import RunHparams, Runtime

TASK_HELP = ("GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), squad, mlm, or "
             "csv/json for your own data; images: cifar10, cifar100, cifar10-animals, "
             "cifar10-vehicles, imagefolder.")


@app.command()
@with_options(prune=True)
def find(
    hp: RunHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help=TASK_HELP),
) -> None:
    """Find a ticket: IMP with rewinding up to --target-sparsity. Resumes if interrupted."""
    from ticketlab.imp import find_ticket

    run = find_ticket(hp, root, runtime, console)
    say("[green]done[/green]: {}  (ticketlab show {})", run.path, run.path.name)


@app.command()
@with_options(prune=False)
def finetune(
    hp: RunHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help="Task to fine-tune on (the transfer target)."),
    mask: Path | None = typer.Option(None, help="A mask.safetensors (from any task's run); "
                                        "none = the full model."),
    allow_different_weights: bool = typer.Option(False, help="Accept a mask found on other "
                                                 "pre-trained weights.", metavar=""),
) -> None:
    """Fine-tune the subnetwork m⊙θ0 on --task (a transfer when the mask comes from elsewhere)."""
    from ticketlab.imp import finetune as run_finetune

    run = run_finetune(hp, mask, root, runtime, console, allow_different_weights)
    say("[green]done[/green]: {}", run.path)


@app.command()
@friendly
def demo(
    root: Path | None = typer.Option(None, "--root", "--output-dir", help=ROOT_HELP),
    train_samples: int | None = typer.Option(None, help="Training sentences (default 3,500)."),
    dev_samples: int | None = typer.Option(None, help="Dev sentences (default and at most "
                                           "1,000)."),
    progress: bool = typer.Option(True, help="Show progress bars.", metavar=""),
) -> None:
    """Run a complete small ticket search offline (MiniLM-L6, Rotten Tomatoes; ~10 min).

    Ends with a table of every level against the full model."""
    from ticketlab.demo import DEMO_DEV, DEMO_TRAIN, demo_data, demo_hparams
    from ticketlab.imp import find_ticket
    from ticketlab.reports.tables import levels_table

    root = resolve_root(root)
    train_samples, dev_samples = train_samples or DEMO_TRAIN, dev_samples or DEMO_DEV
    data = demo_data(root.parent / "data" / "rotten_tomatoes")
    hp = demo_hparams(data, train_samples, dev_samples)
    say("[bold]ticketlab demo[/bold]: IMP on MiniLM-L6 (offline) with {} Rotten Tomatoes "
        "sentences, dev {}; lr {}, {} epochs a level, {} of the original weights pruned per "
        "level (global magnitude ranking, pooler kept dense).", train_samples, dev_samples,
        hp.train.lr, f"{hp.train.epochs:g}", f"{hp.prune.rate:.0%}")
    run = find_ticket(hp, root, Runtime(progress=progress, save_weights=False), console)
    print_table(levels_table(run.records(), 0.01, title="demo: ticket search summary"))
    say("Run stored in {}", run.path)


@app.command()
@friendly
def runs(
    root: Path | None = typer.Option(None, "--root", "--output-dir", help=ROOT_HELP),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
    as_json: bool = json_option(),
    as_csv: bool = csv_option(),
) -> None:
    """List stored runs: task, model, sparsity reached, sparsest level close to the full model."""
    from ticketlab.reports.tables import runs_table
    from ticketlab.store import list_runs

    fmt = output_format(as_json, as_csv)
    store = resolve_root(root)
    found = list_runs(store)
    if not found and fmt == "table":
        say("No runs in {}.", store)
        return
    print_table(runs_table(found, tolerance / 100), fmt)


@app.command()
@friendly
def show(
    run: str = typer.Argument(..., help="Run id (or unique prefix) or path."),
    root: Path | None = typer.Option(None, "--root", "--output-dir", help=ROOT_HELP),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
    matrices: int | None = typer.Option(None, help="Also print per-matrix sparsity of level N."),
    as_json: bool = json_option(),
    as_csv: bool = typer.Option(False, "--csv", help="Print the levels table as CSV.",
                                metavar=""),
) -> None:
    """Print one run: its hparams and every finished level.

    --json prints {run, path, kind, hparams, levels: [every level's metrics.json record],
    damaged: {level: problem}}; --csv the levels table."""
    import json

    from ticketlab.reports.tables import levels_table, matrices_table
    from ticketlab.store import find_run

    fmt = output_format(as_json, as_csv)
    found = find_run(run, resolve_root(root))
    record = found.read_hparams()
    records = found.records()
    if matrices is not None and matrices not in found.levels():
        raise TicketlabError(f"Level {matrices} of {found.path.name} is not finished.",
                             f"Pick one of {found.levels()}.")
    if fmt == "json":
        print_json({"run": found.path.name, "path": str(found.path), "kind": record.get("kind"),
                    "hparams": record["hparams"], "levels": records,
                    "damaged": {str(k): v for k, v in found.damaged_levels().items()}})
        return
    if fmt == "csv":
        print_table(levels_table(records, tolerance / 100), "csv")
        return
    say("[bold]{}[/bold]  ({})", found.path, record.get("kind"))
    console.print_json(json.dumps(record["hparams"]))
    if records:
        print_table(levels_table(records, tolerance / 100))
    else:
        console.print("No finished levels yet.")
    for level, problem in found.damaged_levels().items():
        say("[yellow]level {}[/yellow]: {}; the command that made the run redoes it.", level,
            problem)
    if matrices is not None:
        print_table(matrices_table(found.metrics(matrices)))


@app.command()
@friendly
def describe(
    model: str = typer.Option("minilm", help="Model folder, hub id, 'minilm', or an image "
                              "model ('mobilenet_v2', a .pth/.safetensors checkpoint)."),
    prune_pooler: bool = typer.Option(True, help="Include the pooler.", metavar=""),
    include: list[str] | None = typer.Option(None, help="Regex of extra matrices."),
    exclude: list[str] | None = typer.Option(None, help="Regex of matrices to keep dense."),
    as_json: bool = json_option(),
    as_csv: bool = csv_option(),
) -> None:
    """Print the prunable set: shapes, counts, magnitudes, and outlier warnings.

    A matrix whose weights are far smaller than the rest is wiped out first by one global
    magnitude ranking; describe shows how much of each matrix goes at 10/50/90 %.
    --json prints {model, family, prunable_weights, model_weights, matrices: [...], warnings:
    [...], notes: [...]}."""
    from ticketlab.families import family_for
    from ticketlab.masks import Mask
    from ticketlab.models import matrix_stats, prunable_parameters
    from ticketlab.pruning import prune
    from ticketlab.reports.tables import describe_table

    fmt = output_format(as_json, as_csv)
    fam = family_for(model)
    loaded = fam.load(model, fam.default_head, 2, 0)
    net = loaded.model
    params = prunable_parameters(net, prune_pooler, tuple(include or ()), tuple(exclude or ()),
                                 loaded.missing, family=fam)
    stats = matrix_stats(params, family=fam.name)
    full = Mask.ones_like(params)
    at = {s: prune(params, full, s).per_tensor_sparsity() for s in (0.1, 0.5, 0.9)}
    table = describe_table(stats, at)
    total = sum(r.numel for r in stats)
    model_total = sum(p.numel() for p in net.parameters())
    warnings = [(r, f"{r.name} has mean |w| {r.mean_abs:.4f}, far below the other matrices; a "
                    f"global magnitude ranking removes {at[0.1][r.name]:.0%} of it at 10 % "
                    f"overall sparsity and {at[0.5][r.name]:.0%} at 50 %. To avoid it: "
                    f"{fam.outlier_advice()}.") for r in stats if r.outlier]
    notes = list(fam.describe_notes(stats, at))
    if fmt == "json":
        print_json({"model": model, "family": fam.name, "prunable_weights": total,
                    "model_weights": model_total, "matrices": table.records,
                    "warnings": [w for _, w in warnings]
                    + [n.removeprefix("Warning: ") for n in notes if n.startswith("Warning: ")],
                    "notes": [n for n in notes if not n.startswith("Warning: ")]})
        return
    if fmt == "csv":
        print_table(table, "csv")
        return
    print_table(table)
    say("{} matrices, {} prunable weights ({} of the model).", len(stats), f"{total:,}",
        f"{total / model_total:.1%}")
    for _, text in warnings:
        say("[bold yellow]Warning:[/bold yellow] {}", text)
    for line in notes:
        if line.startswith("Warning: "):
            say("[bold yellow]Warning:[/bold yellow] {}", line.removeprefix("Warning: "))
        else:
            say("{}", line)
