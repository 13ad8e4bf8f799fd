"""Compact level weights (issue 15.11): a level stores its prunable matrices as survivors (the
compressed-ticket encoding) and every other tensor dense, restored bit for bit; stores written
before, with a dense model.safetensors, still load; find says how much a run stores."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.export import load_level
from ticketlab.imp import find_ticket
from ticketlab.levels import level_weights_bytes, load_level_weights
from ticketlab.masks import Mask
from ticketlab.store import sha256_file
from ticketlab.train import Runtime


def test_compact_weights_restore_every_tensor_bit_for_bit(tmp_path) -> None:
    """A tied MLM decoder included: the round trip is exact and tied tensors stay one."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64))
    state = model.state_dict()
    names = [k[len("bert."):] for k in state if k.startswith("bert.encoder.") and
             k.endswith(".weight") and state[k].dim() == 2]
    mask = Mask({n: torch.rand(state["bert." + n].shape) > 0.7 for n in names})
    for n, keep in mask.tensors.items():
        state["bert." + n].mul_(keep)  # a trained level's pruned weights are zero
    path = tmp_path / "model.safetensors"
    path.write_bytes(level_weights_bytes(SimpleNamespace(full_key=lambda n: "bert." + n),
                                         state, mask))
    back = load_level_weights(path)
    assert list(back) == list(state)
    for k, v in state.items():
        assert v.dtype == back[k].dtype and torch.equal(v, back[k]), k
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ticketlab"])
    assert meta["kind"] == "level-weights" and set(meta["compressed"]) == {
        "bert." + n for n in names}
    assert meta["tied"]["cls.predictions.decoder.weight"] == \
        "bert.embeddings.word_embeddings.weight"  # stored once


@pytest.fixture(scope="module")
def run_with_weights(tmp_path_factory, tiny_bert_dir, glue_dir):
    from ticketlab.hparams import (
        DataHparams,
        ModelHparams,
        PruneHparams,
        RunHparams,
        TrainHparams,
    )

    hp = RunHparams(model=ModelHparams(model=str(tiny_bert_dir)),
                    data=DataHparams(task="sst2", data_dir=str(glue_dir), max_train_samples=64,
                                     max_eval_samples=32, max_length=32),
                    train=TrainHparams(lr=1e-3, batch_size=16, epochs=1, seed=0),
                    prune=PruneHparams(target_sparsity=0.5, rate=0.5))
    return find_ticket(hp, tmp_path_factory.mktemp("store") / "runs", Runtime(progress=False),
                       Console(quiet=True))


def test_a_sparser_level_stores_fewer_bytes(run_with_weights) -> None:
    run = run_with_weights
    dense, sparse = (run.level_dir(k) / "model.safetensors" for k in (0, 1))
    mask = Mask.load(run.level_dir(1) / "mask.safetensors")
    pruned = mask.num_total - mask.num_kept
    saved = dense.stat().st_size - sparse.stat().st_size
    # every pruned float32 weight is 4 bytes not stored; the bitmask costs at most 1/32 of it
    assert 4 * pruned * (1 - 1 / 32) - 2048 <= saved <= 4 * pruned + 2048
    state = load_level_weights(sparse)
    for name, keep in mask.tensors.items():
        assert (state["bert." + name][~keep] == 0).all()


def test_an_old_store_with_dense_weights_still_loads(run_with_weights, tmp_path) -> None:
    """A level written before compact weights: plain safetensors, its checksum recorded."""
    import shutil

    run_dir = tmp_path / run_with_weights.path.name
    shutil.copytree(run_with_weights.path, run_dir)
    level = run_dir / "level_1"
    state = load_level_weights(level / "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(level / "model.safetensors"))
    record = json.loads((level / "metrics.json").read_text())
    record["checksums"]["model.safetensors"] = sha256_file(level / "model.safetensors")
    (level / "metrics.json").write_text(json.dumps(record))
    old = load_level_weights(level / "model.safetensors")
    assert all(torch.equal(old[k], state[k]) for k in state)
    ticket = load_level(run_dir, 1, tmp_path)
    assert ticket.mask.sparsity == pytest.approx(0.5, abs=1e-3)
    (level / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(TicketlabError, match="missing or corrupt"):
        load_level_weights(level / "model.safetensors")


def _bytes(number: str, unit: str) -> float:
    return float(number) * (1e6 if unit == "MB" else 1e3)


def test_find_says_how_much_the_run_stores(tiny_bert_dir, glue_dir, tmp_path) -> None:
    common = ["find", "--task", "sst2", "--data-dir", str(glue_dir), "--model",
              str(tiny_bert_dir), "--max-train-samples", "32", "--max-eval-samples", "16",
              "--batch-size", "16", "--epochs", "1", "--max-length", "32", "--no-progress",
              "--target-sparsity", "0.1"]
    size = r"([\d.]+) (MB|kB)"
    out = CliRunner().invoke(app, [*common, "--root", str(tmp_path / "a")]).output
    found = re.search(rf"stored: {size} in .*?, of which {size} are the levels' trained "
                      rf"weights .*?--no-save-weights would keep only the masks and heads "
                      rf"\({size}\)", re.sub(r"\s+", " ", out))
    assert found, out
    total, weights, rest = (_bytes(*found.groups()[i:i + 2]) for i in (0, 2, 4))
    assert weights > 0.9 * total and total == pytest.approx(weights + rest, rel=0.02)
    out = CliRunner().invoke(app, [*common, "--root", str(tmp_path / "b"),
                                   "--no-save-weights"]).output
    light = re.search(rf"stored: {size} in .*?\(masks and heads; no trained weights",
                      re.sub(r"\s+", " ", out))
    assert light and _bytes(*light.groups()) == pytest.approx(rest, rel=0.05)
