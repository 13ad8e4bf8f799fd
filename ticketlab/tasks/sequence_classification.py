"""What every sequence-classification task shares: featurisation, collation and metrics.

GLUE and the generic CSV/JSON task differ only in where examples come from. Once they are
examples (``{"text_a", "text_b", "label", "idx"}``) the path to the model is identical, so it
lives here once: one batched tokeniser call without padding (batches are padded dynamically to
their longest member, which is much cheaper than padding everything to ``max_length``), a
collator that pads and fixes the label dtype, and the metrics of :mod:`.metrics`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from ticketlab.tasks.base import Task, classification_worst_case
from ticketlab.tasks.metrics import METRICS

# --------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------


class ClassificationCollator:
    """Pad a list of features to the batch's longest member and give labels the right dtype.

    ``DataCollatorWithPadding`` infers the label dtype from the Python values, so integer-valued
    regression targets (or float64 arrays coming back from Arrow) would otherwise reach MSE loss
    as int64 or float64. A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer: Any, regression: bool) -> None:
        from transformers import DataCollatorWithPadding

        self.regression = regression
        self._pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = dict(self._pad(features))
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(torch.float32 if self.regression else torch.long)
        return batch


# --------------------------------------------------------------------------------------------
# The shared task
# --------------------------------------------------------------------------------------------


class SequenceClassificationTask(Task):
    """A task whose examples are one text or a text pair with a class id or a real score.

    Subclasses provide :meth:`load`, :attr:`label_names`, ``regression`` and ``metrics``; this
    class turns examples into features, batches and scores the same way for all of them.
    """

    head = "sequence-classification"
    #: True for a real-valued target (one output, MSE loss), e.g. STS-B.
    regression: bool = False
    #: Metric names from :data:`METRICS` reported on each evaluation split.
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    @abstractmethod
    def label_names(self) -> tuple[str, ...]:
        """Class names in label-id order; ``()`` for regression."""

    def num_labels(self, train_examples: list[dict[str, Any]] | None = None) -> int:
        """One output for regression, else one per class."""
        return 1 if self.regression else len(self.label_names)

    def featurize(
        self, examples: list[dict[str, Any]], tokenizer: Any, max_length: int, split: str
    ) -> dict[str, list]:
        """Tokenise all examples in one batched call, truncated but not padded.

        Padding is left to the collator so that each batch is only as long as its longest
        member. The split does not matter: train and eval features are built the same way.
        """
        texts_a = [ex["text_a"] for ex in examples]
        pairs = [ex.get("text_b") is not None for ex in examples]
        if any(pairs) and not all(pairs):
            raise ValueError(f"task {self.name}: some examples have text_b and some do not")
        texts_b = [ex["text_b"] for ex in examples] if examples and all(pairs) else None
        encoded = tokenizer(texts_a, texts_b, truncation=True, max_length=max_length)
        features: dict[str, list] = {
            "input_ids": list(encoded["input_ids"]),
            "attention_mask": list(encoded["attention_mask"]),
        }
        if "token_type_ids" in encoded:
            features["token_type_ids"] = list(encoded["token_type_ids"])
        cast: Callable[[Any], int | float] = float if self.regression else int
        features["labels"] = [cast(ex["label"]) for ex in examples]
        return features

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Dynamic padding via ``DataCollatorWithPadding``, labels as float32 or int64."""
        return ClassificationCollator(tokenizer, regression=self.regression)

    @property
    def robust_evaluation(self) -> bool:  # type: ignore[override]
        return not self.regression

    def worst_case(self, clean: Any, adversarial: Any, batch: dict[str, Any]) -> Any:
        """See :func:`ticketlab.tasks.base.classification_worst_case` (regression has no
        notion of a correct prediction to attack)."""
        if self.regression:
            return super().worst_case(clean, adversarial, batch)
        return classification_worst_case(clean, adversarial, batch)

    def predictions(self, logits: np.ndarray) -> np.ndarray:
        """Class ids (argmax) or, for regression, the single output column."""
        logits = np.asarray(logits)
        if self.regression:
            return logits.reshape(len(logits), -1)[:, 0].astype(np.float64)
        return logits.argmax(axis=-1)

    def compute_metrics(
        self,
        outputs: dict[str, np.ndarray],
        features: dict[str, list],
        examples: list[dict[str, Any]],
    ) -> dict[str, float]:
        """Score predictions against ``features["labels"]`` with this task's metrics.

        The result has no split prefix; the caller adds ``eval_splits``' prefix (MNLI's
        ``mm_``) so one flat dict covers every evaluation set.
        """
        preds = self.predictions(outputs["logits"])
        labels = np.asarray(features["labels"], dtype=np.float64 if self.regression else np.int64)
        if len(preds) != len(labels):
            raise ValueError(f"task {self.name}: {len(preds)} predictions but {len(labels)} labels")
        return {name: METRICS[name](preds, labels) for name in self.metrics}
