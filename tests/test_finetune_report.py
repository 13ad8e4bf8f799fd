"""What ``finetune`` prints (issue 15.4): where the mask comes from (task, run, level) and the
target's full-model score with the Δ when the store has it."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.store import list_runs

runner = CliRunner()


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))


def test_finetune_names_its_mask_and_compares_with_the_full_model(tiny_bert_dir, glue_dir,
                                                                   tmp_path) -> None:
    root = tmp_path / "runs"
    common = ["--data-dir", str(glue_dir), "--model", str(tiny_bert_dir),
              "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16",
              "--epochs", "1", "--max-length", "32", "--root", str(root), "--no-progress"]
    found = runner.invoke(app, ["find", "--task", "sst2", "--target-sparsity", "0.1", *common])
    assert found.exit_code == 0, found.output
    [run] = list_runs(root)
    mask = run.level_dir(1) / "mask.safetensors"
    full = run.metrics(0)["score"]

    result = runner.invoke(app, ["finetune", "--task", "sst2", "--mask", str(mask), *common])
    assert result.exit_code == 0, result.output
    out = plain(result.output)
    assert f"mask: level 1 of run {run.path.name} (found on sst2), sparsity 10.0%" in out
    [ft] = [r for r in list_runs(root) if r.path.name.startswith("finetune-")]
    score = ft.metrics(0)["score"]
    assert (f"finetune on sst2: sparsity 10.0% accuracy {score * 100:.2f} "
            f"Δ {(score - full) * 100:+.2f} vs the full model on sst2 ({full * 100:.2f}, "
            f"run {run.path.name} level 0)") in out
    assert "level 0 sparsity" not in out  # the old, misleading line

    again = plain(runner.invoke(app, ["finetune", "--task", "sst2", "--mask", str(mask),
                                      *common]).output)
    assert "(stored)" in again and f"Δ {(score - full) * 100:+.2f}" in again

    other = runner.invoke(app, ["finetune", "--task", "wnli", "--mask", str(mask), *common])
    assert other.exit_code == 0, other.output
    assert "no full model of wnli with these settings is stored" in plain(other.output)
