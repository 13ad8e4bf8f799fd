"""Hyperparameters as frozen dataclasses, and the hash that names a run.

As in open_lth, everything that changes what a run computes lives in one of these dataclasses,
and a run directory is named by a hash of them: the same command finds the same directory and
resumes it, a different command can never mix its levels with another run's. Settings that do
not change the result (device, logging, the target sparsity, which only says how far to go) are
kept out of the hash, so ``--target-sparsity 0.9`` continues a run that stopped at 0.7.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ticketlab.errors import TicketlabError

PRUNING_METHODS = ("global", "layerwise", "global-normalized", "random")
SCHEDULES = ("original", "remaining")

#: Section -> fields that :meth:`RunHparams.identity` hashes only when set (see there).
_ADDED_LATER = {"model": ("init_mlm_head_steps",),
                "data": ("doc_stride", "block_size", "sample_seed")}


@dataclass(frozen=True)
class ModelHparams:
    """Which pre-trained network θ0 is: a local HF folder, a hub id, or ``minilm`` (offline)."""

    model: str = "minilm"
    trust_remote_code: bool = False
    #: MLM only: steps that first train a missing MLM head (body frozen) before θ0 is taken.
    #: Part of θ0's definition, hence of the run's identity. None = no head training.
    init_mlm_head_steps: int | None = None

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
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    #: Task-specific options as sorted (key, value) pairs, e.g. CSV column names.
    options: tuple[tuple[str, str], ...] = ()
    #: SQuAD: tokens shared by consecutive windows of a long context (None = the task's 128).
    doc_stride: int | None = None
    #: MLM: tokens per training/evaluation block (None = the task's 128; the paper's code 512).
    block_size: int | None = None
    #: With ``max_train_samples``: draw the N training examples at random with this seed
    #: instead of taking the first N (transformers' run_glue.py convention). Files ordered by
    #: source need it: the first 2,000 rows of STS-B's train.tsv are all image captions.
    sample_seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise TicketlabError(
                    f"{flag} is {value}, but a run needs at least one example.",
                    f"Pass a positive {flag}, or leave it out to use the whole split.",
                )
        if self.sample_seed is not None and self.max_train_samples is None:
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
        if self.block_size is not None and self.block_size < 8:
            raise TicketlabError(
                f"--block-size {self.block_size} is too short for masked language modelling.",
                "Use 128 (the default) or the paper's 512.",
            )


@dataclass(frozen=True)
class TrainHparams:
    """One fine-tuning run. Defaults are the paper's GLUE settings (lr 2e-5, batch 32, 3 epochs)."""

    lr: float = 2e-5
    batch_size: int = 32
    epochs: float = 3.0
    max_steps: int | None = None
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    group_by_length: bool = True
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise TicketlabError(f"--lr {self.lr} must be positive.", "The paper uses 2e-5.")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise TicketlabError("Batch sizes must be at least 1.", "The paper uses 32.")
        if not self.epochs > 0 and not self.max_steps:
            raise TicketlabError(f"--epochs {self.epochs} must be positive.", "Use e.g. 3.")
        if self.max_steps is not None and self.max_steps < 1:
            raise TicketlabError(f"--max-steps {self.max_steps} must be >= 1.", "Leave it out.")
        if not 0 <= self.warmup_ratio < 1:
            raise TicketlabError(f"--warmup-ratio {self.warmup_ratio} must be in [0, 1).", "Use 0.")


@dataclass(frozen=True)
class PruneHparams:
    """How IMP prunes and rewinds.

    ``rate`` is removed per level, as a fraction of the *original* prunable weights (the paper's
    code: 10 %, 20 %, ... 90 %) or of the *remaining* ones (its Algorithm 1: 1 - 0.9^k).
    ``rewind_step`` 0 rewinds to θ0; i > 0 rewinds to θ_i, the weights after i training steps of
    the full model. The head is rewound too unless ``keep_trained_head`` (the seed code's habit).
    """

    target_sparsity: float = 0.7
    rate: float = 0.1
    schedule: str = "original"
    method: str = "global"
    rewind_step: int = 0
    keep_trained_head: bool = False
    prune_pooler: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise TicketlabError(
                f"Target sparsity {self.target_sparsity} is outside [0, 1).",
                "Give the fraction of prunable weights to remove, e.g. --target-sparsity 0.7.",
            )
        if not 0 < self.rate < 1:
            raise TicketlabError(
                f"Prune rate {self.rate} is outside (0, 1): each level must remove some weights "
                "and keep some.",
                "The paper removes 10 % per level: --rate 0.1.",
            )
        if self.schedule not in SCHEDULES:
            raise TicketlabError(
                f"Unknown schedule {self.schedule!r}.", f"Use one of: {', '.join(SCHEDULES)}."
            )
        if self.method not in PRUNING_METHODS:
            raise TicketlabError(
                f"Unknown pruning method {self.method!r}.",
                f"Use one of: {', '.join(PRUNING_METHODS)}.",
            )
        if self.rewind_step < 0:
            raise TicketlabError(f"--rewind-step {self.rewind_step} is negative.", "Use 0 for θ0.")


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
        """Rebuild from :meth:`to_dict` output (JSON turns tuples into lists; undo that)."""
        parts = {}
        for f in fields(cls):
            sub_cls = {"model": ModelHparams, "data": DataHparams,
                       "train": TrainHparams, "prune": PruneHparams}[f.name]
            raw = dict(d.get(f.name, {}))
            for sf in fields(sub_cls):
                if isinstance(raw.get(sf.name), list):
                    raw[sf.name] = tuple(tuple(x) if isinstance(x, list) else x
                                         for x in raw[sf.name])
            parts[f.name] = sub_cls(**raw)
        return cls(**parts)

    def identity(self) -> dict[str, Any]:
        """The hashed part: all of it except how far to prune.

        Fields added after runs were first stored are left out while unset, so an older run
        directory keeps its name (and ``find`` still resumes or extends it).
        """
        d = self.to_dict()
        d["prune"].pop("target_sparsity")
        for section, names in _ADDED_LATER.items():
            for name in names:
                if d[section][name] is None:
                    del d[section][name]
        return d

    def run_id(self) -> str:
        return f"{self.data.task}-{stable_hash(self.identity())}"


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short, stable hash of JSON-able data (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
