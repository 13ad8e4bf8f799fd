"""Mask files: packed round trip, and a clear refusal of damaged or foreign masks."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask
from ticketlab.pruning import prune


def sample_mask() -> Mask:
    g = torch.Generator().manual_seed(0)
    params = {"encoder.layer.0.q.weight": torch.randn(12, 7, generator=g),
              "encoder.layer.0.o.weight": torch.randn(5, 3, generator=g),
              "pooler.dense.weight": torch.randn(4, 4, generator=g)}
    return prune(params, Mask.ones_like(params), 0.37)


def test_round_trip_is_exact_and_packed(tmp_path: Path) -> None:
    mask = sample_mask()
    path = tmp_path / "mask.safetensors"
    mask.save(path, {"task": "sst2", "level": 3, "fingerprint": "abc"})
    loaded = Mask.load(path)
    assert loaded == mask
    assert loaded.meta["task"] == "sst2" and loaded.meta["level"] == 3
    assert loaded.sparsity == pytest.approx(mask.sparsity)
    # 84+15+16 bits pack into 11+2+2 bytes (+ header): far below one byte per weight
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size - 8 - header_len == 11 + 2 + 2


def test_resaving_a_loaded_mask_keeps_a_valid_checksum(tmp_path: Path) -> None:
    mask = sample_mask()
    mask.save(tmp_path / "a.safetensors")
    loaded = Mask.load(tmp_path / "a.safetensors")
    loaded.save(tmp_path / "b.safetensors", {"level": 1})
    assert Mask.load(tmp_path / "b.safetensors") == mask


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    sample_mask().save(path)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(TicketlabError, match="corrupt"):
        Mask.load(path)


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["ticketlab"])
    edit(meta, header)
    header["__metadata__"]["ticketlab"] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])


def test_hand_edited_payload_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    sample_mask().save(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # flip bits of the last packed byte
    path.write_bytes(bytes(raw))
    with pytest.raises(TicketlabError, match="checksum"):
        Mask.load(path)


def test_hand_edited_metadata_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    sample_mask().save(path)

    def claim_other_sparsity(meta: dict, header: dict) -> None:
        meta["sparsity"] = 0.9

    _rewrite_header(path, claim_other_sparsity)
    with pytest.raises(TicketlabError, match="corrupt"):
        Mask.load(path)


def test_not_a_mask_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mask.safetensors"
    path.write_text("hello")
    with pytest.raises(TicketlabError, match="corrupt"):
        Mask.load(path)
    with pytest.raises(TicketlabError, match="does not exist"):
        Mask.load(tmp_path / "missing.safetensors")


def test_mask_for_another_architecture_is_refused() -> None:
    mask = sample_mask()
    other = {"encoder.layer.0.q.weight": torch.zeros(12, 8),
             "encoder.layer.0.o.weight": torch.zeros(5, 3)}
    with pytest.raises(TicketlabError, match="shape"):
        mask.check_compatible(other)
    with pytest.raises(TicketlabError, match="prunable set"):
        mask.check_compatible({"encoder.layer.9.x.weight": torch.zeros(2, 2)})


def test_mask_for_other_weights_needs_explicit_permission() -> None:
    mask = sample_mask()
    mask.meta["fingerprint"] = "a" * 64
    params = {k: torch.zeros(t.shape) for k, t in mask.tensors.items()}
    with pytest.raises(TicketlabError, match="other pre-trained weights"):
        mask.check_compatible(params, fingerprint="b" * 64)
    mask.check_compatible(params, fingerprint="b" * 64, allow_different_weights=True)
    mask.check_compatible(params, fingerprint="a" * 64)


def test_pooler_may_be_missing_on_either_side() -> None:
    """A mask from a classification model (with pooler) fits an MLM body (no pooler)."""
    mask = sample_mask()
    body = {k: torch.ones(t.shape) for k, t in mask.tensors.items() if not k.startswith("pooler")}
    mask.check_compatible(body)
    restricted = mask.for_params(body)
    assert set(restricted.tensors) == set(body)
    with_pooler = {**body, "pooler.dense.weight": torch.ones(4, 4)}
    no_pooler_mask = Mask({k: mask.tensors[k] for k in body})
    no_pooler_mask.check_compatible(with_pooler)
    assert no_pooler_mask.for_params(with_pooler).tensors["pooler.dense.weight"].all()


def test_apply_zeroes_exactly_the_pruned_weights() -> None:
    mask = sample_mask()
    params = {k: torch.randn(t.shape) + 10 for k, t in mask.tensors.items()}
    mask.apply_(params)
    for k, t in mask.tensors.items():
        assert (params[k][~t] == 0).all() and (params[k][t] != 0).all()


@pytest.mark.parametrize("edit", [
    lambda meta: meta["shapes"].update({next(iter(meta["shapes"])): ["4", "x"]}),
    lambda meta: meta["shapes"].update({next(iter(meta["shapes"])): [10**13, 10**13]}),
    lambda meta: meta.update({"sparsity": float("nan")}),
    lambda meta: meta.update({"sparsity": "half"}),
    lambda meta: meta.update({"shapes": "everything"}),
])
def test_mask_metadata_with_wrong_types_is_one_clear_error(tmp_path: Path, edit) -> None:
    """Issue 10, item 7: a non-numeric shape, a huge claimed shape, a NaN sparsity — refused
    as a corrupt file, before anything is allocated from the claimed sizes."""
    path = tmp_path / "mask.safetensors"
    sample_mask().save(path)
    _rewrite_header(path, lambda meta, header: edit(meta))
    with pytest.raises(TicketlabError, match="corrupt"):
        Mask.load(path)
