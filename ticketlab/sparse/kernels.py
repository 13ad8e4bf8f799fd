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

import torch

from ticketlab.sparse.build import TOKEN_BLOCKS, load_library

#: Column-chunk widths tried by the calibration (int16 relative indices allow up to 32767).
COLUMN_CHUNKS = (128, 256, 512)


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
    """A weight matrix ``[N, K]`` in column-blocked CSR (only its nonzeros are stored)."""

    rowptr: torch.Tensor  # int32 [ncb * (N + 1)], absolute offsets into idx/val
    idx: torch.Tensor  # int16 [nnz], column index within its chunk
    val: torch.Tensor  # float32 [nnz]
    out_features: int
    in_features: int
    kc: int

    @property
    def ncb(self) -> int:
        return (self.in_features + self.kc - 1) // self.kc

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.out_features * self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.idx, self.val))


@torch.no_grad()
def pack_weight(weight: torch.Tensor, kc: int) -> PackedWeight:
    """Pack the nonzeros of ``weight`` ([N, K], any float dtype) for the kernel, in float32."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(weight.shape)}")
    if not 0 < kc <= 32767:
        raise ValueError(f"column chunk {kc} must be in [1, 32767] (int16 indices)")
    w = weight.detach().to("cpu", torch.float32)
    n, k = w.shape
    rowptrs, idxs, vals = [], [], []
    offset = 0
    for c0 in range(0, k, kc):
        block = w[:, c0:c0 + kc]
        nz = block != 0
        counts = nz.sum(dim=1, dtype=torch.int64)
        rowptr = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=rowptr[1:])
        rowptrs.append(rowptr + offset)
        rows, cols = nz.nonzero(as_tuple=True)  # row-major order: rows sorted, cols ascending
        idxs.append(cols.to(torch.int16))
        vals.append(block[rows, cols])
        offset += int(counts.sum())
    if offset >= 2**31:
        raise ValueError("too many nonzeros for int32 row pointers")
    return PackedWeight(
        rowptr=torch.cat(rowptrs).to(torch.int32).contiguous(),
        idx=torch.cat(idxs).contiguous(),
        val=torch.cat(vals).contiguous(),
        out_features=n,
        in_features=k,
        kc=kc,
    )


_workspace = threading.local()


def _workspace_for(numel: int) -> torch.Tensor:
    """A per-thread scratch buffer, grown on demand and reused (no allocation per call)."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, 1 << 16), dtype=torch.float32)
        _workspace.buf = buf
    return buf


def spmm(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None,
    tb: int,
    threads: int | None = None,
) -> torch.Tensor:
    """``x @ W.T + bias`` for 2-D float32 CPU ``x`` ([T, K]) with the packed sparse ``W``."""
    if tb not in TOKEN_BLOCKS:
        raise ValueError(f"token block {tb} is not one of {TOKEN_BLOCKS}")
    t, k = x.shape
    if k != packed.in_features:
        raise ValueError(f"input has {k} features, the weight expects {packed.in_features}")
    n = packed.out_features
    x = x.contiguous()
    y = torch.empty(t, n, dtype=torch.float32)
    if t == 0:
        return y
    threads = threads or torch.get_num_threads()
    blocks = max((t + tb - 1) // tb, threads)
    ws = _workspace_for(blocks * k * tb)
    b = bias.contiguous() if bias is not None else None
    getattr(load_library(), f"tl_spmm_tb{tb}")(
        x.data_ptr(), t, k, ws.data_ptr(), packed.kc, packed.ncb,
        packed.rowptr.data_ptr(), packed.idx.data_ptr(), packed.val.data_ptr(), n,
        b.data_ptr() if b is not None else None, y.data_ptr(), threads,
    )
    return y
