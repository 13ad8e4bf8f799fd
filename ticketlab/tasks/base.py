"""What a task is: where its data comes from, how it becomes model inputs, how it is scored.

The training loop (:mod:`ticketlab.train`) is shared by every task. A task only answers the
questions that really differ between GLUE, SQuAD and MLM: which head the model needs, how raw
examples become tokenised features, how a batch is collated and how predictions are scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ticketlab.errors import TicketlabError

if TYPE_CHECKING:
    from ticketlab.hparams import DataHparams

#: The ``AutoModelFor...`` family a task needs. Masks transfer between heads because the
#: prunable set is the encoder body's, which all of them share.
HEADS = ("sequence-classification", "question-answering", "masked-lm")


@dataclass(frozen=True)
class DataSource:
    """Where a task reads its data: a local folder or file, or the hub when ``path`` is None.

    ``options`` holds task-specific settings (column names for the generic CSV/JSON task);
    they are part of the run's hparams, so they are plain strings.
    """

    path: Path | None = None
    options: dict[str, str] = field(default_factory=dict)


class Task(ABC):
    """A task: data loading, featurisation, collation and metrics.

    Subclasses set ``name``, ``head``, ``main_metric`` and the splits. ``eval_splits`` maps each
    evaluation split to the prefix its metrics get (MNLI: ``{"dev_matched": "",
    "dev_mismatched": "mm_"}``), so one flat metrics dict covers every evaluation set.
    """

    name: str
    head: str = "sequence-classification"
    main_metric: str = "accuracy"
    train_split: str = "train"
    eval_splits: dict[str, str] = {"dev": ""}
    #: The paper's settings for this task, keyed by training-option name. The CLI fills in each
    #: one the user did not pass, so ``find --task squad`` trains like the paper without flags.
    #: Task-specific settings (SQuAD's ``doc_stride``, MLM's ``block_size``) appear only on the
    #: tasks they apply to; passing them for another task is an error. The base values are
    #: the paper's GLUE settings (lr 2e-5, batch 32, 3 epochs, 128 tokens).
    #: Adversarial training of text (used only with --adversarial/--eval-attack): FreeLB's
    #: SST-2 settings (zhuchen03/FreeLB, huggingface-transformers/launch/run_glue.sh: adv-lr
    #: 1e-1, 2 ascent steps), in an L2 ball per token of radius 0.2 — about a fifth of a
    #: MiniLM word embedding's norm (mean 1.07); FreeLB's own SST-2 run leaves the ball
    #: unbounded (adv-max-norm 0), which a robust-accuracy number cannot use.
    paper_defaults: dict[str, Any] = {"lr": 2e-5, "batch_size": 32, "epochs": 3.0,
                                      "max_length": 128, "adv_norm": "l2", "adv_eps": 0.2,
                                      "adv_step": 0.1, "adv_steps": 2}

    #: Task-specific DataHparams fields (SQuAD's ``doc_stride``, MLM's ``block_size``): each is
    #: an attribute holding the paper's default until :meth:`configure` reads the run's value.
    settings: tuple[str, ...] = ()

    def __init__(self, source: DataSource | None = None) -> None:
        """``source``, when given, has its options checked now: an option meant for another
        task fails before any work starts."""
        self.source = source
        for name in self.settings:
            setattr(self, name, self.paper_defaults[name])
        if source is not None:
            self.check_options(source)

    def configure(self, data: DataHparams) -> None:
        """Take task-specific settings (:attr:`settings`) from the run's data hparams before
        featurising; None keeps the paper's default. Called by
        :func:`ticketlab.experiment.prepare`; most tasks need nothing beyond ``max_length``
        (handed to :meth:`featurize`)."""
        for name in self.settings:
            value = getattr(data, name)
            if value is not None:
                setattr(self, name, value)

    def check_split(self, split: str, splits: Sequence[str]) -> None:
        """Refuse a split name this task does not have."""
        if split not in splits:
            raise TicketlabError(f"task {self.name} has no split {split!r}",
                                 f"use one of: {', '.join(splits)}")

    #: The data options this task accepts (``--train-file``, CSV column names...); any other
    #: key in ``DataSource.options`` is refused by :meth:`check_options`.
    options: tuple[str, ...] = ()

    def check_options(self, source: DataSource) -> None:
        """Refuse an option this task does not take: it is a typo or meant for another task,
        and silently ignoring it would train on data the user did not mean."""
        unknown = sorted(set(source.options) - set(self.options))
        if unknown:
            raise TicketlabError(f"task {self.name}: unknown option(s) {', '.join(unknown)}",
                                 f"task {self.name} takes only: {', '.join(self.options)}")

    def file_option(self, split: str) -> str:
        """The option that names ``split``'s file explicitly: train_file or eval_file."""
        return "train_file" if split == self.train_split else "eval_file"

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        """One forward pass on a batch, for training (``.loss``) and evaluation alike.

        The shared loop calls this rather than ``model(**batch)`` so that a task can change
        what is computed without a loop of its own: MLM scores only the masked positions.
        """
        return model(**batch)

    @abstractmethod
    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        """Read raw examples of ``split``. Raise TicketlabError on missing/empty/malformed data."""

    @abstractmethod
    def num_labels(self, train_examples: list[dict[str, Any]] | None = None) -> int:
        """How many outputs the head needs (1 = regression)."""

    @abstractmethod
    def featurize(
        self, examples: list[dict[str, Any]], tokenizer: Any, max_length: int, split: str
    ) -> dict[str, list]:
        """Tokenise examples into a dict of equal-length lists (``input_ids``, ``labels``...)."""

    @abstractmethod
    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """A function that pads a list of features into a batch of tensors."""

    @abstractmethod
    def compute_metrics(
        self,
        outputs: dict[str, np.ndarray],
        features: dict[str, list],
        examples: list[dict[str, Any]],
    ) -> dict[str, float]:
        """Score the model's concatenated outputs (e.g. ``logits``) on one evaluation split."""

    #: Keys of the model output that evaluation gathers for :meth:`compute_metrics`.
    output_keys: tuple[str, ...] = ("logits",)
    #: What a task's examples are: ``"text"`` (a tokenizer featurises them) or ``"image"``.
    #: Checked against the model family's ``inputs`` when a run is prepared.
    inputs: str = "text"
    #: Feature keys that are model inputs (the rest of a task's features — offsets, example
    #: ids — stay out of the batches).
    feature_keys: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels",
                                     "start_positions", "end_positions")
    #: The feature whose length groups training batches and sorts evaluation; None for
    #: fixed-size inputs.
    length_key: str | None = "input_ids"

    #: Whether ``--eval-attack`` can score this task (a notion of a correct prediction).
    robust_evaluation: bool = False

    def worst_case(self, clean: Any, adversarial: Any, batch: dict[str, Any]) -> Any:
        """Per example, the output an adversary would choose between the clean input and its
        attacked one (both are in the ε-ball); robust metrics are computed from it."""
        raise TicketlabError(f"Task {self.name} has no robust evaluation.",
                             "Use --eval-attack with a classification task.")


def classification_worst_case(clean: Any, adversarial: Any, batch: dict[str, Any]) -> Any:
    """The adversarial logits where the clean prediction is right, the clean ones where it is
    already wrong: an example counts as robust only if both are classified correctly, so
    robust accuracy can never exceed standard accuracy (RobustBench's convention)."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    right = clean.logits.argmax(-1) == batch["labels"]
    logits = torch.where(right.unsqueeze(-1), adversarial.logits, clean.logits)
    return SequenceClassifierOutput(loss=adversarial.loss, logits=logits)



def explicit_file(value: str, option: str, root: Path | None) -> Path:
    """The file an option such as ``--train-file`` names: as given, or relative to the data
    folder ``root`` when it does not exist as given."""
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists() and root is not None and Path(root).is_dir():
        path = Path(root) / path
    if not path.is_file():
        raise TicketlabError(f"{option} {value} does not exist",
                             f"set --{option.replace('_', '-')} to an existing file")
    return path


def default_batch_outputs(
    task: Task, outputs: Any, batch: dict[str, Any]
) -> dict[str, np.ndarray]:
    """What evaluation keeps of one batch: the task's ``output_keys`` as float32 numpy arrays.

    A task whose raw outputs are too large to keep (MLM logits are batch × length × vocab)
    defines ``batch_outputs(outputs, batch)`` to reduce them on the fly instead.
    """
    return {k: getattr(outputs, k).detach().float().cpu().numpy() for k in task.output_keys}
