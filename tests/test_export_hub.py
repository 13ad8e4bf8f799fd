"""Hub-ready exports (issue 15.3): label names, a model card, a from_pretrained hint on the
compressed form, and --push-to-hub checked against a local folder instead of the network."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import ModelCard
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.export import INFO_FILE, TICKET_FILE, export_level, load_ticket
from ticketlab.hparams import DataHparams, ModelHparams, PruneHparams, RunHparams, TrainHparams
from ticketlab.imp import find_ticket
from ticketlab.train import Runtime


def _quiet() -> Console:
    return Console(file=open(os.devnull, "w"))  # noqa: SIM115


def _run(model_dir: Path, data: DataHparams, root: Path) -> Any:
    hp = RunHparams(model=ModelHparams(model=str(model_dir)), data=data,
                    train=TrainHparams(lr=1e-3, batch_size=16, epochs=1, seed=0),
                    prune=PruneHparams(target_sparsity=0.36, rate=0.2))
    return find_ticket(hp, root, Runtime(progress=False), _quiet())


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, glue_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An SST-2 run and a CSV run with three string labels, levels 0-2 (weights stored)."""
    root = tmp_path_factory.mktemp("runs")
    sst2 = _run(tiny_bert_dir, DataHparams(task="sst2", data_dir=str(glue_dir),
                                           max_train_samples=64, max_eval_samples=32,
                                           max_length=32), root)
    data = tmp_path_factory.mktemp("reviews")
    rng = random.Random(0)
    for name, n in (("train.csv", 60), ("dev.csv", 15)):
        with open(data / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for i in range(n):
                label = ("so-so", "good", "bad")[i % 3]
                w.writerow([f"{label} {' '.join(rng.choice('abcde') for _ in range(5))}", label])
    reviews = _run(tiny_bert_dir, DataHparams(task="csv", data_dir=str(data), max_length=32),
                   root)
    return {"root": root, "sst2": sst2, "csv": reviews, "csv_data": data}


def test_hf_export_has_label_names_and_a_model_card(runs, tmp_path):
    from transformers import pipeline

    out = tmp_path / "hf"
    ticket = export_level(runs["sst2"].path, 2, out, runs["root"])
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert config["label2id"] == {"negative": 0, "positive": 1}
    classify = pipeline("text-classification", model=str(out))
    assert classify("a gripping, beautifully acted film .")[0]["label"] in ("negative",
                                                                           "positive")

    card = ModelCard.load(out / "README.md")  # the Hub's own parser of the front matter
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert card.data.datasets == ["nyu-mll/glue"] and "lottery-ticket" in card.data.tags
    assert card.data.base_model is None  # a local model folder: no Hub id to name
    level0 = runs["sst2"].metrics(0)["score"]
    text = card.text
    assert f"{ticket.info['sparsity']:.2%}" in text
    assert f"{ticket.info['score']:.4f}" in text and f"{level0:.4f}" in text  # vs full model
    assert "Iterative magnitude pruning" in text and "rewound" in text
    assert "AutoModelForSequenceClassification.from_pretrained" in text
    assert "`negative`" in text and "`positive`" in text
    assert json.loads((out / INFO_FILE).read_text())["full_score"] == level0


def test_csv_export_uses_the_csv_labels_and_falls_back_when_the_data_is_gone(runs, tmp_path):
    export_level(runs["csv"].path, 1, tmp_path / "a", runs["root"])
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["id2label"] == {"0": "bad", "1": "good", "2": "so-so"}  # the CSV's own

    data = runs["csv_data"]
    moved = data.with_name(data.name + "-moved")
    data.rename(moved)
    try:
        result = CliRunner().invoke(app, ["export", runs["csv"].path.name, "--level", "1",
                                          "--to", str(tmp_path / "b"), "--root",
                                          str(runs["root"])])
    finally:
        moved.rename(data)
    assert result.exit_code == 0, result.output
    assert "could not be read" in result.output  # said, not hidden
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    card = (tmp_path / "b" / "README.md").read_text()
    assert "`LABEL_0` … `LABEL_2`" in card and "could not be read at export time" in card


def test_compressed_folder_tells_from_pretrained_to_use_load_ticket(runs, tmp_path):
    """transformers 5 quotes config.json's transformers_weights when it is no weights file
    name: that is where the hint goes (without it: "no file named model.safetensors")."""
    from transformers import AutoModelForSequenceClassification, pipeline

    out = tmp_path / "c"
    export_level(runs["sst2"].path, 2, out, runs["root"], compressed=True)
    for load in (lambda: AutoModelForSequenceClassification.from_pretrained(out),
                 lambda: pipeline("text-classification", model=str(out))):
        with pytest.raises(ValueError, match=r"ticketlab\.load_ticket"):
            load()
    model = load_ticket(out)  # ticketlab itself ignores the hint
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert not hasattr(model.config, "transformers_weights")
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name is None and "compressed-ticket" in card.data.tags
    assert "ticketlab.load_ticket" in card.text and "cannot read it" in card.text
    assert "size" in card.text and TICKET_FILE in card.text


class FakeHub:
    """Stands in for huggingface_hub.HfApi: "uploads" to a local folder exactly the files
    upload_folder would send (every file under folder_path minus the Hub's default ignores)."""

    def __init__(self, remote: Path, fail: Exception | None = None) -> None:
        self.remote, self.fail, self.calls = remote, fail, []

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", repo_id, kwargs))
        if self.fail:
            raise self.fail
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> None:
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", repo_id, kwargs))
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*"))
                 if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                       ignore_patterns=[*DEFAULT_IGNORE_PATTERNS,
                                                        *(kwargs.get("ignore_patterns") or [])]):
            dest = self.remote / repo_id / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, dest)


@pytest.fixture()
def online(monkeypatch):
    """Online with a token, as far as ticketlab can tell (the network itself is faked)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")


@pytest.mark.parametrize("compressed", [False, True])
def test_push_to_hub_uploads_exactly_the_export(runs, tmp_path, monkeypatch, online,
                                                compressed):
    import ticketlab.hub as hub

    fake = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "hub_api", lambda: fake)
    out = tmp_path / "ticket"
    result = CliRunner().invoke(app, [
        "export", runs["sst2"].path.name, "--level", "2", "--to", str(out), "--root",
        str(runs["root"]), "--push-to-hub", "me/sst2-ticket",
        *(["--compressed"] if compressed else [])])
    assert result.exit_code == 0, result.output
    assert "pushed" in result.output and "https://huggingface.co/me/sst2-ticket" in result.output
    uploaded = tmp_path / "remote" / "me" / "sst2-ticket"
    exported = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {p.name: p.read_bytes() for p in uploaded.iterdir()} == exported
    expected = {"README.md", "config.json", INFO_FILE, "tokenizer.json",
                "tokenizer_config.json", TICKET_FILE if compressed else "model.safetensors"}
    assert set(exported) == expected
    [(_, repo, create), (_, repo2, upload)] = fake.calls
    assert repo == repo2 == "me/sst2-ticket"
    assert create == {"repo_type": "model", "private": False, "exist_ok": True}
    assert upload["repo_type"] == "model" and "level 2" in upload["commit_message"]


def test_push_to_hub_offline_or_without_token_is_one_clear_error(runs, tmp_path, monkeypatch):
    """Checked before exporting: a refused push writes nothing."""
    import huggingface_hub.constants

    import ticketlab.hub as hub

    monkeypatch.setattr(hub, "hub_api", lambda: pytest.fail("no Hub call may be made"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    args = ["export", runs["sst2"].path.name, "--level", "2", "--to", str(tmp_path / "t"),
            "--root", str(runs["root"]), "--push-to-hub"]

    def refused(repo: str, *words: str) -> None:
        result = CliRunner().invoke(app, [*args, repo])
        assert result.exit_code == 2, result.output
        assert result.output.count("Error:") == 1 and "Fix:" in result.output
        assert "Traceback" not in result.output
        for word in words:
            assert word in result.output, result.output
        assert not (tmp_path / "t").exists()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline and no token: one error, offline's
    refused("me/ticket", "offline", "HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    refused("me/ticket", "no Hugging Face token", "hf auth login")
    refused("not a repo!", "not a Hub repo id")


def test_a_failed_upload_is_one_clear_error_and_keeps_the_export(runs, tmp_path, monkeypatch,
                                                                online):
    import ticketlab.hub as hub

    monkeypatch.setattr(hub, "hub_api", lambda: FakeHub(
        tmp_path / "remote", fail=ConnectionError("Name or service not known")))
    out = tmp_path / "t"
    result = CliRunner().invoke(app, ["export", runs["sst2"].path.name, "--level", "2", "--to",
                                      str(out), "--root", str(runs["root"]), "--push-to-hub",
                                      "me/ticket"])
    assert result.exit_code == 2 and "Name or service not known" in result.output
    assert "rerun the same command" in result.output and "Traceback" not in result.output
    assert (out / "model.safetensors").is_file()  # the export is complete; a rerun pushes
