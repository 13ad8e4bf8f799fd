"""SuperTickets on MobileNetV2 (issue 16.2): the expansion channels the vision family
describes, their gate (the depthwise BatchNorm's γ), exact removal (the physically smaller
network computes what the gated one did), and runs through the CLI on the synthetic CIFAR-10
of ``tests/test_vision.py`` with a tiny random MobileNetV2 at 32 px."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.test_vision import _cli, cifar_dir, tiny_resnet  # noqa: F401 (cifar_dir: a fixture)
from ticketlab.errors import TicketlabError
from ticketlab.families import cnn
from ticketlab.families.vision import VisionFamily
from ticketlab.models import prunable_parameters
from ticketlab.supertickets.gates import (
    GatePenalty,
    attach_gates,
    detach_gates,
    fold_gates,
    remove_units,
    structural_weight_mask,
    zero_removed,
)
from ticketlab.supertickets.physical import shrink

FAMILY = VisionFamily()


def tiny_mobilenet(seed: int = 0) -> torch.nn.Module:
    """A random MobileNetV2 at width 0.25 (16 blocks, 48-240 expansion channels), 162k
    parameters: seconds to train at 32 px."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(seed)
    config = MobileNetV2Config(depth_multiplier=0.25, min_depth=4, image_size=32, num_labels=10,
                               tf_padding=False, layer_norm_eps=1e-5,
                               classifier_dropout_prob=0.0, finegrained_output=False)
    return MobileNetV2ForImageClassification(config)


@pytest.fixture(scope="module")
def tiny_mobilenet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-mobilenet")
    tiny_mobilenet().save_pretrained(out)
    return out


def with_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Convolutions at torchvision's init (Kaiming, fan-out), BatchNorm γ and β away from
    their init (γ = 1, β = 0: a removed channel's β must really emit something) and running
    statistics measured on random images (so that eval mode tells images apart)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", generator=g)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.3)
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for _ in range(3):
            model(pixel_values=torch.randn(16, 3, 32, 32, generator=g))
    return model.eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- the units the family describes ---------------------------------------------------------
def test_units_of_a_mobilenet_v2_are_the_expansion_channels_of_its_blocks() -> None:
    model = cnn.build("mobilenet_v2", 10, seed=0)
    groups = FAMILY.structural_units(model)
    # the paper's table (t, c, n, s): 16 blocks with an expansion of 6x their input
    # (the stem's block has no expansion, HR-NAS' expansion_only then has nothing to gate)
    widths = []
    c_in = 16
    for c, n in [(24, 2), (32, 3), (64, 4), (96, 3), (160, 3), (320, 1)]:
        for _ in range(n):
            widths.append(6 * c_in)
            c_in = c
    assert [(g.kind, g.layer, g.count, g.size, g.axis) for g in groups] == [
        ("channel", i, w, 1, 1) for i, w in enumerate(widths)]
    assert sum(g.count for g in groups) == 7_104
    g = groups[0]
    assert g.gate == "layer.0.conv_3x3.normalization.weight"  # the depthwise BN's γ
    assert g.gated == "layer.0.reduce_1x1.convolution"
    assert g.rows == ("layer.0.expand_1x1.convolution", "layer.0.expand_1x1.normalization",
                      "layer.0.conv_3x3.convolution", "layer.0.conv_3x3.normalization")
    # per image at 224 px: the expansion reads 112², the stride-2 depthwise and the
    # projection 56²: 16 in + 9 taps + 24 out per channel
    assert g.macs == 112 ** 2 * 16 + 56 ** 2 * (9 + 24)
    assert groups[-1].macs == 7 ** 2 * (160 + 9 + 320)  # the last block: 7x7, stride 1
    with pytest.raises(TicketlabError, match="no MobileNetV2 inverted residuals"):
        FAMILY.structural_units(tiny_resnet())


def test_the_gate_is_the_networks_own_batchnorm_scale_under_the_l1_penalty() -> None:
    model = tiny_mobilenet()
    base = FAMILY.base_module(model)
    keys = set(model.state_dict())
    bank = attach_gates(model, FAMILY.structural_units(model), base, lr_scale=50.0)
    gamma = base.get_parameter("layer.2.conv_3x3.normalization.weight")
    assert bank.units[2].values() is gamma  # no new parameter: the network's γ
    assert not list(bank.parameters()) and not hasattr(gamma, "lr_scale")
    assert set(model.state_dict()) - keys == {f"supertickets_gates.units.{i}.keep"
                                              for i in range(16)}
    with torch.no_grad():
        gamma.copy_(torch.linspace(-1.0, 1.0, gamma.numel()))
        bank.units[2].keep[:4] = 0.0
    penalty = GatePenalty(bank, rho=0.01, warmup_steps=0, mode="uniform")
    others = sum(float(u.values().detach().abs().sum()) for i, u in enumerate(bank.units) if i != 2)
    mine = float((gamma.detach().abs() * bank.units[2].keep).sum())
    assert float(penalty.loss().detach()) == pytest.approx(0.01 * (others + mine))
    penalty.loss().backward()  # the L1 reaches γ itself
    assert gamma.grad is not None and torch.equal(gamma.grad[:4], torch.zeros(4))
    assert torch.allclose(gamma.grad[4:], 0.01 * gamma.detach()[4:].sign())
    detach_gates(model)
    assert set(model.state_dict()) == keys


def test_a_removed_channel_contributes_exactly_nothing_and_is_cut_physically() -> None:
    model = with_statistics(cnn.build("mobilenet_v2", 10, seed=0))
    base = FAMILY.base_module(model)
    groups = FAMILY.structural_units(model)
    bank = attach_gates(model, groups, base)
    x = images()
    with torch.no_grad():
        out = model(pixel_values=x).logits
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # images are told apart
    gamma = base.get_parameter(groups[1].gate)
    with torch.no_grad():
        gamma[[7, 50]] = 1e-4  # below the threshold
    removed = remove_units(bank, {"channel": 5}, threshold=1e-3)
    assert removed == {"channel": 5}
    assert (~bank.units[1].alive()).nonzero().flatten()[:2].tolist() == [7, 50]
    # γ zero but β not: the channel still emits ReLU6(β) into the projection
    with torch.no_grad():
        gamma.mul_(bank.units[1].keep)
        beta = base.get_parameter("layer.1.conv_3x3.normalization.bias")
        beta[7] = 0.5
        leaky = model(pixel_values=x).logits
    params = prunable_parameters(model, family=FAMILY)
    cleared = structural_weight_mask(bank, params)
    for name, m in cleared.items():
        params[name].data.mul_(m)
    zero_removed(bank, base)  # γ and β of both BatchNorms, the conv rows too
    assert float(beta.detach()[7]) == 0.0 and float(gamma.detach()[7]) == 0.0
    with torch.no_grad():
        gated = model(pixel_values=x).logits
    assert not torch.allclose(leaky, gated, atol=1e-4)
    # the mask clears the expansion's output channel, the depthwise filter and the
    # projection's input column of every removed channel
    gone = sum(int((~u.alive()).sum()) for u in bank.units)
    assert gone == 5
    ex = f"{groups[1].rows[0]}.weight"
    assert (~cleared[ex]).nonzero()[:, 0].unique().tolist()[:2] == [7, 50]
    assert (~cleared[f"{groups[1].gated}.weight"]).nonzero()[:, 1].unique().tolist()[:2] \
        == [7, 50]
    total_cleared = sum(int((~m).sum()) for m in cleared.values())
    assert total_cleared == sum(
        int((~u.alive()).sum()) * (base.get_submodule(g.rows[0]).in_channels + 9
                                   + base.get_submodule(g.gated).out_channels)
        for g, u in zip(groups, bank.units, strict=True))
    # a removed channel's rows no longer matter at all, in eval and in train mode (batch
    # statistics; on a copy, since train mode updates the running ones; dropout seeded)
    for mode in ("eval", "train"):
        probe = getattr(copy.deepcopy(model), mode)()
        probe_w = FAMILY.base_module(probe).get_submodule(groups[1].rows[0]).weight
        with torch.no_grad():
            torch.manual_seed(0)
            before = probe(pixel_values=x).logits
            probe_w[7].normal_()
            torch.manual_seed(0)
            after = probe(pixel_values=x).logits
        assert torch.equal(before, after), mode
    plain = fold_gates(model.state_dict(), bank, FAMILY.base_prefix(model))
    keep = [[bool(b) for b in u.keep] for u in bank.units]
    detach_gates(model)
    model.load_state_dict(plain)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, gated)  # no hook: folding is a no-op
        size = sum(p.numel() for p in model.parameters())
        shrink(base, groups, keep)
        small = model(pixel_values=x).logits
    assert torch.allclose(small, gated, atol=1e-5)
    # each channel: its expansion filter (in) + 2 BN, a 3x3 depthwise filter + 2 BN, a
    # projection column (out)
    assert size - sum(p.numel() for p in model.parameters()) == sum(
        int((~u.alive()).sum()) * (base.get_submodule(g.rows[0]).in_channels + 2 + 9 + 2
                                   + base.get_submodule(g.gated).out_channels)
        for g, u in zip(groups, bank.units, strict=True))
    block = base.layer[1]
    kept = sum(keep[1])
    assert (block.expand_1x1.convolution.out_channels, block.expand_1x1.normalization.num_features,
            block.conv_3x3.convolution.groups, block.conv_3x3.normalization.num_features,
            block.reduce_1x1.convolution.in_channels) == (kept,) * 5
    assert block.conv_3x3.convolution.stride == (1, 1)  # block 1 (24 -> 24) keeps its stride


# --- runs -------------------------------------------------------------------------------------
def st_args(cifar: Path, model: Path, root: Path, *extra: str) -> list[str]:
    """6 SGD steps of the tiny MobileNetV2 on the synthetic CIFAR-10 (160 images), a pruning
    point every 2 steps: 20 % (the image tasks' geometric schedule), then 30 % of the
    convolutions, and a quarter of the channels."""
    return ["supertickets", "--task", "cifar10", "--data-dir", str(cifar), "--model",
            str(model), "--max-steps", "6", "--batch-size", "16", "--lr", "0.05",
            "--target-sparsity", "0.3", "--rate", "0.2", "--interval", "2",
            "--channel-target", "0.25", "--root", str(root), "--no-progress", *extra]


def test_a_mobilenet_run_through_the_cli_stores_levels_resumes_exports_and_benches(
        cifar_dir: Path, tiny_mobilenet_dir: Path, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    import ticketlab.supertickets.search as search
    from tests.test_supertickets_runs import files_of
    from ticketlab.masks import Mask
    from ticketlab.store import list_runs
    from ticketlab.supertickets.bench import bench_superticket
    from ticketlab.supertickets.physical import load_structured, load_superticket

    monkeypatch.setenv("TICKETLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    # interrupted in the third interval (after interval 2 and its state were written) ...
    real_interval = search.Search.interval

    def interrupted(self, k):
        if k == 3:
            raise KeyboardInterrupt
        return real_interval(self, k)

    monkeypatch.setattr(search.Search, "interval", interrupted)
    assert _cli(st_args(cifar_dir, tiny_mobilenet_dir, root)).exit_code != 0
    monkeypatch.setattr(search.Search, "interval", real_interval)
    # ... then resumed: the same files as a run that never stopped
    result = _cli(st_args(cifar_dir, tiny_mobilenet_dir, root))
    assert result.exit_code == 0, result.output
    assert result.output.count("(stored)") == 2
    assert _cli(st_args(cifar_dir, tiny_mobilenet_dir, tmp_path / "ref")).exit_code == 0
    [reference] = list_runs(tmp_path / "ref")
    assert "interval  3/3" in result.output and "channels 1368/1824" in result.output
    assert "heads" not in result.output
    [run] = list_runs(root)
    assert run.path.name.startswith("supertickets-cifar10-") and run.levels() == [1, 2, 3]
    assert files_of(run) == files_of(reference)
    records = [run.metrics(k) for k in run.levels()]
    assert [round(r["sparsity"], 3) for r in records] == [0.2, 0.3, 0.3]
    # half the target at the first point, all of it where the weights reach 30 %: 228,
    # then 456 of the 1,824 channels
    assert [r["structure"]["channel"]["kept"] for r in records] == [1596, 1368, 1368]
    assert all(0 <= r["score"] <= 1 for r in records)
    structure = json.loads((run.level_dir(3) / "structure.json").read_text())
    assert {g["kind"] for g in structure["groups"]} == {"channel"}
    assert all(any(g["keep"]) for g in structure["groups"])  # every block keeps a channel
    mask = Mask.load(run.level_dir(3) / "mask.safetensors")
    group = next(g for g in structure["groups"] if not all(g["keep"]))
    j = group["keep"].index(False)
    layer = group["layer"]
    assert not mask.tensors[f"layer.{layer}.expand_1x1.convolution.weight"][j].any()
    assert not mask.tensors[f"layer.{layer}.conv_3x3.convolution.weight"][j].any()
    assert not mask.tensors[f"layer.{layer}.reduce_1x1.convolution.weight"][:, j].any()
    again = _cli(st_args(cifar_dir, tiny_mobilenet_dir, root))  # finished: all stored
    assert again.exit_code == 0 and again.output.count("(stored)") == 3
    # export: the plain folder (full size, removed channels as zeros) and the physical one
    out = tmp_path / "ticket"
    exported = _cli(["supertickets-export", run.path.name, "--to", str(out), "--root",
                     str(root)])
    assert exported.exit_code == 0, exported.output
    assert "1368/1824 channels kept" in exported.output
    assert "AutoModelForImageClassification" in exported.output
    from transformers import AutoModelForImageClassification

    ticket, groups, keep = load_structured(run.path, root)
    plain = AutoModelForImageClassification.from_pretrained(out).eval()
    small = load_superticket(out)
    x = images(4)
    with torch.no_grad():
        want = ticket.model.eval()(pixel_values=x).logits
        assert torch.allclose(plain(pixel_values=x).logits, want, atol=1e-5)
        assert torch.allclose(small(pixel_values=x).logits, want, atol=1e-5)
    assert [b.expand_1x1.convolution.out_channels for b in small.mobilenet_v2.layer] == [
        sum(bits) for bits in keep]
    sizes = [sum(p.numel() for p in m.parameters()) for m in (plain, small)]
    assert sizes[0] > sizes[1]
    card = (out / "README.md").read_text()
    assert "depthwise BatchNorm scale" in card and "one expand_ratio for all blocks" in card
    info = json.loads((out / "ticket.json").read_text())
    assert info["structure"]["channels"] and info["channels_kept"] == 1368
    bench = bench_superticket(run.path, root, batch_sizes=(2,), threads=(1,), reps=1)
    [row] = bench["rows"]
    assert row["input"] == "32x32 px images" and row["max_abs_logit_diff"] < 1e-4
    assert bench["parameters"]["full"] - bench["parameters"]["structured"] == sizes[0] - sizes[1]


def test_removed_channels_stay_exactly_zero_while_sgd_trains_on(
        cifar_dir: Path, tiny_mobilenet_dir: Path, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SGD with momentum and weight decay would move a removed channel's γ and β (its
    momentum remembers the gradients from before the removal); the loop holds them at 0."""
    import ticketlab.supertickets.search as search
    from ticketlab.hparams import Runtime, build_hparams
    from ticketlab.supertickets.hparams import SuperHparams

    seen: list[list[tuple[float, float]]] = []
    real = search.train

    def spy(model, prunable, mask, *args, **kwargs):
        out = real(model, prunable, mask, *args, **kwargs)
        bank = model.supertickets_gates
        base = model.mobilenet_v2
        values = []
        for u in bank.units:
            gone = ~u.alive()
            for norm in ("expand_1x1", "conv_3x3"):
                bn = base.get_submodule(f"layer.{u.group.layer}.{norm}.normalization")
                values.append((float(bn.weight.detach()[gone].abs().sum()),
                               float(bn.bias.detach()[gone].abs().sum())))
        seen.append(values)
        return out

    monkeypatch.setattr(search, "train", spy)
    hp = build_hparams("cifar10", {"data_dir": str(cifar_dir), "model": str(tiny_mobilenet_dir),
                                   "max_steps": 6, "batch_size": 16, "lr": 0.05,
                                   "target_sparsity": 0.3, "rate": 0.2})
    sp = SuperHparams(channel_target=0.25, interval=2)
    from rich.console import Console

    search.find_superticket(hp, sp, tmp_path, Runtime(progress=False), Console(quiet=True))
    assert len(seen) == 3
    assert all(v == (0.0, 0.0) for values in seen for v in values)  # intervals 2 and 3
    assert hp.train.optimizer == "sgd" and hp.train.momentum > 0 and hp.train.weight_decay > 0


# --- bad inputs -------------------------------------------------------------------------------
def test_structural_targets_for_the_wrong_kind_of_model_are_one_clear_error(
        cifar_dir: Path, tiny_mobilenet_dir: Path, tiny_bert_dir: Path,  # noqa: F811
        csv_task_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    text = ["supertickets", "--task", "csv", "--data-dir", str(csv_task_dir), "--model",
            str(tiny_bert_dir), "--max-steps", "4", "--target-sparsity", "0.2", "--rate", "0.1",
            "--interval", "2", "--root", str(root), "--no-progress"]
    bad = _cli([*text, "--channel-target", "0.25"])
    assert bad.exit_code == 2, bad.output
    assert "--channel-target 0.25: this model has no channels to remove" in bad.output
    assert "use --head-target, --ffn-target" in bad.output
    args = st_args(cifar_dir, tiny_mobilenet_dir, root)
    bad = _cli([*args, "--head-target", "0.25"])
    assert bad.exit_code == 2 and "--head-target 0.25: this model has no heads" in bad.output
    assert "use --channel-target" in bad.output
    bad = _cli([*args, "--ffn-target", "0.1"])
    assert bad.exit_code == 2 and "this model has no neurons to remove" in bad.output
    bad = _cli([*args, "--gate-lr", "0.5"])
    assert bad.exit_code == 2 and "gates are its own BatchNorm scales" in bad.output
    i = args.index("--channel-target")
    bad = _cli([*args[:i + 1], "1.5", *args[i + 2:]])
    assert bad.exit_code == 2 and "--channel-target 1.5 is outside [0, 1)" in bad.output
    resnet = tmp_path / "resnet"
    tiny_resnet().save_pretrained(resnet)
    m = args.index("--model")
    bad = _cli([*args[:m + 1], str(resnet), *args[m + 2:]])
    assert bad.exit_code == 2 and "has no MobileNetV2 inverted residuals" in bad.output
    assert not root.exists() or not any(root.iterdir())  # nothing half-written


def test_a_text_run_keeps_its_id_with_the_new_channel_option(tiny_hparams) -> None:
    """``--channel-target`` came later: at its default it is left out of a run's identity, so
    text SuperTickets runs stored before keep their directory names."""
    from ticketlab.supertickets.hparams import SuperHparams
    from ticketlab.supertickets.search import run_identity

    ident = run_identity(tiny_hparams(target_sparsity=0.4), SuperHparams(head_target=0.25))
    assert "channel_target" not in ident["supertickets"]
    assert ident["supertickets"]["head_target"] == 0.25
    with_channels = run_identity(tiny_hparams(target_sparsity=0.4),
                                 SuperHparams(channel_target=0.25))
    assert with_channels["supertickets"]["channel_target"] == 0.25
