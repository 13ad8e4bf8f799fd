"""Multi-process training under `accelerate launch` (DDP, gloo, 2 CPU processes).

`--batch-size` is the global batch (accelerate's ``split_batches``), so the two-process run sees
the same examples per optimizer step as a single-process run; gradients are all-reduced, masks
are decided once on rank 0 and reach rank 1 through the store, and only rank 0 writes (the store
refuses writes from any other rank). Tolerance: the all-reduce sums gradients in another order,
so trained weights may differ by float rounding (asserted ≤ 1e-5 here); on this tiny model that
flips no magnitude ranking, so the masks are asserted identical. On large models a weight whose
magnitude ties its neighbour's within rounding could in principle be ranked differently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ticketlab.levels import load_level_weights
from ticketlab.masks import Mask
from ticketlab.store import list_runs


def find_args(model, data, root) -> list[str]:
    return ["-m", "ticketlab.cli", "find", "--task", "csv", "--data-dir", str(data), "--model",
            str(model), "--batch-size", "16", "--epochs", "1", "--max-length", "16", "--lr",
            "1e-3", "--target-sparsity", "0.2", "--root", str(root), "--no-progress"]


@pytest.mark.integration
def test_two_process_ddp_matches_single_process(tiny_bert_dir, csv_task_dir, tmp_path):
    accelerate = shutil.which("accelerate")
    assert accelerate, "accelerate's launcher is installed with the package"
    data = csv_task_dir
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *find_args(tiny_bert_dir, data, tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    ddp = subprocess.run(
        [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         *find_args(tiny_bert_dir, data, tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert ddp.stdout.count("level  2") == 1  # one rank reports; the other stays quiet

    [one], [two] = list_runs(tmp_path / "one"), list_runs(tmp_path / "two")
    assert one.path.name == two.path.name and two.levels() == [0, 1, 2]
    for level in (1, 2):
        assert (Mask.load(one.level_dir(level) / "mask.safetensors")
                == Mask.load(two.level_dir(level) / "mask.safetensors"))
    for level in (0, 1, 2):
        a = load_level_weights(one.level_dir(level) / "model.safetensors")
        b = load_level_weights(two.level_dir(level) / "model.safetensors")
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
