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
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
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
from ticketlab.store import current_umask, fsync_dir, sha256_file

TICKET_FORMAT = "ticketlab.ticket"
TICKET_VERSION = 1
TICKET_FILE = "ticket.safetensors"
INFO_FILE = "ticket.json"
#: Heads whose stored classifier says how many labels the task had.
CLASSIFIER_HEADS = ("sequence-classification", "image-classification")
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
    #: Class names in label-id order, from the run's task (None: unknown or not a classifier).
    labels: list[str] | None = None
    #: Set by :func:`export_level`: what the export did at its target.
    export: ExportResult | None = None


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
    from ticketlab.levels import load_level_weights
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
    state = load_level_weights(weights)
    tokenizer = load_tokenizer(model_ref, trust)
    if hasattr(tokenizer, "native_size"):  # an image spec: the export resizes to the run's size
        tokenizer = dataclasses.replace(tokenizer, size=hp["data"].get("image_size"))
    probe = load_model(model_ref, task.head, 2, trust_remote_code=trust)
    prefix = probe.base_model_prefix
    num_labels = _num_labels(state, prefix) if task.head in CLASSIFIER_HEADS else 2
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
    labels, labels_note = task_labels(hp, task.head, num_labels)
    info = {
        "run": run.path.name, "level": level, "task": hp["data"]["task"], "model": model_ref,
        "head": task.head, "num_labels": num_labels, "trust_remote_code": trust,
        "sparsity": mask.sparsity,
        "main_metric": metrics.get("main_metric"), "score": metrics.get("score"),
        "full_score": _full_score(run, record, finished),
        "labels": labels, "labels_note": labels_note,
        "found_by": _found_by(record, hp, finished),
    }
    return LevelTicket(model=model, mask=mask, tokenizer=tokenizer, info=info,
                       run_path=run.path, labels=labels)


def task_labels(hp: dict[str, Any], head: str, num_labels: int
                ) -> tuple[list[str] | None, str | None]:
    """The class names of a run's task in label-id order, and a note when there are none.

    They come from the task itself (:func:`ticketlab.tasks.get_task` with the run's data
    source): fixed names for GLUE, the train file's own sorted labels for CSV/JSON. When the
    task cannot be loaded now (the data moved), the export still works, with the default
    ``LABEL_i`` names, and the note says why.
    """
    from ticketlab.hparams import RunHparams
    from ticketlab.prepare import data_source
    from ticketlab.tasks import get_task

    if head not in CLASSIFIER_HEADS:
        return None, None
    try:
        task = get_task(hp["data"]["task"], data_source(RunHparams.from_dict(hp)))
        if getattr(task, "regression", False):
            return None, "regression: one output, the predicted score"
        names = [str(n) for n in task.label_names]
    except TicketlabError as e:
        return None, f"the task's labels could not be read at export time ({e.problem})"
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        return None, f"the task's labels could not be read at export time ({e})"
    if len(names) != num_labels:
        return None, (f"the task has {len(names)} labels but the stored classifier "
                      f"{num_labels} outputs")
    return names, None


def _full_score(run: Any, record: dict[str, Any], finished: list[int]) -> float | None:
    """The dense model's score on the same run: level 0 of an IMP run (sparsity 0)."""
    if record.get("kind") != "imp" or 0 not in finished:
        return None
    level0 = run.metrics(0)
    return level0.get("score") if level0.get("sparsity", 0.0) == 0.0 else None


def _found_by(record: dict[str, Any], hp: dict[str, Any], finished: list[int]
              ) -> dict[str, Any]:
    """How the ticket was found, for the model card: the run's pruning and training setup."""
    out: dict[str, Any] = {"kind": record.get("kind"), "levels": finished,
                           "prune": hp.get("prune", {}), "max_train_samples":
                           hp.get("data", {}).get("max_train_samples")}
    out["train"] = {k: hp.get("train", {}).get(k)
                    for k in ("lr", "batch_size", "epochs", "max_steps", "seed")}
    if record.get("kind") == "finetune":
        out["mask_meta"] = record.get("mask_meta")  # its run, level, task (not a local path)
    return out


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


# --- writing folders atomically, and only over what ticketlab wrote -------------------------
#: Inside every staging folder: says "ticketlab made this", so that orphan clean-up never
#: touches a folder that merely looks like one of ours.
STAGING_MARKER = ".ticketlab-staging"
_STAGING_TAG = "ticketlab export staging"
#: ``.<target>.<8 random chars>.tmp``: the names :func:`tempfile.mkdtemp` gives our staging.
_STAGING_NAME = re.compile(r"^\.(?P<target>.+)\.[A-Za-z0-9_]{8}\.tmp$")


def _is_run(path: Path) -> bool:
    return (path / "hparams.json").is_file()


def _holds_runs(path: Path) -> bool:
    try:
        return path.is_dir() and any(_is_run(p) for p in path.iterdir() if p.is_dir())
    except OSError:
        return False


def check_target(out: Path, stores: tuple[Path, ...] = ()) -> None:
    """Refuse an export target that is, or is inside, a run or a run store.

    An export there would replace a stored level (``--to RUN/level_2``) or leave a folder that
    ``ticketlab runs`` mistakes for store content. ``stores`` are run-store roots known to the
    caller; the default root is always one. A folder whose children are runs is a store too.
    """
    from ticketlab.store import default_root

    real = out.resolve()
    for folder in (real, *real.parents):
        if _is_run(folder):
            raise TicketlabError(
                f"--to {out} is {'a' if folder == real else 'inside a'} stored run "
                f"({folder}); exporting there would replace or hide the run's levels.",
                "Export to a folder outside the run store, e.g. ./my-ticket.")
    for store in (default_root(), *stores):
        store = Path(store).expanduser().resolve()
        if real == store or store in real.parents:
            raise TicketlabError(
                f"--to {out} is inside the run store {store}; an export there would mix with "
                "the stored runs.", "Export to a folder outside the run store, e.g. ./my-ticket.")
    for folder in (real, real.parent):
        if _holds_runs(folder):
            raise TicketlabError(
                f"--to {out} is {'' if folder == real else 'inside '}a run store ({folder} holds "
                "runs); an export there would mix with the stored runs.",
                "Export to a folder outside the run store, e.g. ./my-ticket.")


def export_manifest(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """``(ticket.json, "")`` when ``folder`` is exactly an export ticketlab wrote, else
    ``(None, why not)``.

    An export is recognised by the ``ticket.json`` it writes, which lists every other file with
    its sha256. The folder must hold those files and nothing else (no sub-folders, no links),
    unchanged: anything else might be someone's work, and ``--force`` must never delete it.
    """
    info_path = folder / INFO_FILE
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        return None, f"it cannot be read ({e.strerror})"
    if not info_path.is_file() or info_path.is_symlink():
        names = ", ".join(e.name for e in entries[:3]) + (" …" if len(entries) > 3 else "")
        return None, f"it holds {names} but no {INFO_FILE}"
    try:
        record = json.loads(info_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, f"its {INFO_FILE} is not one ticketlab wrote"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or "ticketlab_version" not in record:
        return None, (f"its {INFO_FILE} lists no files (an older ticketlab wrote it, or "
                      "another program)")
    for entry in entries:
        if entry.name == INFO_FILE:
            continue
        if entry.name not in files:
            return None, f"it holds {entry.name}, which ticketlab did not write there"
        if not entry.is_file(follow_symlinks=False):
            return None, f"{entry.name} is not a plain file"
    for name, digest in files.items():
        f = folder / str(name)
        if not f.is_file() or f.is_symlink():
            return None, f"{name} (listed in {INFO_FILE}) is missing"
        if sha256_file(f) != digest:
            return None, f"{name} was changed after ticketlab wrote it"
    return record, ""


def _remove_export(folder: Path) -> bool:
    """Delete an export ticketlab wrote: only the files its manifest names, then the folder.
    True when it is gone (a file someone added meanwhile keeps the folder, and is kept)."""
    record, _ = export_manifest(folder)
    if record is None:
        return False
    for name in [*record["files"], INFO_FILE]:
        (folder / name).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _lock(folder: Path, blocking: bool) -> int | None:
    """An flock on the folder itself: held while its owner lives, released by the OS if the
    owner is killed. Returns the descriptor, or None when another process holds the lock."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def clean_orphans(parent: Path) -> list[str]:
    """Remove staging folders that killed exports left in ``parent``; returns their names.

    Only folders named like ours (``.NAME.XXXXXXXX.tmp``) that hold our marker and whose lock
    is free (their exporter is dead) are touched; anything else is left alone. A staging folder
    killed between its two renames still holds the previous export (``old``): when the target
    is missing, that export is put back, so a kill never loses it.
    """
    removed: list[str] = []
    try:
        candidates = [p for p in parent.iterdir() if _STAGING_NAME.match(p.name)]
    except OSError:
        return removed
    for stage in candidates:
        try:
            if stage.is_symlink() or not stage.is_dir():
                continue
            marker = json.loads((stage / STAGING_MARKER).read_text())
            if not isinstance(marker, dict) or marker.get("ticketlab") != _STAGING_TAG:
                continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        fd = _lock(stage, blocking=False)
        if fd is None:
            continue  # a live export owns it
        try:
            target = parent / _STAGING_NAME.match(stage.name)["target"]  # type: ignore[index]
            old = stage / "old"
            if old.is_dir() and not old.is_symlink():
                if not target.exists() and not target.is_symlink():
                    os.replace(old, target)  # killed between the two renames: undo the first
                else:
                    _remove_export(old)
            if (stage / "new").is_dir() and not (stage / "new").is_symlink():
                shutil.rmtree(stage / "new")  # a staged export, written by ticketlab alone
            (stage / STAGING_MARKER).unlink(missing_ok=True)
            stage.rmdir()  # fails, keeping it, if anything we did not write is left
            removed.append(stage.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _os_error(e: OSError, where: Path) -> TicketlabError | None:
    """The user-fixable OSErrors of writing an export, as one clear error (None: a bug)."""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return TicketlabError(
            f"Cannot export to {where}: {e.strerror} ({e.filename or where.parent}).",
            "Pass a --to folder you can write to (a read-only place cannot hold an export).")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return TicketlabError(
            f"No space left on the device while exporting to {where}; nothing was changed "
            "there.", "Free disk space, or export to another disk.")
    return None


@dataclass
class Stage:
    """A staging folder: write the export into :attr:`path`. After the ``with`` block,
    :attr:`unchanged` says the target already held this exact export (nothing was written)
    and :attr:`replaced` that an earlier export of ticketlab's was replaced."""

    path: Path
    target: Path
    unchanged: bool = False
    replaced: bool = False


@contextmanager
def staged_dir(out: Path, force: bool, stores: tuple[Path, ...] = (),
               expect_info: dict[str, Any] | None = None) -> Iterator[Stage]:
    """Stage an export beside ``out``; on success it takes ``out``'s place in one rename.

    ``out`` may be missing, empty, or an export ticketlab wrote (:func:`export_manifest`):
    holding the same export it is left as it is (a rerun after a kill is done, not an error);
    holding another one it is replaced only with ``force``. Anything else is refused, with
    or without ``force``, as is any part of a run store (:func:`check_target`). With
    ``expect_info`` (the ``ticket.json`` fields about to be written, without ``files``) a
    different export is refused before any work. On error the staging folder is removed and
    ``out`` is as it was. Files get ordinary permissions (``0666 & ~umask``).
    """
    out = Path(os.path.abspath(Path(out).expanduser()))
    if not out.name or out == out.parent:
        raise TicketlabError(f"--to {out} is a filesystem root.", "Pass a folder to export to.")
    if out.is_symlink():
        raise TicketlabError(f"--to {out} is a symbolic link (to {os.readlink(out)}).",
                             "Pass the folder it points to, or a new folder.")
    check_target(out, stores)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (_os_error(e, out) or e) from e
    clean_orphans(parent)  # first: it may put back an export a kill left half-replaced
    if out.exists() and not out.is_dir():
        raise TicketlabError(f"{out} exists and is a file.", "Pass a folder path to --to.")
    existing = None
    if out.is_dir() and any(out.iterdir()):
        existing, why = export_manifest(out)
        if existing is None:
            raise TicketlabError(
                f"Output folder {out} is not empty and is not an export of ticketlab's: "
                f"{why}.",
                "Pass an empty or new folder. --force replaces only a folder that ticketlab "
                "exported and that holds nothing else; it never deletes other files.")
        if not force and expect_info is not None and \
                {k: v for k, v in existing.items() if k != "files"} != expect_info:
            raise TicketlabError(
                f"Output folder {out} is not empty: it holds another export "
                f"({existing.get('run', '?')} level {existing.get('level', '?')}, "
                f"{existing.get('format', '?')}).",
                "Pass an empty or new folder, or --force to replace that export.")
    try:
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise (_os_error(e, out) or e) from e
    fd = _lock(stage, blocking=True)
    assert fd is not None
    result = Stage(path=stage / "new", target=out)
    old = stage / "old"
    try:
        try:
            (stage / STAGING_MARKER).write_text(json.dumps({"ticketlab": _STAGING_TAG}) + "\n")
            result.path.mkdir()
            yield result
            staged_info = result.path / INFO_FILE
            new_info = staged_info.read_bytes() if staged_info.is_file() else None
            if existing is not None and (out / INFO_FILE).read_bytes() == new_info:
                result.unchanged = True  # the same export, complete: nothing to do
            elif existing is not None and not force:
                raise TicketlabError(
                    f"Output folder {out} is not empty: it holds a different export of "
                    f"{existing.get('run', '?')} level {existing.get('level', '?')}.",
                    "Pass an empty or new folder, or --force to replace that export.")
            else:
                _commit(result, existing is not None, old)
        except BaseException as e:
            if old.is_dir() and not out.exists():
                os.replace(old, out)  # failed between the two renames: the old export is back
            error = _os_error(e, out) if isinstance(e, OSError) else None
            if error is None:
                raise
            raise error from e
    finally:
        try:
            if not old.exists():  # else a file appeared in the replaced export: keep it all
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


def _commit(stage: Stage, replace: bool, old: Path) -> None:
    """Make the staged export durable with ordinary permissions, then rename it into place
    (moving an export it replaces aside first, and deleting that one's files)."""
    umask = current_umask()
    for f in [stage.path, *stage.path.rglob("*")]:
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)  # mkdtemp/mkstemp made them private
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(stage.path)
    faults.checkpoint("write")  # crash tests: the folder is complete but not yet in place
    if replace:
        os.replace(stage.target, old)
        stage.replaced = True
    os.replace(stage.path, stage.target)
    fsync_dir(stage.target.parent)
    faults.checkpoint("renamed")
    if replace:
        _remove_export(old)


# --- compressed tickets -----------------------------------------------------------------------
def _digest(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(b"\0" + k.encode() + b"\0" + str(t.dtype).encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as
        # bytes directly; for every other tensor the bytes are the same as before
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


#: Limits on what a compressed ticket may claim, checked before anything is allocated or
#: decompressed: the file is untrusted (its sha256 can be recomputed by whoever edits it).
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own cap on the JSON header
MAX_TENSOR_ELEMENTS = 2**32  # 16 GiB of float32 in one matrix: far beyond any BERT
MAX_DIMS = 8
#: deflate's best case: a 258-byte match costs at least 2 bits, so output <= 1032 x input.
_ZLIB_MAX_RATIO = 1032
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4,
             "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_VALUE_DTYPES = {"float32": ("F32", torch.float32), "float16": ("F16", torch.float16)}
_DENSE_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


def _damaged(path: Path, why: str) -> TicketlabError:
    return TicketlabError(
        f"Compressed ticket {path} is damaged or not a ticketlab ticket ({why}).",
        "Export the ticket again (`ticketlab export RUN --level K --to DIR --compressed`).",
    )


def _shape(value: Any) -> tuple[int, ...] | None:
    """A claimed shape as a tuple of non-negative ints, or None when it is not one."""
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        return None
    return tuple(value)


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The safetensors header (tensor name -> dtype, shape, offsets) and the ticketlab metadata
    of a compressed ticket, read and bounded without loading any tensor.

    Every tensor's byte range must lie in the file and match its dtype and shape, so each
    length used later is a length actually present.
    """
    path = Path(path)
    if not path.is_file():
        raise TicketlabError(f"{path} does not exist.",
                             "Pass a folder written by `ticketlab export … --compressed`.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, "shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise _damaged(path, f"its header claims {n:,} bytes; the file has {size:,}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(path, "its header is not JSON") from e
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    raw = (header.pop("__metadata__", None) or {}).get("ticketlab")
    try:
        meta = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError as e:
        raise _damaged(path, "its metadata is not JSON") from e
    if not isinstance(meta, dict) or meta.get("format") != TICKET_FORMAT:
        raise _damaged(path, "no ticketlab metadata")
    data = size - 8 - n
    for key, entry in header.items():
        shape = _shape(entry.get("shape")) if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if shape is None or entry.get("dtype") not in _ITEMSIZE or not (
                isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise _damaged(path, f"tensor {key!r} has a malformed header entry")
        begin, end = offsets
        if not 0 <= begin <= end <= data or \
                end - begin != math.prod(shape) * _ITEMSIZE[entry["dtype"]]:
            raise _damaged(path, f"tensor {key!r} claims bytes the file does not hold")
    return header, meta


def check_claims(path: Path, header: dict[str, dict[str, Any]], meta: dict[str, Any],
                 expected: dict[str, tuple[int, ...]] | None = None) -> None:
    """Check every shape and count the metadata claims against the bytes present and sane
    limits, before anything is decompressed or allocated.

    A packed mask must hold exactly ceil(numel / 8) bytes ("bits") or be a deflate stream
    that can reach that length (at most 1032x its size); the values must be exactly ``nnz``
    present elements; every tensor must fit ``MAX_TENSOR_ELEMENTS``; with ``expected`` (the
    architecture's shapes, from config.json) every tensor must have its architecture's shape.
    """
    compressed, tied, order = meta.get("compressed"), meta.get("tied"), meta.get("order")
    values = _VALUE_DTYPES.get(meta.get("values_dtype"))  # type: ignore[arg-type]
    if not (isinstance(compressed, dict) and isinstance(tied, dict)
            and isinstance(order, list) and values is not None):
        raise _damaged(path, "its metadata lacks the compressed/tied/order/values_dtype fields")
    if not all(isinstance(k, str) for k in order) or len(set(order)) != len(order):
        raise _damaged(path, "its tensor order is malformed")
    present = set(header)
    expected_tensors = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for key, info in compressed.items():
        shape = _shape(info.get("shape")) if isinstance(info, dict) else None
        if shape is None or key not in order or info.get("dtype") not in _DENSE_DTYPES:
            raise _damaged(path, f"{key!r} has a malformed shape or dtype")
        numel, nnz = math.prod(shape), info.get("nnz")
        if numel > MAX_TENSOR_ELEMENTS:
            raise _damaged(path, f"{key!r} claims {numel:,} elements, over the limit of "
                                 f"{MAX_TENSOR_ELEMENTS:,}")
        if not isinstance(nnz, int) or not 0 <= nnz <= numel:
            raise _damaged(path, f"{key!r} claims {nnz!r} kept weights of {numel:,}")
        mask, vals = header.get(key + _MASK_SUFFIX), header.get(key + _VALUES_SUFFIX)
        if mask is None or vals is None:
            raise _damaged(path, f"{key!r} lacks its mask or values")
        if mask["dtype"] != "U8" or len(mask["shape"]) != 1:
            raise _damaged(path, f"the mask of {key!r} is not a byte string")
        if vals["dtype"] != values[0] or vals["shape"] != [nnz]:
            raise _damaged(path, f"{key!r} claims {nnz:,} values; the file holds "
                                 f"{math.prod(vals['shape']):,} ({vals['dtype']})")
        packed, stored = (numel + 7) // 8, mask["shape"][0]
        encoding = info.get("mask_encoding")
        if encoding == "bits" and stored != packed or encoding == "zlib" and (
                stored == 0 or packed > _ZLIB_MAX_RATIO * stored + 258):
            raise _damaged(path, f"the mask of {key!r} ({stored:,} bytes, {encoding}) cannot "
                                 f"hold {numel:,} bits")
        if encoding not in ("bits", "zlib"):
            raise _damaged(path, f"the mask of {key!r} has an unknown encoding {encoding!r}")
        expected_tensors |= {key + _MASK_SUFFIX, key + _VALUES_SUFFIX}
        shapes[key] = shape
    for key in order:
        if key in compressed or key in tied:
            continue
        if key not in header:
            raise _damaged(path, f"tensor {key!r} is missing")
        expected_tensors.add(key)
        shapes[key] = tuple(header[key]["shape"])
    for key, source in tied.items():
        if key not in order or source not in shapes or source in tied:
            raise _damaged(path, f"tied tensor {key!r} points at {source!r}, which is not stored")
        shapes[key] = shapes[source]
    if present != expected_tensors:
        raise _damaged(path, f"unexpected tensors {sorted(present - expected_tensors)[:3]}")
    if expected is not None:
        for key in order:
            if key not in expected:
                raise _damaged(path, f"tensor {key!r} is not part of the architecture in "
                                     "config.json")
            if tuple(expected[key]) != shapes[key]:
                raise _damaged(path, f"{key!r} claims shape {list(shapes[key])}; config.json's "
                                     f"architecture has {list(expected[key])}")


def _inflate(payload: bytes, size: int) -> bytes | None:
    """Decompress at most ``size`` bytes; None unless the stream is exactly that long.

    The output bound is what makes a deflate bomb harmless: no more than the claimed (and
    already bounded) size is ever produced, whatever the stream would expand to.
    """
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, size)
        if len(out) != size:
            return None
        if d.decompress(d.unconsumed_tail, 1) or not d.eof or d.unused_data:
            return None  # longer than claimed, truncated, or trailing bytes
    except zlib.error:
        return None
    return out


def decode_compressed(path: Path, expected: dict[str, tuple[int, ...]] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full state dict stored in a compressed ticket, and its metadata.

    The file is untrusted: :func:`read_header` and :func:`check_claims` bound every length
    before a tensor is loaded, each mask is inflated to its exact claimed size and no more,
    and the sha256 catches accidental damage. ``expected`` (key -> shape) also checks that
    the ticket has the architecture's shapes.
    """
    from safetensors import safe_open

    path = Path(path)
    header, meta = read_header(path)
    if meta.get("version") != TICKET_VERSION:
        raise TicketlabError(
            f"Compressed ticket {path} has format version {meta.get('version')}; this ticketlab "
            f"reads version {TICKET_VERSION}.", "Use the ticketlab version that wrote it.")
    check_claims(path, header, meta, expected)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for damaged files
        raise _damaged(path, "safetensors cannot read it") from e
    want = meta.pop("sha256", None)
    if want != _digest(meta, tensors):
        raise TicketlabError(
            f"Compressed ticket {path} does not match its checksum: it was modified or damaged.",
            "Export the ticket again from its run.",
        )
    state: dict[str, torch.Tensor] = {}
    for key, info in meta["compressed"].items():
        numel = math.prod(info["shape"])
        payload = tensors.pop(key + _MASK_SUFFIX).numpy().tobytes()
        if info["mask_encoding"] == "zlib":
            inflated = _inflate(payload, (numel + 7) // 8)
            if inflated is None:
                raise _damaged(path, f"the mask of {key!r} does not inflate to {numel:,} bits")
            payload = inflated
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=numel)
        keep = torch.from_numpy(bits.view(np.bool_))
        values = tensors.pop(key + _VALUES_SUFFIX)
        if int(keep.sum()) != info["nnz"]:
            raise _damaged(path, f"the mask of {key!r} keeps {int(keep.sum()):,} weights, "
                                 f"not {info['nnz']:,}")
        dense = torch.zeros(numel, dtype=_DENSE_DTYPES[info["dtype"]])
        dense[keep] = values.to(dense.dtype)
        state[key] = dense.reshape(info["shape"])
    for key in meta["order"]:
        if key not in state and key not in meta["tied"]:
            state[key] = tensors[key]
    for key, source in meta["tied"].items():
        state[key] = state[source]
    return {k: state[k] for k in meta["order"]}, meta


def ticket_sizes(path: Path) -> dict[str, float]:
    """Byte counts read from a compressed ticket's safetensors header (not from memory).

    ``prunable_ratio`` = bytes of the masks and values of the pruned matrices / their dense
    float32 size; ``file_ratio`` = the whole file / all tensors as dense float32.
    """
    path = Path(path)
    header, meta = read_header(path)
    check_claims(path, header, meta)
    nbytes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
    prunable = sum(nbytes[k + s] for k in meta["compressed"] for s in (_MASK_SUFFIX,
                                                                        _VALUES_SUFFIX))
    prunable_dense = sum(4 * math.prod(v["shape"]) for v in meta["compressed"].values())
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
#: The ``transformers_weights`` field of a compressed ticket's config.json. transformers 5
#: loads the weights file this names; a value that is not a ``*.safetensors`` name makes a
#: plain ``from_pretrained`` fail with a ValueError that quotes it, so the user is told what
#: to do instead of "no file named model.safetensors". :func:`load_ticket` ignores it, and
#: ``save_pretrained`` drops it again.
FROM_PRETRAINED_HINT = (
    "this folder is a compressed ticketlab ticket (ticket.safetensors), which plain "
    "from_pretrained cannot read. Load it with: pip install ticketlab; "
    "import ticketlab; model = ticketlab.load_ticket(FOLDER) (see the folder's README.md)")


def _check_flags(compressed: bool, fp16: bool) -> None:
    if fp16 and not compressed:
        raise TicketlabError("--fp16 applies to compressed tickets only.",
                             "Add --compressed, or drop --fp16.")


@dataclass
class ExportResult:
    """Where an export went, and whether that folder already held exactly this export
    (``unchanged``: nothing written) or an earlier export was replaced (``replaced``)."""

    path: Path
    unchanged: bool = False
    replaced: bool = False


def _labelled_config(model: nn.Module, labels: list[str] | None) -> Any:
    """A copy of the model's config with the task's class names, so the Hub widget and
    ``pipeline`` print ``positive`` instead of ``LABEL_1``."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # save_pretrained would set it too
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {name: i for i, name in enumerate(labels)}
    return config


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
    labels: list[str] | None = None,
    stores: tuple[Path, ...] = (),
) -> ExportResult:
    """Write ``model`` (a transformers model, pruned by ``mask``) as a shippable folder.

    ``labels`` are the class names in label-id order (written to config.json); ``info`` is
    what ``ticket.json`` and the model card ``README.md`` say about the ticket. ``stores``
    are run stores the target must stay out of (see :func:`staged_dir`).
    """
    from ticketlab import __version__
    from ticketlab.hub import model_card

    _check_flags(compressed, fp16)
    state = _canonical_state(model, mask)
    prefix = model.base_model_prefix
    info = {**(info or {}), "format": "compressed" if compressed else "huggingface",
            "sparsity": mask.sparsity, "architecture": type(model).__name__,
            "ticketlab_version": __version__}
    if compressed:
        info["values_dtype"] = "float16" if fp16 else "float32"
    record = json.loads(json.dumps(info))  # as ticket.json will read back
    config = _labelled_config(model, labels)
    with staged_dir(Path(out), force, stores, expect_info=record) as stage:
        tmp = stage.path
        sizes = None
        if compressed:
            config.save_pretrained(tmp)
            # save_pretrained drops transformers_weights, so the hint goes in afterwards
            written = json.loads((tmp / "config.json").read_text())
            written["transformers_weights"] = FROM_PRETRAINED_HINT
            (tmp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True)
                                             + "\n")
            masks = {f"{prefix}.{k}": v for k, v in mask.tensors.items()
                     if f"{prefix}.{k}" in state}
            extra = {"architecture": type(model).__name__, "info": info}
            with open(tmp / TICKET_FILE, "wb") as f:
                f.write(encode_compressed(state, masks, fp16, extra))
            sizes = ticket_sizes(tmp / TICKET_FILE)
        else:
            original = model.config
            model.config = config  # save_pretrained writes self.config; the caller's is kept
            try:
                with _quiet_hf():
                    model.save_pretrained(tmp, state_dict=state)
            finally:
                model.config = original
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(info, labels=labels, sizes=sizes))
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / INFO_FILE).write_text(json.dumps({**record, "files": files},
                                                indent=2, sort_keys=True) + "\n")
    return ExportResult(path=stage.target, unchanged=stage.unchanged, replaced=stage.replaced)


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
    """Export level ``level`` of a run (see :func:`export_model`); returns the rebuilt level,
    with :attr:`LevelTicket.export` saying what happened at the target."""
    from ticketlab.store import default_root

    _check_flags(compressed, fp16)
    ticket = load_level(run_ref, level, root)
    ticket.export = export_model(
        ticket.model, ticket.mask, out, ticket.tokenizer, compressed=compressed, fp16=fp16,
        force=force, info=ticket.info, labels=ticket.labels,
        stores=(Path(root or default_root()), ticket.run_path.parent))
    return ticket


def load_ticket(path: str | Path) -> nn.Module:
    """Load an exported ticket folder as a plain ``transformers`` model (eval mode).

    A compressed ticket is untrusted input: its claims are checked against the bytes present
    and against the architecture config.json describes (built on the meta device, so nothing
    is allocated) before any tensor is decoded; float32 values come back bit for bit. A plain
    HF export is loaded with ``from_pretrained``. The tokenizer is in the same folder:
    ``AutoTokenizer.from_pretrained(path)``.
    """
    import transformers

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise TicketlabError(f"{path} is not an exported ticket (no config.json).",
                             "Pass a folder written by `ticketlab export`.")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TicketlabError(f"{path}/config.json cannot be read: {str(e).splitlines()[0]}",
                             "Export the ticket again.") from e
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None or not isinstance(cls, type) or \
            not issubclass(cls, transformers.PreTrainedModel):
        raise TicketlabError(f"{path}/config.json names no known architecture ({arch!r}).",
                             "Export the ticket again with this transformers version.")
    if not (path / TICKET_FILE).is_file():
        if not (path / "model.safetensors").is_file():
            raise TicketlabError(f"{path} holds neither {TICKET_FILE} nor model.safetensors.",
                                 "Pass a folder written by `ticketlab export`.")
        with _quiet_hf():
            return cls.from_pretrained(path).eval()
    if getattr(config, "transformers_weights", None) is not None:
        delattr(config, "transformers_weights")  # our from_pretrained hint, not a weights file
    try:
        with torch.device("meta"):
            skeleton = cls(config)
    except Exception as e:  # a config.json the architecture rejects
        raise TicketlabError(f"{path}/config.json does not describe a {arch}: "
                             f"{str(e).splitlines()[0]}", "Export the ticket again.") from e
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    del skeleton
    state, _ = decode_compressed(path / TICKET_FILE, expected)
    model = cls(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TicketlabError(f"{path}/{TICKET_FILE} does not fit its config.json: "
                             f"{str(e).splitlines()[0]}", "Export the ticket again.") from e
    return model.eval()
