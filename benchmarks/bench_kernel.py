"""One Linear, dense (MKL, ticketlab's GEMM) vs ticketlab's sparse kernel: where sparse can win.

What is measured
----------------
For each matrix shape of MiniLM-L6 and BERT-base (Q/K/V/attention-out, FFN in, FFN out), each
density (random unstructured masks) and each token count, the best time of dense ``F.linear``
(MKL), of ticketlab's dense GEMM (``kernels.gemm``: what a layer that stays dense runs when it
measures faster than MKL; on AMD Zen 5 it is twice as fast) and of the best sparse kernel
variant (every token block and column chunk the calibration tries), on one thread, in CPU time
of the calling thread (``time.thread_time``: the other load on a shared machine does not reach
it) beside wall time, interleaved round by round.

It prints the speed-up of sparse over MKL and over the GEMM, the gain of paired rows
(``pack_weight``'s layout) over the same kernel with every row single (random masks share fewer
columns than trained ones: the gain on a real ticket is larger), and the kernel's efficiency
per *useful* FLOP relative to the faster dense kernel (``speed-up * density``: 1.0 would mean
the sparse kernel multiplies a nonzero as fast as the dense kernel multiplies any weight). Why:
that efficiency is what bounds which density can ever run sparse. A sparse layer at density
``d`` is faster than dense only if ``efficiency > d``; at density 1.0 the kernel does the same
FLOPs as dense while loading 6 bytes per weight instead of 4, so it cannot win, and the engine
does not even time it above ``ticketlab.sparse.calibration.MAX_SPARSE_DENSITY``.

Run: ``python benchmarks/bench_kernel.py [--quick]``.
"""

from __future__ import annotations

# isort: off
import _common  # noqa: F401  # first: sets the environment
# isort: on

import argparse
import os
import time

import torch
import torch.nn.functional as F

from ticketlab.sparse.calibration import MAX_SPARSE_DENSITY, candidate_variants
from ticketlab.sparse.kernels import gemm, pack_dense, pack_weight, spmm

SHAPES = {"minilm": [(384, 384), (1536, 384), (384, 1536)],
          "bert-base": [(768, 768), (3072, 768), (768, 3072)]}


def best_times(fns: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Best (CPU, wall) seconds per function over interleaved rounds with rotating order."""
    for fn in fns.values():
        fn()
    names = list(fns)
    best = {n: (float("inf"), float("inf")) for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c0, w0 = time.thread_time(), time.perf_counter()
            fns[n]()
            c, w = time.thread_time() - c0, time.perf_counter() - w0
            best[n] = (min(best[n][0], c), min(best[n][1], w))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM shapes, 128 tokens")
    parser.add_argument("--densities", default="0.05,0.1,0.3,0.5,0.6,0.7,0.8,0.9,1.0")
    parser.add_argument("--tokens", default=None, help="default 128,4096 (quick: 128)")
    parser.add_argument("--models", default=None, help="default minilm,bert-base")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    densities = [float(d) for d in args.densities.split(",")]
    tokens = [int(t) for t in (args.tokens or ("128" if args.quick else "128,4096")).split(",")]
    models = (args.models or ("minilm" if args.quick else "minilm,bert-base")).split(",")
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f}; "
          f"MAX_SPARSE_DENSITY = {MAX_SPARSE_DENSITY}")
    print("| shape | tokens | density | MKL ms (CPU) | GEMM ms (CPU) | best sparse "
          "| sparse ms (CPU) | vs MKL CPU | vs MKL wall | vs GEMM CPU | efficiency per useful FLOP "
          "| paired vs unpaired rows |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    for model in models:
        for n, k in SHAPES[model]:
            w = torch.randn(n, k, generator=gen) * 0.05
            keep = torch.rand(n, k, generator=gen)
            for t in tokens:
                x = torch.randn(t, k, generator=gen)
                for d in densities:
                    wd = w * (keep < d)
                    pd = pack_dense(wd)
                    fns = {"dense": lambda wd=wd, x=x: F.linear(x, wd),
                           "gemm": lambda pd=pd, x=x: gemm(x, pd, None, 1)}
                    packs = {}
                    for v in candidate_variants(k, t, 1):
                        for pair in (True, False):  # the kernel's layout, and rows unpaired
                            if (v.kc, pair) not in packs:
                                packs[v.kc, pair] = pack_weight(wd, v.kc, pair=pair)
                            fns[v.name + ("" if pair else " unpaired")] = (
                                lambda p=packs[v.kc, pair], tb=v.tb, x=x: spmm(x, p, None, tb, 1))
                    best = best_times(fns, args.rounds)
                    paired = [m for m in best
                              if m not in ("dense", "gemm") and not m.endswith("unpaired")]
                    name = min(paired, key=lambda m: best[m][0])
                    single = min((m for m in best if m.endswith("unpaired")),
                                 key=lambda m: best[m][0])
                    dc, dw = best["dense"]
                    gc = best["gemm"][0]
                    sc, sw = best[name]
                    print(f"| {n}x{k} | {t} | {d:.2f} | {1e3 * dc:.3f} | {1e3 * gc:.3f} | {name} "
                          f"| {1e3 * sc:.3f} | {dc / sc:.2f}x | {dw / sw:.2f}x | {gc / sc:.2f}x "
                          f"| {d * min(dc, gc) / sc:.2f} | {best[single][0] / sc:.2f}x |",
                          flush=True)


if __name__ == "__main__":
    main()
