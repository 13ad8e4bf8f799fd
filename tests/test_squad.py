"""SQuAD v1.1: the official metrics by hand, windows and offsets, the loader, the CLI end to end."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.hparams import DataHparams, RunHparams
from ticketlab.store import list_runs
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource
from ticketlab.tasks.squad import MAX_ANSWER_TOKENS, SquadTask, best_span, read_squad_file
from ticketlab.tasks.squad_metrics import (
    exact_match_score,
    f1_score,
    normalize_answer,
    squad_v1_scores,
)

# --------------------------------------------------------------------------------------------
# Metrics, with every expected value worked out by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,normalised", [
    ("The Quick, Brown fox!", "quick brown fox"),   # case, punctuation, article
    ("  Denver   Broncos ", "denver broncos"),      # white space collapsed
    ("An apple a day", "apple day"),                # both other articles
    ("theater anthem", "theater anthem"),           # articles only as whole words
    ("a.m.", "am"),                                 # punctuation goes before articles
    ("the-end", "theend"),                          # ... so no article is left here
    ("The", ""),
])
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


@pytest.mark.parametrize("prediction,gold,em,f1", [
    ("Denver Broncos.", "denver broncos", 1.0, 1.0),
    # pred {cat, sat, on, mat} vs gold {cat, on, mat}: P = 3/4, R = 1 -> F1 = 6/7
    ("the cat sat on the mat", "cat on mat", 0.0, 6 / 7),
    # repeated tokens count once each on the overlap: P = 2/3, R = 1 -> F1 = 4/5
    ("Denver Denver Broncos", "Denver Broncos", 0.0, 0.8),
    # P = 1/1, R = 1/2 -> F1 = 2/3
    ("Broncos", "Denver Broncos", 0.0, 2 / 3),
    ("Carolina", "Denver Broncos", 0.0, 0.0),
    # v1.1: an answer that normalises to nothing has no tokens, hence F1 0, but EM 1
    ("the", "a", 1.0, 0.0),
])
def test_exact_match_and_f1_by_hand(prediction: str, gold: str, em: float, f1: float) -> None:
    assert exact_match_score(prediction, gold) == em
    assert math.isclose(f1_score(prediction, gold), f1)


def test_scores_take_the_best_gold_and_average_over_questions() -> None:
    golds = {"q1": ["Denver Broncos", "The Broncos"], "q2": ["Carolina Panthers"],
             "q3": ["Santa Clara"]}
    predictions = {
        "q1": "broncos",                  # EM 1 and F1 1 against "The Broncos" (2nd gold)
        "q2": "Carolina Panthers team",   # EM 0; P = 2/3, R = 1 -> F1 = 0.8
        "unknown": "ignored",             # q3 has no prediction: 0 and 0
    }
    scores = squad_v1_scores(predictions, golds)
    assert math.isclose(scores["exact_match"], 1 / 3)
    assert math.isclose(scores["f1"], (1 + 0.8 + 0) / 3)


# --------------------------------------------------------------------------------------------
# Windows, offsets, labels and post-processing
# --------------------------------------------------------------------------------------------

ANSWER = "a golden retriever called Biscuit"


def _long_example() -> dict:
    """A context of ~400 tokens with the answer near its end."""
    filler = " ".join(f"Sentence number {i} talks about the weather in town {i}."
                      for i in range(40))
    context = f"{filler} The mayor owns {ANSWER}, who sleeps all day. {filler}"[: 2600]
    start = context.index(ANSWER)
    return {"id": "long-1", "title": "t", "context": context,
            "question": "What pet does the mayor own?",
            "answers": {"text": [ANSWER], "answer_start": [start]}}


def test_windows_offsets_and_labels_on_a_long_context(minilm_tokenizer) -> None:
    task = SquadTask()
    task.doc_stride = 16
    example = _long_example()
    feats = task.featurize([example], minilm_tokenizer, 64, "train")
    n = len(feats["input_ids"])
    assert n > 5 and feats["example_index"] == [0] * n  # one question, many windows
    context = example["context"]
    spans = [[o for o in offsets if o is not None] for offsets in feats["offset_mapping"]]
    # The windows cover the context from its first to its last character ...
    assert spans[0][0][0] == 0 and spans[-1][-1][1] == len(context.rstrip())
    # ... and consecutive windows share exactly doc_stride tokens.
    for a, b in zip(spans, spans[1:], strict=False):
        assert a[-16:] == b[:16]
    # Question tokens and special tokens carry no offsets; context tokens map into the context.
    first = feats["offset_mapping"][0]
    assert first[0] is None and first[len(first) - 1] is None
    assert all(0 <= s < e <= len(context) for s, e in spans[0])
    # The windows that hold the whole answer recover it from their labels; the rest point at CLS.
    holding = [i for i, sp in enumerate(spans)
               if sp[0][0] <= example["answers"]["answer_start"][0]
               and sp[-1][1] >= example["answers"]["answer_start"][0] + len(ANSWER)]
    assert holding
    for i in range(n):
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        if i in holding:
            offsets = feats["offset_mapping"][i]
            assert context[offsets[s][0]: offsets[e][1]] == ANSWER
        else:
            assert (s, e) == (0, 0)


def test_best_span_over_all_windows_recovers_the_answer(minilm_tokenizer) -> None:
    task = SquadTask()
    task.doc_stride = 16
    example = _long_example()
    feats = task.featurize([example], minilm_tokenizer, 64, "dev")
    width = max(len(x) for x in feats["input_ids"])
    start = np.full((len(feats["input_ids"]), width), -1e4, dtype=np.float32)
    end = start.copy()
    target = next(i for i, s in enumerate(feats["start_positions"]) if s != 0)
    start[target, feats["start_positions"][target]] = 5.0
    end[target, feats["end_positions"][target]] = 5.0
    # A decoy span in another window scores lower (3 + 3 < 5 + 5): the best one wins.
    decoy = (target + 3) % len(start)
    ctx = [i for i, o in enumerate(feats["offset_mapping"][decoy]) if o is not None]
    start[decoy, ctx[0]] = end[decoy, ctx[1]] = 3.0
    scores = task.compute_metrics({"start_logits": start, "end_logits": end}, feats, [example])
    assert scores == {"exact_match": 1.0, "f1": 1.0}


def test_best_span_rules() -> None:
    offsets: list = [None] * 3 + [(i, i + 1) for i in range(60)] + [None]
    n = len(offsets)

    def logits() -> tuple[np.ndarray, np.ndarray]:  # 10 positions of batch padding at the end
        return np.full(n + 10, -10.0), np.full(n + 10, -10.0)

    start, end = logits()
    start[1] = end[1] = 100.0  # a question token: never a candidate
    start[n + 2] = 100.0       # batch padding past the feature's end: never a candidate
    start[10], end[12] = 30.0, 30.0
    assert best_span(start, end, offsets) == (60.0, 10, 12)
    start, end = logits()
    start[40], end[20] = 50.0, 50.0  # end before start: the pair is invalid
    assert best_span(start, end, offsets)[0] == 40.0  # one of them with a -10 partner
    start, end = logits()
    start[5], end[5 + MAX_ANSWER_TOKENS] = 50.0, 50.0  # 31 tokens: too long
    end[5 + MAX_ANSWER_TOKENS - 1] = 45.0                # 30 tokens: the longest allowed
    assert best_span(start, end, offsets) == (95.0, 5, 5 + MAX_ANSWER_TOKENS - 1)
    assert best_span(start, end, [None] * n) is None  # no context at all


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_loader_reads_the_official_files(shared_data: Path) -> None:
    source = DataSource(path=shared_data / "squad")
    task = get_task("squad", source)
    dev = task.load(source, "dev")
    assert len(dev) == 10_570 and len({ex["title"] for ex in dev}) == 48
    assert dev[0]["id"] == "56be4db0acb8001400a502ec"
    assert dev[0]["answers"]["text"][0] == "Denver Broncos"
    assert len(task.load(source, "train")) == 11_877  # the shared first-44-articles subset


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def _squad(context: str = "Paris is in France.", start: int = 0, text: str = "Paris",
           **qa_extra: object) -> dict:
    qa = {"id": "q1", "question": "Where?", "answers": [{"text": text, "answer_start": start}],
          **qa_extra}
    return {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": context, "qas": [qa]}]}]}


@pytest.mark.parametrize("content,message", [
    ("{not json", "not a readable JSON file"),
    ({"version": "1.1"}, "no 'data' list"),
    (_squad(is_impossible=True), "SQuAD 2.0"),
    (_squad(start=3), "is not at character 3"),
    ({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}, "lacks a SQuAD field"),
    ({"data": []}, "has no questions"),
])
def test_bad_files_are_clear_errors(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(TicketlabError, match=re.escape(message)):
        read_squad_file(_write(tmp_path / "dev-v1.1.json", content))


def test_file_discovery(tmp_path: Path) -> None:
    task = SquadTask()
    with pytest.raises(TicketlabError, match="no train file"):
        task.load(DataSource(path=tmp_path), "train")
    nested = tmp_path / "squad"
    nested.mkdir()
    _write(nested / "train-v1.1.sample.json", _squad())
    _write(nested / "dev-v1.1.json", _squad())
    source = DataSource(path=tmp_path)
    assert task.find_file(source, "train").name == "train-v1.1.sample.json"  # via train*.json
    assert task.find_file(source, "dev") == nested / "dev-v1.1.json"
    explicit = DataSource(path=None, options={"eval_file": str(nested / "train-v1.1.sample.json")})
    assert task.load(explicit, "dev")[0]["answers"]["text"] == ["Paris"]
    with pytest.raises(TicketlabError, match="unknown option"):
        SquadTask(DataSource(path=tmp_path, options={"text_column": "x"}))


def test_offline_without_data_is_one_clear_error() -> None:
    with pytest.raises(TicketlabError, match="could not load SQuAD validation from the Hugging"):
        SquadTask().load(DataSource(path=None), "dev")  # the tests run with the hub offline


def test_stride_that_leaves_no_room_is_refused(minilm_tokenizer) -> None:
    task = SquadTask()
    task.doc_stride = 60
    with pytest.raises(TicketlabError, match="--doc-stride 60 leaves no room"):
        task.featurize([_long_example()], minilm_tokenizer, 64, "train")


# --------------------------------------------------------------------------------------------
# Per-task defaults and hparams
# --------------------------------------------------------------------------------------------


def test_cli_defaults_follow_the_task() -> None:
    from ticketlab.hparams import build_hparams

    squad = build_hparams("squad", {})
    assert (squad.train.lr, squad.train.batch_size, squad.train.epochs, squad.data.max_length,
            squad.data.doc_stride) == (3e-5, 16, 2.0, 384, 128)
    glue = build_hparams("SST-2", {})
    assert (glue.train.lr, glue.train.batch_size, glue.train.epochs, glue.data.max_length,
            glue.data.doc_stride, glue.data.block_size) == (2e-5, 32, 3.0, 128, None, None)
    assert build_hparams("squad", {"lr": 1e-4}).train.lr == 1e-4
    with pytest.raises(TicketlabError, match="--doc-stride does not apply to task sst2"):
        build_hparams("sst2", {"doc_stride": 64})


def test_new_fields_leave_older_run_ids_alone() -> None:
    glue = RunHparams().identity()
    assert "doc_stride" not in glue["data"] and "block_size" not in glue["data"]
    assert "init_mlm_head_steps" not in glue["model"]
    squad = RunHparams(data=DataHparams(task="squad", max_length=384, doc_stride=128))
    assert squad.identity()["data"]["doc_stride"] == 128
    assert RunHparams.from_dict(squad.to_dict()) == squad
    with pytest.raises(TicketlabError, match="--doc-stride 384 must be at least 1 and below"):
        DataHparams(task="squad", max_length=384, doc_stride=384)


# --------------------------------------------------------------------------------------------
# Integration: MiniLM-L6, two IMP levels on a few dozen real questions, through the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_find_on_squad_with_minilm(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    result = CliRunner().invoke(app, [
        "find", "--task", "squad", "--data-dir", str(shared_data / "squad"), "--model", "minilm",
        "--max-train-samples", "16", "--max-eval-samples", "12", "--max-length", "192",
        "--doc-stride", "64", "--batch-size", "8", "--epochs", "1", "--target-sparsity", "0.1",
        "--root", str(root), "--no-progress", "--no-save-weights"])
    assert result.exit_code == 0, result.output
    assert "level  0" in result.output and "level  1" in result.output
    [run] = list_runs(root)
    hp = run.read_hparams()["hparams"]
    assert hp["train"]["lr"] == 3e-5 and hp["data"]["doc_stride"] == 64  # the paper's lr
    for level, sparsity in ((0, 0.0), (1, 0.1)):
        rec = run.metrics(level)
        assert rec["main_metric"] == "f1" and math.isclose(rec["sparsity"], sparsity, abs_tol=1e-3)
        metrics = rec["metrics"]
        assert 0.0 <= metrics["exact_match"] <= metrics["f1"] <= 1.0
        assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
