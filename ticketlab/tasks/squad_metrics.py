"""The official SQuAD v1.1 metrics: exact match and token-level F1, maximised over gold answers.

Written here rather than taken from ``evaluate.load("squad")`` because that needs the network,
and because the numbers must be exactly the official script's (``evaluate-v1.1.py``): answers
are normalised by lower-casing, removing ASCII punctuation, removing the articles a/an/the and
collapsing white space, in that order; a prediction scores the best value it reaches against
any of the question's gold answers. Scores are fractions in 0..1 like every other metric in
ticketlab (the official script prints percentages).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse white space.

    The order matters and is the official script's: punctuation goes before the articles, so
    "the-end" becomes "theend" (no article left), and "a.m." becomes "am".
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall on normalised answers (bag of tokens).

    As in the official v1.1 script, no overlap (also: either side normalises to nothing)
    scores 0.
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_over_gold(
    metric: Callable[[str, str], float], prediction: str, golds: Sequence[str]
) -> float:
    """The best score of ``prediction`` against any gold answer (0 when there is none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)


def squad_v1_scores(
    predictions: Mapping[str, str], golds: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """``exact_match`` and ``f1`` over every question in ``golds``.

    A question without a prediction scores 0 on both, as in the official script (which
    prints a warning for it); predictions for unknown ids are ignored.
    """
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for qid, answers in golds.items():
        if qid not in predictions:
            continue
        em += max_over_gold(exact_match_score, predictions[qid], answers)
        f1 += max_over_gold(f1_score, predictions[qid], answers)
    return {"exact_match": em / len(golds), "f1": f1 / len(golds)}
