"""``ticketlab export`` and ``ticketlab bench``: ship a ticket, and show that it is faster.

``export`` writes a level of a run as a standard Hugging Face folder or as a compressed ticket
(:mod:`ticketlab.export`). ``bench`` times the level's model dense and accelerated
(:func:`ticketlab.sparse.accelerate_ticket`) side by side in one process, at batch 1 and 32 and
sequence 128, and plots the speed-up of every finished level of the run against its sparsity,
in wall time and, beside it, in CPU time on one thread
(:func:`ticketlab.reports.figures.bench_figure`); ``--json``/``--csv`` print its numbers for
scripts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from ticketlab.cli import app, console, friendly
from ticketlab.cli.output import (
    csv_option,
    json_option,
    messages_to_stderr,
    output_format,
    print_json,
    print_table,
)
from ticketlab.errors import TicketlabError


@app.command()
@friendly
def export(
    run: str = typer.Argument(..., help="Run id (or unique prefix) or path."),
    level: int = typer.Option(..., "--level", help="The level (ticket) to export."),
    to: Path = typer.Option(..., "--to", help="Output folder (new or empty, or an earlier "
                            "export of ticketlab's)."),
    compressed: bool = typer.Option(False, help="Write a compressed ticket (packed bitmask + "
                                    "surviving values); load it with ticketlab.load_ticket."),
    fp16: bool = typer.Option(False, help="Compressed ticket: store surviving values as fp16."),
    force: bool = typer.Option(False, help="Replace an earlier export in --to (only a folder "
                               "ticketlab exported and holding nothing else)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO",
                                           help="Also upload the folder to this Hub model "
                                           "repo (USER/NAME; needs a token)."),
    private: bool = typer.Option(False, help="With --push-to-hub: create the repo private."),
    root: Path | None = typer.Option(None, help="Run store (default: ~/.ticketlab/runs)."),
) -> None:
    """Export a level as a Hugging Face model folder (pruned weights exactly zero), or with
    --compressed as a compressed ticket. Either way the tokenizer, the task's label names and
    a model card (README.md) are included."""
    from ticketlab.export import TICKET_FILE, export_level, ticket_sizes
    from ticketlab.hub import check_can_push, push_folder

    if push_to_hub is not None:
        check_can_push(push_to_hub)  # before exporting: a refused push writes nothing
    ticket = export_level(run, level, to, root, compressed=compressed, fp16=fp16, force=force)
    info, result = ticket.info, ticket.export
    assert result is not None
    what = f"{info['run']} level {level} (sparsity {info['sparsity']:.1%}, {info['task']})"
    if result.unchanged:
        console.print(f"[green]already exported[/green] {what}: {to} holds this export, "
                      "complete and unchanged (nothing written).", highlight=False)
    else:
        console.print(f"[green]exported[/green] {what} to {to}"
                      + (" (replacing the earlier export there)" if result.replaced else ""),
                      highlight=False)
    if info.get("labels") is None and info.get("labels_note") and \
            info["head"] in ("sequence-classification", "image-classification"):
        console.print(f"labels: LABEL_0… ({info['labels_note']})", highlight=False)
    if compressed:
        s = ticket_sizes(Path(to) / TICKET_FILE)
        console.print(
            f"prunable matrices: {s['prunable_bytes'] / 2**20:.2f} MiB = "
            f"{s['prunable_ratio']:.4f}x their dense fp32 size; whole file "
            f"{s['file_bytes'] / 2**20:.2f} MiB = {s['file_ratio']:.3f}x the dense model. "
            "Load with ticketlab.load_ticket(DIR).", highlight=False)
    else:
        from ticketlab.hub import AUTO_CLASSES

        auto = AUTO_CLASSES.get(info["head"], "AutoModel")
        console.print(f"Load with transformers: {auto}.from_pretrained({str(to)!r}).",
                      highlight=False)
    if push_to_hub is not None:
        url = push_folder(Path(to), push_to_hub, private=private,
                          commit_message=f"ticketlab ticket: {what}")
        console.print(f"[green]pushed[/green] {to} to {url}", highlight=False)


def parse_int_list(values: list[str] | None, default: list[int], what: str) -> list[int]:
    """``--batch-sizes 1,32`` (repeatable, comma-separated) as sorted distinct positive ints;
    ``default`` when the option was not given."""
    if not values:
        return default
    try:
        out = sorted({int(p) for v in values for p in str(v).split(",") if p.strip()})
    except ValueError as e:
        raise TicketlabError(f"{what} must be integers, got {values}.",
                             f"Pass e.g. --{what} 1,32.") from e
    if not out or min(out) < 1:
        raise TicketlabError(f"{what} must be positive integers, got {values}.",
                             f"Pass e.g. --{what} 1,32.")
    return out


def time_pair(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Best wall time and best CPU time of the calling thread of each function, over
    interleaved calls (the order alternates every round)."""
    names = list(fns)
    best = {n: {"wall": float("inf"), "cpu": float("inf")} for n in names}
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            w0, c0 = time.perf_counter(), time.thread_time()
            fns[name]()
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - w0)
            best[name]["cpu"] = min(best[name]["cpu"], time.thread_time() - c0)
    return best


@app.command()
@friendly
def bench(
    run: str = typer.Argument(..., help="Run id (or unique prefix) or path."),
    level: int = typer.Option(..., "--level", help="The level (ticket) to benchmark."),
    batch_sizes: list[str] | None = typer.Option(None, "--batch-sizes",
                                                 help="Batch sizes (default: 1,32)."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    threads: list[str] | None = typer.Option(None, help="Thread counts (default: 1 and "
                                             "torch's current count)."),
    reps: int = typer.Option(5, help="Timed calls per variant (interleaved; the best is "
                             "kept, and on one thread also the best CPU time)."),
    png: Path | None = typer.Option(None, help="Speed-up plot (default: "
                                    "./ticketlab-bench-<run>-L<level>.png)."),
    sweep: bool = typer.Option(True, help="Also time every finished level of the run at "
                               "batch 1 for the plot (their masks on the dense θ0)."),
    root: Path | None = typer.Option(None, help="Run store (default: ~/.ticketlab/runs)."),
    as_json: bool = json_option(),
    as_csv: bool = csv_option(),
) -> None:
    """Dense vs accelerated latency and throughput of a level, side by side in one process,
    and a PNG of speed-up against sparsity (wall time, and CPU time on one thread).

    --json prints {run, level, model, sparsity, seq_len, reps, results: [one record per
    (threads, batch)], levels: [{threads, sparsity, speedup, cpu_speedup}], png}."""
    fmt = output_format(as_json, as_csv)
    with messages_to_stderr(fmt):
        report = _bench(run, level, batch_sizes, seq_len, threads, reps, png, sweep, root)
    if fmt == "json":
        print_json(report)
    elif fmt == "csv":
        print_table(_table(report), "csv")


def _table(report: dict[str, Any]) -> Any:
    from ticketlab.reports.tables import bench_table

    return bench_table(report["results"], f"dense vs accelerated, level {report['level']} "
                                          f"({report['sparsity']:.1%} sparse)")


def _bench(run: str, level: int, batch_sizes: list[str] | None, seq_len: int,
           threads: list[str] | None, reps: int, png: Path | None, sweep: bool,
           root: Path | None) -> dict[str, Any]:
    import torch

    from ticketlab.export import load_level
    from ticketlab.reports.figures import bench_figure, save_png
    from ticketlab.sparse import accelerate_ticket, sparse_layers

    if seq_len < 1 or reps < 1:
        raise TicketlabError("--seq-len and --reps must be at least 1.", "Pass positive values.")
    sizes = parse_int_list(batch_sizes, [1, 32], "batch-sizes")
    thread_counts = parse_int_list(threads, sorted({1, torch.get_num_threads()}), "threads")
    ticket = load_level(run, level, root)
    model = ticket.model
    side = image_side(ticket)
    inputs, shape, tokens = bench_inputs(ticket, sizes, seq_len)
    original_threads = torch.get_num_threads()
    console.print(f"[bold]bench[/bold] {ticket.info['run']} level {level}: "
                  f"{ticket.info['model']}, sparsity {ticket.mask.sparsity:.1%}; "
                  f"{shape}, best of {reps} interleaved calls. Calibrating…")
    fast = accelerate_ticket(model, tokens=tokens, threads=thread_counts)
    layers = sparse_layers(fast)
    report: dict[str, Any] = {"run": ticket.info["run"], "level": level,
                              "model": ticket.info["model"], "task": ticket.info["task"],
                              "sparsity": ticket.mask.sparsity, "seq_len": seq_len,
                              "reps": reps, "results": [], "levels": []}
    #: (threads, batch) -> (wall-time speed-up, CPU-time speed-up or None off one thread)
    results: dict[tuple[int, int], tuple[float, float | None]] = {}
    try:
        with torch.inference_mode():
            for th in thread_counts:
                torch.set_num_threads(th)
                for b in sizes:
                    batch = inputs[b]
                    ref, out = model(**batch).logits, fast(**batch).logits  # also warm-up
                    diff = float((ref - out).abs().max())
                    t = time_pair({"dense": lambda batch=batch: model(**batch),
                                   "accel": lambda batch=batch: fast(**batch)}, reps)
                    dense, accel = t["dense"]["wall"], t["accel"]["wall"]
                    cpu_ratio = _cpu_ratio(t, th)
                    results[(th, b)] = (dense / accel, cpu_ratio)
                    used = sum(m.decide(_rows(m, tokens[sizes.index(b)], b), th) != "dense"
                               for m in layers.values())
                    report["results"].append({
                        "threads": th, "batch": b, "dense_ms": dense * 1e3,
                        "accel_ms": accel * 1e3, "dense_seq_per_s": b / dense,
                        "accel_seq_per_s": b / accel, "speedup": dense / accel,
                        "cpu_speedup": cpu_ratio, "sparse_layers": f"{used}/{len(layers)}",
                        "max_abs_logit_diff": diff})
            print_table(_table(report))
            if side is not None:
                _print_conv_profile(model, inputs, reps)
            points = _sweep(ticket, inputs[min(sizes)], thread_counts, reps) if sweep else {}
    finally:
        torch.set_num_threads(original_threads)
    report["levels"] = [{"threads": th, "sparsity": p[0], "speedup": p[1], "cpu_speedup": p[2]}
                        for th, pts in points.items() for p in pts]
    png = png or Path(f"ticketlab-bench-{ticket.info['run']}-L{level}.png")
    fig = bench_figure(results, points, min(sizes), ticket.mask.sparsity, level,
                       f"{ticket.info['model']} ({ticket.info['task']}), {shape}")
    save_png(fig, png)
    console.print(f"plot: {png}")
    report["png"] = str(png)
    return report


def bench_inputs(ticket: Any, sizes: list[int], seq_len: int
                 ) -> tuple[dict[int, dict[str, Any]], str, list[int]]:
    """Random inputs for timing a ticket, one batch per size (seeded): images of the run's
    size for an image model, ``seq_len`` random tokens otherwise. Returns the batches, their
    shape in words, and the rows a sparse kernel sees per batch (tokens; images for a CNN,
    whose 1x1 layers count their pixels themselves)."""
    import torch

    model = ticket.model
    gen = torch.Generator().manual_seed(0)
    side = image_side(ticket)
    if side is not None:  # an image model: random images of the run's size
        inputs = {b: {"pixel_values": torch.randn(b, 3, side, side, generator=gen)}
                  for b in sizes}
        return inputs, f"{side}x{side} px images", list(sizes)
    vocab = model.config.vocab_size
    if seq_len > getattr(model.config, "max_position_embeddings", seq_len):
        raise TicketlabError(f"--seq-len {seq_len} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions.",
                             "Pass a shorter --seq-len.")
    inputs = {b: {"input_ids": torch.randint(1000, vocab, (b, seq_len), generator=gen),
                  "attention_mask": torch.ones(b, seq_len, dtype=torch.long)}
              for b in sizes}
    return inputs, f"seq {seq_len}", [b * seq_len for b in sizes]


def _rows(layer: Any, tokens: int, batch: int) -> int:
    """Rows of a layer's product: the batch's tokens, or for a 1x1 convolution its pixels."""
    pixels = getattr(layer, "pixels_per_example", None)
    return batch * pixels if pixels else tokens


def image_side(ticket: Any) -> int | None:
    """The side of the images an image model's run was trained on (None: a text model)."""
    spec = ticket.tokenizer
    if not hasattr(spec, "native_size"):
        return None
    return int(spec.size or spec.native_size)


def _print_conv_profile(model: Any, inputs: dict[int, dict[str, Any]], reps: int) -> None:
    """Where a CNN's dense forward spends its time, by kind of layer: what a sparse kernel for
    1x1 convolutions (matrix products over pixels) and the classifier could at most speed up."""
    import torch

    from ticketlab.families.vision import time_by_role

    for b, batch in inputs.items():
        shares = time_by_role(model, batch, reps=max(2, reps))
        console.print(f"dense forward at batch {b}, {torch.get_num_threads()} thread(s): "
                      + ", ".join(f"{role} {share:.0%}" for role, share in shares.items())
                      + " (1x1 convolutions and the classifier are what a sparse matrix "
                      "kernel can reach)", highlight=False)


def level_models(ticket: Any) -> Iterator[tuple[int, Any, Any]]:
    """``(level, mask, model)`` for every finished level of the ticket's run: the level's mask
    applied to the dense pre-trained weights θ0 (with a fresh head).

    Speed depends on the sparsity pattern, not on the values, and θ0 is dense; this level's
    trained weights are not (a lower level's mask on them would keep this level's sparsity).
    """
    import copy

    from ticketlab.masks import Mask
    from ticketlab.models import load_model, prunable_parameters
    from ticketlab.store import Run

    run = Run(ticket.run_path)
    info = ticket.info
    theta0 = load_model(info["model"], info["head"], info["num_labels"],
                        trust_remote_code=info.get("trust_remote_code", False)).eval()
    for lvl in run.levels():
        mask = Mask.load(run.level_dir(lvl) / "mask.safetensors")
        net = copy.deepcopy(theta0)
        params = prunable_parameters(net, prune_pooler=True)
        mask.for_params(params).apply_(params)
        yield lvl, mask, net


def _cpu_ratio(t: dict[str, dict[str, float]], threads: int) -> float | None:
    """Dense / accelerated CPU time, on one thread only: there all the work runs on the
    calling thread, so its CPU time is the cost without the share other processes take of the
    core (on a shared machine wall time can show a false slow-down). None on more threads."""
    if threads != 1 or not t["accel"]["cpu"] > 0:
        return None
    return t["dense"]["cpu"] / t["accel"]["cpu"]


#: One point of the sweep: (sparsity, wall-time speed-up, CPU-time speed-up or None).
Point = tuple[float, float, "float | None"]


def _sweep(ticket: Any, batch: dict[str, Any], thread_counts: list[int],
           reps: int) -> dict[int, list[Point]]:
    """Speed-up at ``batch`` of every finished level of the run (see :func:`level_models`)."""
    import torch

    from ticketlab.sparse import accelerate_ticket

    points: dict[int, list[Point]] = {th: [] for th in thread_counts}
    first = next(iter(batch.values()))
    tokens = int(first.numel() if "input_ids" in batch else first.shape[0])
    for lvl, mask, net in level_models(ticket):
        fast = accelerate_ticket(net, tokens=[tokens], threads=thread_counts)
        for th in thread_counts:
            torch.set_num_threads(th)
            fast(**batch)
            t = time_pair({"dense": lambda net=net: net(**batch),
                           "accel": lambda fast=fast: fast(**batch)}, reps)
            points[th].append((mask.sparsity, t["dense"]["wall"] / t["accel"]["wall"],
                               _cpu_ratio(t, th)))
        console.print(f"  level {lvl}: sparsity {mask.sparsity:.1%}  " + "  ".join(
            f"{th} thr {points[th][-1][1]:.2f}x" + (
                f" (CPU {points[th][-1][2]:.2f}x)" if points[th][-1][2] is not None else "")
            for th in thread_counts), highlight=False)
    return {th: sorted(p) for th, p in points.items()}
