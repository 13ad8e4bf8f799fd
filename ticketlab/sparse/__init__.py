"""Sparse CPU inference for tickets: a C kernel, measured kernel choice, and model surgery.

- :mod:`ticketlab.sparse.kernel` (``kernel.c``) -- sparse-weight x dense-activation product,
  vectorised over tokens, built on first use (:mod:`ticketlab.sparse.build`).
- :mod:`ticketlab.sparse.kernels` -- packing a weight matrix and calling the kernel.
- :mod:`ticketlab.sparse.calibration` -- which kernel is fastest, measured and cached.
- :mod:`ticketlab.sparse.engine` -- :func:`accelerate_ticket` and the per-module rewrite
  registry (:func:`register_rewrite`).
- :mod:`ticketlab.sparse.fused` -- fused BERT-family encoder layers (attention, products and
  their epilogues in the C kernels).
"""

from ticketlab.sparse.calibration import CalibrationTable, choose, table_key, token_bucket
from ticketlab.sparse.engine import (
    SparseLinear,
    accelerate_ticket,
    confirm_plan,
    plan_summary,
    register_rewrite,
    sparse_layers,
)

__all__ = ["CalibrationTable", "SparseLinear", "accelerate_ticket", "choose", "confirm_plan",
           "plan_summary", "register_rewrite", "sparse_layers", "table_key", "token_bucket"]
