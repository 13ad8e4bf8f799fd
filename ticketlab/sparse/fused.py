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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.sparse.engine import RewriteContext, SparseLinear, mkl_linear, register_rewrite
from ticketlab.sparse.kernels import (
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_RELU,
    NO_EPILOGUE,
    Epilogue,
    apply_epilogue,
    attention,
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
