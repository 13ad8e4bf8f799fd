"""Robust tickets (issue 13): vanilla vs adversarially found tickets, transferred, with
robust accuracy, as one command; Double-Win matching over seeds."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.masks import Mask
from ticketlab.store import list_runs

runner = CliRunner()


def test_robust_transfer_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    root, out = tmp_path / "runs", tmp_path / "out"
    args = ["robust-transfer", "--source", "sst2", "--targets", "sst2,mrpc",
            "--target-sparsity", "0.1", "--model", str(tiny_bert_dir), "--data-dir",
            str(glue_dir),
            "--max-train-samples", "32", "--max-eval-samples", "16", "--max-length", "32",
            "--batch-size", "16", "--epochs", "1", "--lr", "1e-3", "--adv-eps", "0.3",
            "--adv-step", "0.1", "--adv-steps", "1", "--eval-attack", "pgd",
            "--eval-attack-steps", "1", "--root", str(root), "--out", str(out),
            "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "robust_transfer.json").read_text())
    rows = {(r["ticket"], r["target"]): r for r in data["rows"]}
    assert set(rows) == {(t, g) for t in ("full", "vanilla", "robust")
                         for g in ("sst2", "mrpc")}
    for row in rows.values():
        assert 0 <= row["robust_score"] <= row["score"] <= 1  # robust never above standard
    assert (out / "robust_transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert "vanilla" in re.sub(r"\s+", " ", result.output)
    imp = [r for r in list_runs(root) if r.read_hparams()["kind"] == "imp"]
    methods = sorted(r.read_hparams()["hparams"]["train"].get("adversarial", "none")
                     for r in imp)
    assert methods == ["none", "pgd"]  # the same source searched twice
    masks = [Mask.load(r.level_dir(1) / "mask.safetensors") for r in imp]
    assert masks[0] != masks[1]
    again = runner.invoke(app, args)  # everything is stored: nothing is trained twice
    assert again.exit_code == 0 and "train: step" not in again.output
    # show, table and curves carry robust accuracy for runs scored under --eval-attack
    vanilla = next(r for r in imp
                   if r.read_hparams()["hparams"]["train"].get("adversarial", "none") == "none")
    shown = runner.invoke(app, ["show", vanilla.path.name, "--root", str(root), "--csv"])
    assert shown.exit_code == 0, shown.output
    import csv

    rows = list(csv.DictReader(shown.stdout.splitlines()))
    robust = [float(r["robust_score"]) for r in rows]
    assert robust == [vanilla.metrics(k)["robust_score"] for k in (0, 1)]
    assert float(rows[1]["robust_delta"]) == robust[1] - robust[0]
    table = runner.invoke(app, ["table", "--root", str(root), "--format", "markdown"])
    assert table.exit_code == 0, table.output
    assert "Highest double-win sparsity" in table.output and "Full model, robust" in table.output
    records = json.loads(runner.invoke(app, ["table", "--root", str(root), "--format",
                                             "json"]).stdout)  # messages go to stderr
    assert {"full_robust", "highest_robust_matching", "highest_double_win"} <= set(records[0])
    curves = runner.invoke(app, ["curves", "--task", "sst2", "--root", str(root), "--out",
                                 str(out)])
    assert curves.exit_code == 0, curves.output
    from PIL import Image

    with Image.open(out / "curves_sst2.png") as png:
        width, height = png.size
    assert width > 2 * height  # two panels side by side: standard and robust


def test_robust_transfer_needs_an_adversarial_source(tiny_bert_dir, glue_dir, tmp_path):
    result = runner.invoke(app, ["robust-transfer", "--source", "sst2", "--targets", "mrpc",
                                 "--at-sparsity", "0.1", "--source-adversarial", "none",
                                 "--model", str(tiny_bert_dir), "--data-dir", str(glue_dir),
                                 "--root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "needs an adversarial training method" in result.output
    assert not (tmp_path / "runs").exists()
