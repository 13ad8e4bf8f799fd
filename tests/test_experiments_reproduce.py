"""``reproduce``: presets, the QNLI split, the report, and resume across invocations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import ticketlab.experiments.sweep as sweep
from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.experiments.reproduce import (
    budget,
    preset,
    reproduce,
    split_dev_for_training,
)
from ticketlab.experiments.rewinding import train_size
from ticketlab.experiments.sweep import Spec
from ticketlab.reports.documents import to_toml
from ticketlab.train import Runtime

QUIET = Runtime(progress=False, save_weights=False)


def test_qnli_dev_is_split_into_train_and_eval(glue_dir, tmp_path) -> None:
    dev = glue_dir / "QNLI" / "dev.tsv"
    folder = split_dev_for_training(dev, tmp_path / "QNLI", 1000, seed=0)
    header, *rows = dev.read_text(encoding="utf-8").splitlines()
    train = (folder / "train.tsv").read_text(encoding="utf-8").splitlines()
    held = (folder / "dev.tsv").read_text(encoding="utf-8").splitlines()
    assert train[0] == held[0] == header
    assert len(held) == 1001 and len(train) == len(rows) - 1000 + 1
    assert sorted(train[1:] + held[1:]) == sorted(rows)  # a partition of the dev rows
    again = split_dev_for_training(dev, tmp_path / "again", 1000, seed=0)
    assert (again / "dev.tsv").read_text() == (folder / "dev.tsv").read_text()
    with pytest.raises(TicketlabError, match="too few to hold out"):
        split_dev_for_training(glue_dir / "WNLI" / "dev.tsv", tmp_path / "w", 500)


def test_the_small_preset_is_a_valid_spec_with_a_budget(glue_dir, tmp_path) -> None:
    spec = preset("small", glue_dir, tmp_path / "report")
    assert spec.tasks == ["sst2", "cola", "mrpc", "stsb", "wnli", "qnli"]
    assert spec.hparams["prune_pooler"] is False and spec.seeds == [0, 1, 2]
    assert "pooler" in spec.description  # the report says why
    qnli = spec.hparams_for("qnli", 0)
    assert qnli.data.data_dir == str((tmp_path / "report" / "data").resolve())
    assert train_size(qnli) == 2000  # of the 5,463 - 1,000 rows not held out
    assert Spec.from_dict(sweep.tomllib.loads(to_toml(spec.to_dict()))).to_dict() == spec.to_dict()
    sizes = {t: train_size(spec.hparams_for(t, 0)) for t in spec.tasks}
    assert sizes["sst2"] == 2000 and sizes["mrpc"] == 2000 and sizes["wnli"] == 635
    work = budget(spec, sizes)
    assert work.trainings["imp"] == 6 * 3 * 4  # tasks × seeds × levels 0-75 % by 25 %
    assert work.steps["imp"] == 3 * 4 * sum(2 * -(-n // 32) for n in sizes.values())
    assert spec.baseline_seeds == [0]
    # 4 kinds × 1 seed; standard trains the full model and then the pruned one
    assert work.trainings["baselines"] == 6 * (3 + 2)
    assert set(work.trainings) == {"imp", "rewinding", "baselines", "transfer"}
    paper = preset("paper", None, tmp_path / "paper")
    assert paper.hparams["lr"] == 2e-5 and paper.seeds == [0, 1, 2, 3, 4]
    with pytest.raises(TicketlabError, match="needs --data-dir"):
        preset("small", None, tmp_path)
    with pytest.raises(TicketlabError, match="Unknown scale"):
        preset("huge", glue_dir, tmp_path)


def tiny_spec(model: Path, glue: Path) -> Spec:
    return Spec.from_dict({
        "name": "tiny",
        "description": "Tiny on purpose:\n\n- **two** tasks\n- one `seed`",
        "hparams": {"model": str(model), "data_dir": str(glue), "max_train_samples": 64,
                    "max_eval_samples": 32, "max_length": 32, "lr": 1e-3, "batch_size": 16,
                    "epochs": 1, "weight_decay": 0.01, "target_sparsity": 0.1},
        "grid": {"tasks": ["sst2", "cola"], "seeds": 1, "baselines": ["random"]},
        "rewinding": {"tasks": ["sst2"], "fractions": [0.0, 0.5], "sparsity": 0.1},
        "transfer": {"sparsity": 0.1},
    })


def test_reproduce_writes_the_report_and_resumes(tiny_bert_dir, glue_dir, tmp_path,
                                                 monkeypatch) -> None:
    spec = tiny_spec(tiny_bert_dir, glue_dir)
    out = tmp_path / "report"
    index = reproduce(spec, out, runtime=QUIET, console=Console(quiet=True))
    readme = (out / "README.md").read_text()
    assert "## Why these settings\n\nTiny on purpose:" in readme
    # results first, then what they cost and the settings (issue 15.6)
    order = [readme.index(h) for h in ("## Table 2", "## Figure 2", "## Masks",
                                        "## Time per part", "## Why these settings",
                                        "## Settings")]
    assert order == sorted(order)
    for heading in ("## Table 2", "## Figure 2: transfer at 10% sparsity",
                    "## Sparsity–score curves", "## Rewinding", "## Masks", "## Time per part",
                    "## Settings"):
        assert heading in readme, heading
    assert "| Full model |" in readme and "| Random pruning |" in readme
    html = index.read_text()
    assert html.startswith("<!doctype html>") and "<img src='transfer.png'" in html
    assert html.index("<h2") == html.index("<h2 id='table-2")  # a result comes first
    assert "<nav><a href='#table-2" in html
    # the transfer table's cells are shaded by their value, like the heatmap
    transfer = html[html.index("id='figure-2"):html.index("id='sparsity")]
    assert "style='background:#" in transfer
    assert "<ul><li><strong>two</strong> tasks</li><li>one <code>seed</code></li></ul>" in html
    for name in ("transfer.png", "curves_sst2.png", "curves_cola.png", "mask_overlap.png",
                 "mask_sparsity.png", "rewinding_sst2/rewinding.png", "table2.tex",
                 "spec.toml", "timings.json"):
        assert (out / name).is_file(), name
        assert name in readme or name.endswith((".tex", ".toml", ".json")), name
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"imp", "rewinding", "baselines", "transfer"}
    assert timings["imp"]["cells_run"] == 2 and timings["imp"]["wall_seconds"] > 0
    assert Spec.load(out / "spec.toml").to_dict() == spec.to_dict()

    ran: list[str] = []
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: ran.append(a[1].label()))
    reproduce(spec, out, runtime=QUIET, console=Console(quiet=True))
    assert ran == []  # a second invocation finds everything stored
    again = json.loads((out / "timings.json").read_text())
    assert again["imp"]["cells_run"] == 2  # nothing was counted twice
    assert (out / "README.md").read_text().split("## Time per part")[0] == \
        readme.split("## Time per part")[0]


def test_reproduce_command_estimates_the_budget(glue_dir, tmp_path) -> None:
    result = CliRunner().invoke(app, ["reproduce", "--scale", "small", "--data-dir",
                                      str(glue_dir), "--out", str(tmp_path / "r"), "--estimate"])
    assert result.exit_code == 0, result.output
    assert "imp" in result.output and "total" in result.output and " h " in result.output
    # estimating writes nothing (it used to leave <out>/data/QNLI/ behind), and counts the
    # same QNLI training set a real run derives
    assert "nothing was written" in " ".join(result.output.split())
    assert not (tmp_path / "r").exists()
    assert "146 trainings    16418 steps" in result.output  # the README's budget
    missing = CliRunner().invoke(app, ["reproduce", "--scale", "small", "--out",
                                       str(tmp_path / "r")])
    assert missing.exit_code == 2 and "needs --data-dir" in missing.output
