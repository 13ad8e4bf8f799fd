"""The paper's experiments on the command line: ``branch``, ``matching``, ``table``,
``transfer``, ``rewinding``, ``masks``, ``curves``, ``sweep`` and ``reproduce``.

Every command is a thin shell around :mod:`ticketlab.experiments`: it parses options, calls the
library and prints; what it computes is stored in the run store and resumes like ``find``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ticketlab.cli.app import app, console, friendly, say
from ticketlab.cli.options import (
    ROOT_HELP,
    make_runtime,
    resolve_root,
    runtime_parameters,
    with_options,
    with_task_options,
)
from ticketlab.cli.output import (
    csv_option,
    json_option,
    messages_to_stderr,
    output_format,
    print_json,
    print_table,
)
from ticketlab.errors import TicketlabError
from ticketlab.hparams import RunHparams, Runtime

_E = "Experiments"
REPORTS = Path("ticketlab-reports")
_ROOT = typer.Option(None, "--root", "--output-dir", help=ROOT_HELP)


def _names(text: str, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise TicketlabError(f"{what} is empty.", f"Pass a comma-separated list to {what}.")
    return names


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in _names(text, what)]
    except ValueError as e:
        raise TicketlabError(f"{what} {text!r} is not a list of numbers.",
                             f"Write e.g. {what} 0,0.01,0.05.") from e


def renamed(new: Any, new_flag: str, old: Any, old_flag: str) -> Any:
    """The value of an option that was renamed: the old spelling still works (scripts use
    it), with a note; giving both is refused."""
    if old is None:
        return new
    if new is not None:
        raise TicketlabError(f"{old_flag} is the old name of {new_flag}; both were given.",
                             f"Keep only {new_flag}.")
    say("[yellow]note[/yellow]: {} is deprecated; use {} (same meaning).", old_flag, new_flag)
    return old


def with_runtime(**defaults: Any) -> Callable[..., Any]:
    """Add the runtime options (and --root) to a command that takes no hparams; it receives
    ``runtime`` (``defaults`` for options not given) and ``root`` (None when not given)."""
    from ticketlab.cli.options import _wrap

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        def body(opts: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            return {"runtime": make_runtime(opts, **defaults), "root": opts["root"]}

        return _wrap(func, runtime_parameters(), ("runtime", "root"), body)

    return decorate


def _baseline_help() -> str:
    from ticketlab.experiments.baselines import BASELINES

    return "; ".join(f"{k}: {b.help}" for k, b in BASELINES.items())


@app.command(rich_help_panel=_E)
@with_runtime(save_weights=False)
def branch(
    runtime: Runtime,
    root: Path | None,
    run: str = typer.Argument(..., help="IMP run id (or unique prefix) or path."),
    level: int = typer.Option(..., help="The IMP level whose mask/sparsity the baseline uses."),
    kind: str = typer.Option(..., help=_baseline_help()),
    seeds: int = typer.Option(1, help="Seeds, counted from the run's own seed."),
    shuffle_layers: bool = typer.Option(False, help="With --kind shuffle: permute whole "
                                        "layers (the seed code's variant).", metavar=""),
) -> None:
    """Train a baseline at an IMP level's sparsity, as a branch of the run.

    Stored in <run>/branches/<kind>-level<K>-seed<S>/; finished seeds are skipped."""
    from ticketlab.experiments.baselines import check_kind, imp_run_hparams, run_branch
    from ticketlab.experiments.common import Stats, seed_list
    from ticketlab.store import find_run

    if shuffle_layers:
        if kind != "shuffle":
            raise TicketlabError("--shuffle-layers only applies to --kind shuffle.",
                                 "Drop it, or use --kind shuffle.")
        kind = "shuffle-layers"
    check_kind(kind)
    found = find_run(run, resolve_root(root))
    hp, _ = imp_run_hparams(found)
    scores = []
    for seed in seed_list(hp.train.seed, seeds):
        done = run_branch(found, level, kind, seed, runtime, console)
        scores.append(done.metrics(level)["score"])
    line = f"{kind} at level {level}: {Stats.of(scores).fmt(digits=2)} over {len(scores)} seed(s)"
    if found.level_done(level):
        line += f"; IMP (seed {hp.train.seed}) {found.metrics(level)['score'] * 100:.2f}"
    say("{}", line)


@app.command(rich_help_panel=_E)
@with_options(prune=True)
def matching(
    hp: RunHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help="Task to search tickets on."),
    seeds: int = typer.Option(3, help="IMP runs, one per seed from --seed (paper: 5).",
                              rich_help_panel=_E),
    baselines: str = typer.Option("", help="Comma-separated baseline kinds to train at the "
                                  "highest matching level (e.g. random,random-reinit).",
                                  rich_help_panel=_E),
    out: Path = typer.Option(REPORTS, help="Folder for matching-<task>.json.",
                             rich_help_panel=_E),
    as_json: bool = json_option(),
    as_csv: bool = csv_option(),
) -> None:
    """IMP over several seeds: which levels match the full model, and the sparsest.

    Matching: the mean over seeds is within one std of the full model's mean; strictly
    matching: at least that mean. --json prints what matching-<task>.json holds."""
    from ticketlab.experiments.baselines import check_kind
    from ticketlab.experiments.common import seed_list
    from ticketlab.experiments.matching import double_win, run_matching
    from ticketlab.reports.tables import matching_table
    from ticketlab.store import atomic_write_json

    fmt = output_format(as_json, as_csv)
    kinds = [check_kind(k) for k in _names(baselines, "--baselines")] if baselines else []
    with messages_to_stderr(fmt):
        summary, group = run_matching(hp, seed_list(hp.train.seed, seeds), root, runtime,
                                      console, kinds)
    record = {**summary.to_dict(), "runs": [r.path.name for r in group.runs.values()]}
    wins = double_win(group)
    if wins is not None:  # scored under --eval-attack: Double-Win matching too
        record["double_win"] = wins.to_dict()
    atomic_write_json(out / f"matching-{hp.data.task}.json", record)
    if fmt == "json":
        print_json(record)
        return
    print_table(matching_table(record), fmt)
    if fmt == "csv":
        return
    best = summary.highest
    say("highest matching sparsity: {}",
        f"{best.sparsity:.1%} (level {best.level})" if best else "none")
    if wins is not None:
        print_table(matching_table(wins.robust.to_dict()))
        for label, level in (("robust-matching", wins.robust.highest),
                             ("double-win", wins.highest)):
            say("highest {} sparsity: {}", label,
                f"{level.sparsity:.1%} (level {level.level})" if level else "none")


@app.command(rich_help_panel=_E)
@friendly
def table(
    root: Path | None = _ROOT,
    tasks: str = typer.Option("", help="Comma-separated tasks, in column order (default: all "
                              "tasks with IMP runs)."),
    rewind_step: int = typer.Option(0, help="Use the IMP runs with this rewind step."),
    fmt: str = typer.Option("markdown", "--format", help="What to print: markdown, csv, "
                            "latex or json (all four are written with --out)."),
    out: Path | None = typer.Option(None, help="Also write table2.{md,csv,tex,json} here."),
) -> None:
    """Table 2 from the store, as Markdown, CSV, LaTeX or JSON.

    Per task: the full model, IMP at the highest matching sparsity and every baseline found at
    that level, mean ± std over seeds."""
    import sys

    from ticketlab.experiments.matching import table2_columns, write_table2
    from ticketlab.reports.tables import TABLE2_FORMATS

    if fmt not in TABLE2_FORMATS:
        raise TicketlabError(f"Unknown --format {fmt!r}.",
                             f"Use {', '.join(TABLE2_FORMATS)}.")
    with messages_to_stderr("table" if fmt == "markdown" else fmt):  # stdout: the table only
        columns = table2_columns(resolve_root(root),
                                 _names(tasks, "--tasks") if tasks else None, rewind_step,
                                 console)
    if not columns:
        raise TicketlabError(f"No finished IMP runs in {resolve_root(root)}"
                             + (f" for {tasks}" if tasks else "") + ".",
                             "Run `ticketlab matching --task T` first (or pass --root).")
    sys.stdout.write(TABLE2_FORMATS[fmt](columns))
    if out is not None:
        paths = write_table2(columns, out)
        say("written: {}", ", ".join(str(p) for p in paths.values()))


@app.command(rich_help_panel=_E)
@with_task_options()
def transfer(
    build: Callable[[str], RunHparams],
    runtime: Runtime,
    root: Path,
    sources: str = typer.Option(..., help="Comma-separated source tasks (their IMP masks).",
                                rich_help_panel=_E),
    targets: str = typer.Option(..., help="Comma-separated target tasks.", rich_help_panel=_E),
    target_sparsity: float | None = typer.Option(
        None, "--target-sparsity", help="Sparsity of the transferred masks: each source's IMP "
        "level at this sparsity (IMP runs are continued that far). Default 0.7.",
        rich_help_panel=_E),
    old_sparsity: float | None = typer.Option(None, "--sparsity", hidden=True,
                                              help="Deprecated: --target-sparsity."),
    seeds: int = typer.Option(3, help="Fine-tuning seeds per cell, from --seed.",
                              rich_help_panel=_E),
    one_shot: bool = typer.Option(True, help="Add the row of one-shot pruning of θ0.",
                                  rich_help_panel=_E, metavar=""),
    out: Path = typer.Option(REPORTS, help="Folder for transfer.{csv,json,png}.",
                             rich_help_panel=_E),
) -> None:
    """Figure 2: every source task's mask fine-tuned on every target task.

    Rows: each source's IMP mask and one-shot pruning of θ0. Writes the matrix of transfer −
    full model as CSV and a heatmap. Missing IMP runs are made (up to --target-sparsity)."""
    from ticketlab.experiments.common import seed_list, with_seed
    from ticketlab.experiments.transfer import run_transfer, write_transfer
    from ticketlab.reports.tables import transfer_table

    sparsity = renamed(target_sparsity, "--target-sparsity", old_sparsity, "--sparsity")
    sparsity = 0.7 if sparsity is None else sparsity
    src, tgt = _names(sources, "--sources"), _names(targets, "--targets")
    per_task = {t: build(t) for t in dict.fromkeys([*src, *tgt])}  # all validated first
    hp = per_task[src[0]]

    def hp_for(task: str, seed: int) -> RunHparams:
        if task not in per_task:
            per_task[task] = build(task)
        return with_seed(per_task[task], seed)

    result = run_transfer(hp_for, src, tgt, sparsity, seed_list(hp.train.seed, seeds), root,
                          runtime, console, one_shot)
    print_table(transfer_table(result.to_dict()))
    paths = write_transfer(result, out)
    say("written: {}", ", ".join(str(p) for p in paths.values()))


@app.command("robust-transfer", rich_help_panel=_E)
@with_task_options()
def robust_transfer(
    build: Callable[..., RunHparams],
    runtime: Runtime,
    root: Path,
    source: str = typer.Option(..., help="The source task both tickets are searched on.",
                               rich_help_panel=_E),
    targets: str = typer.Option(..., help="Comma-separated target tasks.", rich_help_panel=_E),
    target_sparsity: float | None = typer.Option(
        None, "--target-sparsity", help="Sparsity of the transferred tickets: the source "
        "searches' IMP level at this sparsity (required).", rich_help_panel=_E),
    old_sparsity: float | None = typer.Option(None, "--at-sparsity", hidden=True,
                                              help="Deprecated: --target-sparsity."),
    source_adversarial: str = typer.Option("pgd", help="Training method of the robust "
                                           "ticket's search (pgd, fgsm-rs, freelb).",
                                           rich_help_panel=_E),
    seeds: int = typer.Option(1, help="Fine-tuning seeds per cell, from --seed.",
                              rich_help_panel=_E),
    out: Path = typer.Option(REPORTS, help="Folder for robust_transfer.{csv,json,png}.",
                             rich_help_panel=_E),
) -> None:
    """Robust tickets transfer better? The vanilla and the adversarially found IMP ticket of
    --source, at one sparsity, each fine-tuned on every target beside the full model.

    The training options apply to the targets (add --adversarial for adversarial transfer,
    --train-fraction 0.01 for data-limited transfer, --eval-attack pgd for robust accuracy)
    and to both source searches; the robust search also trains with --source-adversarial."""
    from ticketlab.experiments.common import seed_list, with_seed
    from ticketlab.experiments.robust import (
        run_robust_transfer,
        source_runs,
        write_robust_transfer,
    )
    from ticketlab.reports.tables import robust_transfer_table

    sparsity = renamed(target_sparsity, "--target-sparsity", old_sparsity, "--at-sparsity")
    if sparsity is None:
        raise TicketlabError("robust-transfer needs the sparsity of the tickets it transfers.",
                             "Pass --target-sparsity, e.g. --target-sparsity 0.5.")
    tgt = _names(targets, "--targets")
    # one set of options, three roles: --adv-* configure whichever runs attack
    per_task = {t: build(t, drop_inactive=True) for t in tgt}
    sources = source_runs(build(source, True, adversarial="none", train_fraction=None),
                          build(source, True, adversarial=source_adversarial,
                                train_fraction=None), sparsity)
    first = per_task[tgt[0]].train.seed
    result = run_robust_transfer(lambda t, s: with_seed(per_task[t], s), sources, source, tgt,
                                 sparsity, seed_list(first, seeds), root, runtime, console)
    print_table(robust_transfer_table(result.to_dict()))
    paths = write_robust_transfer(result, out)
    say("written: {}", ", ".join(str(p) for p in paths.values()))


@app.command(rich_help_panel=_E)
@with_options(prune=True)
def rewinding(
    hp: RunHparams,
    runtime: Runtime,
    root: Path,
    task: str = typer.Option(..., help="Task to search tickets on."),
    fractions: str = typer.Option("0,0.01,0.05,0.1,0.2,0.5", help="Rewind points as shares "
                                  "of a level's training steps.", rich_help_panel=_E),
    seeds: int = typer.Option(1, help="IMP runs per rewind point.", rich_help_panel=_E),
    score_at_sparsity: float | None = typer.Option(
        None, "--score-at-sparsity", help="Also plot the score at this sparsity (an IMP "
        "level's; --target-sparsity is how far IMP goes).", rich_help_panel=_E),
    old_sparsity: float | None = typer.Option(None, "--sparsity", hidden=True,
                                              help="Deprecated: --score-at-sparsity."),
    out: Path = typer.Option(REPORTS, help="Folder for rewinding.{csv,json,png}.",
                             rich_help_panel=_E),
) -> None:
    """IMP rewinding to θ_i for a sweep of i, with its plot.

    Plots the highest matching sparsity (and the score at --score-at-sparsity) against i."""
    from ticketlab.experiments.common import seed_list
    from ticketlab.experiments.rewinding import run_rewinding, write_rewinding

    sparsity = renamed(score_at_sparsity, "--score-at-sparsity", old_sparsity, "--sparsity")
    points = run_rewinding(hp, _floats(fractions, "--fractions"),
                           seed_list(hp.train.seed, seeds), root, runtime, console, sparsity)
    for p in points:
        say("rewind {} (step {}): highest matching {}{}", f"{p.fraction:>5.0%}",
            f"{p.step:>4}",
            "none" if p.highest_matching is None else f"{p.highest_matching:.0%}",
            f", score at {sparsity:.0%}: {p.score_at.fmt(digits=2)}" if p.score_at else "")
    paths = write_rewinding(hp.data.task, points, sparsity, out)
    say("written: {}", ", ".join(str(p) for p in paths.values()))


@app.command(rich_help_panel=_E)
@friendly
def masks(
    refs: list[str] = typer.Argument(..., help="Mask files or RUN:LEVEL (run id or prefix)."),
    root: Path | None = _ROOT,
    out: Path = typer.Option(REPORTS, help="Folder for the plots, CSV and JSON."),
) -> None:
    """Where masks prune, and how much masks overlap.

    Per-matrix and per-layer sparsity plots; for two masks or more, the pairwise Jaccard
    overlap against that of random masks with the same per-matrix sparsities."""
    from ticketlab.experiments.analysis import (
        overlap_matrices,
        resolve_mask,
        unique_labels,
        write_mask_analysis,
    )

    resolved = [resolve_mask(r, resolve_root(root)) for r in refs]
    found = dict(zip(unique_labels([label for label, _ in resolved]),
                     [m for _, m in resolved], strict=True))
    for label, m in found.items():
        say("{}: sparsity {}", label, f"{m.sparsity:.1%}")
    if len(found) > 1:
        observed, expected = overlap_matrices(found)
        labels = list(found)
        for i in range(len(labels)):
            for j in range(i + 1, len(labels)):
                say("  {} ∩ {}: Jaccard {} (random masks: {})", labels[i], labels[j],
                    f"{observed[i][j]:.3f}", f"{expected[i][j]:.3f}")
    paths = write_mask_analysis(found, out)
    say("written: {}", ", ".join(str(p) for p in paths.values()))


@app.command(rich_help_panel=_E)
@friendly
def curves(
    task: str = typer.Option(..., help="Task whose IMP runs to plot."),
    root: Path | None = _ROOT,
    rewind_step: int = typer.Option(0, help="Use the IMP runs with this rewind step."),
    out: Path = typer.Option(REPORTS, help="Folder for curves_<task>.png."),
) -> None:
    """Score against sparsity for IMP and every stored baseline, with std bands."""
    from ticketlab.experiments.common import seed_groups
    from ticketlab.experiments.matching import write_curves

    groups = [g for g in seed_groups(resolve_root(root), task)
              if g.rewind_step == rewind_step]
    if not groups:
        raise TicketlabError(f"No IMP runs of {task!r} in {resolve_root(root)}.",
                             "Run `ticketlab matching` or `ticketlab find` first.")
    path = write_curves(groups[0], out)
    if path is None:
        raise TicketlabError(f"The IMP runs of {task} have not finished their full model yet.",
                             "Let `ticketlab matching` finish level 0 first.")
    say("written: {}", path)


@app.command(rich_help_panel=_E)
@with_runtime(save_weights=False)
def sweep(
    runtime: Runtime,
    root: Path | None,
    spec: Path = typer.Argument(..., help="Experiment spec (TOML)."),
    backend: str = typer.Option("inprocess", help="inprocess (one cell after another) or ray "
                                "(cells of a part in parallel)."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address (default: start "
                                           "a local cluster)."),
    dry_run: bool = typer.Option(False, help="Count the cells, then list them and which are "
                                 "finished.", metavar=""),
) -> None:
    """Run the missing cells of an experiment spec (TOML); finished cells are skipped.

    The spec has an hparams table (any run option by name), task_hparams.<task> tables, a grid
    table (tasks, seeds, baselines, baseline_levels) and optional rewinding and transfer
    tables; see README, "Experiments"."""
    from ticketlab.experiments.sweep import Spec, run_sweep, sweep_status

    loaded = Spec.load(spec)
    store = root or (Path(loaded.root) if loaded.root else resolve_root(None))
    if dry_run:
        say("{}: {} cells ({})", loaded.name, loaded.cell_count(),
            ", ".join(f"{part} {n}" for part, n in loaded.cell_counts().items() if n))
        finished = 0
        for cell, done in sweep_status(loaded, store):
            finished += done
            say("{} {}", "done " if done else "todo ", cell.label())
        say("{} of {} cells finished (baselines at the matching level count once IMP is "
            "done).", finished, loaded.cell_count())
        return
    run_sweep(loaded, store, runtime, console, backend, ray_address)
    say("[green]done[/green]: every cell of {} is stored in {}", loaded.name, store)


@app.command(rich_help_panel=_E)
@with_runtime(save_weights=False)
def reproduce(
    runtime: Runtime,
    root: Path | None,
    scale: str = typer.Option("small", help="small (MiniLM-L6 on CPU, GLUE subsets) or paper "
                              "(BERT-base, full data, 5 seeds; GPU)."),
    data_dir: Path | None = typer.Option(None, help="GLUE folder (SST-2/, CoLA/, ...). "
                                         "Required for small; paper without it uses the hub."),
    out: Path | None = typer.Option(None, help="Report folder (default: "
                                    "ticketlab-reproduction-<scale>); holds the run store too."),
    spec: Path | None = typer.Option(None, help="Reproduce your own spec instead of a preset."),
    backend: str = typer.Option("inprocess", help="inprocess or ray."),
    ray_address: str | None = typer.Option(None, help="Ray cluster address."),
    parts: str | None = typer.Option(None, help="Comma-separated report parts, generated "
                                     "from the same store: glue (Table 2, transfer, curves, "
                                     "masks, rewinding, standard pruning), mlm (its Table 2 "
                                     "column and transfer row; needs glue), vision, robust, "
                                     "supertickets. Default: the text parts (glue,mlm)."),
    estimate: bool = typer.Option(False, help="Only print the work each part needs (writes "
                                  "nothing).", metavar=""),
    seconds_per_step: float = typer.Option(0.33, help="For --estimate: seconds per SST-2 "
                                           "training step (MiniLM-L6, batch 32: 0.33 measured "
                                           "on 2 idle CPU cores, one process; two one-thread "
                                           "Ray workers: 0.23 s a step combined)."),
) -> None:
    """Run the paper's experiments and write the report folder; resumable.

    index.html and README.md show Table 2, the transfer heatmap (with the MLM row and its
    verdict), the curves, rewinding, standard pruning, the masks, the vision, robust and
    SuperTickets parts chosen with --parts, the settings and the time per part. Run the same
    command again to continue."""
    from ticketlab.experiments.reproduce import preset
    from ticketlab.experiments.reproduce import reproduce as run_reproduce
    from ticketlab.experiments.sweep import Spec

    folder = out or Path(f"ticketlab-reproduction-{scale}")
    if estimate:
        _print_estimate(spec, scale, data_dir, folder, seconds_per_step, parts)
        return
    loaded = Spec.load(spec) if spec else preset(scale, data_dir, folder)
    run_reproduce(loaded, folder, root, runtime, console, backend, ray_address, parts)


def _print_estimate(spec: Path | None, scale: str, data_dir: Path | None, folder: Path,
                    seconds_per_step: float, parts: str | None = None) -> None:
    """The work each part needs, computed without writing anything: data the preset derives
    (QNLI's split of its dev file) goes to a temporary folder, removed afterwards. The parts'
    data and weights are checked as a real run checks them."""
    import tempfile

    from ticketlab.experiments.reproduce import (
        BUDGET_PARTS,
        budget,
        check_parts,
        parse_parts,
        preset,
        step_costs,
        text_spec,
    )
    from ticketlab.experiments.rewinding import train_size
    from ticketlab.experiments.sweep import Spec

    with tempfile.TemporaryDirectory(prefix="ticketlab-estimate-") as tmp:
        loaded = Spec.load(spec) if spec else preset(scale, data_dir, folder, Path(tmp))
        chosen = parse_parts(parts, loaded)
        check_parts(loaded, chosen)
        grid = text_spec(loaded, chosen)
        tasks = grid.tasks if grid is not None else []
        sizes = {t: train_size(loaded.hparams_for(t, 0)) for t in tasks}
        b = budget(loaded, sizes, step_costs(grid) if grid is not None else {}, chosen)
    for part in [p for p in BUDGET_PARTS if p in b.trainings]:
        note = f"  ({b.notes[part]})" if part in b.notes else ""
        console.print(f"{part:<12} {b.trainings[part]:>5} trainings  {b.steps[part]:>7} steps  "
                      f"~{b.cost[part] * seconds_per_step / 3600:.1f} h{note}")
    console.print(f"{'total':<12} {sum(b.trainings.values()):>5} trainings  "
                  f"{sum(b.steps.values()):>7} steps  "
                  f"~{sum(b.cost.values()) * seconds_per_step / 3600:.1f} h of training at "
                  f"{seconds_per_step} s per SST-2-length step (longer examples are "
                  "costed by their mean length), plus evaluation; nothing was written")
