"""One level's lifecycle — train, evaluate, time, write — shared by IMP levels, single
fine-tunes and every baseline branch.

A level starts from a full state (θ0 with γ0, θ_i, re-initialised or shuffled weights, or a
fine-tuned model), applies a mask, trains with the run's training method, is evaluated, and is
written into a :class:`~ticketlab.store.Run`: its mask, its head, optionally its weights and
any training statistics, and ``metrics.json`` last with the checksums of the others — the
level's completion marker. IMP adds one step before that marker (the next level's mask) through
``before_finish``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ticketlab.errors import TicketlabError
from ticketlab.hparams import Runtime
from ticketlab.masks import Mask
from ticketlab.methods import make_method
from ticketlab.prepare import Setup
from ticketlab.store import Run, atomic_write_bytes
from ticketlab.tracking import LevelLog, open_level_log
from ticketlab.train import TrainResult, evaluate, get_accelerator, train


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise TicketlabError(f"{what} {path} is missing or corrupt.",
                             "Rerun the command that made it: a damaged level is redone.") from e


#: ``model.safetensors`` of a level: compact (issue 15.11) — every prunable matrix as its
#: packed keep-mask and surviving values, every other tensor dense — in the compressed-ticket
#: encoding (:func:`ticketlab.export.encode_compressed`, float32 values, so it restores the
#: trained weights bit for bit). Stores written before hold the dense state dict; both load.
WEIGHTS_FILE = "model.safetensors"


def level_weights_bytes(setup: Setup, state: dict[str, torch.Tensor], mask: Mask) -> bytes:
    """The compact bytes of a level's trained ``state`` under ``mask``."""
    from ticketlab.export import encode_compressed

    keep = {setup.full_key(name): m for name, m in mask.tensors.items()}
    return encode_compressed({k: v.detach().cpu() for k, v in state.items()}, keep,
                             extra={"kind": "level-weights"})


def load_level_weights(path: Path) -> dict[str, torch.Tensor]:
    """A level's trained weights, compact or (older stores) dense: the one reader of
    ``model.safetensors`` (export, the standard baseline, IMP's mask healing)."""
    from safetensors import safe_open

    from ticketlab.export import decode_compressed

    try:
        with safe_open(str(path), framework="pt") as f:
            compact = "ticketlab" in (f.metadata() or {})
    except Exception as e:  # safetensors raises several types for damaged files
        raise TicketlabError(f"Level weights {path} are missing or corrupt.",
                             "Rerun the command that made them: a damaged level is redone."
                             ) from e
    if not compact:
        return load_tensors(path, "Level weights")
    try:
        return decode_compressed(path)[0]
    except TicketlabError as e:
        raise TicketlabError(f"Level weights {path} are damaged ({e.problem})",
                             "Rerun the command that made them: a damaged level is redone."
                             ) from e


def role_sparsity(setup_or_family: Any, mask: Mask) -> dict[str, float]:
    """Sparsity per matrix role (text: Q, K, V, attn-out, ffn-in, ffn-out, pooler)."""
    family = getattr(setup_or_family, "family", setup_or_family)
    kept: dict[str, list[int]] = {}
    for name, t in mask.tensors.items():
        k = kept.setdefault(family.role_of(name, tuple(t.shape)), [0, 0])
        k[0] += int(t.sum())
        k[1] += t.numel()
    return {role: 1 - a / b for role, (a, b) in kept.items()}


def level_record(setup: Setup, level: int, target: float, mask: Mask, metrics: dict[str, float],
                 result: TrainResult, eval_seconds: float) -> dict[str, Any]:
    main = setup.task.main_metric
    return {
        "level": level,
        "target_sparsity": target,
        "sparsity": mask.sparsity,
        "main_metric": main,
        "score": metrics[main],
        "metrics": metrics,
        "sparsity_by_role": role_sparsity(setup, mask),
        "sparsity_by_matrix": mask.per_tensor_sparsity(),
        "train": {"steps": result.steps, "epochs": result.epochs, "loss": result.train_loss,
                  "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                  "examples_per_second": result.examples_per_second},
        "eval_seconds": eval_seconds,
        **({"robust_score": metrics["robust_" + main]} if "robust_" + main in metrics else {}),
    }


@dataclass
class LevelPlan:
    """What one level trains: ``mask`` on ``start`` (a full state dict)."""

    level: int
    mask: Mask
    start: dict[str, torch.Tensor]
    target: float
    description: str
    #: Metadata every mask file of this level records (task, run, level, θ0 digests...).
    mask_meta: dict[str, Any] = field(default_factory=dict)
    on_step: Callable[[int, torch.nn.Module], None] | None = None
    #: Objects fed after every backward pass (``after_backward(step)``): training statistics.
    hooks: tuple[Any, ...] = ()
    #: Merged into the level's record (a branch's kind and seed), and into its ``train``
    #: part (extra timings, e.g. the dense training standard pruning needed first).
    extra: dict[str, Any] = field(default_factory=dict)
    train_extra: dict[str, Any] = field(default_factory=dict)
    save_head: bool = True


def train_and_evaluate(setup: Setup, mask: Mask, start: dict[str, torch.Tensor],
                       runtime: Runtime, description: str,
                       on_step: Callable[[int, torch.nn.Module], None] | None = None,
                       hooks: tuple[Any, ...] = (), log: LevelLog | None = None
                       ) -> tuple[dict[str, float], TrainResult, float, Mask]:
    """Fine-tune ``mask ⊙ start`` with the setup's data, hparams and training method; return
    (metrics, training result, eval seconds, the mask restricted to the prunable set).
    ``log`` receives the training loss and learning rate of every step."""
    hp = setup.hp
    setup.model.load_state_dict(start)
    mask = mask.for_params(setup.prunable)
    mask.apply_(setup.prunable)
    result = train(setup.model, setup.prunable, mask, setup.train_features, setup.collator,
                   hp.train, runtime, seed=hp.train.seed, on_step=on_step,
                   description=description, forward=setup.task.forward,
                   method=make_method(hp.train.adversarial, hp.train, setup), hooks=hooks,
                   feature_keys=setup.task.feature_keys, length_key=setup.task.length_key,
                   log=log)
    t0 = time.perf_counter()
    attack = setup.eval_attack()
    metrics = evaluate(setup.model, setup.task, setup.eval_sets, setup.collator,
                       hp.train.eval_batch_size, runtime, attack=attack,
                       space=setup.input_space() if attack is not None else None)
    return metrics, result, time.perf_counter() - t0, mask


def run_level(setup: Setup, run: Run, plan: LevelPlan, runtime: Runtime,
              before_finish: Callable[[dict[str, Any]], list[str]] | None = None
              ) -> dict[str, Any]:
    """Train, evaluate and write one level of ``run``; returns its record.

    ``before_finish(record)`` runs on the writing rank after the level's files and before its
    ``metrics.json``, and returns extra file names of the level to checksum (IMP writes the
    next level's mask there, so a resumed run never lacks it). With several processes every
    rank trains and evaluates; only the main rank writes — and logs, with ``--report-to``, into
    ``<run>/logs/level_K/`` (:mod:`ticketlab.tracking`): the loss and learning rate of every
    step, then the level's eval metrics and sparsity (overall and per role).
    """
    main = get_accelerator(runtime).is_main_process
    log = open_level_log(runtime.report_to, run.path, plan.level, setup.hp.to_dict()) \
        if main else None
    try:
        metrics, result, eval_seconds, mask = train_and_evaluate(
            setup, plan.mask, plan.start, runtime, plan.description, plan.on_step, plan.hooks,
            log)
        record = level_record(setup, plan.level, plan.target, mask, metrics, result,
                              eval_seconds)
        if log is not None:
            log.log_level(record, result.steps)
    finally:
        if log is not None:
            log.finish()
    record.update(plan.extra)
    record["train"].update(plan.train_extra)
    if main:
        write_level(setup, run, plan, mask, record, runtime, before_finish)
    return record


def write_level(setup: Setup, run: Run, plan: LevelPlan, mask: Mask, record: dict[str, Any],
                runtime: Runtime,
                before_finish: Callable[[dict[str, Any]], list[str]] | None = None) -> None:
    """The level's files, then ``metrics.json`` last (the completion marker)."""
    d = run.level_dir(plan.level)
    mask.save(d / "mask.safetensors", {**setup.mask_meta(), **plan.mask_meta})
    files = ["mask.safetensors"]
    state = setup.model.state_dict()
    if plan.save_head:
        save_tensors(d / "head.safetensors", {k: state[k] for k in setup.head_names()})
        files.append("head.safetensors")
    if runtime.save_weights:
        atomic_write_bytes(d / WEIGHTS_FILE, level_weights_bytes(setup, state, mask))
        files.append(WEIGHTS_FILE)
    if before_finish is not None:
        files += before_finish(record)
    run.finish_level(plan.level, record, files)
