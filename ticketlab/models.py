"""Loading θ0 and finding its prunable set, whatever the family.

The family-specific parts (how a BERT or a CNN is loaded, which matrices the paper prunes) live
in :mod:`ticketlab.families`; this module is what the rest of ticketlab calls: load a model for
``--model``, its prunable set after ``--include``/``--exclude`` and after leaving out weights
the checkpoint did not provide, θ0's fingerprint, and per-matrix statistics.
"""

from __future__ import annotations

import hashlib
import re
import statistics
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families import family_for, family_of, get_family
from ticketlab.families.text import (  # noqa: F401  (re-exported: the public names)
    DEFAULT_MODEL_ALIASES,
    SUPPORTED_MODEL_TYPES,
    resolve_model_path,
)


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The processor a task featurises with (a tokenizer for text models)."""
    return family_for(model).processor(model, trust_remote_code)


def load_model(
    model: str,
    head: str,
    num_labels: int = 2,
    seed: int = 0,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
) -> nn.Module:
    """Load θ0 with a task head. The head's random init (γ0) is seeded so runs repeat exactly."""
    fam = family_for(model)
    loaded = fam.load(model, head, num_labels, seed, trust_remote_code)
    check = getattr(fam, "check_processor", None)
    if check is not None:
        check(loaded.model, tokenizer)
    return loaded.model


def default_prunable_names(model: nn.Module, prune_pooler: bool = True) -> list[str]:
    """The paper's prunable set, found from the model by its family."""
    return family_of(model).default_prunable(model, prune_pooler)


def prunable_parameters(
    model: nn.Module,
    prune_pooler: bool = True,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    missing: tuple[str, ...] | list[str] = (),
    keep_missing: bool = False,
    family: Any = None,
) -> dict[str, nn.Parameter]:
    """Map base-model-relative name → parameter for the prunable set.

    ``include`` regexes add any other matrix of the base model (say the word embeddings);
    ``exclude`` regexes remove matrices from the set (say ``pooler``). ``missing`` are the
    base-model weights the checkpoint lacked: they were drawn at random, not pre-trained, so
    a "ticket" of them would prune noise — they are left out with a warning unless
    ``keep_missing`` (``--prune-missing-weights``).
    """
    fam = family or family_of(model)
    base_params = dict(fam.base_module(model).named_parameters())
    names = fam.default_prunable(model, prune_pooler)
    for pattern in include:
        rx = _compile(pattern, "--include")
        names += [n for n, p in base_params.items() if rx.search(n) and p.dim() >= 2]
    for pattern in exclude:
        rx = _compile(pattern, "--exclude")
        names = [n for n in names if not rx.search(n)]
    unique = list(dict.fromkeys(names))
    absent = [n for n in unique if n in set(missing)]
    if absent and not keep_missing:
        warnings.warn(
            f"The checkpoint has no weights for {len(absent)} prunable matri"
            f"{'x' if len(absent) == 1 else 'ces'} ({', '.join(absent[:3])}"
            f"{', …' if len(absent) > 3 else ''}): they were randomly initialised, so they are "
            "left out of the prunable set (kept dense, drawn under --seed like the head). "
            "--prune-missing-weights keeps them in.", UserWarning, stacklevel=2)
        unique = [n for n in unique if n not in absent]
    if not unique:
        raise TicketlabError(
            "The prunable set is empty after --include/--exclude.",
            "Loosen the --exclude patterns.",
        )
    return {n: base_params[n] for n in unique}


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise TicketlabError(f"{flag} {pattern!r} is not a valid regex: {e}.", "Fix it.") from e


#: The matrix roles, in the order a BERT layer computes them (other families' roles after).
ROLE_ORDER = ("Q", "K", "V", "attn-out", "ffn-in", "ffn-out", "pooler", "other")


def role_of(name: str, family: str = "text-encoder",
            shape: tuple[int, ...] | None = None) -> str:
    """Which kind of matrix a prunable name is (Q, K, V, attn-out, ffn-in, ... for text;
    conv1x1, depthwise, conv3x3 ... for a CNN, told apart by ``shape``)."""
    return get_family(family).role_of(name, shape)


def layer_of(name: str, family: str = "text-encoder") -> int | None:
    return get_family(family).layer_of(name)


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 of θ0's prunable encoder-layer tensors (names, shapes, values).

    The pooler is left out on purpose: MLM and QA models have none, and a mask must still
    transfer between heads of the same body. The per-tensor digests of
    :func:`tensor_digests` cover the rest of θ0 (pooler included where both sides have one).
    """
    h = hashlib.sha256()
    for name in sorted(params):
        if "pooler" in name:
            continue
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tensor_digests(base_state: dict[str, torch.Tensor], missing: tuple[str, ...] | list[str] = (),
                   length: int = 16) -> dict[str, str]:
    """A short sha256 of every tensor of θ0's body the checkpoint provided.

    Stored in every mask, so a mask is checked against *everything of θ0 it depends on* —
    embeddings, LayerNorms and the pooler included, not only the prunable encoder matrices the
    fingerprint covers — on the tensors both sides have (an MLM body has no pooler). Weights the
    checkpoint lacked are drawn under the seed, like the head, and are left out unless they
    are pruned (then their values matter and are covered by the mask's own digests).
    """
    skip = set(missing)
    out = {}
    for name in sorted(base_state):
        if name in skip:
            continue
        t = base_state[name].detach().to("cpu").contiguous()
        h = hashlib.sha256(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[name] = h.hexdigest()[:length]
    return out


@dataclass
class MatrixStats:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    numel: int
    mean_abs: float
    std: float
    outlier: bool = False


def matrix_stats(params: dict[str, torch.Tensor], outlier_ratio: float = 0.25,
                 family: str = "text-encoder") -> list[MatrixStats]:
    """Per-matrix magnitude statistics, flagging matrices whose mean |w| is far below the rest.

    Why: one global magnitude ranking prunes such a matrix first and fastest. MiniLM-L6's pooler
    (mean |w| 0.0073 against 0.034-0.074 elsewhere) loses half its weights at 10 % overall
    sparsity and all of them at 50 %, after which a classifier on the pooled output is dead.
    """
    fam = get_family(family)
    rows = []
    for name, p in params.items():
        t = p.detach().float()
        rows.append(MatrixStats(name, fam.role_of(name, tuple(t.shape)), fam.layer_of(name),
                                tuple(t.shape),
                                t.numel(), t.abs().mean().item(),
                                t.std().item() if t.numel() > 1 else 0.0))
    median = statistics.median(r.mean_abs for r in rows)
    for r in rows:
        r.outlier = r.mean_abs < outlier_ratio * median
    return rows
