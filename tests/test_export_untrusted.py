"""A compressed ticket is untrusted input: crafted files are refused before any allocation.

Whoever edits a ticket can recompute its sha256, so the checksum proves nothing about intent;
what protects the reader is that every claimed shape and count is checked against the bytes
actually present and against sane limits before anything is decompressed or allocated, and
that a mask is inflated to its claimed size and no further (issue 10.3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from ticketlab.errors import TicketlabError
from ticketlab.export import (
    TICKET_FILE,
    _digest,
    decode_compressed,
    encode_compressed,
    export_model,
    load_ticket,
)
from ticketlab.masks import Mask

#: A 64 MiB run of zero bytes deflates to about 65 KB: the payload of the reported bomb.
BOMB = zlib.compress(bytes(64 * 2**20), 9)


def _tiny_ticket(folder: Path) -> Path:
    """A real compressed ticket of a tiny random BERT classifier (half its weights pruned)."""
    from transformers import BertConfig, BertForSequenceClassification

    from ticketlab.models import prunable_parameters
    from ticketlab.pruning import prune

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = BertForSequenceClassification(config).eval()
    params = prunable_parameters(model)
    mask = prune(params, Mask.ones_like(params), 0.5)
    mask.apply_(params)
    export_model(model, mask, folder, compressed=True)
    return folder


def _craft(source: Path, out: Path, edit: Any) -> Path:
    """Copy a ticket folder, let ``edit(tensors, meta)`` change the ticket as an attacker
    would, and re-sign it (the sha256 is public: anyone can recompute it)."""
    out.mkdir()
    for f in source.iterdir():
        if f.name != TICKET_FILE:
            (out / f.name).write_bytes(f.read_bytes())
    with safe_open(str(source / TICKET_FILE), framework="pt") as f:
        meta = json.loads(f.metadata()["ticketlab"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sha256")
    edit(tensors, meta)
    meta["sha256"] = _digest(meta, tensors)
    (out / TICKET_FILE).write_bytes(save(tensors, metadata={"ticketlab": json.dumps(meta)}))
    return out


def _first(meta: dict[str, Any]) -> str:
    return sorted(meta["compressed"])[0]


def _bomb(shape: list[int]) -> Any:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        key = _first(meta)
        tensors[key + "::mask"] = torch.frombuffer(bytearray(BOMB), dtype=torch.uint8)
        tensors[key + "::values"] = torch.zeros(0)
        meta["compressed"][key] = {"shape": shape, "dtype": "float32", "nnz": 0,
                                   "mask_encoding": "zlib"}
    return edit


def _deflated(payload: bytes) -> Any:
    """The first matrix keeps its true shape, but its mask is ``payload`` deflated."""
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        key = _first(meta)
        data = zlib.compress(payload, 9)
        tensors[key + "::mask"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        tensors[key + "::values"] = torch.zeros(0)
        meta["compressed"][key].update(nnz=0, mask_encoding="zlib")
    return edit


def _set(field: str, value: Any) -> Any:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        meta["compressed"][_first(meta)][field] = value
    return edit


def _values(n: int) -> Any:
    def edit(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tensors[_first(meta) + "::values"] = torch.zeros(n)
    return edit


def _short_bits(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    key = _first(meta)
    info = meta["compressed"][key]
    packed = torch.ones((int(torch.tensor(info["shape"]).prod()) + 7) // 8 - 1, dtype=torch.uint8)
    tensors[key + "::mask"] = packed
    info["mask_encoding"] = "bits"


def _tied_to_nothing(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    meta["tied"] = {meta["order"][0]: "no.such.tensor"}


CRAFTED = {
    "claims 1e12 elements (the report)": (_bomb([10**6, 10**6]), "over the limit"),
    "claims a shape its architecture does not have": (_bomb([64, 2**20]), "architecture has"),
    "inflates to far more than it claims": (_deflated(bytes(64 * 2**20)), "does not inflate"),
    "inflates to less than it claims": (_deflated(bytes(4)), "does not inflate"),
    "negative dimension": (_set("shape", [16, -16]), "malformed shape"),
    "a dtype that is not one": (_set("dtype", "manual_seed"), "malformed shape or dtype"),
    "more kept weights than values": (_set("nnz", 10**9), "kept weights of"),
    "fewer values than kept weights": (_values(3), "claims"),
    "a bitmask shorter than its matrix": (_short_bits, "cannot hold"),
    "an unknown mask encoding": (_set("mask_encoding", "lzma"), "unknown encoding"),
    "a tied tensor pointing nowhere": (_tied_to_nothing, "not stored"),
}


@pytest.fixture(scope="module")
def ticket(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_ticket(tmp_path_factory.mktemp("tiny") / "ticket")


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_ticket_is_one_clear_error(ticket, tmp_path, case):
    edit, message = CRAFTED[case]
    crafted = _craft(ticket, tmp_path / "crafted", edit)
    with pytest.raises(TicketlabError, match=message) as e:
        load_ticket(crafted)
    assert "Export the ticket again" in e.value.fix


def test_header_that_claims_more_bytes_than_the_file_is_refused(ticket, tmp_path):
    crafted = _craft(ticket, tmp_path / "crafted", lambda tensors, meta: None)
    data = bytearray((crafted / TICKET_FILE).read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    (crafted / TICKET_FILE).write_bytes(bytes(data))
    with pytest.raises(TicketlabError, match="header claims"):
        load_ticket(crafted)


def test_crafted_ticket_is_refused_before_allocating(ticket, tmp_path):
    """The reported bomb (65 KB claiming a 1e12-element tensor), one claiming a shape within
    the limits but not its architecture's, and a true-shaped mask whose stream would inflate
    to 64 MiB: each refused with peak memory growth (RSS high-water mark, ru_maxrss and
    tracemalloc) below 4 MiB, measured in a fresh process."""
    cases = ["claims 1e12 elements (the report)", "claims a shape its architecture does not have",
             "inflates to far more than it claims"]
    folders = [str(_craft(ticket, tmp_path / f"c{i}", CRAFTED[c][0])) for i, c in
               enumerate(cases)]
    sizes = [(Path(f) / TICKET_FILE).stat().st_size for f in folders]
    assert max(sizes) < 100_000  # the ~65 KB bomb plus an 18 KB tiny model
    script = textwrap.dedent(f"""
        import json, resource, tracemalloc
        from pathlib import Path
        from ticketlab.errors import TicketlabError
        from ticketlab.export import load_ticket

        def rss(field):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

        load_ticket({str(ticket)!r})  # warm up: imports and first-call caches
        out = []
        for folder in {folders!r}:
            Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
            before, maxrss = rss("VmRSS"), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            tracemalloc.start()
            try:
                load_ticket(folder)
                refused = ""
            except TicketlabError as e:
                refused = e.problem
            traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            out.append({{"refused": refused, "traced_peak": traced,
                         "hwm_growth": rss("VmHWM") - before,
                         "ru_maxrss_growth": (resource.getrusage(resource.RUSAGE_SELF)
                                              .ru_maxrss - maxrss) * 1024}})
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print("peak memory growth while refusing crafted tickets:", json.dumps(results, indent=1))
    for case, r in zip(cases, results, strict=True):
        assert r["refused"], case
        assert r["traced_peak"] < 4 * 2**20, (case, r)
        assert r["hwm_growth"] < 4 * 2**20, (case, r)
        assert r["ru_maxrss_growth"] < 4 * 2**20, (case, r)


def test_a_fully_pruned_large_matrix_still_decodes(tmp_path):
    """The deflate-ratio bound never refuses a real ticket: an all-zero 4096 x 4096 mask
    deflates about 1000:1, near deflate's 1032:1 limit, and must come back exactly."""
    state = {"w": torch.randn(4096, 4096), "b": torch.randn(3)}
    state["w"][0, 0] = 1.5
    keep = torch.zeros(4096, 4096, dtype=torch.bool)
    keep[0, 0] = True
    path = tmp_path / TICKET_FILE
    path.write_bytes(encode_compressed(state, {"w": keep}))
    decoded, meta = decode_compressed(path)
    assert meta["compressed"]["w"]["mask_encoding"] == "zlib"
    assert torch.equal(decoded["w"], state["w"] * keep) and torch.equal(decoded["b"], state["b"])
