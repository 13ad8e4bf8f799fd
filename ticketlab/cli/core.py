"""The core commands: ``find``, ``finetune``, ``demo``, ``runs``, ``show``, ``describe``.

Each is a thin shell: options come from the hparams declarations (:mod:`.options`), the work
from the library (:mod:`ticketlab.imp`), the tables from :mod:`ticketlab.report`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ticketlab.cli.app import app, console, friendly, say
from ticketlab.cli.options import ROOT_HELP, resolve_root, with_options
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
    root: Path | None = typer.Option(None, help=ROOT_HELP),
    train_samples: int | None = typer.Option(None, help="Training sentences (default 3,500)."),
    dev_samples: int | None = typer.Option(None, help="Dev sentences (default and at most "
                                           "1,000)."),
    progress: bool = typer.Option(True, help="Show progress bars.", metavar=""),
) -> None:
    """Run a complete small ticket search offline (MiniLM-L6, Rotten Tomatoes; ~10 min).

    Ends with a table of every level against the full model."""
    from ticketlab.demo import DEMO_DEV, DEMO_TRAIN, demo_data, demo_hparams
    from ticketlab.imp import find_ticket
    from ticketlab.report import level_records, levels_table

    root = resolve_root(root)
    train_samples, dev_samples = train_samples or DEMO_TRAIN, dev_samples or DEMO_DEV
    data = demo_data(root.parent / "data" / "rotten_tomatoes")
    hp = demo_hparams(data, train_samples, dev_samples)
    say("[bold]ticketlab demo[/bold]: IMP on MiniLM-L6 (offline) with {} Rotten Tomatoes "
        "sentences, dev {}; lr {}, {} epochs a level, {} of the original weights pruned per "
        "level (global magnitude ranking, pooler kept dense).", train_samples, dev_samples,
        hp.train.lr, f"{hp.train.epochs:g}", f"{hp.prune.rate:.0%}")
    run = find_ticket(hp, root, Runtime(progress=progress, save_weights=False), console)
    console.print(levels_table(level_records(run), 0.01, title="demo: ticket search summary"))
    say("Run stored in {}", run.path)


@app.command()
@friendly
def runs(
    root: Path | None = typer.Option(None, help=ROOT_HELP),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
) -> None:
    """List stored runs: task, model, sparsity reached, sparsest level close to the full model."""
    from ticketlab.report import runs_table
    from ticketlab.store import list_runs

    store = resolve_root(root)
    found = list_runs(store)
    if not found:
        say("No runs in {}.", store)
        return
    console.print(runs_table(found, tolerance / 100))


@app.command()
@friendly
def show(
    run: str = typer.Argument(..., help="Run id (or unique prefix) or path."),
    root: Path | None = typer.Option(None, help=ROOT_HELP),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
    matrices: int | None = typer.Option(None, help="Also print per-matrix sparsity of level N."),
) -> None:
    """Print one run: its hparams and every finished level."""
    import json

    from ticketlab.report import level_records, levels_table, matrices_table
    from ticketlab.store import find_run

    found = find_run(run, resolve_root(root))
    record = found.read_hparams()
    say("[bold]{}[/bold]  ({})", found.path, record.get("kind"))
    console.print_json(json.dumps(record["hparams"]))
    records = level_records(found)
    if records:
        console.print(levels_table(records, tolerance / 100))
    else:
        console.print("No finished levels yet.")
    for level, problem in found.damaged_levels().items():
        say("[yellow]level {}[/yellow]: {}; the command that made the run redoes it.", level,
            problem)
    if matrices is not None:
        if matrices not in found.levels():
            raise TicketlabError(f"Level {matrices} of {found.path.name} is not finished.",
                                 f"Pick one of {found.levels()}.")
        console.print(matrices_table(found.metrics(matrices)))


@app.command()
@friendly
def describe(
    model: str = typer.Option("minilm", help="Model folder, hub id, 'minilm', or an image "
                              "model ('mobilenet_v2', a .pth/.safetensors checkpoint)."),
    prune_pooler: bool = typer.Option(True, help="Include the pooler.", metavar=""),
    include: list[str] | None = typer.Option(None, help="Regex of extra matrices."),
    exclude: list[str] | None = typer.Option(None, help="Regex of matrices to keep dense."),
) -> None:
    """Print the prunable set: shapes, counts, magnitudes, and outlier warnings.

    A matrix whose weights are far smaller than the rest is wiped out first by one global
    magnitude ranking; describe shows how much of each matrix goes at 10/50/90 %."""
    from ticketlab.families import family_for
    from ticketlab.masks import Mask
    from ticketlab.models import matrix_stats, prunable_parameters
    from ticketlab.pruning import prune
    from ticketlab.report import describe_table

    fam = family_for(model)
    loaded = fam.load(model, fam.default_head, 2, 0)
    net = loaded.model
    params = prunable_parameters(net, prune_pooler, tuple(include or ()), tuple(exclude or ()),
                                 loaded.missing, family=fam)
    stats = matrix_stats(params, family=fam.name)
    full = Mask.ones_like(params)
    at = {s: prune(params, full, s).per_tensor_sparsity() for s in (0.1, 0.5, 0.9)}
    console.print(describe_table(stats, at))
    total = sum(r.numel for r in stats)
    say("{} matrices, {} prunable weights ({} of the model).", len(stats), f"{total:,}",
        f"{total / sum(p.numel() for p in net.parameters()):.1%}")
    for r in stats:
        if r.outlier:
            say("[bold yellow]Warning:[/bold yellow] {} has mean |w| {}, far below the other "
                "matrices; a global magnitude ranking removes {} of it at 10 % overall sparsity "
                "and {} at 50 %. To avoid it: {}.", r.name, f"{r.mean_abs:.4f}",
                f"{at[0.1][r.name]:.0%}", f"{at[0.5][r.name]:.0%}", fam.outlier_advice())
    for line in fam.describe_notes(stats, at):
        if line.startswith("Warning: "):
            say("[bold yellow]Warning:[/bold yellow] {}", line.removeprefix("Warning: "))
        else:
            say("{}", line)

