"""Masks transfer across heads: a ticket found with an MLM or QA head fine-tunes a classifier of
the same body, and the other way round (the prunable set is the body's; the pooler, which only
the classifier has, stays dense)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.levels import load_level_weights
from ticketlab.masks import Mask


def _task_args(task: str, data: Path) -> list[str]:
    """CLI flags for a seconds-long run of the tiny BERT on real data of ``task``."""
    common = ["--batch-size", "16", "--epochs", "1", "--lr", "1e-3", "--no-progress"]
    if task == "sst2":
        return ["--data-dir", str(data / "glue"), "--max-train-samples", "32",
                "--max-eval-samples", "16", "--max-length", "32", *common]
    if task == "mlm":
        return ["--data-dir", str(data / "wikitext" / "wikitext-2"), "--max-train-samples", "16",
                "--max-eval-samples", "8", "--block-size", "32", "--init-mlm-head", "2",
                *common]
    return ["--data-dir", str(data / "squad"), "--max-train-samples", "16",
            "--max-eval-samples", "8", "--max-length", "96", "--doc-stride", "32", *common]


@pytest.mark.parametrize("source,target", [
    ("mlm", "sst2"), ("sst2", "mlm"), ("squad", "sst2"), ("sst2", "squad"),
])
def test_a_mask_fine_tunes_another_head(source, target, tiny_bert_dir, shared_data, tmp_path):
    runner = CliRunner()
    root = tmp_path / "runs"
    found = runner.invoke(app, ["find", "--task", source, "--model", str(tiny_bert_dir),
                                "--target-sparsity", "0.1", "--root", str(root),
                                "--no-save-weights", *_task_args(source, shared_data)])
    assert found.exit_code == 0, found.output
    [run_dir] = root.glob(f"{source}-*")
    mask_path = run_dir / "level_1" / "mask.safetensors"
    mask = Mask.load(mask_path)

    result = runner.invoke(app, ["finetune", "--task", target, "--model", str(tiny_bert_dir),
                                 "--mask", str(mask_path), "--root", str(root),
                                 *_task_args(target, shared_data)])
    assert result.exit_code == 0, result.output
    [ft_dir] = root.glob(f"finetune-{target}-*")
    weights = load_level_weights(ft_dir / "level_0" / "model.safetensors")
    encoder = {k: m for k, m in mask.tensors.items() if k.startswith("encoder.")}
    assert len(encoder) == 12 and abs(mask.sparsity - 0.1) < 1e-3
    for name, keep in encoder.items():  # exactly the mask's weights are zero after training
        w = weights[f"bert.{name}"]
        assert (w[~keep] == 0).all() and (w[keep] != 0).all(), name
    if target == "sst2":  # the classifier's pooler is not in an MLM/QA mask: it stays dense
        assert source != "sst2" and "pooler.dense.weight" not in mask.tensors
        assert (weights["bert.pooler.dense.weight"] != 0).all()
    else:  # an MLM/QA body has no pooler: the classifier mask's pooler entry is ignored
        assert "pooler.dense.weight" in mask.tensors
        assert not any("pooler" in k for k in weights)
