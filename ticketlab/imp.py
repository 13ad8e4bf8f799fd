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
from ticketlab.errors import TicketlabError
from ticketlab.experiment import Setup, prepare
from ticketlab.hparams import RunHparams, stable_hash
from ticketlab.masks import Mask
from ticketlab.models import role_of
from ticketlab.pruning import level_sparsity, prune, sparsity_schedule
from ticketlab.store import Run, atomic_write_bytes, sha256_file
from ticketlab.train import Runtime, evaluate, planned_steps, train


@contextmanager
def run_lock(run: Run) -> Iterator[None]:
    """One process per run directory. flock is released by the OS if the owner dies."""
    run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise TicketlabError(
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
    setup = prepare(hp)  # everything validated before the run directory is touched
    steps = planned_steps(len(next(iter(setup.train_features.values()))), hp.train)
    if hp.prune.rewind_step >= steps:
        raise TicketlabError(
            f"--rewind-step {hp.prune.rewind_step} is not below the {steps} training steps of a "
            "level, so θ_i would never be reached.",
            f"Use a rewind step below {steps} (the paper's default is 0).",
        )
    run = Run(root / hp.run_id())
    with run_lock(run):
        run.create(hp.identity(), {
            "kind": "imp",
            "ticketlab_version": VERSION,
            "fingerprint": setup.fingerprint,
            "prunable": {k: list(p.shape) for k, p in setup.prunable.items()},
            "main_metric": setup.task.main_metric,
        })
        recorded = run.read_hparams()
        if recorded.get("fingerprint") != setup.fingerprint:
            raise TicketlabError(
                f"The model's weights changed since run {run.path.name} started "
                "(θ0 fingerprint differs).",
                "Use the same model files, or start a new run with another --root.",
            )
        console.print(f"[bold]run[/bold] {run.path}  "
                      f"levels at sparsity {', '.join(f'{s:.0%}' for s in schedule)}")
        _imp_levels(setup, run, schedule, runtime, console)
    return run


def _theta0_state(setup: Setup, run: Run) -> dict[str, torch.Tensor]:
    """θ0 with the head γ0 as first drawn (saved once, so a resumed run rewinds identically)."""
    state = dict(setup.theta0)
    path = run.path / "init_head.safetensors"
    if path.is_file():
        state.update(_load_tensors(path, "Initial head"))
    else:
        _save_tensors(path, {k: state[k] for k in setup.head_names()})
    return state


def _imp_levels(setup: Setup, run: Run, schedule: list[float], runtime: Runtime,
                console: Console) -> None:
    hp = setup.hp
    model = setup.model
    theta0 = _theta0_state(setup, run)
    full_score: float | None = None

    def snapshot(step: int, net: torch.nn.Module) -> None:
        if step == hp.prune.rewind_step:  # θ_i and γ_i, taken while the full model trains
            _save_tensors(run.rewind_path, net.state_dict())

    for level, target in enumerate(schedule):
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
                       description=f"level {level} train", tracker_name=f"level_{level}")
        t0 = time.perf_counter()
        metrics = evaluate(model, setup.task, setup.eval_sets, setup.collator,
                           hp.train.eval_batch_size, runtime)
        eval_seconds = time.perf_counter() - t0

        files = ["mask.safetensors", "head.safetensors"]
        meta = {"task": hp.data.task, "level": level, "fingerprint": setup.fingerprint,
                "model": hp.model.model, "run": run.path.name, "hparams": hp.identity()}
        mask.save(d / "mask.safetensors", meta)
        head_names = setup.head_names()
        _save_tensors(d / "head.safetensors", {k: model.state_dict()[k] for k in head_names})
        if runtime.save_weights:
            _save_tensors(d / "model.safetensors", model.state_dict())
            files.append("model.safetensors")
        # The next level's mask is written before this level is marked done, also after the
        # last level, so a later, higher --target-sparsity continues without retraining.
        nxt = level_sparsity(level + 1, hp.prune.rate, hp.prune.schedule)
        if nxt < 1.0:
            new_mask = prune(setup.prunable, mask, nxt,
                             hp.prune.method, seed=hp.train.seed * 1000 + level)
            new_mask.save(run.level_dir(level + 1) / "mask.safetensors",
                          {**meta, "level": level + 1})
        rec = _level_record(setup, level, target, mask, metrics, result, eval_seconds)
        run.finish_level(level, rec, files)
        full_score = rec["score"] if level == 0 else full_score
        _print_level(console, rec, None if level == 0 else full_score)


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
    setup = prepare(hp)
    if mask is not None:
        mask.check_compatible(setup.prunable, setup.fingerprint, allow_different_weights,
                              source=f"mask {mask_path}")
        mask = mask.for_params(setup.prunable)
    else:
        mask = Mask.ones_like(setup.prunable)
    mask_id = sha256_file(mask_path) if mask_path is not None else "dense"
    identity = {"finetune": hp.identity(), "mask": mask_id}
    run = Run(root / f"finetune-{hp.data.task}-{stable_hash(identity)}")
    with run_lock(run):
        run.create(identity, {"kind": "finetune", "ticketlab_version": VERSION,
                              "fingerprint": setup.fingerprint,
                              "mask_source": str(mask_path) if mask_path else None,
                              "mask_meta": {k: mask.meta.get(k) for k in ("task", "level", "run")},
                              "main_metric": setup.task.main_metric})
        if run.level_done(0):
            _print_level(console, run.metrics(0), None, resumed=True)
            return run
        setup.model.load_state_dict(setup.theta0)
        mask.apply_(setup.prunable)
        result = train(setup.model, setup.prunable, mask, setup.train_features, setup.collator,
                       hp.train, runtime, seed=hp.train.seed, description="finetune")
        t0 = time.perf_counter()
        metrics = evaluate(setup.model, setup.task, setup.eval_sets, setup.collator,
                           hp.train.eval_batch_size, runtime)
        d = run.level_dir(0)
        mask.save(d / "mask.safetensors", {"task": hp.data.task, "fingerprint": setup.fingerprint})
        files = ["mask.safetensors"]
        if runtime.save_weights:
            _save_tensors(d / "model.safetensors", setup.model.state_dict())
            files.append("model.safetensors")
        rec = _level_record(setup, 0, mask.sparsity, mask, metrics, result,
                            time.perf_counter() - t0)
        run.finish_level(0, rec, files)
        _print_level(console, rec, None)
    return run
