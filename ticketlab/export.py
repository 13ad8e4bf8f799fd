"""Shipping a ticket: a standard Hugging Face folder, or a compressed ticket that is really small.

Two forms, both written atomically (a temporary folder beside the target, renamed into place)
so that an interrupted export never leaves half a folder:

- **HF folder** (default): ``save_pretrained`` output (``config.json``, ``model.safetensors``)
  plus the tokenizer. The pruned weights are exactly ``+0.0``; plain
  ``AutoModelForSequenceClassification.from_pretrained(DIR)`` loads it without ticketlab.
- **Compressed ticket** (``compressed=True``): ``config.json``, the tokenizer, and one
  ``ticket.safetensors`` holding, per prunable matrix, the packed keep-bitmask and the surviving
  values in row-major order (float32, or float16 with ``fp16=True``), and every other tensor
  dense. The bitmask is zlib-deflated when that is smaller: at 90 % sparsity the mask's entropy
  is 0.47 bit per weight, so deflate takes it from 1 bit to about 0.49, which is what brings the
  prunable matrices from 1/32 + 0.10 = 0.131x to about 0.115x their dense float32 size. The JSON
  metadata in the safetensors header lists every tensor's shape, nonzero count and encoding, and
  a sha256 over the metadata and every tensor byte, so a truncated or edited file is refused.
  :func:`load_ticket` restores a normal ``transformers`` model, bit for bit (float32 values).

``ticket.json`` in both forms records where the ticket came from (run, level, task, sparsity,
score); it is for people and is not needed to load anything.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ticketlab import faults
from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask

TICKET_FORMAT = "ticketlab.ticket"
TICKET_VERSION = 1
TICKET_FILE = "ticket.safetensors"
INFO_FILE = "ticket.json"
_MASK_SUFFIX = "::mask"
_VALUES_SUFFIX = "::values"


# --- a run's level as a model -----------------------------------------------------------------
@dataclass
class LevelTicket:
    """A finished level of a run, rebuilt: the trained model with its mask applied."""

    model: nn.Module
    mask: Mask
    tokenizer: Any
    info: dict[str, Any]
    run_path: Path


def _run_hparams(record: dict[str, Any]) -> dict[str, Any]:
    hp = record.get("hparams", {})
    return hp.get("finetune", hp) if record.get("kind") == "finetune" else hp


def _num_labels(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many outputs the stored classifier has: rows of the head's last matrix."""
    head = [k for k, v in state.items()
            if not k.startswith(prefix + ".") and k.endswith("weight") and v.dim() == 2]
    return int(state[head[-1]].shape[0]) if head else 2


def load_level(run_ref: str | Path, level: int, root: Path | None = None) -> LevelTicket:
    """Rebuild level ``level`` of a run: θ0's architecture + the task head, the level's trained
    weights, checked against the level's mask (pruned weights must be zero) and the tokenizer."""
    from safetensors.torch import load_file

    from ticketlab.models import load_model, load_tokenizer
    from ticketlab.store import default_root, find_run
    from ticketlab.tasks import get_task

    run = find_run(str(run_ref), root or default_root())
    record = run.read_hparams()
    finished = run.levels()
    if level not in finished:
        raise TicketlabError(
            f"Level {level} of run {run.path.name} is not finished (or its files are damaged).",
            f"Pick a finished level: {finished}." if finished else "Let the run finish a level.",
        )
    d = run.level_dir(level)
    weights = d / "model.safetensors"
    if not weights.is_file():
        raise TicketlabError(
            f"Run {run.path.name} was stored without trained weights (--no-save-weights), so "
            f"level {level} has only its mask, no model to export.",
            "Re-run the search without --no-save-weights, or fine-tune this mask once with "
            f"`ticketlab finetune --task … --mask {d / 'mask.safetensors'}` (it stores weights).",
        )
    hp = _run_hparams(record)
    model_ref = hp["model"]["model"]
    trust = bool(hp["model"].get("trust_remote_code", False))
    task = get_task(hp["data"]["task"])
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises several error types for damaged files
        raise TicketlabError(f"Trained weights {weights} are corrupt.",
                             "Re-run the level that wrote them.") from e
    tokenizer = load_tokenizer(model_ref, trust)
    probe = load_model(model_ref, task.head, 2, trust_remote_code=trust)
    prefix = probe.base_model_prefix
    num_labels = _num_labels(state, prefix) if task.head == "sequence-classification" else 2
    model = probe if num_labels == 2 else load_model(model_ref, task.head, num_labels,
                                                     trust_remote_code=trust)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TicketlabError(
            f"The trained weights of level {level} do not fit {model_ref!r} with a "
            f"{task.head} head ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}).",
            "Export with the model files the run was started with.",
        )
    model.eval()
    mask = Mask.load(d / "mask.safetensors")
    _check_pruned_zero(model, mask, prefix)
    metrics = run.metrics(level)
    info = {
        "run": run.path.name, "level": level, "task": hp["data"]["task"], "model": model_ref,
        "head": task.head, "num_labels": num_labels, "trust_remote_code": trust,
        "sparsity": mask.sparsity,
        "main_metric": metrics.get("main_metric"), "score": metrics.get("score"),
    }
    return LevelTicket(model=model, mask=mask, tokenizer=tokenizer, info=info,
                       run_path=run.path)


def _check_pruned_zero(model: nn.Module, mask: Mask, prefix: str) -> None:
    state = model.state_dict()
    for name, keep in mask.tensors.items():
        key = f"{prefix}.{name}"
        if key not in state:
            continue
        w = state[key]
        if tuple(w.shape) != tuple(keep.shape):
            raise TicketlabError(f"The mask's {name} has shape {tuple(keep.shape)}, the trained "
                                 f"weights have {tuple(w.shape)}.",
                                 "The level's files do not belong together; re-run it.")
        if bool((w[~keep] != 0).any()):
            raise TicketlabError(
                f"The trained weights of {name} are nonzero where the level's mask prunes them.",
                "The level's files do not belong together; re-run the level.",
            )


def _canonical_state(model: nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    """The model's state with every pruned weight set to +0.0 (the product w * 0 can be -0.0)."""
    prefix = model.base_model_prefix
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for name, keep in mask.tensors.items():
        key = f"{prefix}.{name}"
        if key in state:
            state[key] = state[key].masked_fill(~keep, 0.0)
    return state


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """No transformers progress bars or info logs while saving/loading (CLI output stays clean)."""
    from transformers import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


# --- writing folders atomically ---------------------------------------------------------------
@contextmanager
def staged_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    ``out`` must be missing or empty unless ``force``; on any error the temporary folder is
    removed and ``out`` is left as it was.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise TicketlabError(f"{out} exists and is a file.", "Pass a folder path to --to.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise TicketlabError(f"Output folder {out} is not empty.",
                                 "Pass an empty or new folder, or --force to replace it.")
        if (out / "hparams.json").is_file() or any(out.glob("*/hparams.json")):
            raise TicketlabError(f"{out} holds ticketlab runs; --force will not replace it.",
                                 "Export to another folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        faults.checkpoint("write")  # crash tests: the folder is complete but not yet in place
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "replaced")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        faults.checkpoint("renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- compressed tickets -----------------------------------------------------------------------
def _digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(b"\0" + k.encode() + b"\0" + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode_compressed(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                      fp16: bool = False, extra: dict[str, Any] | None = None) -> bytes:
    """The bytes of a compressed ticket: ``masks`` maps state keys to bool keep-masks."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    compressed: dict[str, Any] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    values_dtype = torch.float16 if fp16 else torch.float32
    for key, t in state.items():
        sig = (t.untyped_storage().data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and sig in seen:  # tied weights (e.g. an MLM decoder): stored once
            tied[key] = seen[sig]
            continue
        seen[sig] = key
        if key in masks:
            keep = masks[key].to(torch.bool).reshape(-1)
            bits = np.packbits(keep.numpy()).tobytes()
            deflated = zlib.compress(bits, 6)
            encoding = "zlib" if len(deflated) < len(bits) else "bits"
            payload = deflated if encoding == "zlib" else bits
            tensors[key + _MASK_SUFFIX] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            tensors[key + _VALUES_SUFFIX] = t.reshape(-1)[keep].to(values_dtype).contiguous()
            compressed[key] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                               "nnz": int(keep.sum()), "mask_encoding": encoding}
        else:
            tensors[key] = t.contiguous()
    meta = {"format": TICKET_FORMAT, "version": TICKET_VERSION, "compressed": compressed,
            "tied": tied, "values_dtype": str(values_dtype).removeprefix("torch."),
            "order": list(state), **(extra or {})}
    meta["sha256"] = _digest(meta, tensors)
    return save(tensors, metadata={"ticketlab": json.dumps(meta, sort_keys=True)})


def decode_compressed(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full state dict stored in a compressed ticket, and its metadata (checks everything)."""
    from safetensors import safe_open

    path = Path(path)
    bad = TicketlabError(
        f"Compressed ticket {path} is damaged (truncated, or not a ticketlab ticket).",
        "Export the ticket again (`ticketlab export RUN --level K --to DIR --compressed`).",
    )
    if not path.is_file():
        raise TicketlabError(f"{path} does not exist.",
                             "Pass a folder written by `ticketlab export … --compressed`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ticketlab")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for damaged files
        raise bad from e
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as e:
        raise bad from e
    if not isinstance(meta, dict) or meta.get("format") != TICKET_FORMAT:
        raise bad
    if meta.get("version") != TICKET_VERSION:
        raise TicketlabError(
            f"Compressed ticket {path} has format version {meta.get('version')}; this ticketlab "
            f"reads version {TICKET_VERSION}.", "Use the ticketlab version that wrote it.")
    want = meta.pop("sha256", None)
    if want != _digest(meta, tensors):
        raise TicketlabError(
            f"Compressed ticket {path} does not match its checksum: it was modified or damaged.",
            "Export the ticket again from its run.",
        )
    state: dict[str, torch.Tensor] = {}
    try:
        for key, info in meta["compressed"].items():
            shape, numel = info["shape"], int(np.prod(info["shape"]))
            payload = tensors[key + _MASK_SUFFIX].numpy().tobytes()
            if info["mask_encoding"] == "zlib":
                payload = zlib.decompress(payload)
            keep = torch.from_numpy(
                np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[:numel].astype(bool))
            values = tensors[key + _VALUES_SUFFIX]
            nnz = int(info["nnz"])
            if keep.numel() != numel or int(keep.sum()) != nnz or values.numel() != nnz:
                raise bad
            dense = torch.zeros(numel, dtype=getattr(torch, info["dtype"]))
            dense[keep] = values.to(dense.dtype)
            state[key] = dense.reshape(shape)
        for key in meta["order"]:
            if key in state or key in meta["tied"]:
                continue
            state[key] = tensors[key]
        for key, source in meta["tied"].items():
            state[key] = state[source]
        state = {k: state[k] for k in meta["order"]}
    except (KeyError, ValueError, TypeError, zlib.error) as e:
        raise bad from e
    return state, meta


def ticket_sizes(path: Path) -> dict[str, float]:
    """Byte counts read from a compressed ticket's safetensors header (not from memory).

    ``prunable_ratio`` = bytes of the masks and values of the pruned matrices / their dense
    float32 size; ``file_ratio`` = the whole file / all tensors as dense float32.
    """
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = json.loads(header.pop("__metadata__")["ticketlab"])
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    prunable = sum(nbytes[k + s] for k in meta["compressed"] for s in (_MASK_SUFFIX,
                                                                        _VALUES_SUFFIX))
    prunable_dense = sum(4 * int(np.prod(v["shape"])) for v in meta["compressed"].values())
    other_dense = sum(b for k, b in nbytes.items()
                      if not k.endswith((_MASK_SUFFIX, _VALUES_SUFFIX)))
    file_bytes = path.stat().st_size
    return {
        "prunable_bytes": prunable, "prunable_dense_bytes": prunable_dense,
        "prunable_ratio": prunable / prunable_dense if prunable_dense else 1.0,
        "file_bytes": file_bytes, "dense_bytes": prunable_dense + other_dense,
        "file_ratio": file_bytes / (prunable_dense + other_dense),
    }


# --- public API -------------------------------------------------------------------------------
def _check_flags(compressed: bool, fp16: bool) -> None:
    if fp16 and not compressed:
        raise TicketlabError("--fp16 applies to compressed tickets only.",
                             "Add --compressed, or drop --fp16.")


def export_model(
    model: nn.Module,
    mask: Mask,
    out: Path,
    tokenizer: Any = None,
    *,
    compressed: bool = False,
    fp16: bool = False,
    force: bool = False,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a transformers model, pruned by ``mask``) as a shippable folder."""
    _check_flags(compressed, fp16)
    state = _canonical_state(model, mask)
    prefix = model.base_model_prefix
    info = {**(info or {}), "format": "compressed" if compressed else "huggingface",
            "sparsity": mask.sparsity}
    with staged_dir(Path(out), force) as tmp:
        if compressed:
            config = copy.deepcopy(model.config)
            config.architectures = [type(model).__name__]  # save_pretrained would set it too
            config.save_pretrained(tmp)
            masks = {f"{prefix}.{k}": v for k, v in mask.tensors.items()
                     if f"{prefix}.{k}" in state}
            extra = {"architecture": type(model).__name__, "info": info}
            with open(tmp / TICKET_FILE, "wb") as f:
                f.write(encode_compressed(state, masks, fp16, extra))
            info["values_dtype"] = "float16" if fp16 else "float32"
        else:
            with _quiet_hf():
                model.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from ticketlab import __version__

        (tmp / INFO_FILE).write_text(json.dumps({**info, "ticketlab_version": __version__},
                                                indent=2, sort_keys=True) + "\n")
    return Path(out)


def export_level(
    run_ref: str | Path,
    level: int,
    out: Path,
    root: Path | None = None,
    *,
    compressed: bool = False,
    fp16: bool = False,
    force: bool = False,
) -> LevelTicket:
    """Export level ``level`` of a run (see :func:`export_model`); returns the rebuilt level."""
    _check_flags(compressed, fp16)
    ticket = load_level(run_ref, level, root)
    export_model(ticket.model, ticket.mask, out, ticket.tokenizer, compressed=compressed,
                 fp16=fp16, force=force, info=ticket.info)
    return ticket


def load_ticket(path: str | Path) -> nn.Module:
    """Load an exported ticket folder as a plain ``transformers`` model (eval mode).

    A compressed ticket is decoded and checked (checksum, shapes, counts); float32 values come
    back bit for bit. A plain HF export is loaded with ``from_pretrained``. The tokenizer is in
    the same folder: ``AutoTokenizer.from_pretrained(path)``.
    """
    import transformers

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise TicketlabError(f"{path} is not an exported ticket (no config.json).",
                             "Pass a folder written by `ticketlab export`.")
    config = transformers.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise TicketlabError(f"{path}/config.json names no known architecture ({arch!r}).",
                             "Export the ticket again with this transformers version.")
    if not (path / TICKET_FILE).is_file():
        if not (path / "model.safetensors").is_file():
            raise TicketlabError(f"{path} holds neither {TICKET_FILE} nor model.safetensors.",
                                 "Pass a folder written by `ticketlab export`.")
        with _quiet_hf():
            return cls.from_pretrained(path).eval()
    state, _ = decode_compressed(path / TICKET_FILE)
    model = cls(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TicketlabError(f"{path}/{TICKET_FILE} does not fit its config.json: "
                             f"{str(e).splitlines()[0]}", "Export the ticket again.") from e
    return model.eval()
