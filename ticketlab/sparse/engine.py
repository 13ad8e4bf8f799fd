"""``accelerate_ticket``: the same model, with each layer it recognises on its fastest kernels.

How a model is rewritten: :func:`accelerate_ticket` copies the model (sharing its weights) and
walks its modules top-down through a **rewrite registry** (:func:`register_rewrite`): the first
registered rule whose module class matches (along the MRO) may return a replacement; if it
does, its subtree is done, otherwise the walk descends into the children. Two kinds of rules are
registered by default:

- BERT-family encoder layers (BERT, RoBERTa, ELECTRA, MiniLM, ...; :mod:`ticketlab.sparse.fused`)
  become *fused* layers: the same module (same class hierarchy, parameters and submodule names)
  whose forward runs attention, the products and their epilogues (bias + GELU, bias + residual +
  LayerNorm) in ticketlab's C kernels, falling back to the original forward for anything it does
  not support (gradients, cross-attention, caches, returned attention weights, other dtypes);
- every targeted ``nn.Linear`` becomes a :class:`SparseLinear`.

- every targeted 1×1 convolution (a CNN ticket's pointwise layers) becomes a
  :class:`~ticketlab.sparse.conv.SparseConv1x1`: the same product over pixels.

Anything else (embeddings, depthwise and 3×3 convolutions, a head) stays plain PyTorch: a model
ticketlab does not recognise runs exactly as before. A new architecture plugs in with one more
:func:`register_rewrite` call, not an edit here.

A :class:`SparseLinear` keeps the dense weight (shared with the original model, not copied) and,
for the token counts and thread counts it has been calibrated for, a decision: MKL's
``F.linear``, ticketlab's dense GEMM, or one sparse variant with its packed weight. The decision
comes from a measured :class:`~ticketlab.sparse.calibration.CalibrationTable`; a layer at 30 %
sparsity typically stays dense, one at 90 % runs sparse, one above
:data:`~ticketlab.sparse.calibration.MAX_SPARSE_DENSITY` is never timed sparse. A call with a
token or thread count not yet calibrated is measured on first use (and cached on disk).

Inference only: a call that needs gradients with respect to its input (grad mode on and
``x.requires_grad``) runs dense PyTorch, so autograd stays correct; the returned model's
parameters do not require gradients.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.sparse.calibration import (
    DEFAULT_MARGIN,
    DENSE,
    DENSE_KINDS,
    GEMM,
    CalibrationTable,
    best_dense,
    can_run_sparse,
    choose,
    measure_layer,
    table_key,
    token_bucket,
)
from ticketlab.sparse.kernels import (
    NO_EPILOGUE,
    Epilogue,
    PackedDense,
    PackedWeight,
    Variant,
    apply_epilogue,
    gemm,
    pack_dense,
    pack_weight,
    spmm,
)


class SparseLinear(nn.Linear):
    """An ``nn.Linear`` that runs the kernel measured to be fastest for its weight.

    It subclasses ``nn.Linear`` (and keeps ``weight``/``bias``) so that code inspecting layers,
    e.g. for ``weight.dtype``, still works. :meth:`run` is the entry point of fused layers: the
    product with an epilogue applied while the output is in cache.
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
        #: (token bucket, threads) -> kernel name: "dense" (MKL), "gemm" or a Variant name
        self.kernels: dict[tuple[int, int], str] = {}
        #: column chunk -> packed weight, for the chosen sparse variants only
        self.packed: dict[int, PackedWeight] = {}
        #: the dense GEMM's packed copy of the weight, if a decision chose it
        self.packed_dense: PackedDense | None = None
        self._seen: dict[tuple[int, int], tuple[str, Variant | None]] = {}

    @property
    def plan(self) -> dict[tuple[int, int], str]:
        """(token bucket, threads) -> "dense" or the sparse variant (what :meth:`decide` says)."""
        return {key: (DENSE if k in DENSE_KINDS else k) for key, k in self.kernels.items()}

    def extra_repr(self) -> str:
        plan = ", ".join(f"t{t}/th{th}:{k}" for (t, th), k in sorted(self.kernels.items()))
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density:.3f}, plan=[{plan}]")

    def _supported(self) -> bool:
        w = self.weight
        return w.device.type == "cpu" and w.dtype == torch.float32 and (
            self.bias is None or self.bias.dtype == torch.float32)

    def kernel(self, tokens: int, threads: int) -> str:
        """The exact kernel for ``tokens`` tokens on ``threads`` threads (measured if not in
        the table): ``"dense"`` (MKL), ``"gemm"`` (ticketlab's dense GEMM) or a sparse variant."""
        bucket = token_bucket(tokens)
        choice = self.kernels.get((bucket, threads))
        if choice is not None:
            return choice
        if not self._supported() or not can_run_sparse(self.density):
            # e.g. an unpruned layer: never timed sparse; MKL vs GEMM still measured, both dense
            choice = DENSE if not self._supported() else self._dense_choice(bucket, threads)
        else:
            scratch: dict[int, PackedWeight] = {}
            timings = self._timings(bucket, threads, scratch)
            confirm = self._timings(bucket, 1, scratch) if threads > 1 else None
            choice = choose(timings, self.margin, confirm)
            if choice not in DENSE_KINDS:
                kc = Variant.parse(choice).kc
                if kc not in self.packed:
                    self.packed[kc] = scratch.get(kc) or pack_weight(self.weight, kc)
        if choice == GEMM and self.packed_dense is None:
            self.packed_dense = pack_dense(self.weight)
        self.kernels[(bucket, threads)] = choice
        return choice

    def decide(self, tokens: int, threads: int) -> str:
        """``"dense"`` or the sparse variant that runs ``tokens`` tokens on ``threads`` threads."""
        choice = self.kernel(tokens, threads)
        return DENSE if choice in DENSE_KINDS else choice

    def set_kernel(self, tokens: int, threads: int, choice: str) -> None:
        """Run ``tokens`` tokens on ``threads`` threads on ``choice`` ("dense", "gemm" or a
        sparse variant's name) from now on, packing what it needs (:func:`confirm_plan`)."""
        if choice not in DENSE_KINDS:
            kc = Variant.parse(choice).kc
            if kc not in self.packed:
                self.packed[kc] = pack_weight(self.weight, kc)
        elif choice == GEMM and self.packed_dense is None:
            self.packed_dense = pack_dense(self.weight)
        self.kernels[(token_bucket(tokens), threads)] = choice
        self._seen.clear()

    def tie_alternative(self, tokens: int, threads: int) -> str | None:
        """The kernel on the other side of a tie, or None if this layer's choice is clear.

        A tie: the best sparse variant timed within ``margin`` of the choice bar (dense time x
        ``(1 - margin)``) on either side, i.e. between ``1 - 2 margin`` and ``1`` of the best
        dense time. Timed alone, such a layer is level with dense, and whether sparse or dense
        is faster inside a forward depends on what the timing of one layer cannot see (on AMD
        Zen 5, BERT-base's 768 x 3072 layers at density 0.5: 1.05x alone, about 9 % faster in
        the batch-32 forward). A layer above the density ceiling, with no sparse timing, has no
        tie: an unpruned layer never runs sparse.
        """
        bucket = token_bucket(tokens)
        choice = self.kernels.get((bucket, threads))
        key = table_key(self.out_features, self.in_features, self.density, bucket, threads)
        timings = self.table.get(key)
        if choice is None or timings is None or not can_run_sparse(self.density):
            return None
        sparse = {k: v for k, v in timings.items() if k not in DENSE_KINDS}
        if not sparse:
            return None
        dense = timings[best_dense(timings)]
        if choice in DENSE_KINDS:
            best = min(sparse, key=sparse.__getitem__)
            return best if sparse[best] < dense else None
        return best_dense(timings) if timings[choice] > dense * (1 - 2 * self.margin) else None

    def _dense_choice(self, bucket: int, threads: int) -> str:
        """MKL or the GEMM for a layer that cannot run sparse: timed once per key, no sparse
        variant among the candidates."""
        key = table_key(self.out_features, self.in_features, self.density, bucket, threads)
        timings = self.table.get(key)
        if timings is None or GEMM not in timings:
            timings = measure_layer(self.weight, self.bias, bucket, threads, sparse=False)
            self.table.put(key, timings)
            self.table.save()
        return choose({k: v for k, v in timings.items() if k in DENSE_KINDS}, self.margin)

    def _timings(self, bucket: int, threads: int,
                 scratch: dict[int, PackedWeight]) -> dict[str, float]:
        """The table's timings for this layer's key, measured (and stored) if missing."""
        key = table_key(self.out_features, self.in_features, self.density, bucket, threads)
        timings = self.table.get(key)
        if timings is None or all(k in DENSE_KINDS for k in timings):  # none or dense only
            timings = measure_layer(self.weight, self.bias, bucket, threads, scratch)
            self.table.put(key, timings)
            self.table.save()
        return timings

    def _fast_path(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        return not needs_grad and x.dtype == torch.float32 and x.device.type == "cpu"

    def call_plan(self, rows: int, threads: int) -> tuple[str, Variant | None]:
        """The kernel for ``rows`` input rows on ``threads`` threads and its parsed variant (None
        for a dense kind), memoised per (rows, threads): the per-call fast path, with no
        bucketing and no table lookup. The returned tuple is the same object until the plan
        changes (:meth:`set_kernel` clears the memo), which fused layers rely on to know that
        their one-call program (``fused.LayerProgram``) is still the plan."""
        key = (rows, threads)
        seen = self._seen.get(key)
        if seen is None:
            if len(self._seen) > 4096:  # many distinct input sizes: keep the memo bounded
                self._seen.clear()
            choice = self.kernel(*key)
            seen = self._seen[key] = (choice, None if choice in DENSE_KINDS
                                      else Variant.parse(choice))
        return seen

    def run(self, x2: torch.Tensor, epilogue: Epilogue = NO_EPILOGUE,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """``epilogue(x2 @ W.T + b)`` for a 2-D float32 CPU input, on the chosen kernel (into
        ``out``, a contiguous ``[rows, out_features]`` float32 tensor, if given)."""
        threads = torch.get_num_threads()
        choice, v = self.call_plan(x2.shape[0], threads)
        if v is not None:
            return spmm(x2, self.packed[v.kc], self.bias, v.tb, v.threads or threads, epilogue,
                        out)
        if choice == GEMM and self.packed_dense is not None:
            return gemm(x2, self.packed_dense, self.bias, threads, epilogue, out)
        return apply_epilogue(mkl_linear(x2, self.weight, self.bias, out), epilogue, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        y = self.run(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)


def mkl_linear(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` (PyTorch's MKL product), written into ``out`` if given."""
    if out is None:
        return F.linear(x2, weight, bias)
    if bias is None:
        return torch.mm(x2, weight.t(), out=out)
    return torch.addmm(bias, x2, weight.t(), out=out)


# --- the rewrite registry ----------------------------------------------------------------------

@dataclass
class RewriteContext:
    """What a rewrite rule may use: the calibration table and margin, and which Linears to
    accelerate (module objects, so that a rule finds its own among them)."""

    table: CalibrationTable
    margin: float
    targets: set[int]

    def linear(self, module: nn.Module) -> nn.Module:
        """``module`` as a :class:`SparseLinear` if it is a targeted Linear, else unchanged."""
        if (isinstance(module, SparseLinear) or id(module) not in self.targets
                or not isinstance(module, nn.Linear)):
            return module
        return SparseLinear(module, self.table, self.margin)

    def rewrite_children(self, module: nn.Module) -> None:
        """Apply the registry to every child of ``module`` (what a rule calls for its parts)."""
        for name, child in list(module.named_children()):
            new = rewrite(child, self)
            if new is not child:
                setattr(module, name, new)


#: A rule gets a module and the context; it returns the replacement, or None to descend.
RewriteRule = Callable[[nn.Module, RewriteContext], "nn.Module | None"]
_REGISTRY: list[tuple[type | str, RewriteRule]] = []


def register_rewrite(target: type | str, rule: RewriteRule) -> None:
    """Register ``rule`` for modules of class ``target`` (a class, or a class name when the
    class lives in an optional package). Later registrations take precedence."""
    _REGISTRY.insert(0, (target, rule))


def _rules_for(module: nn.Module) -> list[RewriteRule]:
    mro = type(module).__mro__
    names = {c.__name__ for c in mro}
    return [rule for target, rule in _REGISTRY
            if (target in mro if isinstance(target, type) else target in names)]


def rewrite(module: nn.Module, ctx: RewriteContext) -> nn.Module:
    """``module`` rewritten by the first applicable rule, or with its children rewritten."""
    for rule in _rules_for(module):
        new = rule(module, ctx)
        if new is not None:
            return new
    ctx.rewrite_children(module)
    return module


def _linear_rule(module: nn.Module, ctx: RewriteContext) -> nn.Module | None:
    return ctx.linear(module) if id(module) in ctx.targets else None


register_rewrite(nn.Linear, _linear_rule)


def _acceleratable(module: Any) -> bool:
    from ticketlab.sparse.conv import is_pointwise

    return isinstance(module, nn.Linear) or is_pointwise(module)


def _target_linears(model: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Module]:
    """Module name -> Linear (or 1×1 convolution) to accelerate: ``names``, or the model's
    prunable set."""
    modules = dict(model.named_modules())
    if names is not None:
        chosen = list(names)
        bad = [n for n in chosen if not _acceleratable(modules.get(n))]
        if bad:
            raise TicketlabError(f"These are not nn.Linear (or 1x1 nn.Conv2d) modules of the "
                                 f"model: {bad[:3]}.",
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
        if _acceleratable(modules.get(mname)):
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
    fuse: bool = True,
    example: Any = None,
) -> nn.Module:
    """A copy of ``model`` (sharing its weights) whose layers run ticketlab's fastest kernels.

    ``tokens`` and ``threads`` are the token counts (batch x sequence) and thread counts to
    calibrate for right away (default: 128 tokens on ``torch.get_num_threads()``); others are
    calibrated on first use. ``table`` replaces the machine's cached calibration table (an
    in-memory table is never written to disk). ``names`` picks the modules to accelerate
    (default: the prunable set, or every Linear of a model that is not a Hugging Face
    encoder). ``margin``: how much faster than dense a sparse kernel must measure to be used.
    ``fuse=False`` keeps every layer's own forward and only swaps the Linears (the engine as it
    was before fused layers; for comparisons).

    ``example``: inputs of the forward the model will serve (a dict of keyword arguments, a
    tuple of positional ones, or one tensor). With it, the layers whose measured choice is a
    tie are settled by timing that whole forward both ways (:func:`confirm_plan`; on each of
    ``threads``); the result is on ``fast.plan_check``. It costs a few dozen forwards, and is
    not cached: pass it when the model will serve that input size for long.

    The result is in eval mode, its parameters do not require gradients, and the input model is
    left untouched. Outputs match the dense model up to float32 summation order.
    """
    from ticketlab.sparse import conv, fused  # noqa: F401  # register their rules
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
    targets = {id(m) for m in _target_linears(fast, names).values()}
    ctx = RewriteContext(table, margin, targets)
    if fuse:
        fast = rewrite(fast, ctx)
    else:
        _linear_only(fast, ctx)
    thread_counts = list(threads) if threads is not None else [torch.get_num_threads()]
    for layer in sparse_layers(fast).values():
        if hasattr(layer, "pixels_per_example"):
            continue  # a 1x1 convolution: its rows are pixels, calibrated at its first call
        for th in thread_counts:
            for t in tokens:
                layer.kernel(t, th)
    if example is not None:
        previous = torch.get_num_threads()
        checks = []
        try:
            for th in thread_counts:
                torch.set_num_threads(th)
                checks += confirm_plan(fast, example)
        finally:
            torch.set_num_threads(previous)
        fast.plan_check = checks
    return fast


#: Paired forwards (current plan, then flipped, order alternating) that settle one tie group.
PLAN_ROUNDS = 6
#: How much faster (median pair ratio) a group's flipped plan must make the forward.
PLAN_MARGIN = 0.01


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, Mapping):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


@torch.no_grad()
def confirm_plan(model: nn.Module, example: Any, rounds: int = PLAN_ROUNDS,
                 margin: float = PLAN_MARGIN, budget_s: float = 60.0,
                 clock: Callable[[], float] | None = None) -> list[dict[str, Any]]:
    """Settle the tied layers of an accelerated model by timing its whole forward on
    ``example`` both ways, on the current thread count; return what was tried.

    Why: a layer's kernel is chosen from a timing of that layer alone (its weights out of L2,
    random activations). Where the sparse and the dense kernel are level there
    (:meth:`SparseLinear.tie_alternative`), the forward can still prefer one clearly: its
    weights come from memory rather than L3, a sparse weight is fewer bytes, and the products
    before and after share the caches. Timing the forward measures exactly that.

    The tied layers are grouped by shape and by the side they are on (e.g. "the 12 FFN
    outputs, dense now"), largest product first. For each group, the forward is timed in
    ``rounds`` adjacent pairs, the current plan and the group flipped, order alternating
    (CPU time of this thread on one thread, wall time on more), and the flip is kept only if
    it is faster in most pairs and by ``margin`` in the median pair ratio. Groups are tried one
    after the other (a kept flip stays for the next), until ``budget_s`` is spent.
    """
    threads = torch.get_num_threads()
    clock = clock or (time.thread_time if threads == 1 else time.perf_counter)
    layers = sparse_layers(model)
    for layer in layers.values():
        layer._seen.clear()
    _call(model, example)  # calibrates the token counts this input needs, and warms up
    groups: dict[tuple[int, int, bool], list[tuple[SparseLinear, int, str, str]]] = {}
    for layer in layers.values():
        for rows in sorted({token_bucket(r) for r, th in layer._seen if th == threads}):
            current = layer.kernel(rows, threads)
            alt = layer.tie_alternative(rows, threads)
            if alt is not None:
                key = (layer.out_features, layer.in_features, current in DENSE_KINDS)
                groups.setdefault(key, []).append((layer, rows, current, alt))
    order = sorted(groups, key=lambda g: -len(groups[g]) * g[0] * g[1])
    report: list[dict[str, Any]] = []
    start = time.perf_counter()
    for g in order:
        if time.perf_counter() - start > budget_s:
            break
        members = groups[g]

        def flip(to_alt: bool, members: list = members) -> None:
            for layer, rows, current, alt in members:
                layer.set_kernel(rows, threads, alt if to_alt else current)

        ratios = []
        for r in range(rounds):
            pair = {}
            for state in ((False, True) if r % 2 == 0 else (True, False)):
                flip(state)
                t0 = clock()
                _call(model, example)
                pair[state] = clock() - t0
            ratios.append(pair[True] / pair[False])
        ratios.sort()
        median = ratios[len(ratios) // 2] if rounds % 2 else math.sqrt(
            ratios[rounds // 2 - 1] * ratios[rounds // 2])
        keep = median < 1 - margin and 2 * sum(q < 1 for q in ratios) > rounds
        flip(keep)
        names = [n for n, m in layers.items() if any(m is x[0] for x in members)]
        report.append({"shape": [g[0], g[1]], "layers": names, "threads": threads,
                       "from": "dense" if g[2] else "sparse",
                       "to": "sparse" if g[2] else "dense", "median_ratio": median,
                       "flipped": keep})
    return report


def _linear_only(module: nn.Module, ctx: RewriteContext) -> None:
    from ticketlab.sparse.conv import _conv_rule

    for name, child in list(module.named_children()):
        new = ctx.linear(child) if isinstance(child, nn.Linear) else (
            _conv_rule(child, ctx) or child)
        if new is child:
            _linear_only(child, ctx)
        else:
            setattr(module, name, new)


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The accelerated layers of a model returned by :func:`accelerate_ticket`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def plan_summary(model: nn.Module) -> list[dict[str, Any]]:
    """Per accelerated layer: name, shape, density and the kernel chosen per (tokens, threads)."""
    return [
        {"name": n, "shape": [m.out_features, m.in_features], "density": m.density,
         "plan": {f"t{t}/th{th}": k for (t, th), k in sorted(m.kernels.items())}}
        for n, m in sparse_layers(model).items()
    ]
