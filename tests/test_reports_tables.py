"""Tables (issue 15.2): readable at 80 columns and when piped — every number whole, the least
useful columns left out and named — and ``--json``/``--csv`` for scripts from ``runs``,
``show``, ``describe``, ``bench``, ``matching`` and ``table``."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.cli.app import console
from ticketlab.reports.tables import Column, Table, bench_table, fixed
from ticketlab.train import Runtime

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory, tiny_bert_dir, glue_dir):
    """A tiny IMP run with its weights: levels 0 and 1 (50 %)."""
    from ticketlab.hparams import (
        DataHparams,
        ModelHparams,
        PruneHparams,
        RunHparams,
        TrainHparams,
    )
    from ticketlab.imp import find_ticket

    hp = RunHparams(model=ModelHparams(model=str(tiny_bert_dir)),
                    data=DataHparams(task="sst2", data_dir=str(glue_dir), max_train_samples=64,
                                     max_eval_samples=32, max_length=32),
                    train=TrainHparams(lr=1e-3, batch_size=16, epochs=1, seed=0),
                    prune=PruneHparams(target_sparsity=0.5, rate=0.5))
    root = tmp_path_factory.mktemp("tables") / "runs"
    return find_ticket(hp, root, Runtime(progress=False), Console(file=open(os.devnull, "w")))  # noqa: SIM115


@pytest.fixture()
def narrow(monkeypatch):
    """The CLI's console at 80 columns (a standard terminal, and what rich uses when piped)."""
    monkeypatch.setattr(console, "width", 80)
    return 80


def lines_of(text: str) -> list[str]:
    return [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()]


def test_a_wide_table_fits_80_columns_without_cutting_a_number() -> None:
    rows = [{"threads": 2, "batch": 32, "dense_ms": 1533.4, "accel_ms": 415.3,
             "dense_seq_per_s": 20.9, "accel_seq_per_s": 77.05, "speedup": 3.69,
             "cpu_speedup": None, "sparse_layers": "36/37", "max_abs_logit_diff": 3.8e-7}]
    table = bench_table(rows, "dense vs accelerated, level 9 (90.0% sparse)")
    with console.capture() as cap:
        console.print(table.to_rich(80))
    text = cap.get()
    assert "…" not in text and max(len(line) for line in lines_of(text)) <= 80
    for value in ("1533.4", "415.3", "3.69x"):
        assert value in text
    assert "left out to fit 80 columns: dense seq/s, accel seq/s" in " ".join(text.split())
    # wide enough: everything is shown, nothing is named as left out
    with console.capture() as cap:
        console.print(table.to_rich(200))
    assert "left out" not in cap.get() and "dense seq/s" in cap.get() and "20.9" in cap.get()


def test_free_text_wraps_before_columns_are_dropped() -> None:
    table = Table([Column("name", "matrix", align="left", wrap=True),
                   Column("v", "value", fixed(".3f")), Column("w", "spare", drop=1)])
    table.add({"name": "encoder.layer.0.attention.self.query.weight", "v": 0.12345, "w": 7})
    visible, widths = table.layout(48)
    assert visible == [0, 1, 2] and widths[1] == 5  # the number keeps its width
    assert widths[0] == 28 < len("encoder.layer.0.attention.self.query.weight")
    visible, widths = table.layout(30)
    assert visible == [0, 1] and widths == {0: 18, 1: 5}  # the spare column goes first,
    # then the name wraps tighter; the number is never cut


def test_runs_and_show_print_json_and_csv(stored_run, narrow) -> None:
    root = stored_run.path.parent
    listing = invoke("runs", "--root", root)
    assert listing.exit_code == 0 and "…" not in listing.output
    assert stored_run.path.name in listing.output  # the run id is never cut
    assert max(len(line) for line in lines_of(listing.output)) <= 80

    result = invoke("runs", "--root", root, "--json")
    [rec] = json.loads(result.stdout)
    assert rec["run"] == stored_run.path.name and rec["kind"] == "imp" and rec["task"] == "sst2"
    assert rec["levels"] == [0, 1] and rec["sparsity_reached"] == pytest.approx(0.5)
    assert rec["full_score"] == stored_run.metrics(0)["score"]
    assert rec["main_metric"] == "accuracy" and rec["path"] == str(stored_run.path)
    assert set(rec) >= {"best_level", "best_sparsity", "model"}
    rows = list(csv.DictReader(io.StringIO(invoke("runs", "--root", root, "--csv").stdout)))
    assert rows[0]["run"] == stored_run.path.name and rows[0]["levels"] == "[0, 1]"
    assert json.loads(invoke("runs", "--root", root / "empty", "--json").stdout) == []

    shown = json.loads(invoke("show", stored_run.path.name, "--root", root, "--json").stdout)
    assert set(shown) == {"run", "path", "kind", "hparams", "levels", "damaged"}
    assert shown["hparams"]["train"]["lr"] == 1e-3 and shown["damaged"] == {}
    assert [lv["level"] for lv in shown["levels"]] == [0, 1]
    assert shown["levels"][1] == stored_run.metrics(1)  # every field of metrics.json
    levels = list(csv.DictReader(io.StringIO(
        invoke("show", stored_run.path.name, "--root", root, "--csv").stdout)))
    assert [r["level"] for r in levels] == ["0", "1"]
    assert float(levels[1]["sparsity"]) == pytest.approx(0.5)
    both = invoke("runs", "--root", root, "--json", "--csv")
    assert both.exit_code == 2 and "--json and --csv were both given" in both.output


def test_describe_fits_80_columns_and_prints_json(tiny_bert_dir, narrow) -> None:
    text = invoke("describe", "--model", tiny_bert_dir).output
    assert "…" not in text and max(len(line) for line in lines_of(text)) <= 80
    assert "@90%" in text and "13 matrices" in text
    doc = json.loads(invoke("describe", "--model", tiny_bert_dir, "--json").stdout)
    assert set(doc) == {"model", "family", "prunable_weights", "model_weights", "matrices",
                        "warnings", "notes"}
    assert len(doc["matrices"]) == 13 and doc["prunable_weights"] == sum(
        m["numel"] for m in doc["matrices"])
    first = doc["matrices"][0]
    assert set(first) == {"name", "role", "shape", "numel", "mean_abs", "std", "outlier",
                          "global_0.1", "global_0.5", "global_0.9"}
    assert first["shape"] == [32, 32] and first["role"] == "Q"
    rows = list(csv.DictReader(io.StringIO(
        invoke("describe", "--model", tiny_bert_dir, "--csv").stdout)))
    assert rows[0]["name"] == first["name"] and float(rows[0]["global_0.9"]) > 0


def test_bench_prints_json_on_stdout_and_its_messages_on_stderr(stored_run, tmp_path) -> None:
    png = tmp_path / "b.png"
    result = invoke("bench", stored_run.path.name, "--level", "1", "--root",
                    stored_run.path.parent, "--batch-sizes", "1", "--seq-len", "16",
                    "--threads", "1", "--reps", "1", "--png", png, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # nothing but the document on stdout
    assert "Calibrating" in result.stderr and "plot:" in result.stderr
    assert doc["run"] == stored_run.path.name and doc["level"] == 1
    assert doc["sparsity"] == pytest.approx(0.5) and doc["png"] == str(png)
    [row] = doc["results"]
    assert set(row) == {"threads", "batch", "dense_ms", "accel_ms", "dense_seq_per_s",
                        "accel_seq_per_s", "speedup", "cpu_speedup", "sparse_layers",
                        "max_abs_logit_diff"}
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["accel_ms"])
    assert [p["sparsity"] for p in doc["levels"]] == pytest.approx([0.0, 0.5])
    rows = list(csv.DictReader(io.StringIO(invoke(
        "bench", stored_run.path.name, "--level", "1", "--root", stored_run.path.parent,
        "--batch-sizes", "1", "--seq-len", "16", "--threads", "1", "--reps", "1", "--png",
        png, "--no-sweep", "--csv").stdout)))
    assert rows[0]["batch"] == "1" and float(rows[0]["dense_ms"]) > 0


def test_matching_and_table_print_json(tiny_bert_dir, glue_dir, tmp_path) -> None:
    root, out = tmp_path / "runs", tmp_path / "out"
    result = invoke("matching", "--task", "sst2", "--seeds", "1", "--target-sparsity", "0.1",
                    "--data-dir", glue_dir, "--model", tiny_bert_dir, "--max-train-samples",
                    "32", "--max-eval-samples", "16", "--max-length", "32", "--batch-size",
                    "16", "--epochs", "1", "--root", root, "--no-progress",
                    "--no-save-weights", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads((out / "matching-sst2.json").read_text())
    assert set(doc) == {"task", "metric", "seeds", "full", "levels", "highest_matching",
                        "highest_strictly_matching", "runs"}
    assert [lv["level"] for lv in doc["levels"]] == [1] and doc["seeds"] == [0]
    assert "level 1" in result.stderr  # the training's own lines went to stderr
    table2 = json.loads(invoke("table", "--root", root, "--format", "json").stdout)
    assert table2[0]["task"] == "sst2" and table2[0]["full"] == doc["full"]
