"""The CNN architectures ticketlab ships, and how weights reach them.

torchvision does not import on every machine (its PyPI wheel is a CUDA build: ``operator
torchvision::nms does not exist`` on a CPU torch), so ticketlab never needs it: MobileNetV2 and
ResNet-18…152 are transformers' ``MobileNetV2ForImageClassification`` and
``ResNetForImageClassification`` (the same networks: symmetric padding, BatchNorm eps 1e-5,
ReLU6 / ReLU, stride on the ResNet 3×3 — torchvision's v1.5), and torchvision-layout
checkpoints are mapped onto them key by key. A transformers model also exports as a standard
Hugging Face folder that ``AutoModelForImageClassification`` loads without ticketlab.

Checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain containers
only, no code runs) or as safetensors; nothing is ever fully unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError


# --- reading checkpoints ----------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a torch file loaded with
    ``weights_only=True``; a ``{"state_dict": …}`` / ``{"model": …}`` wrapper is opened."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (code in the file), truncation, wrong format
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TicketlabError(
            f"Could not read the checkpoint {path} as tensors only ({first[:200]}).",
            "ticketlab loads .pth files with torch.load(weights_only=True) and never runs "
            "code from a file: pass a plain state dict (or a .safetensors file).") from e
    for key in ("state_dict", "model", "model_state", "net"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
            break
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(v, torch.Tensor) for v in raw.values()):
        raise TicketlabError(f"The checkpoint {path} holds no state dict of tensors.",
                             "Pass a torchvision-style state dict (model.state_dict()).")
    return {str(k): v for k, v in raw.items()}


def _strip_prefix(state: dict[str, torch.Tensor], anchor: str) -> dict[str, torch.Tensor]:
    """Keep the keys under the prefix of ``anchor`` (``module.encoder_q.conv1.weight`` →
    prefix ``module.encoder_q.``) and drop that prefix: self-supervised checkpoints (MoCo,
    SimCLR) wrap the backbone and carry a second encoder or projection head beside it."""
    hits = [k for k in state if k == anchor or k.endswith("." + anchor)]
    if not hits:
        return state
    prefix = min(hits, key=len)[: -len(anchor)]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def architecture_of(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any]]:
    """Which shipped architecture a torchvision-layout state dict is, read off its keys:
    ``("mobilenet_v2", {})`` or ``("resnet", {"depths": …, "layer_type": …})``."""
    if "features.0.0.weight" in state and "features.18.0.weight" in state:
        return "mobilenet_v2", {}
    if "conv1.weight" in state and "layer1.0.conv1.weight" in state:
        bottleneck = "layer1.0.conv3.weight" in state
        depths = []
        for s in range(1, 5):
            blocks = {int(m.group(1)) for k in state
                      if (m := re.match(rf"layer{s}\.(\d+)\.conv1\.weight$", k))}
            depths.append(len(blocks))
        return "resnet", {"depths": depths,
                          "layer_type": "bottleneck" if bottleneck else "basic"}
    raise TicketlabError(
        "The checkpoint is neither a torchvision MobileNetV2 nor a ResNet (no features.18 or "
        "layer1 keys).",
        "Pass a torchvision-layout state dict, a Hugging Face image model (folder or hub id), "
        "or torchvision:NAME / timm:NAME with those libraries installed.")


# --- torchvision layout -> transformers modules -----------------------------------------------
def mobilenet_v2_config(num_labels: int) -> Any:
    """transformers' MobileNetV2 configured as torchvision's: symmetric padding (not TF's
    "SAME"), BatchNorm eps 1e-5, dropout 0.2 before the classifier, width 1.0."""
    from transformers import MobileNetV2Config

    return MobileNetV2Config(num_labels=num_labels, tf_padding=False, layer_norm_eps=1e-5,
                             classifier_dropout_prob=0.2, image_size=224, depth_multiplier=1.0)


def resnet_config(depths: list[int], layer_type: str, num_labels: int) -> Any:
    from transformers import ResNetConfig

    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return ResNetConfig(num_labels=num_labels, embedding_size=64, hidden_sizes=widths,
                        depths=depths, layer_type=layer_type, downsample_in_first_stage=False)


def _bn(src: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src}.{p}", f"{dst}.{p}") for p in
            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _conv_bn(src_conv: str, src_bn: str, dst: str) -> list[tuple[str, str]]:
    return [(f"{src_conv}.weight", f"{dst}.convolution.weight"),
            *_bn(src_bn, f"{dst}.normalization")]


def mobilenet_v2_key_map() -> list[tuple[str, str]]:
    """torchvision MobileNetV2 key -> transformers key (body, then the ImageNet head)."""
    b = "mobilenet_v2"
    pairs = _conv_bn("features.0.0", "features.0.1", f"{b}.conv_stem.first_conv")
    pairs += _conv_bn("features.1.conv.0.0", "features.1.conv.0.1", f"{b}.conv_stem.conv_3x3")
    pairs += _conv_bn("features.1.conv.1", "features.1.conv.2", f"{b}.conv_stem.reduce_1x1")
    for i in range(2, 18):
        d = f"{b}.layer.{i - 2}"
        pairs += _conv_bn(f"features.{i}.conv.0.0", f"features.{i}.conv.0.1", f"{d}.expand_1x1")
        pairs += _conv_bn(f"features.{i}.conv.1.0", f"features.{i}.conv.1.1", f"{d}.conv_3x3")
        pairs += _conv_bn(f"features.{i}.conv.2", f"features.{i}.conv.3", f"{d}.reduce_1x1")
    pairs += _conv_bn("features.18.0", "features.18.1", f"{b}.conv_1x1")
    return pairs + [("classifier.1.weight", "classifier.weight"),
                    ("classifier.1.bias", "classifier.bias")]


def resnet_key_map(depths: list[int], layer_type: str) -> list[tuple[str, str]]:
    """torchvision ResNet key -> transformers key (body, then the ImageNet head)."""
    b = "resnet"
    pairs = _conv_bn("conv1", "bn1", f"{b}.embedder.embedder")
    convs = 3 if layer_type == "bottleneck" else 2
    for s, depth in enumerate(depths):
        for j in range(depth):
            src, dst = f"layer{s + 1}.{j}", f"{b}.encoder.stages.{s}.layers.{j}"
            for k in range(convs):
                pairs += _conv_bn(f"{src}.conv{k + 1}", f"{src}.bn{k + 1}", f"{dst}.layer.{k}")
            pairs += _conv_bn(f"{src}.downsample.0", f"{src}.downsample.1", f"{dst}.shortcut")
    return pairs + [("fc.weight", "classifier.1.weight"), ("fc.bias", "classifier.1.bias")]


def build(arch: str, num_labels: int, seed: int, **kwargs: Any) -> nn.Module:
    """A shipped architecture with random weights under ``seed`` (tests, and the skeleton
    torchvision weights are copied into)."""
    from transformers import MobileNetV2ForImageClassification, ResNetForImageClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "mobilenet_v2":
            return MobileNetV2ForImageClassification(mobilenet_v2_config(num_labels))
        return ResNetForImageClassification(resnet_config(kwargs["depths"],
                                                          kwargs["layer_type"], num_labels))


def from_torchvision_state(state: dict[str, torch.Tensor], num_labels: int, seed: int,
                           expect: str | None, keep_head: bool = False
                           ) -> tuple[nn.Module, list[str]]:
    """The transformers model holding a torchvision-layout checkpoint's body, with a new
    classifier for ``num_labels`` classes drawn under ``seed`` (``keep_head``: the
    checkpoint's own head, which needs its class count). Returns the model and the body
    weights the checkpoint lacked (base-model-relative)."""
    for anchor in ("features.0.0.weight", "conv1.weight"):
        if any(k == anchor or k.endswith("." + anchor) for k in state):
            state = _strip_prefix(state, anchor)
            break
    arch, extra = architecture_of(state)
    if expect is not None and arch != expect:
        raise TicketlabError(f"The checkpoint is a {arch}, not a {expect}.",
                             f"Pass a {expect} checkpoint.")
    model = build(arch, num_labels, seed, **extra)
    pairs = (mobilenet_v2_key_map() if arch == "mobilenet_v2"
             else resnet_key_map(extra["depths"], extra["layer_type"]))
    target = model.state_dict()
    prefix = model.base_model_prefix + "."
    new: dict[str, torch.Tensor] = {}
    for src, dst in pairs:
        if src not in state or dst not in target:
            continue
        if not dst.startswith(prefix) and not keep_head:
            continue  # the ImageNet (or projection) head: the task gets a new one
        if tuple(state[src].shape) != tuple(target[dst].shape):
            raise TicketlabError(
                f"The checkpoint's {src} has shape {tuple(state[src].shape)}, the {arch} "
                f"architecture {tuple(target[dst].shape)}.",
                "Pass a standard-width torchvision checkpoint of that architecture.")
        new[dst] = state[src].to(target[dst].dtype)
    used = {src for src, dst in pairs if dst in new}
    unknown = sorted(k for k in state if k not in used and not k.startswith(("fc.", "classifier.")))
    if unknown:
        raise TicketlabError(
            f"The checkpoint has {len(unknown)} tensors the {arch} architecture does not "
            f"(e.g. {', '.join(unknown[:3])}).",
            "Pass a plain torchvision MobileNetV2/ResNet state dict (a modified network needs "
            "its own loader: wrap it with ticketlab.families.base.ModuleFamily).")
    model.load_state_dict(new, strict=False)
    missing = sorted(k[len(prefix):] for k in target if k.startswith(prefix) and k not in new
                     and not k.endswith("num_batches_tracked"))
    return model, missing


# --- Hugging Face image models ----------------------------------------------------------------
def load_hf_image_model(model_ref: str, num_labels: int, seed: int,
                        trust_remote_code: bool = False) -> tuple[nn.Module, list[str]]:
    """``AutoModelForImageClassification`` with a new ``num_labels`` classifier (safetensors
    only); a backbone without a classification head (DINO) gets one."""
    from transformers import AutoModelForImageClassification
    from transformers import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # missing weights are reported by ticketlab itself
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    try:
        net, info = AutoModelForImageClassification.from_pretrained(
            model_ref, num_labels=num_labels, ignore_mismatched_sizes=True,
            use_safetensors=True, output_loading_info=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, safetensors' own error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TicketlabError(
            f"Could not load the image model {model_ref!r} ({first[:200]}).",
            "Pass a Hugging Face image model with safetensors weights (folder or reachable hub "
            "id), a torchvision checkpoint file, or --model mobilenet_v2 (offline).") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    prefix = net.base_model_prefix + "."
    missing = sorted(k[len(prefix):] for k in info.get("missing_keys", ()) if k.startswith(prefix))
    return net, missing


# --- torchvision / timm models, for users whose libraries import ------------------------------
class ExternalImageClassifier(nn.Module):
    """A torchvision or timm network with its own classifier removed (``body``) and a new
    ``classifier`` for the task, speaking the HF interface the training loop uses:
    ``forward(pixel_values, labels)`` -> ``.loss``, ``.logits``."""

    base_model_prefix = "body"

    def __init__(self, body: nn.Module, features: int, num_labels: int, name: str) -> None:
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(features, num_labels)
        self.source = name

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

        logits = self.classifier(torch.flatten(self.body(pixel_values), 1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits)


def _drop_classifier(model: nn.Module) -> int:
    """Replace the network's last Linear (its ImageNet classifier) by Identity; returns its
    input width."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise TicketlabError(f"{type(model).__name__} has no Linear classifier to replace.",
                             "Use a classification network.")
    name, linear = last
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return linear.in_features


def load_external(library: str, name: str, num_labels: int, seed: int
                  ) -> tuple[nn.Module, list[str]]:
    """``torchvision:NAME`` (its DEFAULT weights) or ``timm:NAME`` (pretrained), imported
    only here: the offline path never needs either library."""
    try:
        if library == "timm":
            import timm

            body = timm.create_model(name, pretrained=True, num_classes=0)
            features = int(body.num_features)
        else:
            import torchvision

            body = torchvision.models.get_model(name, weights="DEFAULT")
            features = _drop_classifier(body)
    except ImportError as e:
        raise TicketlabError(
            f"--model {library}:{name} needs {library}, which does not import here "
            f"({str(e).splitlines()[0][:120]}).",
            f"Install a {library} build that matches your torch (pip install {library}), or "
            "use --model mobilenet_v2 (offline, no torchvision needed) or a hub id.") from e
    except TicketlabError:
        raise
    except Exception as e:  # unknown model name, weights not downloadable
        raise TicketlabError(f"{library} could not build {name!r}: {str(e).splitlines()[0]}",
                             f"Check the model name in {library}'s model list.") from e
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ExternalImageClassifier(body, features, num_labels, f"{library}:{name}")
    return model, []
