"""The one training loop every task shares: masked fine-tuning and evaluation.

Why a lean loop on accelerate instead of the HF Trainer: IMP needs to act at exact points of
every step — mask the gradients *before* clipping (so pruned weights do not eat the clipping
budget), re-zero pruned weights *after* the optimizer step (a safety net against any optimizer
that moves zeros), snapshot θ_i at step i for rewinding — and to be bit-reproducible for resume.
A Trainer callback's events come only after clipping (:mod:`ticketlab.hf` reaches
inside the Trainer's step with tensor hooks instead). accelerate still gives us device
placement, bf16/fp16 autocast and DDP; logging goes to the per-level tracker the level
lifecycle opens (:mod:`ticketlab.tracking`), never to a process-wide one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ticketlab import faults
from ticketlab.errors import TicketlabError
from ticketlab.hparams import Runtime, TrainHparams
from ticketlab.masks import Mask
from ticketlab.tasks.base import Task, default_batch_outputs

__all__ = ["FeatureDataset", "Runtime", "TrainResult", "TrainState", "evaluate", "planned_steps",
           "predict", "train"]

#: The text tasks' model inputs (``Task.feature_keys``' default); anything else a task keeps in
#: its features (offsets, example ids) stays out of the batches.
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions",
)


class FeatureDataset(Dataset):
    """A dict of equal-length sequences (lists, arrays or tensors), served one example (a
    dict) at a time. ``keys`` are the task's model inputs (``Task.feature_keys``); anything
    else a task keeps in its features (offsets, example ids) stays out. ``length_key`` names
    the feature whose length sorts and groups examples (token ids); None: fixed-size inputs."""

    def __init__(self, features: dict[str, Any], keys: tuple[str, ...] = MODEL_INPUT_KEYS,
                 length_key: str | None = "input_ids") -> None:
        self.features = {k: v for k, v in features.items() if k in keys}
        lengths = {len(v) for v in self.features.values()}
        if len(lengths) != 1:
            raise ValueError(f"feature lists differ in length: {lengths}")
        self.n = lengths.pop()
        self.length_key = length_key if length_key in self.features else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.features.items()}

    @property
    def has_lengths(self) -> bool:
        return self.length_key is not None

    def lengths(self) -> list[int]:
        if self.length_key is None:
            return [1] * self.n
        return [len(x) for x in self.features[self.length_key]]


def _forward_keys(model: nn.Module) -> set[str]:
    """The batch keys ``model.forward`` accepts (DistilBERT and RoBERTa take no
    ``token_type_ids``, whatever a tokenizer returned)."""
    import inspect

    net = model.module if hasattr(model, "module") else model
    return set(inspect.signature(net.forward).parameters)


@dataclass
class TrainState:
    """Where one training run stands after ``step`` optimizer steps, so that a later call of
    :func:`train` continues it exactly (``resume=``): the optimizer's and the schedule's state
    dicts and torch's global RNG state (dropout, MLM masking). The data order needs no state:
    it is replayed from the seed. A search that changes the mask between parts of one run
    (SuperTickets' pruning intervals) trains it as several calls."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: torch.Tensor


@dataclass
class TrainResult:
    steps: int
    epochs: float
    train_loss: float
    seconds: float
    examples_per_second: float
    #: With ``stop_step``: the state to continue from (``train(..., resume=state)``).
    state: TrainState | None = None
    #: CPU time of the whole process while training (all threads): what a run costs on a
    #: shared machine, where wall time also counts other jobs' share of the cores.
    cpu_seconds: float = 0.0


def planned_steps(num_examples: int, hp: TrainHparams) -> int:
    """Optimizer steps a run will take (what --rewind-step must stay below)."""
    if hp.max_steps:
        return hp.max_steps
    return max(1, math.ceil(hp.epochs * math.ceil(num_examples / hp.batch_size)))


_ACCELERATORS: dict[tuple, Any] = {}


def get_accelerator(runtime: Runtime) -> Any:
    """The process's Accelerator (one per process: accelerate's state is a singleton).

    ``split_batches`` makes ``--batch-size`` the *global* batch: under ``accelerate launch``
    with N processes every optimizer step sees the same examples as a single-process run, each
    process taking 1/N of them, so DDP and single-process runs follow the same trajectory.
    """
    from ticketlab.tracking import check_report_to

    check_report_to(runtime.report_to)  # every call: the cached Accelerator knows no trackers
    key = (runtime.device, runtime.precision)
    if key not in _ACCELERATORS:
        _ACCELERATORS[key] = make_accelerator(runtime)
    return _ACCELERATORS[key]


def make_accelerator(runtime: Runtime) -> Any:
    from accelerate import Accelerator, DataLoaderConfiguration

    device = runtime.device
    if device not in ("auto", "cpu", "cuda"):
        raise TicketlabError(f"Unknown --device {device!r}.", "Use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise TicketlabError("--device cuda was asked for, but no CUDA GPU is visible.",
                             "Use --device cpu, or run on a machine with a GPU.")
    if runtime.precision not in ("no", "bf16", "fp16"):
        raise TicketlabError(f"Unknown --precision {runtime.precision!r}.", "Use no, bf16 or fp16.")
    return Accelerator(
        cpu=device == "cpu",
        mixed_precision=runtime.precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _progress(runtime: Runtime) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=True, disable=not runtime.progress)


def _optimizer(model: nn.Module, hp: TrainHparams) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, or SGD (``--optimizer sgd``). A parameter
    carrying an ``lr_scale`` attribute gets its own group at ``lr * lr_scale``, without weight
    decay (a search method's own parameters, e.g. SuperTickets' gates, must move further in a
    few hundred steps than fine-tuned weights); without any, the groups are exactly what they
    always were."""
    scaled = _scaled_groups(model, hp.lr)
    if hp.optimizer == "sgd":
        # The vision paper's code (CV_LTH_Pre-training main_imp_downstream.py:112-114): SGD
        # with momentum, weight decay on every parameter, BatchNorm and biases included.
        plain = [p for p in model.parameters()
                 if p.requires_grad and getattr(p, "lr_scale", None) is None]
        return torch.optim.SGD([{"params": plain}, *scaled], lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or getattr(p, "lr_scale", None) is not None:
            continue
        is_norm = "LayerNorm" in name or "layer_norm" in name
        (no_decay if p.dim() < 2 or is_norm else decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}, *scaled]
    # The fused kernel is ~3x faster on CPU, and it does not slow down on gradients that are
    # exactly zero (pruned weights), where the for-each AdamW's sqrt did (benchmarks/).
    try:
        return torch.optim.AdamW(groups, lr=hp.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=hp.lr)


def _scaled_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """One optimizer group per ``lr_scale`` among the trainable parameters carrying one: at
    ``lr * lr_scale``, without weight decay."""
    scaled: dict[float, list[torch.Tensor]] = {}
    for p in model.parameters():
        scale = getattr(p, "lr_scale", None)
        if p.requires_grad and scale is not None:
            scaled.setdefault(float(scale), []).append(p)
    return [{"params": ps, "weight_decay": 0.0, "lr": lr * scale}
            for scale, ps in scaled.items()]


def _scheduler(optimizer: torch.optim.Optimizer, hp: TrainHparams, total: int) -> Any:
    """The warm-up (``--warmup-steps`` or ``--warmup-ratio``), then transformers'
    ``get_scheduler`` schedule, or ``step``: ×0.1 at 50 % and ×0.01 at 75 % of the steps (the
    vision code's MultiStepLR at epochs 91 and 136 of 182)."""
    warmup = hp.warmup_for(total)
    if hp.lr_scheduler_type != "step":
        from transformers import get_scheduler

        return get_scheduler(hp.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                             num_training_steps=total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # the CV code's warm-up reaches lr at its last step
        return 1.0 if step < total // 2 else 0.1 if step < (3 * total) // 4 else 0.01

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MaskEnforcer:
    """Holds the pruned weights at exactly zero: masks as float tensors on the device, paired
    with the live parameters, so the hot path is two fused multiplies per step — one on the
    gradients (before clipping, so pruned weights never eat the clipping budget), one on the
    weights after the optimizer step (a safety net against optimizers that move zeros)."""

    def __init__(self, prunable: dict[str, nn.Parameter], mask: Mask | None,
                 device: torch.device) -> None:
        self.params: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        if mask is not None:
            for name, p in prunable.items():
                if name in mask.tensors:
                    self.params.append(p)
                    self.values.append(mask.tensors[name].to(device=device, dtype=p.dtype))

    def zero_weights(self) -> None:
        if self.params:
            with torch.no_grad():
                torch._foreach_mul_(self.params, self.values)

    def zero_grads(self) -> None:
        live = [(p.grad, m) for p, m in zip(self.params, self.values, strict=True)
                if p.grad is not None]
        if live:
            torch._foreach_mul_([g for g, _ in live], [m for _, m in live])


def _loader(dataset: FeatureDataset, hp: TrainHparams, seed: int,
            collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> DataLoader:
    """Batches of ``hp.batch_size`` in a seeded order: length-grouped (transformers'
    ``LengthGroupedSampler``: much less padding) when asked and the data has lengths."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    if hp.group_by_length and dataset.has_lengths:
        sampler: Any = LengthGroupedSampler(hp.batch_size, lengths=dataset.lengths(),
                                            generator=generator)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=generator)
    return DataLoader(dataset, batch_size=hp.batch_size, sampler=sampler, collate_fn=collator)


def _batches(loader: DataLoader, skip: int, rng: torch.Tensor | None) -> Any:
    """The loader's batches, epoch after epoch, from optimizer step ``skip`` on.

    A fresh run (``skip`` 0, no ``rng``) iterates the loader exactly as a plain ``for`` loop
    per epoch would. A resumed run replays the seeded sampler through the finished epochs
    (index lists only, nothing collated), skips the current epoch's first batches, and only
    then restores torch's RNG state ``rng``: creating a DataLoader iterator draws from that
    RNG, so restoring it earlier would shift dropout against the uninterrupted run.
    """
    per_epoch = len(loader)
    for _ in range(skip // per_epoch):
        for _ in loader.batch_sampler:  # advances the sampler's generator by one epoch
            pass
    it = iter(loader)
    for _ in range(skip % per_epoch):
        next(it)
    if rng is not None:
        torch.set_rng_state(rng)
    while True:
        yield from it
        it = iter(loader)


def micro_batches(batch: dict[str, Any], parts: int) -> list[tuple[dict[str, Any], float]]:
    """Split a batch into ``parts`` micro-batches with the share of the examples each holds
    (the last batch of an epoch may be smaller). One part: the batch itself, share 1."""
    if parts == 1:
        return [(batch, 1.0)]
    size = len(next(iter(batch.values())))
    bounds = [round(i * size / parts) for i in range(parts + 1)]
    return [({k: v[a:b] for k, v in batch.items()}, (b - a) / size)
            for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _check_finite(value: float, step: int, lr: float) -> None:
    if not math.isfinite(value):
        raise TicketlabError(
            f"The training loss became {value} at step {step} (learning rate {lr:.3g}).",
            "Lower --lr, use --precision no, or check the data for broken labels; "
            "finished levels are kept and the run resumes from this level.",
        )


def _check_batch_split(hp: TrainHparams, processes: int) -> None:
    """``--batch-size`` is the global batch: it must split over processes × micro-batches."""
    parts = processes * hp.gradient_accumulation_steps
    if hp.batch_size % parts:
        raise TicketlabError(
            f"--batch-size {hp.batch_size} is the global batch and must split evenly over "
            f"{processes} processes × {hp.gradient_accumulation_steps} micro-batches.",
            f"Use a multiple of {parts}.")


def _optimization(model: nn.Module, hp: TrainHparams, total: int,
                  resume: TrainState | None) -> tuple[torch.optim.Optimizer, Any]:
    """A fresh optimizer and schedule for a ``total``-step run, at ``resume``'s state if given."""
    optimizer = _optimizer(model, hp)
    scheduler = _scheduler(optimizer, hp, total)
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
    return optimizer, scheduler


def _update(model: nn.Module, batch: dict[str, Any], forward: Callable[..., Any], method: Any,
            accelerator: Any, hp: TrainHparams, optimizer: torch.optim.Optimizer,
            scheduler: Any, enforcer: MaskEnforcer, hooks: tuple[Any, ...], step: int) -> float:
    """Optimizer step number ``step``, in the order IMP needs: back-propagate (the training
    method), zero the pruned weights' gradients, let the hooks read the gradients, clip, step,
    re-zero the pruned weights. Returns the batch loss."""
    value = _optimizer_step(model, batch, forward, method, accelerator, hp)
    _check_finite(value, step, scheduler.get_last_lr()[0])
    enforcer.zero_grads()
    for hook in hooks:
        hook.after_backward(step)
    if hp.max_grad_norm and hp.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    enforcer.zero_weights()
    return value


def train(
    model: nn.Module,
    prunable: dict[str, nn.Parameter],
    mask: Mask | None,
    features: dict[str, list],
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    hp: TrainHparams,
    runtime: Runtime = Runtime(),
    *,
    seed: int = 0,
    on_step: Callable[[int, nn.Module], None] | None = None,
    description: str = "train",
    log: Any = None,
    forward: Callable[[nn.Module, dict[str, Any]], Any] | None = None,
    method: Any = None,
    hooks: tuple[Any, ...] = (),
    feature_keys: tuple[str, ...] = MODEL_INPUT_KEYS,
    length_key: str | None = "input_ids",
    resume: TrainState | None = None,
    stop_step: int | None = None,
) -> TrainResult:
    """Fine-tune ``model`` with the pruned weights of ``mask`` held at exactly zero.

    A fresh optimizer (AdamW or SGD) and schedule (``--lr-scheduler-type``, default linear)
    every call (IMP's "retrain from the rewind point"); a collator with a ``reseed(seed)``
    method (image augmentation) is reseeded too.
    One optimizer step: the training ``method`` (:mod:`ticketlab.methods`; default standard)
    computes the loss of each micro-batch and back-propagates it; the pruned weights' gradients
    are zeroed; every ``hooks`` entry's ``after_backward(step)`` reads the gradients (a pruning
    criterion's statistics); gradients are clipped; the optimizer steps; the pruned weights are
    re-zeroed; ``on_step(step, model)`` runs (IMP snapshots θ_i there). ``forward(model,
    batch)`` is the task's forward pass (``Task.forward``; default ``model(**batch)``). ``log``
    (a :class:`ticketlab.tracking.LevelLog`) receives train/loss and train/lr every step.

    One run may be trained in parts: ``stop_step`` ends this call after that many optimizer
    steps of the whole run (the schedule still spans the whole run) and returns its
    :class:`TrainState` in ``TrainResult.state``; ``resume=state`` continues from it, on the
    same data, hparams and seed, bit-identically to a run that never stopped (the model's
    weights are the caller's to restore). The mask may differ between parts.
    """
    from ticketlab.methods import StandardTraining

    method = method or StandardTraining()
    forward = forward or _call
    dataset = FeatureDataset(features, feature_keys, length_key)
    if len(dataset) == 0:
        raise TicketlabError("The training split is empty.", "Check the data and sample limits.")
    accelerator = get_accelerator(runtime)
    _check_batch_split(hp, accelerator.num_processes)
    torch.manual_seed(seed)
    reseed = getattr(collator, "reseed", None)
    if reseed is not None:  # a collator with its own random stream (image augmentation)
        reseed(seed)
    loader = _loader(dataset, hp, seed, collator)
    total = planned_steps(len(dataset), hp)
    first = resume.step if resume is not None else 0
    stop = total if stop_step is None else stop_step
    if not first <= stop <= total:
        raise ValueError(f"cannot train steps {first}..{stop} of a {total}-step run")
    optimizer, scheduler = _optimization(model, hp, total, resume)
    if accelerator.num_processes > 1:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                                  scheduler)
    else:
        model = accelerator.prepare_model(model)
    device = accelerator.device
    enforcer = MaskEnforcer(prunable, mask, device)
    enforcer.zero_weights()

    model.train()
    accepted = _forward_keys(model)
    step, seen, loss_sum, start = first, 0, 0.0, time.perf_counter()
    cpu_start = time.process_time()
    batches = _batches(loader, first, resume.rng if resume is not None else None)
    with _progress(runtime) as progress:
        bar = progress.add_task(description, total=total, completed=first, info="")
        while step < stop:
            batch = next(batches)
            batch = {k: v.to(device) for k, v in batch.items() if k in accepted}
            value = _update(model, batch, forward, method, accelerator, hp, optimizer,
                            scheduler, enforcer, hooks, step + 1)
            step += 1
            seen += len(next(iter(batch.values())))
            loss_sum += value
            progress.update(bar, advance=1, info=f"loss {value:.4f}")
            _log_line(runtime, accelerator, description, step, total, value, start)
            faults.checkpoint("step")
            if log is not None:
                log.log({"train/loss": value, "train/lr": scheduler.get_last_lr()[0]}, step)
            if on_step is not None:
                on_step(step, accelerator.unwrap_model(model))
    state = None
    if stop_step is not None:
        state = TrainState(step=step, optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(), rng=torch.get_rng_state())
    accelerator.free_memory()  # drop the prepared optimizer/loader so levels do not pile up
    seconds = time.perf_counter() - start
    taken = step - first
    return TrainResult(steps=taken, epochs=taken * hp.batch_size / len(dataset),
                       train_loss=loss_sum / max(taken, 1), seconds=seconds,
                       examples_per_second=seen / max(seconds, 1e-9), state=state,
                       cpu_seconds=time.process_time() - cpu_start)


def _call(model: nn.Module, batch: dict[str, Any]) -> Any:
    return model(**batch)


def _optimizer_step(model: nn.Module, batch: dict[str, Any], forward: Callable[..., Any],
                    method: Any, accelerator: Any, hp: TrainHparams) -> float:
    """Back-propagate one batch through the training method, in ``gradient_accumulation_steps``
    micro-batches (each loss weighted by its share of the examples); returns the batch loss."""
    parts = micro_batches(batch, hp.gradient_accumulation_steps)
    value = 0.0
    for i, (micro, share) in enumerate(parts):
        def backward(loss: torch.Tensor, share: float = share) -> None:
            accelerator.backward(loss if share == 1.0 else loss * share)

        sync = contextlib.nullcontext() if i == len(parts) - 1 else accelerator.no_sync(model)
        with sync:
            value += method.step(model, micro, forward, backward) * share
    return value


def _log_line(runtime: Runtime, accelerator: Any, description: str, step: int, total: int,
              value: float, start: float) -> None:
    """A log line every 10 % for runs without a terminal (nohup, CI, clusters)."""
    if not runtime.progress and accelerator.is_main_process and (
            step % max(1, total // 10) == 0 or step == total):
        print(f"{description}: step {step}/{total}  loss {value:.4f}  "
              f"{(time.perf_counter() - start) / step:.2f} s/step", flush=True)


@torch.no_grad()
def predict(
    model: nn.Module,
    task: Task,
    features: dict[str, list],
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    runtime: Runtime = Runtime(),
    description: str = "eval",
    attack: Any = None,
    space: Any = None,
) -> tuple[dict[str, np.ndarray], float]:
    """Run the model over ``features`` and return the task's outputs in the original order.

    Batches are formed from length-sorted examples (much less padding), then put back in order;
    outputs with a sequence axis (QA logits) are padded to the longest batch. With an
    ``attack`` (:class:`ticketlab.attacks.Attack` in the family's input ``space``) every batch
    is attacked first and the outputs are the task's worst case of clean and attacked
    (``Task.worst_case``): robust predictions.
    """
    dataset = FeatureDataset(features, task.feature_keys, task.length_key)
    if len(dataset) == 0:
        raise TicketlabError("The evaluation split is empty.", "Check the data and sample limits.")
    device = next(model.parameters()).device
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda i: -lengths[i])  # stable: fixed-size stays
    reduce = getattr(task, "batch_outputs", None)
    accepted = _forward_keys(model)
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    loss_sum, loss_count = 0.0, 0
    with _progress(runtime) as progress:
        bar = progress.add_task(description, total=math.ceil(len(order) / batch_size), info="")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collator([dataset[i] for i in idx])
            batch = {k: v.to(device) for k, v in batch.items() if k in accepted}
            out = task.forward(model, batch)
            if attack is not None:
                out = _attacked(model, task, batch, out, attack, space)
            if getattr(out, "loss", None) is not None:
                loss_sum += out.loss.item() * len(idx)
                loss_count += len(idx)
            arrays = reduce(out, batch) if reduce else default_batch_outputs(task, out, batch)
            for k, v in arrays.items():
                chunks.setdefault(k, []).append(v)
            progress.update(bar, advance=1)
            faults.checkpoint("eval")
    model.train()
    inverse = np.argsort(np.asarray(order))
    outputs = {}
    for k, parts in chunks.items():
        if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2),
                            constant_values=-1e4) for p in parts]
        outputs[k] = np.concatenate(parts)[inverse]
    return outputs, loss_sum / max(loss_count, 1)


def _attacked(model: nn.Module, task: Task, batch: dict[str, Any], clean: Any, attack: Any,
              space: Any) -> Any:
    """The task's worst case of the clean output and the output under ``attack``."""
    from ticketlab.attacks import perturb

    x0, delta = perturb(model, batch, task.forward, space, attack)
    adversarial = task.forward(model, space.batch_with(batch, x0, delta))
    return task.worst_case(clean, adversarial, batch)


#: Seed of the evaluation attack's random starts: every level and seed of a run is attacked
#: the same way, and the training RNG is left untouched.
EVAL_ATTACK_SEED = 1234


def evaluate(
    model: nn.Module,
    task: Task,
    eval_sets: dict[str, tuple[dict[str, list], list[dict[str, Any]]]],
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]],
    batch_size: int,
    runtime: Runtime = Runtime(),
    attack: Any = None,
    space: Any = None,
) -> dict[str, float]:
    """Score every evaluation split; metric names get the split's prefix (MNLI's ``mm_``).

    With an ``attack`` the splits are scored twice: as usual, and under the attack with the
    metric names prefixed ``robust_`` (``robust_accuracy``)."""
    metrics: dict[str, float] = {}
    for split, (features, examples) in eval_sets.items():
        prefix = task.eval_splits.get(split, f"{split}_")
        outputs, loss = predict(model, task, features, collator, batch_size, runtime,
                                description=f"eval {split}")
        for k, v in task.compute_metrics(outputs, features, examples).items():
            metrics[prefix + k] = float(v)
        metrics[prefix + "eval_loss"] = loss
        if attack is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(EVAL_ATTACK_SEED)
                outputs, loss = predict(model, task, features, collator, batch_size, runtime,
                                        description=f"attack {split}", attack=attack,
                                        space=space)
            for k, v in task.compute_metrics(outputs, features, examples).items():
                metrics[f"{prefix}robust_{k}"] = float(v)
            metrics[f"{prefix}robust_eval_loss"] = loss
    return metrics
