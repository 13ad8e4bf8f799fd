"""Matching over seeds and Table 2: the rule on hand-made scores, renderers, a tiny real run."""

from __future__ import annotations

import csv
import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.experiments.baselines import KIND_LABELS
from ticketlab.experiments.common import Stats, level_of_sparsity, seed_groups
from ticketlab.experiments.matching import (
    LevelSummary,
    is_matching,
    is_strictly_matching,
    run_matching,
    summarize,
    table2_columns,
    write_curves,
)
from ticketlab.reports.tables import Table2Column, table2_csv, table2_latex, table2_markdown
from ticketlab.train import Runtime

QUIET = Runtime(progress=False, save_weights=False)


def test_the_matching_rule_on_hand_made_scores() -> None:
    full = [0.80, 0.82, 0.84]  # mean 0.82, sample std 0.02
    scores = {
        0: (0.0, full),
        1: (0.1, [0.83, 0.83, 0.84]),  # above the mean: strictly matching
        2: (0.2, [0.80, 0.81, 0.81]),  # mean 0.8067 >= 0.80: matching, not strictly
        3: (0.3, [0.78, 0.79, 0.80]),  # mean 0.79 < 0.80: not matching
        4: (0.4, [0.81, 0.80, 0.80]),  # matching again after a miss: still counts
        5: (0.5, [0.50, 0.90, 0.50]),  # huge spread, mean 0.633: not matching
    }
    s = summarize("sst2", "accuracy", [0, 1, 2], scores)
    assert s.full.mean == pytest.approx(0.82) and s.full.std == pytest.approx(0.02)
    assert [lvl.matching for lvl in s.levels] == [True, True, False, True, False]
    assert [lvl.strictly for lvl in s.levels] == [True, False, False, False, False]
    assert s.highest.level == 4 and s.highest.sparsity == 0.4
    assert s.highest_strict.level == 1
    assert s.to_dict()["highest_matching"]["sparsity"] == 0.4

    # the boundary: exactly one std below the mean is matching, a hair less is not
    assert is_matching(Stats(0.80, 0.0, 3), Stats(0.82, 0.02, 3))
    assert not is_matching(Stats(0.7999, 0.0, 3), Stats(0.82, 0.02, 3))
    assert is_strictly_matching(Stats(0.82, 0.1, 3), Stats(0.82, 0.02, 3))

    one_seed = summarize("cola", "matthews_correlation", [0],
                         {0: (0.0, [0.5]), 1: (0.1, [0.49]), 2: (0.2, [0.5])})
    assert one_seed.full.std == 0.0  # one seed: matching means at least the full score
    assert [lvl.matching for lvl in one_seed.levels] == [False, True]
    none = summarize("sst2", "accuracy", [0], {0: (0.0, [0.9]), 1: (0.1, [0.5])})
    assert none.highest is None
    with pytest.raises(ValueError):
        summarize("sst2", "accuracy", [0], {1: (0.1, [0.5])})


def columns() -> list[Table2Column]:
    level = LevelSummary(3, 0.3, Stats(0.845, 0.005, 3), True, False)
    return [
        Table2Column("sst2", "accuracy", [0, 1, 2], Stats(0.85, 0.01, 3), level, None, 3,
                     {"random": Stats(0.6, 0.02, 3), "random-reinit": Stats(0.55, 0.0, 1)},
                     labels=KIND_LABELS),
        Table2Column("cola", "matthews_correlation", [0], Stats(0.4, 0.0, 1), None, None, 1, {},
                     chance=0.0),
    ]


def test_table2_renders_markdown_csv_and_latex() -> None:
    md = table2_markdown(columns())
    header = md.splitlines()[0]
    assert "SST-2 (accuracy, 3 seeds)" in header and "CoLA (matthews_correlation, 1 seed)" in header
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines()[2:] if line.startswith("|")}
    assert rows["Full model"] == ["85.0 ± 1.0", "40.0"]
    assert rows["Highest matching sparsity"] == ["30%", "–"]
    assert rows["IMP subnetwork at that sparsity"] == ["84.5 ± 0.5", "–"]
    assert rows["Random pruning"] == ["60.0 ± 2.0", "–"]
    assert rows["Random reinit (θ0')"] == ["55.0", "–"]
    assert "No pruned level matches the full model for CoLA" in md
    assert rows["Majority class (chance)"] == ["–", "0.0"]
    assert "trivially" not in md  # neither full model is at chance
    at_chance = columns()[1]
    at_chance.full = Stats(0.0, 0.0, 3)
    md = table2_markdown([at_chance])
    assert "0.0 ± 0.0 (at chance)" in md and "The full model of CoLA scores no better" in md

    records = list(csv.DictReader(io.StringIO(table2_csv(columns()))))
    entries = {(r["task"], r["entry"]): r for r in records}
    assert float(entries["sst2", "imp"]["sparsity"]) == 0.3
    assert float(entries["sst2", "random"]["std"]) == 0.02 and entries["sst2", "random"]["n"] == "3"
    assert ("cola", "imp") not in entries and ("cola", "full") in entries

    tex = table2_latex(columns())
    assert tex.startswith(r"\begin{tabular}{lcc}") and r"85.0 $\pm$ 1.0" in tex
    assert r"30\%" in tex and r"$\theta_0'$" in tex and tex.rstrip().endswith(r"\end{tabular}")


def test_chance_score_is_the_majority_class_score(tiny_hparams, glue_dir) -> None:
    import dataclasses

    from ticketlab.experiments.common import chance_score
    from ticketlab.tasks import DataSource, get_task

    hp = tiny_hparams()  # SST-2: 64 train sentences, the first 32 dev sentences
    train = get_task("sst2").load(DataSource(glue_dir), "train")[:64]
    dev = get_task("sst2").load(DataSource(glue_dir), "dev")[:32]
    majority = int(sum(ex["label"] for ex in train) * 2 > len(train))
    assert chance_score(hp) == pytest.approx(
        sum(ex["label"] == majority for ex in dev) / len(dev))
    cola = dataclasses.replace(hp, data=dataclasses.replace(hp.data, task="cola"))
    assert chance_score(cola) == 0.0  # MCC of a constant prediction
    stsb = dataclasses.replace(hp, data=dataclasses.replace(hp.data, task="stsb"))
    assert chance_score(stsb) is None  # regression: no majority class


def test_matching_over_seeds_with_baselines_end_to_end(tiny_hparams, tmp_path) -> None:
    hp = tiny_hparams(target_sparsity=0.1)
    root = tmp_path / "runs"
    summary, group = run_matching(hp, [0, 1], root, QUIET, Console(quiet=True), ["random"])
    assert group.seeds == [0, 1] and [lvl.level for lvl in summary.levels] == [1]
    scores = group.level_scores()
    assert summary.full == Stats.of(scores[0][1])
    assert summary.levels[0].stats == Stats.of(scores[1][1])

    (col,) = table2_columns(root)
    assert col.task == "sst2" and col.seeds == [0, 1] and col.level == 1
    assert col.baselines["random"].n == 2  # the baseline ran over both seeds
    assert write_curves(seed_groups(root)[0], tmp_path).read_bytes()[:4] == b"\x89PNG"

    runner = CliRunner()
    result = runner.invoke(app, ["table", "--root", str(root), "--format", "csv",
                                 "--out", str(tmp_path / "t2")])
    assert result.exit_code == 0, result.output
    assert "task,metric,entry" in result.output
    assert {p.name for p in (tmp_path / "t2").iterdir()} == {"table2.md", "table2.csv",
                                                            "table2.tex", "table2.json"}
    empty = runner.invoke(app, ["table", "--root", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "No finished IMP runs" in empty.output


def test_sparsity_levels_of_the_schedule(tiny_hparams) -> None:
    from ticketlab.errors import TicketlabError

    assert level_of_sparsity(tiny_hparams(), 0.7) == 7
    assert level_of_sparsity(tiny_hparams(rate=0.2), 0.4) == 2
    assert level_of_sparsity(tiny_hparams(schedule="remaining"), 0.19) == 2  # 1 - 0.9^2
    with pytest.raises(TicketlabError, match="No IMP level has sparsity 0.250"):
        level_of_sparsity(tiny_hparams(), 0.25)


def test_double_win_needs_matching_on_standard_and_robust_accuracy() -> None:
    """Issue 13: double-win = matching on both scores, each against its own full model."""
    from ticketlab.experiments.matching import DoubleWin

    standard = summarize("cifar10", "accuracy", [0, 1], {
        0: (0.0, [0.90, 0.92]),    # mean 0.91, std 0.0141
        1: (0.2, [0.91, 0.91]),    # matching
        2: (0.36, [0.90, 0.90]),   # matching (>= 0.8959)
        3: (0.49, [0.85, 0.86]),   # not matching
    })
    robust = summarize("cifar10", "robust accuracy", [0, 1], {
        0: (0.0, [0.40, 0.44]),    # mean 0.42, std 0.0283
        1: (0.2, [0.30, 0.31]),    # not robust-matching
        2: (0.36, [0.41, 0.42]),   # robust-matching
        3: (0.49, [0.45, 0.46]),   # robust-matching, but not standard-matching
    })
    wins = DoubleWin(standard, robust)
    assert wins.levels == [2]
    assert wins.highest.level == 2 and wins.highest.sparsity == 0.36
    assert standard.highest.level == 2 and robust.highest.level == 3
    assert wins.to_dict()["highest_double_win"] == {"level": 2, "sparsity": 0.36}
