"""Metrics computed offline with scikit-learn and scipy (never ``evaluate.load``, which needs
the network), shared by every task that classifies or regresses, text or image.

All return plain floats in 0..1 (correlations in -1..1), never percents, so that every task's
numbers are on the same scale in logs and result files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

MetricFn = Callable[[np.ndarray, np.ndarray], float]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of exact matches."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def binary_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (label 1), the GLUE convention for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1, so rare classes count as much as common ones."""
    from sklearn.metrics import f1_score

    return float(f1_score(labels, preds, average="macro", zero_division=0))


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA's metric): robust to CoLA's class imbalance."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(labels, preds))


def _correlation(fn: Callable[..., Any], preds: np.ndarray, labels: np.ndarray) -> float:
    """Run a scipy correlation; an undefined one (constant input) scores 0, not NaN.

    A freshly initialised or heavily pruned regressor can predict a constant. Its correlation
    is undefined, and a NaN would poison "best checkpoint" comparisons, so it counts as no
    correlation at all.
    """
    from scipy.stats import ConstantInputWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(fn(np.asarray(preds, dtype=np.float64), np.asarray(labels, np.float64))[0])
    return value if math.isfinite(value) else 0.0


def pearson(preds: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation (STS-B's main metric)."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (STS-B's second metric)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


#: Metric name (as it appears in results) -> function(preds, labels).
METRICS: dict[str, MetricFn] = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "macro_f1": macro_f1,
    "matthews_correlation": matthews_correlation,
    "pearson": pearson,
    "spearmanr": spearman,
}
