"""SQuAD v1.1 extractive question answering (task ``squad``, question-answering head).

Data: the official JSON files (``train-v1.1.json``, ``dev-v1.1.json`` — or any ``train*.json``
/ ``dev*.json`` in the folder, or explicit ``train_file``/``eval_file`` options), or the hub's
``rajpurkar/squad`` when no folder is given. One example is one question.

Preprocessing follows the paper's setup (BERT's run_squad, as kept in HF's ``run_qa.py``): the
question comes first and the context second; a context that does not fit ``max_length`` (384)
is split into overlapping windows with ``truncation="only_second"`` and
``return_overflowing_tokens``; each window (a *feature*) keeps the character offsets of its
context tokens, so a predicted token span maps back to text of the original context. A training
window that does not contain the whole answer is labelled with the CLS position, as in BERT.
Questions are cut to 64 tokens (BERT's ``max_query_length``) so that a rambling question can
never leave a window without room for context.

``doc_stride`` is the number of tokens consecutive windows *share* (the ``stride`` of HF
tokenizers and of ``run_qa.py``). The legacy ``run_squad.py`` that the paper's code forks used
the same number as the *step* between window starts; with 384/128 the two differ only for the
few dev contexts longer than one window (about 3 % of SQuAD's).

Post-processing: for every feature, the 20 best start and 20 best end positions among its
context tokens, all pairs with ``start <= end`` and at most 30 tokens, scored by the sum of
their logits; an example's answer is its best span over all of its features. Scores are the
official v1.1 exact match and F1 (:mod:`ticketlab.tasks.squad_metrics`); the main metric is F1.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource, Task, explicit_file
from ticketlab.tasks.squad_metrics import squad_v1_scores

#: The hub dataset used when no local folder is given.
HUB_DATASET = "rajpurkar/squad"
#: Option keys understood in ``DataSource.options``.
OPTIONS = ("train_file", "eval_file")
#: Candidate start/end positions per feature, and the longest answer in tokens (BERT's).
N_BEST = 20
MAX_ANSWER_TOKENS = 30
#: Questions are cut to this many tokens (BERT's ``max_query_length``).
MAX_QUESTION_TOKENS = 64
#: split -> (file names tried in order, glob tried last, hub split name).
_SPLITS = {
    "train": (("train-v1.1.json", "train.json"), "train*.json", "train"),
    "dev": (("dev-v1.1.json", "dev.json", "validation.json"), "dev*.json", "validation"),
}
_FILE_FIX = (
    "pass --data-dir pointing at a folder with the official train-v1.1.json and dev-v1.1.json "
    "(or --train-file/--eval-file)"
)


class QACollator:
    """Pad a list of QA features to the batch's longest member (``DataCollatorWithPadding``).

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorWithPadding

        self._pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self._pad(features))


class SquadTask(Task):
    """SQuAD v1.1: find the answer span of a question in a Wikipedia paragraph."""

    name = "squad"
    options = OPTIONS
    head = "question-answering"
    main_metric = "f1"
    eval_splits = {"dev": ""}
    output_keys = ("start_logits", "end_logits")
    settings = ("doc_stride",)
    doc_stride: int
    paper_defaults = {"lr": 3e-5, "batch_size": 16, "epochs": 2.0, "max_length": 384,
                      "doc_stride": 128}

    # ---- loading ---------------------------------------------------------------------------

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        """Questions of ``split`` as ``{"id", "title", "context", "question", "answers"}``."""
        self.check_split(split, list(_SPLITS))
        self.check_options(source)
        if source.path is None and not source.options.get(self.file_option(split)):
            return self._load_hub(split)
        return read_squad_file(self.find_file(source, split))

    def find_file(self, source: DataSource, split: str) -> Path:
        """The JSON file of ``split``: an explicit option, else a known name in the folder."""
        option = self.file_option(split)
        if source.options.get(option):
            return explicit_file(source.options[option], option, source.path)
        assert source.path is not None
        root = Path(source.path)
        if not root.is_dir():
            raise TicketlabError(f"data path {root} is a file, not a folder", _FILE_FIX)
        names, pattern, _ = _SPLITS[split]
        folders = [root] + [root / sub for sub in ("squad", "SQuAD") if (root / sub).is_dir()]
        for folder in folders:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        for folder in folders:
            found = sorted(folder.glob(pattern))
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise TicketlabError(
                    f"task squad: several {split} files in {folder}: "
                    f"{', '.join(p.name for p in found)}",
                    f"keep one, or name it with --{option.replace('_', '-')}",
                )
        raise TicketlabError(
            f"task squad: no {split} file in {root}; looked for {', '.join(names)} and "
            f"{pattern}", _FILE_FIX)

    def _load_hub(self, split: str) -> list[dict[str, Any]]:
        hub_split = _SPLITS[split][2]
        try:
            import datasets

            rows = datasets.load_dataset(HUB_DATASET, split=hub_split)
        except Exception as exc:  # any network/cache failure: the remedy is the same
            raise TicketlabError(
                f"could not load SQuAD {hub_split} from the Hugging Face hub ({HUB_DATASET}): "
                f"{type(exc).__name__}: {exc}", _FILE_FIX) from exc
        return [
            {"id": str(r["id"]), "title": r.get("title", ""), "context": r["context"],
             "question": r["question"],
             "answers": {"text": list(r["answers"]["text"]),
                         "answer_start": [int(s) for s in r["answers"]["answer_start"]]}}
            for r in rows
        ]

    # ---- features --------------------------------------------------------------------------

    def num_labels(self, train_examples: list[dict[str, Any]] | None = None) -> int:
        """Two outputs per token: start and end logits."""
        return 2

    def featurize(
        self, examples: list[dict[str, Any]], tokenizer: Any, max_length: int, split: str
    ) -> dict[str, list]:
        """Windows of (question, context) with span labels, offsets and their example's index.

        Every feature carries ``start_positions``/``end_positions`` (from the first gold
        answer on dev, so evaluation also reports a loss), ``offset_mapping`` (character
        offsets of context tokens, None elsewhere) and ``example_index``; the last two are not
        model inputs and stay out of batches.
        """
        if not getattr(tokenizer, "is_fast", False):
            raise TicketlabError(
                "task squad needs a fast tokenizer (it maps answer tokens back to characters)",
                "use a model whose folder has a tokenizer.json",
            )
        questions = self._clip_questions([ex["question"].lstrip() for ex in examples], tokenizer)
        longest = max((len(q) for q in tokenizer(questions, add_special_tokens=False)
                       ["input_ids"]), default=0)
        room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
        if self.doc_stride >= room:
            raise TicketlabError(
                f"--doc-stride {self.doc_stride} leaves no room to move the window: with "
                f"--max-length {max_length} and questions of up to {longest} tokens, a window "
                f"holds {max(room, 0)} context tokens, and the stride must be smaller.",
                "Raise --max-length (the paper: 384) or lower --doc-stride (the paper: 128).",
            )
        enc = tokenizer(questions, [ex["context"] for ex in examples], truncation="only_second",
                        max_length=max_length, stride=self.doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
        sample_map = enc["overflow_to_sample_mapping"]
        features: dict[str, list] = {"input_ids": [], "attention_mask": []}
        if "token_type_ids" in enc:
            features["token_type_ids"] = []
        features.update(start_positions=[], end_positions=[], offset_mapping=[],
                        example_index=[])
        for i, offsets in enumerate(enc["offset_mapping"]):
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in features:
                    features[key].append(enc[key][i])
            seq_ids = enc.sequence_ids(i)
            example = examples[sample_map[i]]
            ids = enc["input_ids"][i]
            cls_index = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            start, end = _span_labels(offsets, seq_ids, example["answers"], cls_index)
            features["start_positions"].append(start)
            features["end_positions"].append(end)
            features["offset_mapping"].append(
                [tuple(o) if s == 1 else None for o, s in zip(offsets, seq_ids, strict=True)])
            features["example_index"].append(sample_map[i])
        return features

    @staticmethod
    def _clip_questions(questions: list[str], tokenizer: Any) -> list[str]:
        """Cut questions longer than 64 tokens at the end of their 64th token."""
        enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
        clipped = []
        for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"],
                                   strict=True):
            long = len(ids) > MAX_QUESTION_TOKENS
            clipped.append(q[: offsets[MAX_QUESTION_TOKENS - 1][1]] if long else q)
        return clipped

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Dynamic padding; the span labels become int64 tensors."""
        return QACollator(tokenizer)

    # ---- scoring ---------------------------------------------------------------------------

    def compute_metrics(
        self,
        outputs: dict[str, np.ndarray],
        features: dict[str, list],
        examples: list[dict[str, Any]],
    ) -> dict[str, float]:
        """Official exact match and F1 of each question's best span across its windows."""
        predictions = predict_answers(outputs["start_logits"], outputs["end_logits"],
                                      features, examples)
        golds = {ex["id"]: ex["answers"]["text"] for ex in examples}
        return squad_v1_scores(predictions, golds)


def _span_labels(
    offsets: list[tuple[int, int]], seq_ids: list[int | None], answers: dict[str, list],
    cls_index: int,
) -> tuple[int, int]:
    """Token positions of the (first) answer inside this window, or (cls, cls) if it is not
    entirely inside (BERT's labelling of windows that miss the answer)."""
    if not answers["text"]:
        return cls_index, cls_index
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    context = [i for i, s in enumerate(seq_ids) if s == 1]
    if not context:
        return cls_index, cls_index
    first, last = context[0], context[-1]
    if not (offsets[first][0] <= start_char and offsets[last][1] >= end_char):
        return cls_index, cls_index
    start = first
    while start <= last and offsets[start][0] <= start_char:
        start += 1
    end = last
    while end >= first and offsets[end][1] >= end_char:
        end -= 1
    return start - 1, end + 1


def best_span(
    start_logits: np.ndarray, end_logits: np.ndarray, offsets: list[tuple[int, int] | None]
) -> tuple[float, int, int] | None:
    """The highest-scoring valid span of one feature as (score, start, end), or None.

    Candidates are the :data:`N_BEST` best starts and ends among the context tokens; a span is
    valid when ``start <= end`` and it is at most :data:`MAX_ANSWER_TOKENS` tokens long.
    Positions past the feature's own length (padding of its batch) are never candidates.
    """
    n = len(offsets)
    context = np.array([o is not None for o in offsets], dtype=bool)
    if not context.any():
        return None
    starts = np.where(context, start_logits[:n], -np.inf)
    ends = np.where(context, end_logits[:n], -np.inf)
    k = min(N_BEST, int(context.sum()))
    top_s = np.argsort(-starts, kind="stable")[:k]
    top_e = np.argsort(-ends, kind="stable")[:k]
    length = top_e[None, :] - top_s[:, None]
    scores = starts[top_s][:, None] + ends[top_e][None, :]
    scores = np.where((length >= 0) & (length < MAX_ANSWER_TOKENS), scores, -np.inf)
    flat = int(np.argmax(scores))
    i, j = divmod(flat, k)
    if not np.isfinite(scores[i, j]):
        return None
    return float(scores[i, j]), int(top_s[i]), int(top_e[j])


def predict_answers(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    features: dict[str, list],
    examples: list[dict[str, Any]],
) -> dict[str, str]:
    """Question id -> answer text: the best span over all of the question's features."""
    best: dict[int, tuple[float, str]] = {}
    for f, (ex_i, offsets) in enumerate(zip(features["example_index"],
                                            features["offset_mapping"], strict=True)):
        span = best_span(np.asarray(start_logits[f]), np.asarray(end_logits[f]), offsets)
        if span is None:
            continue
        score, s, e = span
        if ex_i not in best or score > best[ex_i][0]:
            context = examples[ex_i]["context"]
            best[ex_i] = (score, context[offsets[s][0]: offsets[e][1]])  # type: ignore[index]
    return {ex["id"]: best[i][1] if i in best else "" for i, ex in enumerate(examples)}


def read_squad_file(path: Path) -> list[dict[str, Any]]:
    """Parse an official SQuAD v1.1 JSON file into one example per question.

    Every way the file can be wrong — not JSON, not SQuAD's layout, SQuAD 2.0's unanswerable
    questions, an answer whose ``answer_start`` does not point at its text — is a
    :class:`TicketlabError` that names the file and the question.
    """
    fix = "give an official SQuAD v1.1 file (train-v1.1.json / dev-v1.1.json)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TicketlabError(f"{path} is not a readable JSON file ({exc})", fix) from exc
    articles = data.get("data") if isinstance(data, dict) else None
    if not isinstance(articles, list):
        raise TicketlabError(f"{path} has no 'data' list of articles, so it is not SQuAD", fix)
    examples: list[dict[str, Any]] = []
    try:
        for a, article in enumerate(articles):
            title = str(article.get("title", ""))
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    where = f"{path}: question {qa.get('id', '?')} (article {a} {title!r})"
                    if qa.get("is_impossible") or "plausible_answers" in qa:
                        raise TicketlabError(
                            f"{where} is a SQuAD 2.0 question (unanswerable questions)",
                            "task squad is SQuAD v1.1; give the v1.1 files")
                    texts = [str(ans["text"]) for ans in qa["answers"]]
                    starts = [int(ans["answer_start"]) for ans in qa["answers"]]
                    if not texts:
                        raise TicketlabError(f"{where} has no answer", fix)
                    for text, start in zip(texts, starts, strict=True):
                        if context[start: start + len(text)] != text:
                            raise TicketlabError(
                                f"{where}: answer {text!r} is not at character {start} of "
                                "its context", "repair the answer_start of that answer")
                    examples.append({"id": str(qa["id"]), "title": title, "context": context,
                                     "question": str(qa["question"]),
                                     "answers": {"text": texts, "answer_start": starts}})
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise TicketlabError(
            f"{path}: an article, paragraph or question lacks a SQuAD field "
            f"({type(exc).__name__}: {exc}) near question {len(examples)}", fix) from exc
    if not examples:
        raise TicketlabError(f"{path} has no questions", fix)
    return examples
