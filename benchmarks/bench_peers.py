"""ticketlab's accelerated ticket against other CPU inference engines, on identical masked weights.

What is measured
----------------
The forward latency (batch x sequence 128, every token attended) of a sequence-classification
model with a global magnitude mask (the pooler kept dense, as in ``bench_sparse.py``): MiniLM-L6
(real weights) and a BERT-base-shaped model (random init; speed depends on the sparsity
pattern, not on the values), at 0/50/70/90/95 % sparsity, batch 1 and 32, on 1 thread (and 2),
in four engines on the *same* masked weights:

- ``torch``: PyTorch eager, ``model(**batch)`` (the reference for every ratio and every logit);
- ``ticketlab``: ``ticketlab.accelerate_ticket(model, example=batch)``: each layer's kernel
  chosen from its own timing, and the ties among them settled by timing this forward
  (``confirm_plan``);
- ``ticketlab-layers`` (only when asked for, ``--engines``): the same without ``example``, the
  plan as the per-layer timings chose it, to see what the forward check changes;
- ``onnxruntime``: ONNX Runtime (``pip install onnxruntime onnx``, the ``bench`` extra) on an
  ONNX export of the masked model (``torch.onnx.export``, static shapes, all graph
  optimisations);
- ``deepsparse``: Neural Magic's DeepSparse 1.8 on the same ONNX file, *if it is installed* (a
  comparator only: end-of-life, evaluation licence; ticketlab never imports it). It pins
  numpy < 2 and onnx < 1.15, so it is best installed in its own virtual environment with
  ``--system-site-packages`` and this script run with that environment's python.

How
---
One process per cell (model, batch, threads, sparsity): the parent runs this script again with
``--cell`` for each, so no engine's memory or threads disturb another cell. Inside a cell,
after a warm-up call each (which also runs ticketlab's calibration, cached on disk, and
DeepSparse's compilation), the engines are called round by round with a rotating order, so a
drift in machine load hits all alike, and the best of ``--reps`` calls is kept, both in CPU
time of the whole process (``time.process_time``: all threads, engines that run their own
worker threads included; the share of the cores other processes take does not count) and in
wall time. Outputs are checked: the largest logit difference of every engine against PyTorch
eager is printed.

Ratios: "vs torch" is torch's time / the engine's time in the same cell. "vs fastest dense" is
ticketlab's speed-up over torch divided by the best speed-up over torch any engine reaches at
0 % (dense) for the same model, batch and threads; torch's dense kernels do the same work at
every sparsity, so its time is the common yardstick across cells.

Run: ``python benchmarks/bench_peers.py [--quick]`` (full: about an hour on 2 cores); with
DeepSparse: ``/path/to/venv/bin/python benchmarks/bench_peers.py``.
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  # first: sets the environment
# isort: on

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

SEQ_LEN = 128
ENGINES = ("torch", "ticketlab", "onnxruntime", "deepsparse")
#: Engines run only when named in ``--engines``.
EXTRA_ENGINES = ("ticketlab-layers",)


def installed(engine: str) -> bool:
    """Whether an engine's package can be imported here (torch and ticketlab always can)."""
    module = {"onnxruntime": "onnxruntime", "deepsparse": "deepsparse"}.get(engine)
    return module is None or importlib.util.find_spec(module) is not None


class Logits(nn.Module):
    """``model(input_ids, attention_mask).logits`` as a plain function of two tensors (export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> float:
    """Export a copy of ``model`` (the exporter may leave a model changed) with static shapes."""
    t0 = time.perf_counter()
    net = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(net), (inputs["input_ids"], inputs["attention_mask"]),
                          str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return time.perf_counter() - t0


def onnxruntime_engine(path: Path, threads: int) -> Callable[[dict], Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)[0]


def deepsparse_engine(path: Path, batch: int, threads: int) -> Callable[[dict], Any]:
    from deepsparse import Engine

    engine = Engine(model=str(path), batch_size=batch, num_cores=threads)
    return lambda feed: engine.run([feed["input_ids"], feed["attention_mask"]])[0]


def cpu_isa() -> str:
    """The CPU's model and widest vector extension: the ranking of the engines depends on it
    (DeepSparse's README: "highly recommended to run on a CPU with AVX-512 instructions
    available for optimal algorithms to be enabled"; on AVX2 it measured far slower here)."""
    from ticketlab.sparse.build import cpu_signature

    model, _, flags = cpu_signature().partition("|")
    isa = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags.split()),
               "no vector extension known here")
    return f"{model}, {isa}"


def run_cell(model_name: str, batch: int, threads: int, sparsity: float, reps: int,
             engines: list[str]) -> dict[str, Any]:
    """Everything measured for one cell, in this process."""
    from bench_sparse import build_model, masked_copy

    from ticketlab.sparse import accelerate_ticket, sparse_layers

    torch.set_num_threads(threads)
    net, _ = masked_copy(build_model(model_name), sparsity)
    net.eval()
    gen = torch.Generator().manual_seed(batch)
    inputs = {"input_ids": torch.randint(1000, net.config.vocab_size, (batch, SEQ_LEN),
                                         generator=gen),
              "attention_mask": torch.ones(batch, SEQ_LEN, dtype=torch.long)}
    feed = {k: v.numpy() for k, v in inputs.items()}
    setup: dict[str, float] = {}
    fns: dict[str, Callable[[], Any]] = {}
    outs: dict[str, Callable[[], torch.Tensor]] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        if any(e in engines for e in ("onnxruntime", "deepsparse")):
            setup["onnx export s"] = export_onnx(net, inputs, onnx_path)
        for engine in engines:
            t0 = time.perf_counter()
            if engine == "torch":
                fn = lambda: net(**inputs).logits  # noqa: E731
            elif engine.startswith("ticketlab"):
                check = engine == "ticketlab"
                fast = accelerate_ticket(net, tokens=(batch * SEQ_LEN,), threads=(threads,),
                                         example=inputs if check else None)
                fn = lambda fast=fast: fast(**inputs).logits  # noqa: E731
                layers = sparse_layers(fast).values()
                used = sum(m.decide(batch * SEQ_LEN, threads) != "dense" for m in layers)
                extra[f"{engine} sparse layers"] = f"{used}/{len(layers)}"
                if check:
                    extra["ticketlab plan check"] = fast.plan_check
            elif engine == "onnxruntime":
                run = onnxruntime_engine(onnx_path, threads)
                fn = lambda run=run: torch.from_numpy(run(feed))  # noqa: E731
            else:
                run = deepsparse_engine(onnx_path, batch, threads)
                fn = lambda run=run: torch.from_numpy(run(feed))  # noqa: E731
            with torch.inference_mode():
                fn()  # warm-up (and calibration / compilation)
            setup[f"{engine} setup s"] = time.perf_counter() - t0
            fns[engine] = fn
            outs[engine] = fn
        with torch.inference_mode():
            ref = outs["torch"]().float()
            diffs = {e: float((f().float() - ref).abs().max()) for e, f in outs.items()}
            best = timed_rounds(fns, reps)
    return {"model": model_name, "batch": batch, "threads": threads, "sparsity": sparsity,
            "reps": reps, "cpu_s": {e: b["cpu"] for e, b in best.items()},
            "wall_s": {e: b["wall"] for e, b in best.items()}, "max_logit_diff": diffs,
            "setup": setup, **extra}


def timed_rounds(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, float]]:
    """Best process CPU time and wall time of each function, interleaved with rotating order."""
    names = list(fns)
    best = {n: {"wall": float("inf"), "cpu": float("inf")} for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            best[name]["cpu"] = min(best[name]["cpu"], time.process_time() - c0)
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - w0)
    return best


def fmt_ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}x" if num and den else "–"


def markdown(cells: list[dict[str, Any]], engines: list[str]) -> str:
    """The speed-up table (CPU time, wall time in parentheses) and the detail table."""
    dense: dict[tuple, dict[str, float]] = {}
    for c in cells:
        if c["sparsity"] == 0:
            t = c["cpu_s"]["torch"]
            dense[(c["model"], c["batch"], c["threads"])] = {
                e: t / v for e, v in c["cpu_s"].items() if not e.startswith("ticketlab")}
    others = [e for e in engines if e != "torch"]
    head = ["model", "batch", "threads", "sparsity", "torch eager ms (CPU)"]
    head += [f"{e} vs torch" for e in others]
    head += ["ticketlab vs fastest dense", "ticketlab vs DeepSparse"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|" + "---:|" * (len(head) - 4)]
    for c in cells:
        cpu, wall = c["cpu_s"], c["wall_s"]
        row = [c["model"], str(c["batch"]), str(c["threads"]), f"{c['sparsity']:.0%}",
               f"{1e3 * cpu['torch']:.1f}"]
        for e in others:
            row.append(f"{fmt_ratio(cpu['torch'], cpu.get(e))} "
                       f"({fmt_ratio(wall['torch'], wall.get(e))})" if e in cpu else "–")
        ref = dense.get((c["model"], c["batch"], c["threads"]))
        if ref and "ticketlab" in cpu:
            fastest = max(ref, key=ref.__getitem__)
            row.append(f"{cpu['torch'] / cpu['ticketlab'] / ref[fastest]:.2f}x ({fastest})")
        else:
            row.append("–")
        row.append(fmt_ratio(cpu.get("deepsparse"), cpu.get("ticketlab")))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| model | batch | threads | sparsity | " + " | ".join(
        f"{e} ms CPU / wall" for e in engines) + " | max abs Δ logit vs torch | ticketlab "
        "sparse layers (flipped by the plan check) | load before / after |",
        "|---|---:|---:|---:|" + "---:|" * len(engines) + "---|---:|---|"]
    for c in cells:
        ms = [f"{1e3 * c['cpu_s'][e]:.1f} / {1e3 * c['wall_s'][e]:.1f}" if e in c["cpu_s"]
              else "–" for e in engines]
        diffs = ", ".join(f"{e} {v:.1e}" for e, v in c["max_logit_diff"].items() if e != "torch")
        flipped = sum(len(g["layers"]) for g in c.get("ticketlab plan check", [])
                      if g["flipped"])
        lines.append(f"| {c['model']} | {c['batch']} | {c['threads']} | {c['sparsity']:.0%} | "
                     + " | ".join(ms) + f" | {diffs} | {c.get('ticketlab sparse layers', '–')} "
                     f"({flipped}) | {c.get('load', '–')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="MiniLM only, batch 1, sparsity 0/90, 1 thread, 5 rounds")
    parser.add_argument("--models", default=None, help="default minilm,bert-base")
    parser.add_argument("--sparsities", default=None, help="default 0,0.5,0.7,0.9,0.95")
    parser.add_argument("--batch-sizes", default=None, help="default 1,32")
    parser.add_argument("--threads", default=None, help="default 1")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help="subset of " + ",".join(ENGINES) + " (missing packages skipped)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed rounds (default batch 1: 15 MiniLM / 7 BERT-base; "
                        "batch 32: 5 / 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write all cells as JSON")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cell-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if e not in ENGINES + EXTRA_ENGINES]
    if bad:
        parser.error(f"unknown engines {bad}; choose from {ENGINES + EXTRA_ENGINES}")
    if "torch" not in engines:
        engines.insert(0, "torch")

    if args.cell:  # a child: one cell, results as JSON
        model, batch, threads, sparsity = args.cell.split(",")
        result = run_cell(model, int(batch), int(threads), float(sparsity), args.reps or 5,
                          engines)
        args.cell_out.write_text(json.dumps(result))
        return

    missing = [e for e in engines if not installed(e)]
    if missing:
        print(f"not installed here, skipped: {', '.join(missing)}", flush=True)
    engines = [e for e in engines if e not in missing]
    models = (args.models or ("minilm" if args.quick else "minilm,bert-base")).split(",")
    sparsities = [float(s) for s in (args.sparsities
                                     or ("0,0.9" if args.quick else "0,0.5,0.7,0.9,0.95")
                                     ).split(",")]
    batches = [int(b) for b in (args.batch_sizes or ("1" if args.quick else "1,32")).split(",")]
    thread_counts = [int(t) for t in (args.threads or "1").split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({cpu_isa()}), engines {engines}; "
          f"seq {SEQ_LEN}; load average {os.getloadavg()[0]:.2f}", flush=True)
    for e in engines[1:]:
        with contextlib.suppress(Exception):
            print(f"  {e} {__import__(e).__version__}", flush=True)
    cells = []
    for model in models:
        for threads in thread_counts:
            for batch in batches:
                for s in sparsities:
                    reps = args.reps or (5 if args.quick else {
                        (1, "minilm"): 15, (1, "bert-base"): 7, (32, "minilm"): 5}.get(
                            (batch, model), 3))
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "cell.json"
                        before = os.getloadavg()[0]
                        proc = subprocess.run(
                            [sys.executable, __file__, "--cell", f"{model},{batch},{threads},{s}",
                             "--cell-out", str(out), "--reps", str(reps),
                             "--engines", ",".join(engines)], capture_output=True, text=True)
                        if proc.returncode != 0:
                            print(proc.stderr[-3000:], file=sys.stderr)
                            raise SystemExit(f"cell {model} b{batch} th{threads} {s:.0%} failed")
                        cell = json.loads(out.read_text())
                    cell["load"] = f"{before:.2f} / {os.getloadavg()[0]:.2f}"
                    cells.append(cell)
                    cpu = cell["cpu_s"]
                    print(f"  {model:9s} b{batch:<2d} th{threads} {s:4.0%}: " + "  ".join(
                        f"{e} {1e3 * cpu[e]:.1f} ms ({cpu['torch'] / cpu[e]:.2f}x)"
                        for e in engines) + f"  load {cell['load']}", flush=True)
    print("\n" + markdown(cells, engines))
    if args.json:
        for cell in cells:
            cell["cpu"] = cpu_isa()
        args.json.write_text(json.dumps(cells, indent=2) + "\n")


if __name__ == "__main__":
    main()
