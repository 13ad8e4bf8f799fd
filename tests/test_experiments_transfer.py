"""Transfer (Figure 2) and mask analysis: the dark-cell rule, the matrix, overlaps, plots."""

from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from rich.console import Console

from ticketlab.errors import TicketlabError
from ticketlab.experiments.analysis import (
    expected_jaccard,
    jaccard,
    resolve_mask,
    sparsity_by_layer,
    write_mask_analysis,
)
from ticketlab.experiments.common import Stats, with_seed, with_task
from ticketlab.experiments.transfer import (
    ONE_SHOT,
    TransferResult,
    run_transfer,
    write_transfer,
)
from ticketlab.imp import finetune, finetune_run
from ticketlab.masks import Mask
from ticketlab.train import Runtime

QUIET = Runtime(progress=False, save_weights=False)
PNG = b"\x89PNG"


def hand_made() -> TransferResult:
    r = TransferResult(["sst2", "cola", ONE_SHOT], ["sst2", "cola"], 0.5, [0, 1])
    r.full = {"sst2": Stats(0.90, 0.01, 2), "cola": Stats(0.50, 0.02, 2)}
    r.same = {"sst2": Stats(0.88, 0.01, 2), "cola": Stats(0.45, 0.02, 2)}
    r.transfer = {
        ("sst2", "sst2"): Stats(0.88, 0.01, 2), ("sst2", "cola"): Stats(0.46, 0.0, 2),
        ("cola", "sst2"): Stats(0.87, 0.0, 2), ("cola", "cola"): Stats(0.45, 0.02, 2),
        (ONE_SHOT, "sst2"): Stats(0.80, 0.0, 2),  # (one-shot, cola) missing
    }
    return r


def test_transfer_matrix_shape_and_dark_cells(tmp_path) -> None:
    r = hand_made()
    m = r.matrix()
    assert len(m) == 3 and all(len(row) == 2 for row in m)  # sources × targets
    assert m[0][0] == pytest.approx(-0.02) and m[1][0] == pytest.approx(-0.03)
    assert math.isnan(m[2][1])
    # dark: at least the target's own subnetwork (same-task score), not the full model
    assert r.dark("sst2", "sst2") and r.dark("sst2", "cola") and r.dark("cola", "cola")
    assert not r.dark("cola", "sst2") and not r.dark(ONE_SHOT, "sst2")
    assert not r.dark(ONE_SHOT, "cola")  # missing cells are never dark
    assert r.dark_counts() == [2, 1, 0]
    rows = list(csv.reader(io.StringIO(r.matrix_csv())))
    assert rows[0] == ["source", "sst2", "cola", "dark_cells"]
    assert rows[1] == ["sst2", "-2.00", "-4.00", "2"] and rows[3][2] == ""
    paths = write_transfer(r, tmp_path)
    assert paths["png"].read_bytes()[:4] == PNG
    assert len(list(csv.DictReader(io.StringIO(paths["csv"].read_text())))) == 6


def test_transfer_end_to_end(tiny_hparams, tmp_path) -> None:
    hp = tiny_hparams(target_sparsity=0.1)

    def hp_for(task: str, seed: int):
        return with_seed(with_task(hp, task), seed)

    root = tmp_path / "runs"
    result = run_transfer(hp_for, ["sst2", "cola"], ["sst2", "cola"], 0.1, [0], root, QUIET,
                          Console(quiet=True))
    assert result.sources == ["sst2", "cola", ONE_SHOT] and result.targets == ["sst2", "cola"]
    assert len(result.transfer) == 6 and not any(math.isnan(v) for r in result.matrix()
                                                 for v in r)
    for t in ("sst2", "cola"):  # the same-task reference is the task's own IMP level 1
        imp = root / hp_for(t, 0).run_id() / "level_1" / "metrics.json"
        assert result.same[t].mean == pytest.approx(__import__("json").loads(
            imp.read_text())["score"])
        assert result.dark(t, t)
    # the fine-tune of sst2's mask on cola is stored where imp.finetune puts it
    mask = root / hp_for("sst2", 0).run_id() / "level_1" / "mask.safetensors"
    run = finetune(hp_for("cola", 0), mask, root, QUIET, Console(quiet=True))
    assert run.path == finetune_run(hp_for("cola", 0), mask, root).path
    assert run.metrics(0)["score"] == result.transfer["sst2", "cola"].mean
    with pytest.raises(TicketlabError, match="No IMP level has sparsity 0.150"):
        run_transfer(hp_for, ["sst2"], ["cola"], 0.15, [0], root, QUIET, Console(quiet=True))


def mask_of(*rows: list[bool]) -> Mask:
    return Mask({f"encoder.layer.{i}.attention.self.query.weight": torch.tensor([r])
                 for i, r in enumerate(rows)})


def test_jaccard_and_its_random_expectation() -> None:
    a = mask_of([1, 1, 0, 0], [1, 0, 0, 0])
    b = mask_of([1, 0, 1, 0], [0, 1, 0, 0])
    assert jaccard(a, a) == 1.0
    assert jaccard(a, b) == pytest.approx(1 / 5)  # {0} of {0, 1, 2} ∪ {4, 5}
    # E|A∩B| = 4·(1/2)(1/2) + 4·(1/4)(1/4) = 1.25; |A| + |B| = 6
    assert expected_jaccard(a, b) == pytest.approx(1.25 / (6 - 1.25))
    assert sparsity_by_layer(a) == {"0": 0.5, "1": 0.75}
    # random masks really do overlap as expected, on average
    g = torch.Generator().manual_seed(0)
    big_a = Mask({"encoder.layer.0.x.weight": torch.rand(200, 200, generator=g) < 0.3})
    big_b = Mask({"encoder.layer.0.x.weight": torch.rand(200, 200, generator=g) < 0.6})
    assert jaccard(big_a, big_b) == pytest.approx(expected_jaccard(big_a, big_b), abs=0.01)


def test_mask_analysis_files_and_refs(tmp_path) -> None:
    a = mask_of([1, 1, 0, 0], [1, 0, 0, 0])
    path = tmp_path / "a.safetensors"
    a.save(path, {"task": "sst2", "level": 3})
    label, loaded = resolve_mask(str(path), tmp_path)
    assert label == "sst2@3" and loaded == a
    paths = write_mask_analysis({"a": a, "b": mask_of([1, 0, 1, 0], [0, 1, 0, 0])}, tmp_path)
    assert paths["overlap_png"].read_bytes()[:4] == PNG
    assert paths["sparsity_0"].read_bytes()[:4] == PNG
    assert "a,b,0.200000" in paths["overlap_csv"].read_text()
    with pytest.raises(TicketlabError, match="neither a mask file nor RUN:LEVEL"):
        resolve_mask("nothing-here", tmp_path)
    with pytest.raises(TicketlabError, match="No run"):
        resolve_mask("nothing:3", tmp_path)


def test_experiment_commands_end_to_end(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """matching → curves → masks → transfer → rewinding on one store; later commands reuse
    the runs earlier ones made (the same hparams name the same runs)."""
    from typer.testing import CliRunner

    from ticketlab.cli import app

    root, out = tmp_path / "runs", tmp_path / "out"
    common = ["--data-dir", str(glue_dir), "--model", str(tiny_bert_dir),
              "--max-train-samples", "64", "--max-eval-samples", "32", "--max-length", "32",
              "--lr", "1e-3", "--batch-size", "16", "--epochs", "1", "--weight-decay", "0.01",
              "--root", str(root), "--no-progress", "--no-save-weights"]
    runner = CliRunner()

    def ok(*args: str) -> str:
        result = runner.invoke(app, [*args])
        assert result.exit_code == 0, result.output
        return result.output

    text = ok("matching", "--task", "sst2", "--seeds", "1", "--target-sparsity", "0.1",
              "--out", str(out), *common)
    assert "highest matching sparsity:" in text and (out / "matching-sst2.json").is_file()
    assert "curves_sst2.png" in ok("curves", "--task", "sst2", "--root", str(root),
                                   "--out", str(out))
    (run,) = [p.name for p in root.iterdir() if p.name.startswith("sst2-")]
    text = ok("masks", f"{run}:1", f"{run}:0", "--root", str(root), "--out", str(out))
    assert "Jaccard" in text and (out / "mask_overlap.png").is_file()
    text = ok("transfer", "--sources", "sst2", "--targets", "sst2", "--target-sparsity", "0.1",
              "--seeds", "1", "--no-one-shot", "--out", str(out), *common)
    assert "transfer.png" in text
    assert not [p for p in root.iterdir() if p.name.startswith("finetune-")]  # all reused
    text = ok("rewinding", "--task", "sst2", "--fractions", "0,0.5", "--score-at-sparsity", "0.1",
              "--target-sparsity", "0.1", "--out", str(out), *common)
    assert "rewind    0% (step    0)" in text and "rewind   50% (step    2)" in text
    assert (out / "rewinding.png").read_bytes()[:4] == PNG
    bad = runner.invoke(app, ["transfer", "--sources", "sst2", "--targets", "sst2",
                              "--sparsity", "0.15", *common])  # the old spelling still works
    assert "--sparsity is deprecated; use --target-sparsity" in bad.output
    assert bad.exit_code == 2 and "No IMP level has sparsity 0.150" in bad.output
