"""Iterative magnitude pruning with rewinding — the paper's ticket search — and single fine-tunes.

One level = fine-tune m⊙θ_rewind (fresh optimizer and schedule) → evaluate → prune the lowest
weights → rewind the survivors. Level 0 is the full model. A level's files are written before
its ``metrics.json``, which is written last, so a run killed at any moment resumes at the first
unfinished level; training is deterministic for a given seed, so the resumed masks are
bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from safetensors.torch import load_file, save

from ticketlab import __version__ as VERSION
from ticketlab.errors import RunBusy, TicketlabError
from ticketlab.experiment import Setup, prepare
from ticketlab.hparams import RunHparams, stable_hash
from ticketlab.masks import Mask
from ticketlab.models import role_of
from ticketlab.pruning import level_sparsity, prune, sparsity_schedule
from ticketlab.store import Run, atomic_write_bytes, sha256_file
from ticketlab.train import Runtime, evaluate, get_accelerator, planned_steps, train


@contextmanager
def run_lock(run: Run, main: bool = True) -> Iterator[None]:
    """One job per run directory. flock is released by the OS if the owner dies.

    Under ``accelerate launch`` only the main process takes the lock: its sibling ranks are the
    same job.
    """
    if not main:
        yield
        return
    run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RunBusy(
                f"Another ticketlab process is working on {run.path}.",
                "Wait for it to finish (or stop it); a crashed process releases the lock.",
            ) from e
        yield
    finally:
        os.close(fd)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def _load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise TicketlabError(f"{what} {path} is missing or corrupt.",
                             "Delete the run directory and start again.") from e


def matrix_summary(mask: Mask) -> dict[str, float]:
    """Sparsity per matrix kind (Q, K, V, attn-out, ffn-in, ffn-out, pooler)."""
    kept: dict[str, list[int]] = {}
    for name, t in mask.tensors.items():
        k = kept.setdefault(role_of(name), [0, 0])
        k[0] += int(t.sum())
        k[1] += t.numel()
    return {role: 1 - a / b for role, (a, b) in kept.items()}


def _level_record(setup: Setup, level: int, target: float, mask: Mask, metrics: dict[str, float],
                  result: Any, eval_seconds: float) -> dict[str, Any]:
    main = setup.task.main_metric
    return {
        "level": level,
        "target_sparsity": target,
        "sparsity": mask.sparsity,
        "main_metric": main,
        "score": metrics[main],
        "metrics": metrics,
        "sparsity_by_kind": matrix_summary(mask),
        "sparsity_by_matrix": mask.per_tensor_sparsity(),
        "train": {"steps": result.steps, "epochs": result.epochs, "loss": result.train_loss,
                  "seconds": result.seconds, "examples_per_second": result.examples_per_second},
        "eval_seconds": eval_seconds,
    }


def _print_level(console: Console, rec: dict[str, Any], full_score: float | None,
                 resumed: bool = False) -> None:
    score = rec["score"] * 100
    delta = "" if full_score is None else f"  Δ {score - full_score * 100:+.2f}"
    kinds = rec["sparsity_by_kind"]
    pooler = f"  pooler {kinds['pooler'] * 100:.0f}%" if "pooler" in kinds else ""
    by_kind = " ".join(f"{k} {v * 100:.0f}%" for k, v in kinds.items() if k != "pooler")
    tag = " [dim](stored)[/dim]" if resumed else ""
    console.print(
        f"level {rec['level']:>2}  sparsity {rec['sparsity'] * 100:5.1f}%  "
        f"{rec['main_metric']} {score:6.2f}{delta}{pooler}{tag}\n"
        f"          [dim]{by_kind}[/dim]"
    )


def find_ticket(
    hp: RunHparams,
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
) -> Run:
    """Run (or resume) IMP until ``hp.prune.target_sparsity``. Returns the run directory."""
    console = console or Console()
    schedule = sparsity_schedule(hp.prune.target_sparsity, hp.prune.rate, hp.prune.schedule)
    setup = prepare(hp, runtime)  # everything validated before the run directory is touched
    steps = planned_steps(len(next(iter(setup.train_features.values()))), hp.train)
    if hp.prune.rewind_step >= steps:
        raise TicketlabError(
            f"--rewind-step {hp.prune.rewind_step} is not below the {steps} training steps of a "
            "level, so θ_i would never be reached.",
            f"Use a rewind step below {steps} (the paper's default is 0).",
        )
    run = Run(root / hp.run_id())
    accelerator = get_accelerator(runtime)
    main = accelerator.is_main_process
    with run_lock(run, main):
        if main:
            run.create(hp.identity(), {
                "kind": "imp",
                "ticketlab_version": VERSION,
                "fingerprint": setup.fingerprint,
                "prunable": {k: list(p.shape) for k, p in setup.prunable.items()},
                "main_metric": setup.task.main_metric,
            })
        accelerator.wait_for_everyone()
        recorded = run.read_hparams()
        if recorded.get("fingerprint") != setup.fingerprint:
            raise TicketlabError(
                f"The model's weights changed since run {run.path.name} started "
                "(θ0 fingerprint differs).",
                "Use the same model files, or start a new run with another --root.",
            )
        if main:
            console.print(f"[bold]run[/bold] {run.path}  "
                          f"levels at sparsity {', '.join(f'{s:.0%}' for s in schedule)}")
        _imp_levels(setup, run, schedule, runtime, console if main else Console(quiet=True))
    return run


def _theta0_state(setup: Setup, run: Run, main: bool, barrier: Any) -> dict[str, torch.Tensor]:
    """θ0 with the head γ0 as first drawn (saved once, so a resumed run — and every rank of a
    multi-process run — rewinds to exactly the same head)."""
    state = dict(setup.theta0)
    path = run.path / "init_head.safetensors"
    if main and not path.is_file():
        _save_tensors(path, {k: state[k] for k in setup.head_names()})
    barrier()
    state.update(_load_tensors(path, "Initial head"))
    return state


def _imp_levels(setup: Setup, run: Run, schedule: list[float], runtime: Runtime,
                console: Console) -> None:
    """The level loop. With several processes (``accelerate launch``) every rank trains and
    evaluates; only the main rank writes, and the next mask is decided once — on the main rank —
    and reaches the others through the store, after a barrier."""
    hp = setup.hp
    model = setup.model
    accelerator = get_accelerator(runtime)
    main, barrier = accelerator.is_main_process, accelerator.wait_for_everyone
    theta0 = _theta0_state(setup, run, main, barrier)
    full_score: float | None = None

    def snapshot(step: int, net: torch.nn.Module) -> None:
        if step == hp.prune.rewind_step and main:  # θ_i and γ_i, while the full model trains
            _save_tensors(run.rewind_path, net.state_dict())

    for level, target in enumerate(schedule):
        barrier()
        if run.level_done(level):
            rec = run.metrics(level)
            full_score = rec["score"] if level == 0 else full_score
            _print_level(console, rec, None if level == 0 else full_score, resumed=True)
            continue
        d = run.level_dir(level)
        if level == 0:
            mask = Mask.ones_like(setup.prunable)
        else:
            mask = Mask.load(d / "mask.safetensors")
            mask.check_compatible(setup.prunable, setup.fingerprint, source="stored mask")
        if level > 0 and hp.prune.rewind_step > 0:
            model.load_state_dict(_load_tensors(run.rewind_path, "Rewind point θ_i"))
        else:
            model.load_state_dict(theta0)
        if hp.prune.keep_trained_head and level > 0:
            model.load_state_dict(_load_tensors(run.level_dir(level - 1) / "head.safetensors",
                                                "Trained head"), strict=False)
        mask.apply_(setup.prunable)
        on_step = snapshot if level == 0 and hp.prune.rewind_step > 0 else None
        result = train(model, setup.prunable, mask, setup.train_features, setup.collator,
                       hp.train, runtime, seed=hp.train.seed, on_step=on_step,
                       description=f"level {level} train", tracker_name=f"level_{level}",
                       forward=setup.task.forward)
        t0 = time.perf_counter()
        metrics = evaluate(model, setup.task, setup.eval_sets, setup.collator,
                           hp.train.eval_batch_size, runtime)
        eval_seconds = time.perf_counter() - t0
        rec = _level_record(setup, level, target, mask, metrics, result, eval_seconds)
        if main:
            _store_level(setup, run, level, mask, rec, runtime)
        full_score = rec["score"] if level == 0 else full_score
        _print_level(console, rec, None if level == 0 else full_score)
    barrier()


def _store_level(setup: Setup, run: Run, level: int, mask: Mask, rec: dict[str, Any],
                 runtime: Runtime) -> None:
    """Write a finished level: its files, the next level's mask, and metrics.json last."""
    hp, model, d = setup.hp, setup.model, run.level_dir(level)
    files = ["mask.safetensors", "head.safetensors"]
    meta = {"task": hp.data.task, "level": level, "fingerprint": setup.fingerprint,
            "model": hp.model.model, "run": run.path.name, "hparams": hp.identity()}
    mask.save(d / "mask.safetensors", meta)
    state = model.state_dict()
    _save_tensors(d / "head.safetensors", {k: state[k] for k in setup.head_names()})
    if runtime.save_weights:
        _save_tensors(d / "model.safetensors", state)
        files.append("model.safetensors")
    # The next level's mask is written before this level is marked done, also after the last
    # level, so a later, higher --target-sparsity continues without retraining.
    nxt = level_sparsity(level + 1, hp.prune.rate, hp.prune.schedule)
    if nxt < 1.0:
        new_mask = prune(setup.prunable, mask, nxt, hp.prune.method,
                         seed=hp.train.seed * 1000 + level)
        new_mask.save(run.level_dir(level + 1) / "mask.safetensors", {**meta, "level": level + 1})
    run.finish_level(level, rec, files)


def finetune(
    hp: RunHparams,
    mask_path: Path | None,
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
    allow_different_weights: bool = False,
) -> Run:
    """Fine-tune the subnetwork m⊙θ0 once on ``hp.data.task`` (a transfer when the mask comes
    from another task). Stored as a one-level run named by the hparams and the mask's checksum."""
    console = console or Console()
    mask = Mask.load(mask_path) if mask_path is not None else None
    setup = prepare(hp, runtime)
    if mask is not None:
        mask.check_compatible(setup.prunable, setup.fingerprint, allow_different_weights,
                              source=f"mask {mask_path}")
        mask = mask.for_params(setup.prunable)
    else:
        mask = Mask.ones_like(setup.prunable)
    mask_id = sha256_file(mask_path) if mask_path is not None else "dense"
    identity = {"finetune": hp.identity(), "mask": mask_id}
    run = Run(root / f"finetune-{hp.data.task}-{stable_hash(identity)}")
    accelerator = get_accelerator(runtime)
    main = accelerator.is_main_process
    with run_lock(run, main):
        if main:
            run.create(identity, {"kind": "finetune", "ticketlab_version": VERSION,
                                  "fingerprint": setup.fingerprint,
                                  "mask_source": str(mask_path) if mask_path else None,
                                  "mask_meta": {k: mask.meta.get(k)
                                                for k in ("task", "level", "run")},
                                  "main_metric": setup.task.main_metric})
        accelerator.wait_for_everyone()
        if run.level_done(0):
            _print_level(console, run.metrics(0), None, resumed=True)
            return run
        setup.model.load_state_dict(setup.theta0)
        mask.apply_(setup.prunable)
        result = train(setup.model, setup.prunable, mask, setup.train_features, setup.collator,
                       hp.train, runtime, seed=hp.train.seed, description="finetune",
                       forward=setup.task.forward)
        t0 = time.perf_counter()
        metrics = evaluate(setup.model, setup.task, setup.eval_sets, setup.collator,
                           hp.train.eval_batch_size, runtime)
        rec = _level_record(setup, 0, mask.sparsity, mask, metrics, result,
                            time.perf_counter() - t0)
        if main:
            d = run.level_dir(0)
            mask.save(d / "mask.safetensors",
                      {"task": hp.data.task, "fingerprint": setup.fingerprint})
            files = ["mask.safetensors"]
            if runtime.save_weights:
                _save_tensors(d / "model.safetensors", setup.model.state_dict())
                files.append("model.safetensors")
            run.finish_level(0, rec, files)
            _print_level(console, rec, None)
        accelerator.wait_for_everyone()
    return run
