"""Measured kernel choice: a short timing per (shape, density, token count, threads), cached.

Whether a sparse kernel beats the dense one, and which sparse variant wins, depends on things
no formula gets right on every machine: the density, the matrix shape, the number of tokens,
the thread count, the CPU's caches and vector units, and how well MKL does on that shape. So
ticketlab measures: for each distinct key it times dense ``F.linear`` and every sparse variant on
random activations of that size, interleaved round by round, keeps each one's best time, and
stores the numbers in a JSON table next to the built kernel (a new kernel, compiler or CPU starts
a new table). The choice rule lives in :func:`choose`: a sparse variant is used only when it
beats dense by ``margin`` (on more than one thread: and also on one thread, in CPU time);
otherwise the layer stays dense, so an accelerated model is never slower than dense by more than
measurement noise.

Keys bucket the density to steps of 0.02 and the token count to :data:`TOKEN_BUCKETS` (nearest
in log scale), so the 72 layers of BERT-base calibrate a few dozen keys, once per machine.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ticketlab.sparse.build import TOKEN_BLOCKS
from ticketlab.sparse.kernels import (
    COLUMN_CHUNKS,
    PackedWeight,
    Variant,
    gemm,
    pack_dense,
    pack_weight,
    spmm,
)

TABLE_FORMAT = "ticketlab.calibration"
TABLE_VERSION = 7  # 3: weights out of L2 (see evict_caches); 4: paired rows; 5: tile-major;
# 6: spread panel prefetch; 7: column chunks of 96 and 192
#: Token counts calibrated for; a call with T tokens uses the nearest one (in log scale).
TOKEN_BUCKETS = (16, 128, 1024)
#: Density is bucketed to this step in the table's keys.
DENSITY_STEP = 0.02
DENSE = "dense"
#: ticketlab's own dense kernel (``kernels.gemm``): the other dense candidate beside MKL.
GEMM = "gemm"
#: The kernels that do not exploit zeros; a sparse variant is judged against the best of them.
DENSE_KINDS = (DENSE, GEMM)
#: A sparse variant must be this much faster than dense to be chosen.
DEFAULT_MARGIN = 0.05
#: Above this density a layer stays dense without being timed (see :func:`can_run_sparse`).
MAX_SPARSE_DENSITY = 0.8
#: A sparse win smaller than this (dense time / sparse time below ``1 / (1 - CLOSE_CALL)``,
#: i.e. under 1.25x) is a close call: it is re-timed, paired with dense, before it counts.
CLOSE_CALL = 0.2
#: Paired rounds (dense, then the candidate, alternating order) that confirm a close call.
CONFIRM_ROUNDS = 12


def token_bucket(tokens: int) -> int:
    """The calibrated token count closest to ``tokens`` in log scale."""
    t = max(int(tokens), 1)
    return min(TOKEN_BUCKETS, key=lambda b: abs(math.log(t / b)))


def table_key(out_features: int, in_features: int, density: float, tokens: int,
              threads: int) -> str:
    """The table key of a layer shape, its density, a token count and a thread count."""
    d = round(density / DENSITY_STEP) * DENSITY_STEP
    return f"{out_features}x{in_features}/d{d:.2f}/t{token_bucket(tokens)}/th{threads}"


#: A variant name's own-thread-count suffix ("tb64-kc256-t1" runs "tb64-kc256" on one thread).
_SINGLE = re.compile(r"-t\d+$")


def _wins(timings: dict[str, float], margin: float) -> dict[str, float]:
    if DENSE not in timings:
        raise ValueError("a calibration entry needs a 'dense' timing")
    bar = best_dense_time(timings) * (1 - margin)
    return {k: v for k, v in timings.items() if k not in DENSE_KINDS and v < bar}


def best_dense(timings: dict[str, float]) -> str:
    """The dense kernel to use: ticketlab's GEMM unless MKL's ``F.linear`` measured faster by
    :data:`DEFAULT_MARGIN`.

    Why the GEMM gets the benefit of the doubt: both do the same work, but only the GEMM applies
    a fused layer's epilogue (GELU, residual + LayerNorm) while its output is in cache; after
    MKL that is one more pass over the activations, which the per-Linear timing does not see.
    (A fresh calibration under load once timed MKL 6 % faster on MiniLM's 384 x 384 layers,
    where the GEMM is 15-25 % faster when re-timed, and the 0 % model lost 15 %.)
    """
    if GEMM in timings and DENSE in timings:
        return DENSE if timings[DENSE] < timings[GEMM] * (1 - DEFAULT_MARGIN) else GEMM
    return DENSE if DENSE in timings else GEMM


def best_dense_time(timings: dict[str, float]) -> float:
    return timings[best_dense(timings)]


def choose(timings: dict[str, float], margin: float = DEFAULT_MARGIN,
           confirm: dict[str, float] | None = None) -> str:
    """The kernel to run: the fastest sparse variant if it beats the best dense kernel by
    ``margin``, else that dense kernel (MKL's ``dense`` or ticketlab's ``gemm``, whichever
    measured faster: both do the same work, so a wrong pick between them costs little).

    ``confirm`` (the same key's timings on one thread) restricts the candidates to the variants
    that also beat dense there. Why: multi-thread timings are wall times, and on a machine that
    other processes share, one unlucky dense measurement can make a sparse kernel look faster at
    a density where it does more work; one-thread timings are CPU times, which that noise does
    not reach. So a sparse kernel runs on N threads only when it is both cheaper (one thread)
    and faster (N threads). A table without a dense timing is refused: the fallback can only be
    decided against it.
    """
    sparse = _wins(timings, margin)
    if confirm is not None:
        cheaper = _wins(confirm, margin)
        sparse = {k: v for k, v in sparse.items() if _SINGLE.sub("", k) in cheaper}
    if not sparse:
        return best_dense(timings)
    return min(sparse, key=sparse.__getitem__)


def can_run_sparse(density: float) -> bool:
    """Whether a layer of this density is worth timing on the sparse kernel at all.

    Why a fixed ceiling: the kernel does one FMA per nonzero (over a token block) plus an index
    and a value load, so against a dense GEMM near the FMA peak it needs a density clearly below
    its own efficiency per useful FLOP to win; ``benchmarks/bench_kernel.py`` measures that
    efficiency at 0.8-1.1 of MKL's (and below that of ticketlab's own dense kernel) on the
    encoder shapes. Above :data:`MAX_SPARSE_DENSITY` a win is at best a few percent, exactly the
    size of the noise of a timing on a shared machine, and an unpruned layer (density 1.0) must
    never be made slower by a lucky measurement. So such layers stay dense, untimed.
    """
    return density <= MAX_SPARSE_DENSITY


def candidate_variants(in_features: int, tokens: int, threads: int = 1) -> list[Variant]:
    """The sparse variants worth timing: token blocks no wider than the input, distinct column
    chunks, and on several threads each also run on the calling thread alone."""
    bucket = token_bucket(tokens)
    tbs = [tb for tb in TOKEN_BLOCKS if tb <= max(bucket, TOKEN_BLOCKS[0])]
    kcs = sorted({min(kc, in_features) for kc in COLUMN_CHUNKS})
    own = (0, 1) if threads > 1 else (0,)
    return [Variant(tb, kc, t) for t in own for tb in tbs for kc in kcs]


#: Bytes read before each timed call to push the layer's weights out of L1 and L2 (larger than
#: any per-core L2 we know of; the L3 keeps them, as it does in a forward).
EVICT_BYTES = 8 << 20
_evict: dict[str, torch.Tensor] = {}


def evict_caches(keep: torch.Tensor | None = None) -> None:
    """Read :data:`EVICT_BYTES` of other memory, then ``keep`` (the product's input) again.

    Why: in a forward, each of a model's weight matrices was last used a whole forward ago (37
    matrices, 42 MB for MiniLM; 73 and 342 MB for BERT-base), so it comes from L3 or memory,
    while the input is the previous product's output, still in L2. Timing a layer by calling it
    again and again keeps its weights in L2 instead, which flatters whichever kernel suffers most
    from L3 latency: on an AVX-512 Xeon, a calibration timed hot put BERT-base's 50 %-sparse
    layers on the sparse kernel and the accelerated model ran at 0.94x of eager (175.6 -> 186.0
    ms; 1.07x at 0 %).
    """
    buf = _evict.get("buf")
    if buf is None:
        buf = _evict["buf"] = torch.ones(EVICT_BYTES // 4)
    buf.sum()
    if keep is not None:
        keep.sum()


def time_candidates(fns: dict[str, Callable[[], Any]], rounds: int = 3, budget_s: float = 4.0,
                    clock: Callable[[], float] = time.perf_counter,
                    before: Callable[[], Any] | None = None) -> dict[str, float]:
    """Best time of each function, measured in interleaved rounds after one warm-up each.

    Interleaving spreads drift in machine load over all candidates alike. After the first round,
    candidates slower than 1.5x the best so far are dropped, and rounds stop once ``budget_s`` is
    spent (every candidate keeps at least one measurement). ``before`` runs ahead of every
    timed call, outside the clock (:func:`evict_caches`).
    """
    best: dict[str, float] = {}
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    alive = list(fns)
    for r in range(rounds):
        for name in alive:
            if before is not None:
                before()
            t0 = clock()
            fns[name]()
            dt = clock() - t0
            best[name] = min(best.get(name, math.inf), dt)
        if r == 0:
            floor = min(best.values())
            alive = [n for n in alive if best[n] <= 1.5 * floor or n == DENSE]
        if time.perf_counter() - start > budget_s:
            break
    return best


def confirm_close_call(fns: dict[str, Callable[[], Any]], timings: dict[str, float],
                       margin: float = DEFAULT_MARGIN, rounds: int = CONFIRM_ROUNDS,
                       clock: Callable[[], float] = time.perf_counter,
                       before: Callable[[], Any] | None = None) -> dict[str, float]:
    """Re-time a close sparse win against dense before it can be chosen; return the timings.

    A first measurement of a few rounds can flatter a sparse kernel by 10-25 % when the dense
    call happened to share the core with another process (issue 14: 1.85 vs 1.98 ms chosen,
    1.82 vs 1.56 ms re-timed). When the best sparse variant beats dense by less than
    :data:`CLOSE_CALL`, dense and that variant are timed again in ``rounds`` adjacent pairs
    (order alternating), and the variant keeps its win only if it is faster in most pairs *and*
    by ``margin`` in the median pair ratio; otherwise its timing is raised to dense's (so that
    :func:`choose` keeps the layer dense). Clear wins and clear losses are left as they are.
    """
    if DENSE not in timings:
        raise ValueError("a calibration entry needs a 'dense' timing")
    sparse = {k: v for k, v in timings.items() if k not in DENSE_KINDS}
    if not sparse:
        return dict(timings)
    winner = min(sparse, key=sparse.__getitem__)
    ref = best_dense(timings)
    dense = timings[ref]
    if not dense * (1 - CLOSE_CALL) < sparse[winner] < dense * (1 - margin):
        return dict(timings)
    ratios, best_d, best_s = [], math.inf, math.inf
    for r in range(rounds):
        pair = {}
        for name in ((ref, winner) if r % 2 == 0 else (winner, ref)):
            if before is not None:
                before()
            t0 = clock()
            fns[name]()
            pair[name] = clock() - t0
        ratios.append(pair[winner] / pair[ref])
        best_d, best_s = min(best_d, pair[ref]), min(best_s, pair[winner])
    ratios.sort()
    median = ratios[len(ratios) // 2]
    faster_in = sum(q < 1 for q in ratios)
    out = dict(timings)
    out[ref] = min(dense, best_d)
    if median < 1 - margin and 2 * faster_in > rounds:
        out[winner] = max(best_s, out[ref] * median)
    else:  # not confirmed: neither it nor the variants it beat in the same rounds count
        for name, t in sparse.items():
            if t < dense * (1 - margin):
                out[name] = max(t, best_s if name == winner else t, out[ref])
    return out


@torch.no_grad()
def measure_layer(weight: torch.Tensor, bias: torch.Tensor | None, tokens: int, threads: int,
                  packed: dict[int, PackedWeight] | None = None,
                  sparse: bool = True) -> dict[str, float]:
    """Time the dense kernels (MKL, ticketlab's GEMM) and, with ``sparse``, every sparse variant
    for this layer at ``tokens`` tokens and ``threads`` threads.

    ``packed`` caches the packed weight per column chunk (filled in as a side effect).
    """
    packed = {} if packed is None else packed
    n, k = weight.shape
    bucket = token_bucket(tokens)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(bucket, k, generator=gen)
    w = weight.detach().float()
    b = bias.detach().float() if bias is not None else None
    pd = pack_dense(w)
    fns: dict[str, Callable[[], Any]] = {DENSE: lambda: F.linear(x, w, b),
                                         GEMM: lambda: gemm(x, pd, b, threads)}
    for v in candidate_variants(k, bucket, threads) if sparse else []:
        if v.kc not in packed:
            packed[v.kc] = pack_weight(w, v.kc)
        pw = packed[v.kc]
        fns[v.name] = lambda pw=pw, tb=v.tb, th=v.threads or threads: spmm(x, pw, b, tb, th)
    # On one thread all the work runs on the calling thread (MKL and the kernel alike), so its
    # CPU time is the cost without the noise of other processes sharing the cores; with more
    # threads only wall time measures parallel efficiency.
    clock = time.thread_time if threads == 1 else time.perf_counter
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def cold() -> None:
            evict_caches(x)

        return confirm_close_call(fns, time_candidates(fns, clock=clock, before=cold),
                                  clock=clock, before=cold)
    finally:
        torch.set_num_threads(previous)


@dataclass
class CalibrationTable:
    """Timings per key (see :func:`table_key`), optionally backed by a JSON file.

    A table built in memory (``path=None``) is never written: tests and users can inject one to
    force choices. Entries measured at run time are added with :meth:`put`; :meth:`save` merges
    them into the file (another process may have added entries meanwhile) and writes atomically.
    """

    entries: dict[str, dict[str, float]] = field(default_factory=dict)
    path: Path | None = None
    _dirty: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, path: Path) -> CalibrationTable:
        """The table stored at ``path``; a missing or unreadable file gives an empty table (it is
        only a cache, and is rebuilt by measuring)."""
        return cls(_read_entries(path), Path(path))

    @classmethod
    def default(cls) -> CalibrationTable:
        """The table of this machine's built kernel."""
        from ticketlab.sparse.build import library_path

        return cls.load(library_path().parent / "calibration.json")

    def get(self, key: str) -> dict[str, float] | None:
        return self.entries.get(key)

    def put(self, key: str, timings: dict[str, float]) -> None:
        self.entries[key] = dict(timings)
        self._dirty.add(key)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        from ticketlab.store import atomic_write_json

        merged = _read_entries(self.path)
        merged.update({k: self.entries[k] for k in self._dirty})
        atomic_write_json(self.path, {"format": TABLE_FORMAT, "version": TABLE_VERSION,
                                      "entries": merged})
        self.entries = {**merged, **self.entries}
        self._dirty.clear()


def _read_entries(path: Path) -> dict[str, dict[str, float]]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if record.get("format") != TABLE_FORMAT or record.get("version") != TABLE_VERSION:
        return {}
    entries = record.get("entries")
    if not isinstance(entries, dict):
        return {}
    good = {}
    for key, timings in entries.items():
        if isinstance(timings, dict) and DENSE in timings and all(
                isinstance(v, (int, float)) for v in timings.values()):
            good[key] = {name: float(v) for name, v in timings.items()}
    return good
