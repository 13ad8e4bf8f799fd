"""The sparse × dense product: packing a weight matrix, and calling the C kernel on it.

A :class:`PackedWeight` is the column-blocked CSR layout that ``kernel.c`` reads (see the
comment at its top): int32 row pointers per column chunk of ``kc`` inputs, int16 column indices
relative to the chunk, float32 values. :func:`spmm` computes ``x @ W.T + b`` with it, in the
token-block width ``tb``; which ``(tb, kc)`` is fastest for a layer is measured by
:mod:`ticketlab.sparse.calibration`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from ticketlab.sparse.build import TOKEN_BLOCKS, load_library

#: Column-chunk widths tried by the calibration (int16 relative indices allow up to 32767).
#: Why 96 and 192 beside the powers of two: a chunk's slice of X^T (kc x TB floats) is reread by
#: every row of a tile, so it is fastest when it just fits in L1 -- the fewer chunks, the less
#: per-chunk overhead (partial sums to memory, loop exits), until the slice spills to L2. 64/128
#: fill a 32 KiB L1 at TB = 128/64; 96/192 fill the 48 KiB L1 of Golden Cove and Zen 5 cores.
#: Measured on an AVX-512 Xeon (48 KiB L1D), 1 thread, 128 tokens, density 0.5, 12 weights
#: cycled: TB = 128 at kc = 96 against the best power of two, 768x768 0.80 vs 0.84 ms, 3072x768
#: 3.15 vs 3.36, 768x3072 3.32 vs 3.54, 384x1536 0.84 vs 0.90.
COLUMN_CHUNKS = (64, 96, 128, 192, 256, 512)


@dataclass(frozen=True)
class Variant:
    """One sparse kernel configuration: token-block width, column-chunk width, and the threads
    the kernel itself uses (0: as many as torch; 1: only the calling thread -- small products
    can finish before a sleeping worker thread would even wake up)."""

    tb: int
    kc: int
    threads: int = 0

    @property
    def name(self) -> str:
        suffix = f"-t{self.threads}" if self.threads else ""
        return f"tb{self.tb}-kc{self.kc}{suffix}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        tb, kc, *rest = name.split("-")
        threads = int(rest[0].removeprefix("t")) if rest else 0
        return cls(int(tb.removeprefix("tb")), int(kc.removeprefix("kc")), threads)


@dataclass(frozen=True)
class PackedWeight:
    """A weight matrix ``[N, K]`` in column-blocked CSR (only its nonzeros are stored), with
    its rows paired.

    Why pairs: the kernel is bound by loads, not by FMAs -- every nonzero loads its own row of
    X^T (eight 512-bit loads for eight FMAs at 128 tokens), plus its index and value. Two rows
    that share a column can share that load: the pair's 16 FMAs need 8 loads of X^T (measured in
    isolation on an AVX-512 Xeon: 158 against 117 GFLOP/s). Rows are paired greedily within a
    tile of ``tl_tile_rows()`` output rows (the kernel's partial sums of a tile stay in one
    buffer, so a pair never crosses a tile) by the number of columns they share; on MiniLM's
    global-magnitude masks 57 % of the nonzeros at 50 % sparsity, 42 % at 70 % and 25 % at 90 %
    are in a shared column of their pair (a random mask gives 50, 30 and 10 %).

    Layout: the kernel walks ``groups`` -- a pair ``(a, b)`` or a single row ``(a, -1)`` --
    tile by tile (``tgroup`` are the first group of each tile). In column chunk ``c``, a pair
    ``g`` of tile ``t`` has its shared columns at ``sidx[sptr[c, g + t]:sptr[c, g + t + 1]]``,
    with the two rows' values interleaved in ``sval``; the remaining nonzeros of each row are
    CSR in ``rowptr``/``idx``/``val`` over row *slots* ``2 g`` (row a) and ``2 g + 1`` (row b,
    empty for a single row), at ``rowptr[c, slot + t]``. Both streams are stored in the order
    the kernel reads them: tile by tile, and within a tile chunk by chunk
    (:func:`_tile_major_csr`), so that a weight is read front to back. Measured: with the rows'
    own nonzeros in row order, the pairs' gain was lost to the jumps in a cold forward; with
    every chunk a stream of its own (chunk-major, up to 4 x 48 streams read in turn), a
    768 x 768 product at density 0.5 took 1.29-1.53x its hot time with its weights out of
    every cache, against 1.18x for a single chunk.
    """

    rowptr: torch.Tensor  # int32 [ncb * (2 * ngroups + ntiles)] per row slot, into idx/val
    idx: torch.Tensor  # int16 [nnz own], column index within its chunk
    val: torch.Tensor  # float32 [nnz own]
    groups: torch.Tensor  # int32 [2 * ngroups]: (a, b) per group, b = -1 for a single row
    tgroup: torch.Tensor  # int32 [ntiles + 1]: first group of each tile of output rows
    sptr: torch.Tensor  # int32 [ncb * (ngroups + ntiles)], absolute offsets into sidx
    sidx: torch.Tensor  # int16 [nshared], column index within its chunk
    sval: torch.Tensor  # float32 [2 * nshared]: (w[a, k], w[b, k]) per shared column
    out_features: int
    in_features: int
    kc: int

    @property
    def ncb(self) -> int:
        return (self.in_features + self.kc - 1) // self.kc

    @property
    def ngroups(self) -> int:
        return self.groups.numel() // 2

    @property
    def nnz(self) -> int:
        return int(self.val.numel() + self.sval.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.out_features * self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (
            self.rowptr, self.idx, self.val, self.groups, self.tgroup, self.sptr, self.sidx,
            self.sval))


#: A pair is formed only if its rows share at least this many columns per column chunk on
#: average. Why: each pair adds a short loop per chunk (its setup and a mispredicted exit) that
#: a handful of saved loads does not pay for. Measured within noise against pairing every row
#: that shares a column (one process, same plan: MiniLM batch 1 at 50 and 90 %, about 2 %;
#: BERT-base batch 32 at 90 %, 1377 against 1378 ms). Re-measured on AMD Zen 5 after a pair's
#: shared vector was held in a register: thresholds 1, 2, 4 and 8 within 1.6 % in geometric mean
#: (MiniLM's real masks at 50/70/90 %, Q, V, FFN in and out, 128 and 1024 tokens).
PAIR_MIN_SHARED_PER_CHUNK = 4


def pair_rows(nz: torch.Tensor, tile: int, min_shared: float = 1.0) -> list[tuple[int, int]]:
    """Groups of the rows of the 0/1 matrix ``nz`` ([N, K]), tile by tile of ``tile`` rows:
    greedily, the row with the most nonzeros first, each row paired with the unpaired row of its
    tile that shares the most columns with it, if they share at least ``min_shared`` (else
    ``(a, -1)``: a single row)."""
    groups: list[tuple[int, int]] = []
    for t0 in range(0, nz.shape[0], tile):
        m = nz[t0:t0 + tile].to(torch.float32)
        overlap = (m @ m.T).fill_diagonal_(-1.0)
        free = torch.ones(m.shape[0], dtype=torch.bool)
        for i in torch.argsort(m.sum(dim=1), descending=True, stable=True).tolist():
            if not free[i]:
                continue
            free[i] = False
            shared = overlap[i].masked_fill(~free, -1.0)
            j = int(shared.argmax())
            if shared[j] >= max(1.0, min_shared):
                free[j] = False
                groups.append((t0 + i, t0 + j))
            else:
                groups.append((t0 + i, -1))
    return groups


def _tile_major_csr(nz: torch.Tensor, kc: int, tile_of: torch.Tensor, ntiles: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR of the 0/1 matrix ``nz`` ([S, K]: S row slots, listed tile by tile) in chunks of
    ``kc`` columns, with its nonzeros stored **tile-major**: tile 0's chunk 0, tile 0's chunk 1,
    ..., then tile 1. That is the order the kernel reads them (per token block: every tile,
    and per tile every chunk), so a weight is one sequential stream.

    Returns the row pointers ``[ncb, S + ntiles]`` (int32, absolute: slot ``s`` of tile ``t``
    in chunk ``c`` spans ``ptr[c, s + t]`` to ``ptr[c, s + t + 1]``: one extra entry per tile
    closes its last slot, since the next tile's slots of that chunk are stored elsewhere), the
    chunk-relative column indices (int16) and the positions ``(slot, column)`` of the stored
    nonzeros, in storage order.
    """
    n, k = nz.shape
    ncb = (k + kc - 1) // kc
    slot, col = nz.nonzero(as_tuple=True)  # slots ascending, columns ascending within a slot
    chunk = col // kc
    order = torch.argsort((tile_of[slot] * ncb + chunk) * n + slot, stable=True)
    slot, col, chunk = slot[order], col[order], chunk[order]
    counts = torch.zeros(ncb, n, dtype=torch.int64)
    counts.index_put_((chunk, slot), torch.ones_like(slot), accumulate=True)
    if int(counts.sum()) >= 2**31:
        raise ValueError("too many nonzeros for int32 row pointers")
    ptr = torch.zeros(ncb, n + ntiles, dtype=torch.int64)
    bounds = torch.searchsorted(tile_of, torch.arange(ntiles + 1))
    offset = 0
    for t in range(ntiles):  # regions (t, 0), (t, 1), ... follow each other
        a, b = int(bounds[t]), int(bounds[t + 1])
        within = torch.cumsum(counts[:, a:b], dim=1)  # [ncb, slots of the tile]
        starts = offset + torch.cumsum(within[:, -1], 0) - within[:, -1] if b > a else (
            torch.full((ncb,), offset, dtype=torch.int64))
        ptr[:, a + t] = starts
        if b > a:
            ptr[:, a + t + 1:b + t + 1] = starts[:, None] + within
            offset += int(within[:, -1].sum())
    return ptr.to(torch.int32).flatten(), (col - chunk * kc).to(torch.int16), torch.stack(
        [slot, col])


@torch.no_grad()
def pack_weight(weight: torch.Tensor, kc: int, pair: bool = True) -> PackedWeight:
    """Pack the nonzeros of ``weight`` ([N, K], any float dtype) for the kernel, in float32,
    with its rows paired (``pair=False``: every row on its own, for comparison)."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    if not 0 < kc <= 32767:
        raise ValueError(f"column chunk {kc} must be in [1, 32767] (int16 indices)")
    w = weight.detach().to("cpu", torch.float32)
    n, k = w.shape
    nz = w != 0
    tile = load_library().tl_tile_rows()
    if pair:
        groups = pair_rows(nz, tile, PAIR_MIN_SHARED_PER_CHUNK * ((k + kc - 1) // kc))
    else:
        groups = [(r, -1) for r in range(n)]
    # groups are listed tile by tile: the first group of each tile
    tiles = torch.tensor([a // tile for a, _ in groups], dtype=torch.int64)
    tgroup = torch.searchsorted(tiles, torch.arange((n + tile - 1) // tile + 1))
    ga = torch.tensor([a for a, _ in groups], dtype=torch.int64)
    gb = torch.tensor([b for _, b in groups], dtype=torch.int64)
    paired = gb >= 0
    shared = torch.zeros(len(groups), k, dtype=torch.bool)
    shared[paired] = nz[ga[paired]] & nz[gb[paired]]
    # each row's own nonzeros, in the order the kernel visits the rows (a, b of every group):
    # one sequential stream per chunk, as the hardware prefetcher wants it
    slots = torch.stack([ga, gb], dim=1).flatten()
    live = slots >= 0
    own = torch.zeros(len(slots), k, dtype=torch.bool)
    own[live] = nz[slots[live]]
    own[0::2] &= ~shared
    own[1::2] &= ~shared
    ntiles = (n + tile - 1) // tile
    group_tile = ga // tile
    rowptr, idx, pos = _tile_major_csr(own, kc, group_tile.repeat_interleave(2), ntiles)
    val = w[slots[pos[0]], pos[1]]
    sptr, sidx, spos = _tile_major_csr(shared, kc, group_tile, ntiles)
    sval = torch.stack([w[ga[spos[0]], spos[1]], w[gb[spos[0]].clamp(min=0), spos[1]]],
                       dim=1).flatten()
    return PackedWeight(
        rowptr=rowptr.contiguous(),
        idx=idx.contiguous(),
        val=val.contiguous(),
        groups=slots.to(torch.int32).contiguous(),
        tgroup=tgroup.to(torch.int32).contiguous(),
        sptr=sptr.contiguous(),
        sidx=sidx.contiguous(),
        sval=sval.contiguous(),
        out_features=n,
        in_features=k,
        kc=kc,
    )


_workspace = threading.local()


def output(out: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor:
    """``out`` checked to be a contiguous float32 ``[rows, cols]`` tensor, or a new one."""
    if out is None:
        return torch.empty(rows, cols, dtype=torch.float32)
    if out.shape != (rows, cols) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [{rows}, {cols}] tensor")
    return out


def _workspace_for(numel: int) -> torch.Tensor:
    """A per-thread scratch buffer, grown on demand and reused (no allocation per call)."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 16), dtype=torch.float32)
        _workspace.buf = buf
    return buf


#: Activation codes of the fused epilogue (``kernel.c``: ACT_*).
ACT_NONE, ACT_GELU, ACT_GELU_TANH, ACT_RELU = 0, 1, 2, 3


@dataclass(frozen=True)
class Epilogue:
    """What a product does to its output while it is still in cache: ``act(x W^T + b)``, then,
    with ``ln`` (a LayerNorm's weight, bias and eps), ``LayerNorm(y + residual)``."""

    act: int = ACT_NONE
    residual: torch.Tensor | None = None
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def args(self, rows: int, features: int) -> tuple[Any, ...]:
        """The C arguments (act, res, gamma, beta, eps), checked against the output shape."""
        res = self.residual
        if res is not None:
            if res.shape != (rows, features) or not res.is_contiguous() \
                    or res.dtype != torch.float32:
                raise ValueError(f"residual must be a contiguous float32 [{rows}, {features}]")
        if self.ln is None:
            if res is not None:
                raise ValueError("a residual is only added before a LayerNorm")
            return (self.act, None, None, None, 0.0)
        gamma, beta, eps = self.ln
        if gamma.shape != (features,) or beta.shape != (features,):
            raise ValueError(f"LayerNorm parameters must have {features} elements")
        return (self.act, res.data_ptr() if res is not None else None, gamma.data_ptr(),
                beta.data_ptr(), float(eps))


NO_EPILOGUE = Epilogue()


def _operands(x: torch.Tensor, packed: Any, out: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A product's contiguous input, checked against the packed weight, and its output buffer."""
    k = x.shape[1]
    if k != packed.in_features:
        raise ValueError(f"input has {k} features, the weight expects {packed.in_features}")
    return x.contiguous(), output(out, x.shape[0], packed.out_features)


def spmm_workspace(rows: int, in_features: int, tb: int, threads: int) -> int:
    """Scratch floats ``tl_spmm_tb{tb}`` needs: one packed ``X^T`` block per token block or
    thread, whichever is more."""
    return max((rows + tb - 1) // tb, threads) * in_features * tb


def attention_workspace(seq: int, head_dim: int, threads: int) -> int:
    """Scratch floats ``tl_attention`` needs: per thread ``Kt [d][Tp]``, ``QB = 8`` score rows
    and a bias row, ``Tp`` being ``seq`` rounded up to the vector width."""
    vw = load_library().tl_gemm_nr() // 2
    tp = (seq + vw - 1) // vw * vw
    return threads * (head_dim + 9) * tp


def key_bias_operand(key_bias: torch.Tensor | None, batch: int, seq: int
                     ) -> torch.Tensor | None:
    """``key_bias`` as the contiguous float32 ``[batch, seq]`` the attention kernel reads."""
    if key_bias is None:
        return None
    key_bias = key_bias.to(torch.float32).contiguous()
    if key_bias.shape != (batch, seq):
        raise ValueError(f"key_bias must be [{batch}, {seq}]")
    return key_bias


def spmm(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    tb: int,
    threads: int | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for 2-D float32 CPU ``x`` ([T, K]) with the packed sparse ``W``, and
    the fused ``epilogue`` applied to it; written into ``out`` if given (see :func:`output`)."""
    if tb not in TOKEN_BLOCKS:
        raise ValueError(f"token block {tb} is not one of {TOKEN_BLOCKS}")
    x, y = _operands(x, packed, out)
    (t, k), n = x.shape, packed.out_features
    if t == 0:
        return y
    threads = threads or torch.get_num_threads()
    ws = _workspace_for(spmm_workspace(t, k, tb, threads))
    b = bias.contiguous() if bias is not None else None
    getattr(load_library(), f"tl_spmm_tb{tb}")(
        x.data_ptr(), t, k, ws.data_ptr(), packed.kc, packed.ncb,
        packed.rowptr.data_ptr(), packed.idx.data_ptr(), packed.val.data_ptr(),
        packed.groups.data_ptr(), packed.tgroup.data_ptr(), packed.sptr.data_ptr(),
        packed.sidx.data_ptr(), packed.sval.data_ptr(), packed.ngroups, n,
        b.data_ptr() if b is not None else None, y.data_ptr(), threads,
        *epilogue.args(t, n),
    )
    return y


@dataclass(frozen=True)
class PackedDense:
    """A dense weight ``[N, K]`` in the GEMM's panel layout (``kernel.c``: ``tl_gemm_pack``):
    panels of NR outputs, k-major, zero-padded to a whole panel. A copy of the weight, made
    once per layer that stays dense."""

    panels: torch.Tensor
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return self.panels.numel() * self.panels.element_size()


@torch.no_grad()
def pack_dense(weight: torch.Tensor) -> PackedDense:
    """Pack ``weight`` ([N, K]) for :func:`gemm`."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().to("cpu", torch.float32).contiguous()
    n, k = w.shape
    lib = load_library()
    nr = lib.tl_gemm_nr()
    panels = torch.empty((n + nr - 1) // nr * nr * k, dtype=torch.float32)
    lib.tl_gemm_pack(w.data_ptr(), n, k, panels.data_ptr())
    return PackedDense(panels, n, k)


def gemm(x: torch.Tensor, packed: PackedDense, bias: torch.Tensor | None,
         threads: int | None = None, epilogue: Epilogue = NO_EPILOGUE,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``epilogue(x @ W.T + bias)`` with ticketlab's dense kernel, for 2-D float32 CPU ``x``
    (into ``out`` if given)."""
    x, y = _operands(x, packed, out)
    (t, k), n = x.shape, packed.out_features
    if t == 0:
        return y
    threads = threads or torch.get_num_threads()
    lib = load_library()
    ws = _workspace_for(lib.tl_gemm_ws(t, k, threads))
    b = bias.contiguous() if bias is not None else None
    lib.tl_gemm(x.data_ptr(), t, k, packed.panels.data_ptr(), n,
                           b.data_ptr() if b is not None else None, y.data_ptr(), threads,
                           *epilogue.args(t, n), ws.data_ptr())
    return y


def apply_epilogue(y: torch.Tensor, epilogue: Epilogue, threads: int | None = None
                   ) -> torch.Tensor:
    """Apply ``epilogue`` in place to a product computed elsewhere (``F.linear``)."""
    if epilogue.act == ACT_NONE and epilogue.ln is None:
        return y
    if y.dim() != 2 or not y.is_contiguous() or y.dtype != torch.float32:
        raise ValueError("the epilogue works on a contiguous float32 matrix")
    t, n = y.shape
    load_library().tl_epilogue(y.data_ptr(), t, n, *epilogue.args(t, n),
                               threads or torch.get_num_threads())
    return y


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: int, seq: int,
              heads: int, head_dim: int, key_bias: torch.Tensor | None, scale: float,
              threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + key_bias) v`` per sequence and head, token-major in and out.

    ``q``, ``k``, ``v``: ``[batch * seq, heads * head_dim]`` float32 views with unit column
    stride (e.g. column slices of one fused QKV projection); ``key_bias``: ``[batch, seq]``
    additive mask or None. Returns the context, ``[batch * seq, heads * head_dim]``.
    """
    lib = load_library()
    vw = lib.tl_gemm_nr() // 2
    if head_dim % vw:
        raise ValueError(f"head size {head_dim} is not a multiple of the vector width {vw}")
    width = heads * head_dim
    for name, m in (("q", q), ("k", k), ("v", v)):
        if m.shape != (batch * seq, width) or m.stride(1) != 1 or m.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 [{batch * seq}, {width}] row-major view")
    out = output(out, batch * seq, width)
    if batch * seq == 0:
        return out
    key_bias = key_bias_operand(key_bias, batch, seq)
    threads = threads or torch.get_num_threads()
    ws = _workspace_for(attention_workspace(seq, head_dim, threads))
    lib.tl_attention(q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(),
                     v.stride(0), batch, seq, heads, head_dim,
                     key_bias.data_ptr() if key_bias is not None else None, float(scale),
                     out.data_ptr(), width, ws.data_ptr(), threads)
    return out
