"""Fused encoder layers: a whole BERT-family layer in ticketlab's kernels, not only its Linears.

Why: with the prunable Linears on the sparse kernel, what PyTorch runs around them (attention,
GELU, the residual adds and LayerNorms, reshapes and transposes, Python module calls) was about
half of the accelerated MiniLM forward at 90 % sparsity (issue 14), and at 0 % the dense
products were MKL's, which reaches 70-90 GFLOP/s on this AMD CPU where a register-blocked
kernel reaches 100-115. A fused layer runs, per encoder layer::

    q, k, v = Q(x), K(x), V(x)                          # each on its measured kernel
    c = attention(q, k, v, key mask)                     # kernel.c, token-major in and out
    a = LayerNorm(O(c) + x)                              # residual + LN fused into O's product
    h = act(I(a))                                        # GELU fused into I's product
    y = LayerNorm(Out(h) + a)                            # residual + LN fused into Out's product

with every product the layer's :class:`~ticketlab.sparse.engine.SparseLinear` (MKL, ticketlab's
dense GEMM or a sparse variant, as calibrated) and its epilogue applied while the output is in
cache. The arithmetic is the same as the original layer's up to float32 summation order (erf and
exp are computed to ~1e-7; tests require max |Δ logit| ≤ 1e-4 against the dense model).

How a layer becomes fused: its class is swapped for a subclass made here (``Fused<Name>``, cached
per class) whose ``forward`` takes the fused path when it applies and otherwise calls the
original ``forward``. Swapping the class rather than wrapping the module keeps everything else
as it was: parameter and module names (state dicts, ``sparse_layers``), ``isinstance`` checks,
and the forward hooks transformers uses to collect ``output_hidden_states``. The fused path is
skipped (original forward) when gradients are needed, in training mode, for non-float32 or
non-CPU inputs, with cross-attention, caches, or head masks, when attention weights are being
collected (``output_attentions``), and for a mask that is not a per-key padding mask.

Which architectures: a *parts* function per layer class names the layer's pieces (the BERT
layout: BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, and MiniLM, which is a BERT; DistilBERT's
``TransformerBlock``). Each is registered with :func:`ticketlab.sparse.engine.register_rewrite`;
a layer whose parts do not fit (another activation, a pre-LayerNorm layout, a head size that is
not a multiple of the vector width) keeps its own forward with only its Linears accelerated.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.sparse.calibration import GEMM
from ticketlab.sparse.engine import RewriteContext, SparseLinear, mkl_linear, register_rewrite
from ticketlab.sparse.kernels import (
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    NO_EPILOGUE,
    Epilogue,
    _workspace_for,
    apply_epilogue,
    attention,
    attention_workspace,
    key_bias_operand,
    spmm_workspace,
)


@dataclass
class LayerParts:
    """The pieces of a post-LayerNorm encoder layer, as the fused forward uses them."""

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    attn_out: nn.Linear
    ln1: nn.LayerNorm
    ffn_in: nn.Linear
    act: int
    ffn_out: nn.Linear
    ln2: nn.LayerNorm
    heads: int
    head_dim: int
    scale: float


def activation_code(fn: Any) -> int | None:
    """The fused epilogue code of an activation module or function; None if not supported."""
    from transformers import activations as A

    if type(fn) is A.GELUActivation or fn is F.gelu:  # erf GELU (C or Python formula alike)
        return ACT_GELU
    tanh_kinds = tuple(getattr(A, n) for n in ("GELUTanh", "NewGELUActivation",
                                               "FastGELUActivation", "PytorchGELUTanh")
                       if hasattr(A, n))
    if isinstance(fn, tanh_kinds):
        return ACT_GELU_TANH
    if type(fn) is nn.ReLU or fn is F.relu:
        return ACT_RELU
    return None


def _linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _ln(m: Any) -> bool:
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None \
        and len(m.normalized_shape) == 1


def _check(parts: LayerParts) -> LayerParts | None:
    """The parts if the fused forward computes exactly this layer, else None."""
    from ticketlab.sparse.build import load_library

    hidden = parts.query.in_features
    width = parts.heads * parts.head_dim
    vw = load_library().tl_gemm_nr() // 2
    ok = (all(_linear(m) for m in (parts.query, parts.key, parts.value, parts.attn_out,
                                   parts.ffn_in, parts.ffn_out))
          and _ln(parts.ln1) and _ln(parts.ln2) and parts.act is not None
          and parts.head_dim % vw == 0
          and parts.query.out_features == parts.key.out_features == width
          and parts.value.out_features == width and parts.attn_out.in_features == width
          and parts.attn_out.out_features == hidden == parts.ffn_in.in_features
          and parts.ffn_out.in_features == parts.ffn_in.out_features
          and parts.ffn_out.out_features == hidden
          and parts.ln1.normalized_shape[0] == hidden == parts.ln2.normalized_shape[0])
    return parts if ok else None


def bert_parts(layer: nn.Module) -> LayerParts | None:
    """BERT's layout (``attention.self.query`` ... ``output.LayerNorm``), post-LayerNorm."""
    try:
        attn, inter, out = layer.attention, layer.intermediate, layer.output
        sa, so = attn.self, attn.output
        if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False) \
                or getattr(sa, "is_causal", False) or getattr(layer, "chunk_size_feed_forward",
                                                              0):
            return None
        parts = LayerParts(sa.query, sa.key, sa.value, so.dense, so.LayerNorm, inter.dense,
                           activation_code(inter.intermediate_act_fn), out.dense, out.LayerNorm,
                           int(sa.num_attention_heads), int(sa.attention_head_size),
                           float(getattr(sa, "scaling", sa.attention_head_size ** -0.5)))
    except AttributeError:
        return None
    return _check(parts)


def distilbert_parts(layer: nn.Module) -> LayerParts | None:
    """DistilBERT's ``TransformerBlock`` (``attention.q_lin`` ... ``output_layer_norm``)."""
    try:
        attn, ffn = layer.attention, layer.ffn
        if getattr(ffn, "chunk_size_feed_forward", 0) or getattr(attn, "is_causal", False):
            return None
        head = int(attn.attention_head_size)
        parts = LayerParts(attn.q_lin, attn.k_lin, attn.v_lin, attn.out_lin,
                           layer.sa_layer_norm, ffn.lin1, activation_code(ffn.activation),
                           ffn.lin2, layer.output_layer_norm, int(attn.n_heads), head,
                           float(getattr(attn, "scaling", head ** -0.5)))
    except AttributeError:
        return None
    return _check(parts)


# --- the mask ---------------------------------------------------------------------------------

_NOT_A_KEY_MASK = object()
_mask_memo: dict[str, Any] = {}


def key_bias(mask: torch.Tensor | None, batch: int, seq: int) -> Any:
    """The additive per-key bias ``[batch, seq]`` that ``mask`` amounts to, None for no mask, or
    ``_NOT_A_KEY_MASK`` if the mask differs between queries (then the layer is not fused).

    transformers 5 hands every layer the same 4-D mask (``[B, 1, T, T]``, bool: True attends;
    or additive float), so the conversion is remembered for the last mask object seen.
    """
    if mask is None:
        return None
    # inference tensors have no version counter (and cannot be changed outside inference mode)
    version = -1 if mask.is_inference() else mask._version
    memo = _mask_memo.get("last")
    if memo is not None and memo[0] is mask and memo[1] == version:
        return memo[2]
    result: Any = _NOT_A_KEY_MASK
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, batch) \
            and mask.shape[3] == seq and mask.shape[2] in (1, seq):
        first = mask[:, 0, :1, :]
        if mask.shape[2] == 1 or mask.stride(2) == 0 or torch.equal(mask, first.unsqueeze(1)
                                                                    .expand_as(mask)):
            row = first[:, 0, :].expand(batch, seq)
            if row.dtype == torch.bool:
                result = None if bool(row.all()) else torch.zeros(batch, seq).masked_fill_(
                    ~row, torch.finfo(torch.float32).min)
            elif row.is_floating_point():
                result = None if not bool(row.any()) else row.float().contiguous()
    elif mask.dim() == 2 and mask.shape == (batch, seq):  # a raw 1/0 attention mask
        keep = mask.bool()
        result = None if bool(keep.all()) else torch.zeros(batch, seq).masked_fill_(
            ~keep, torch.finfo(torch.float32).min)
    _mask_memo["last"] = (mask, version, result)
    return result


def _attentions_requested() -> bool:
    """Whether transformers is collecting attention weights for this forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # no collector: attentions are only returned through it in 5.x
        return False
    collected = _active_collector.get()
    return bool(collected) and any(k != "hidden_states" and not k.startswith("_")
                                   for k in collected)


_UNFUSABLE_KWARGS = ("encoder_hidden_states", "encoder_attention_mask", "cache",
                     "past_key_values", "past_key_value", "head_mask", "layer_head_mask",
                     "output_attentions")


def _run(linear: nn.Linear, x: torch.Tensor, epilogue: Epilogue = NO_EPILOGUE,
         out: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(linear, SparseLinear):
        return linear.run(x, epilogue, out)
    return apply_epilogue(mkl_linear(x, linear.weight, linear.bias, out), epilogue)


_scratch = threading.local()


def scratch(tag: str, rows: int, cols: int) -> torch.Tensor:
    """A reusable ``[rows, cols]`` float32 buffer for a fused layer's temporaries.

    Why: a fresh tensor above glibc's mmap threshold (32 MiB; BERT-base's FFN activations at
    batch 32 are 48 MiB) is new memory on every call, and touching it costs page faults and
    zeroing: 21 ms per call for 4096 x 3072 floats, measured, ~12 % of a 90 %-sparse BERT-base
    forward at batch 32. The layer's temporaries (Q, K, V, context, attention output, FFN
    activations) are dead when the layer returns, so each thread keeps one buffer per tag,
    grown as needed; the layer's output is always a new tensor. Buffers made in inference mode
    are inference tensors, which cannot be written outside it, so the two modes keep their own.
    """
    pools = _scratch.__dict__.setdefault("pools", {})
    key = (tag, torch.is_inference_mode_enabled())
    buf = pools.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = pools[key] = torch.empty(rows * cols, dtype=torch.float32)
    return buf[:rows * cols].view(rows, cols)


#: Run a fused layer as one C call (``kernel.c``: ``tl_encoder_layer``) whenever all six of its
#: products are on ticketlab's own kernels; False: always the per-product calls from Python.
LAYER_PROGRAMS = True


@dataclass
class LayerProgram:
    """A fused layer's plan at one (batch, sequence, threads), as ``tl_encoder_layer`` reads it.

    Why: the seven kernel calls of a layer issued from Python cost ~0.38 ms more than the same
    calls replayed from C (MiniLM batch 1 at 70 % on a Xeon: 2.75 against 2.35 ms per layer),
    ~14 % of the layer. The descriptors hold raw pointers into the layer's packed weights,
    biases and LayerNorm parameters; ``tensors`` keeps those alive, and ``signature`` (each
    product's plan object and every pointer) is compared on each call, so a changed plan, a
    re-packed weight or a replaced parameter rebuilds the program instead of reading stale
    memory.
    """

    signature: tuple
    ints: torch.Tensor  # int64: 6 product descriptors, then heads, head size, act, LN pointers
    floats: torch.Tensor  # float32: scale, eps1, eps2
    workspace: int  # floats: the largest product's or the attention's scratch
    tensors: tuple  # what the pointers point into


#: Programs per fused layer, keyed by (batch, sequence, threads). Kept outside the module so
#: that a deep copy or a pickle of the model never carries pointers into the original.
_programs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _product_tensors(lin: SparseLinear, plan: tuple) -> tuple[torch.Tensor, ...] | None:
    """The tensors of ``lin``'s product under ``plan``, first the weight's; None if the product
    is not on one of ticketlab's kernels (MKL's ``F.linear`` cannot be called from C)."""
    choice, v = plan
    bias = (lin.bias,) if lin.bias is not None else ()
    if v is not None:
        w = lin.packed.get(v.kc)
        if w is None:
            return None
        return (w.rowptr, w.idx, w.val, w.groups, w.tgroup, w.sptr, w.sidx, w.sval, *bias)
    if choice == GEMM and lin.packed_dense is not None:
        return (lin.packed_dense.panels, *bias)
    return None


def _descriptor(lin: SparseLinear, plan: tuple, rows: int, threads: int,
                lib: Any) -> tuple[list[int], int]:
    """One product's ``TL_P_SLOTS`` int64 slots (``kernel.c``: ``P_KIND`` ...) and the scratch
    floats it needs."""
    _, v = plan
    n, k = lin.out_features, lin.in_features
    bias = lin.bias.data_ptr() if lin.bias is not None else 0
    if v is None:
        panels = lin.packed_dense.panels.data_ptr()
        return ([0, threads, n, k, 0, 0, 0, bias, panels, *([0] * 7)],
                int(lib.tl_gemm_ws(rows, k, threads)))
    w = lin.packed[v.kc]
    th = v.threads or threads
    return ([v.tb, th, n, k, w.kc, w.ncb, w.ngroups, bias, w.rowptr.data_ptr(),
             w.idx.data_ptr(), w.val.data_ptr(), w.groups.data_ptr(), w.tgroup.data_ptr(),
             w.sptr.data_ptr(), w.sidx.data_ptr(), w.sval.data_ptr()],
            spmm_workspace(rows, k, v.tb, th))


class FusedEncoderLayer(nn.Module):
    """Mixin placed in front of an encoder layer's class (see the module docstring)."""

    _tl_parts: LayerParts

    def _tl_fusable(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> bool:
        p = self._tl_parts
        if self.training or x.dim() != 3 or x.dtype != torch.float32 or x.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and (x.requires_grad or p.ln1.weight.requires_grad
                                        or p.query.weight.requires_grad):
            return False
        if any(a is not None for a in args) or any(
                kwargs.get(k) is not None and kwargs.get(k) is not False
                for k in _UNFUSABLE_KWARGS):
            return False
        return not _attentions_requested()

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *args: Any, **kwargs: Any) -> Any:
        original = super().forward
        if not self._tl_fusable(hidden_states, args, kwargs):
            return original(hidden_states, attention_mask, *args, **kwargs)
        b, t, h = hidden_states.shape
        bias = key_bias(attention_mask, b, t)
        if bias is _NOT_A_KEY_MASK:
            return original(hidden_states, attention_mask, *args, **kwargs)
        p = self._tl_parts
        n = b * t
        w = p.heads * p.head_dim
        x = hidden_states.reshape(n, h).contiguous()
        prog = self._tl_program(b, t) if LAYER_PROGRAMS else None
        if prog is not None:
            return self._tl_run_program(prog, x, b, t, bias).view(b, t, h)
        q = _run(p.query, x, out=scratch("q", n, w))
        k = _run(p.key, x, out=scratch("k", n, w))
        v = _run(p.value, x, out=scratch("v", n, w))
        ctx = attention(q, k, v, b, t, p.heads, p.head_dim, bias, p.scale,
                        out=scratch("ctx", n, w))
        a = _run(p.attn_out, ctx, Epilogue(residual=x, ln=(p.ln1.weight, p.ln1.bias,
                                                           p.ln1.eps)), scratch("a", n, h))
        inner = _run(p.ffn_in, a, Epilogue(act=p.act),
                     scratch("ffn", n, p.ffn_in.out_features))
        y = _run(p.ffn_out, inner, Epilogue(residual=a, ln=(p.ln2.weight, p.ln2.bias,
                                                            p.ln2.eps)))
        return y.view(b, t, h)

    def _tl_program(self, b: int, t: int) -> LayerProgram | None:
        """This layer's one-call program for ``b`` sequences of ``t`` tokens on the current
        thread count, built on first use and whenever the plan or a pointer changed; None if a
        product is not on ticketlab's kernels (then the layer runs product by product)."""
        p = self._tl_parts
        lins = (p.query, p.key, p.value, p.attn_out, p.ffn_in, p.ffn_out)
        if not all(isinstance(m, SparseLinear) for m in lins):
            return None
        threads = torch.get_num_threads()
        n = b * t
        plans = tuple(m.call_plan(n, threads) for m in lins)
        tensors: list[torch.Tensor] = []
        for m, plan in zip(lins, plans, strict=True):
            ts = _product_tensors(m, plan)
            if ts is None:
                return None
            tensors.extend(ts)
        tensors.extend((p.ln1.weight, p.ln1.bias, p.ln2.weight, p.ln2.bias))
        signature = (*(id(x) for x in plans), *(x.data_ptr() for x in tensors))
        progs = _programs.setdefault(self, {})
        prog = progs.get((b, t, threads))
        if prog is not None and prog.signature == signature:
            return prog
        from ticketlab.sparse.build import load_library

        lib = load_library()
        ints: list[int] = []
        need = 0
        for m, plan in zip(lins, plans, strict=True):
            slots, ws = _descriptor(m, plan, n, threads, lib)
            ints.extend(slots)
            need = max(need, ws)
        if len(ints) != 6 * lib.tl_product_slots():
            raise RuntimeError("the kernel library's layer descriptor does not match fused.py")
        need = max(need, attention_workspace(t, p.head_dim, threads))
        ints += [p.heads, p.head_dim, p.act, p.ln1.weight.data_ptr(), p.ln1.bias.data_ptr(),
                 p.ln2.weight.data_ptr(), p.ln2.bias.data_ptr()]
        prog = LayerProgram(signature, torch.tensor(ints, dtype=torch.int64),
                            torch.tensor([p.scale, p.ln1.eps, p.ln2.eps], dtype=torch.float32),
                            need, (*plans, *tensors))
        progs[(b, t, threads)] = prog
        return prog

    def _tl_run_program(self, prog: LayerProgram, x: torch.Tensor, b: int, t: int,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's output for ``x`` ([b * t, hidden], contiguous) in one C call."""
        from ticketlab.sparse.build import load_library

        p = self._tl_parts
        n, h = x.shape
        w = p.heads * p.head_dim
        bias = key_bias_operand(bias, b, t)
        y = torch.empty(n, h, dtype=torch.float32)
        bufs = (scratch("q", n, w), scratch("k", n, w), scratch("v", n, w),
                scratch("ctx", n, w), scratch("a", n, h),
                scratch("ffn", n, p.ffn_in.out_features))
        load_library().tl_encoder_layer(
            prog.ints.data_ptr(), prog.floats.data_ptr(), x.data_ptr(), b, t,
            bias.data_ptr() if bias is not None else None, *(u.data_ptr() for u in bufs),
            y.data_ptr(), _workspace_for(prog.workspace).data_ptr(), torch.get_num_threads())
        return y


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """``Fused<cls>``: the fused mixin in front of ``cls`` (one per class)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (FusedEncoderLayer, cls),
                                   {"__module__": __name__})
    return _FUSED_CLASSES[cls]


def layer_rule(parts_of: Callable[[nn.Module], LayerParts | None]
               ) -> Callable[[nn.Module, RewriteContext], nn.Module | None]:
    """A rewrite rule that fuses a layer whose parts ``parts_of`` recognises."""

    def rule(layer: nn.Module, ctx: RewriteContext) -> nn.Module | None:
        if isinstance(layer, FusedEncoderLayer) or parts_of(layer) is None:
            return None
        ctx.rewrite_children(layer)  # its Linears become SparseLinears first
        parts = parts_of(layer)
        if parts is None:
            return None
        layer.__class__ = fused_class(type(layer))
        layer._tl_parts = parts
        return layer

    return rule


for _name in ("BertLayer", "RobertaLayer", "XLMRobertaLayer", "CamembertLayer", "ElectraLayer"):
    register_rewrite(_name, layer_rule(bert_parts))
register_rewrite("TransformerBlock", layer_rule(distilbert_parts))


def fused_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of an accelerated model that run fused."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FusedEncoderLayer)}
