"""``accelerate_ticket``: the same model, with each prunable Linear on its fastest kernel.

Every prunable ``nn.Linear`` (the encoder's Q, K, V, attention output, FFN in and out, and the
pooler) becomes a :class:`SparseLinear`. It keeps the dense weight (shared with the original
model, not copied) and, for the token counts and thread counts it has been calibrated for, a
decision: dense ``F.linear`` or one sparse variant with its packed weight. The decision comes
from a measured :class:`~ticketlab.sparse.calibration.CalibrationTable`; a layer at 30 % sparsity
typically stays dense, one at 90 % runs sparse. A call with a token or thread count not yet
calibrated is measured on first use (and cached on disk).

Inference only: a call that needs gradients with respect to its input (grad mode on and
``x.requires_grad``) runs dense, so autograd stays correct; the returned model's parameters do
not require gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.sparse.calibration import (
    DEFAULT_MARGIN,
    DENSE,
    CalibrationTable,
    can_run_sparse,
    choose,
    measure_layer,
    table_key,
    token_bucket,
)
from ticketlab.sparse.kernels import PackedWeight, Variant, pack_weight, spmm


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` that runs a sparse kernel where that was measured to be faster.

    It subclasses ``nn.Linear`` (and keeps ``weight``/``bias``) so that code inspecting layers,
    e.g. for ``weight.dtype``, still works.
    """

    def __init__(self, linear: nn.Linear, table: CalibrationTable,
                 margin: float = DEFAULT_MARGIN) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.table = table
        self.margin = margin
        w = self.weight.detach()
        self.density = float((w != 0).sum()) / max(1, w.numel())
        #: (token bucket, threads) -> kernel name ("dense" or a Variant name)
        self.plan: dict[tuple[int, int], str] = {}
        #: column chunk -> packed weight, for the chosen variants only
        self.packed: dict[int, PackedWeight] = {}
        self._seen: dict[tuple[int, int], str] = {}

    def extra_repr(self) -> str:
        plan = ", ".join(f"t{t}/th{th}:{k}" for (t, th), k in sorted(self.plan.items()))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density:.3f}, plan=[{plan}]")

    def _supported(self) -> bool:
        w = self.weight
        return w.device.type == "cpu" and w.dtype == torch.float32 and (
            self.bias is None or self.bias.dtype == torch.float32)

    def decide(self, tokens: int, threads: int) -> str:
        """The kernel for ``tokens`` tokens on ``threads`` threads (measured if not in table)."""
        bucket = token_bucket(tokens)
        choice = self.plan.get((bucket, threads))
        if choice is not None:
            return choice
        if not self._supported() or not can_run_sparse(self.density):
            choice = DENSE  # e.g. an unpruned layer: never timed, never sparse
        else:
            scratch: dict[int, PackedWeight] = {}
            timings = self._timings(bucket, threads, scratch)
            confirm = self._timings(bucket, 1, scratch) if threads > 1 else None
            choice = choose(timings, self.margin, confirm)
            if choice != DENSE:
                kc = Variant.parse(choice).kc
                if kc not in self.packed:
                    self.packed[kc] = scratch.get(kc) or pack_weight(self.weight, kc)
        self.plan[(bucket, threads)] = choice
        return choice

    def _timings(self, bucket: int, threads: int,
                 scratch: dict[int, PackedWeight]) -> dict[str, float]:
        """The table's timings for this layer's key, measured (and stored) if missing."""
        key = table_key(self.out_features, self.in_features, self.density, bucket, threads)
        timings = self.table.get(key)
        if timings is None:
            timings = measure_layer(self.weight, self.bias, bucket, threads, scratch)
            self.table.put(key, timings)
            self.table.save()
        return timings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or x.dtype != torch.float32 or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        threads = torch.get_num_threads()
        key = (x2.shape[0], threads)
        choice = self._seen.get(key)  # the per-call fast path: no bucketing, no table lookup
        if choice is None:
            if len(self._seen) > 4096:  # many distinct input sizes: keep the memo bounded
                self._seen.clear()
            choice = self._seen[key] = self.decide(*key)
        if choice == DENSE:
            return F.linear(x, self.weight, self.bias)
        v = Variant.parse(choice)
        y = spmm(x2, self.packed[v.kc], self.bias, v.tb, v.threads or threads)
        return y.reshape(*lead, self.out_features)


def _target_linears(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Linear]:
    """Module name -> Linear to accelerate: ``names``, or the model's prunable set."""
    modules = dict(model.named_modules())
    if names is not None:
        chosen = list(names)
        bad = [n for n in chosen if not isinstance(modules.get(n), nn.Linear)]
        if bad:
            raise TicketlabError(f"These are not nn.Linear modules of the model: {bad[:3]}.",
                                 "Pass module names from model.named_modules().")
        return {n: modules[n] for n in chosen}
    base = getattr(model, "base_model", None)
    if base is None or not hasattr(model, "base_model_prefix"):
        return {n: m for n, m in modules.items() if isinstance(m, nn.Linear)}
    from ticketlab.models import default_prunable_names

    prefix = "" if base is model else model.base_model_prefix + "."
    found = {}
    for pname in default_prunable_names(model, prune_pooler=True):
        mname = prefix + pname.removesuffix(".weight")
        if isinstance(modules.get(mname), nn.Linear):
            found[mname] = modules[mname]
    return found


def accelerate_ticket(
    model: nn.Module,
    *,
    tokens: Iterable[int] = (128,),
    threads: Iterable[int] | None = None,
    table: CalibrationTable | None = None,
    names: Iterable[str] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> nn.Module:
    """A copy of ``model`` (sharing its weights) whose prunable Linears run the fastest kernel.

    ``tokens`` and ``threads`` are the token counts (batch x sequence) and thread counts to
    calibrate for right away (default: 128 tokens on ``torch.get_num_threads()``); others are
    calibrated on first use. ``table`` replaces the machine's cached calibration table (an
    in-memory table is never written to disk). ``names`` picks the modules to accelerate
    (default: the prunable set, or every Linear of a model that is not a Hugging Face
    encoder). ``margin``: how much faster than dense a sparse kernel must measure to be used.

    The result is in eval mode, its parameters do not require gradients, and the input model is
    left untouched. Outputs match the dense model up to float32 summation order.
    """
    from ticketlab.sparse.build import load_library

    load_library()  # build errors surface now, not in the middle of a forward pass
    table = table if table is not None else CalibrationTable.default()
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = b
    fast = copy.deepcopy(model, memo)
    fast.eval()
    targets = _target_linears(fast, names)
    for name, linear in targets.items():
        if isinstance(linear, SparseLinear):  # already accelerated
            continue
        parent_name, _, child = name.rpartition(".")
        parent = fast.get_submodule(parent_name) if parent_name else fast
        setattr(parent, child, SparseLinear(linear, table, margin))
    thread_counts = list(threads) if threads is not None else [torch.get_num_threads()]
    for layer in sparse_layers(fast).values():
        for th in thread_counts:
            for t in tokens:
                layer.decide(t, th)
    return fast


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The accelerated layers of a model returned by :func:`accelerate_ticket`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def plan_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Per accelerated layer: name, shape, density and the kernel chosen per (tokens, threads)."""
    return [
        {"name": n, "shape": [m.out_features, m.in_features], "density": m.density,
         "plan": {f"t{t}/th{th}": k for (t, th), k in sorted(m.plan.items())}}
        for n, m in sparse_layers(model).items()
    ]
