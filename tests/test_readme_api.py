"""The README's "Python API" (issue 15.9) runs as written — on a tiny model and 32 sentences
instead of MiniLM and 2,000 — and its "Multi-GPU and clusters" Ray recipe reaches a cluster
that another process started (issue 15.10)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def api_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("## Multi-GPU and clusters")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_python_api_section_runs(tiny_bert_dir, glue_dir, tmp_path) -> None:
    code = "\n".join(api_blocks())
    small = {
        '"minilm"': repr(str(tiny_bert_dir)),
        '"../shared/data/glue"': repr(str(glue_dir)),
        "max_train_samples=2000": "max_train_samples=32, max_eval_samples=16, max_length=32",
        '"max_train_samples": 2000': '"max_train_samples": 32, "max_eval_samples": 16, '
                                     '"max_length": 32',
        'Path("~/ticketlab-runs").expanduser()': f"Path({str(tmp_path / 'runs')!r})",
    }
    for old, new in small.items():
        assert old in code, old  # the README still shows what this test shrinks
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)  # noqa: S102
    run, mask = namespace["run"], namespace["mask"]
    assert sorted(namespace["scores"]) == [0, 1, 2]
    assert repr(run).startswith(f"Run({str(run.path)!r}, imp on sst2, levels [0, 1, 2]")
    params = namespace["mask_parameters"](namespace["model"], mask)
    out = namespace["classify"]("a gripping, beautifully acted film")
    assert out[0]["label"] in ("negative", "positive")
    import ticketlab

    assert {"find_ticket", "finetune", "Mask", "export_level", "accelerate_ticket",
            "TicketMaskCallback", "build_hparams", "load_ticket", "Run"} <= set(dir(ticketlab))
    assert ticketlab.TicketMaskCallback.__module__ == "ticketlab.hf"
    # the model the snippet masked is the exported one reloaded: pruned weights are zero
    assert all((p[~mask.tensors[n]] == 0).all() for n, p in params.items())


@pytest.mark.integration
@pytest.mark.slow
def test_a_sweep_reaches_an_existing_ray_cluster(tiny_bert_dir, glue_dir, tmp_path) -> None:
    """`ticketlab sweep --backend ray --ray-address ADDR` against a cluster this test starts in
    another process (and stops by its pid), as the README's recipe does with `ray start`."""
    import secrets

    pytest.importorskip("ray")
    # a cluster with token authentication (Ray's default for new local clusters): its nodes
    # and every driver share the token through RAY_AUTH_TOKEN
    cluster_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                   "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import signal, sys, time, ray
        ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        print(ctx.address_info["gcs_address"], flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exit runs ray.shutdown()
        time.sleep(900)
    """)], stdout=subprocess.PIPE, text=True, env=cluster_env)
    try:
        address = head.stdout.readline().strip()
        assert re.fullmatch(r"[\d.]+:\d+", address), address
        spec = tmp_path / "spec.toml"
        spec.write_text(textwrap.dedent(f"""
            name = "ray-cluster"
            root = "runs"
            [hparams]
            model = "{tiny_bert_dir}"
            data_dir = "{glue_dir}"
            max_train_samples = 32
            max_eval_samples = 16
            max_length = 32
            batch_size = 16
            epochs = 1
            target_sparsity = 0.0
            [grid]
            tasks = ["sst2"]
            seeds = 2
        """))
        command = [sys.executable, "-m", "ticketlab.cli", "sweep", str(spec), "--backend",
                   "ray", "--ray-address", address]
        env = {**cluster_env, "PYTHONPATH": str(ROOT)}
        wrong = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                               env={**env, "RAY_AUTH_TOKEN": "0" * 64})
        assert wrong.returncode == 2 and "Traceback" not in wrong.stdout + wrong.stderr
        assert f"Cannot reach the Ray cluster at {address}" in " ".join(wrong.stdout.split())
        assert not (tmp_path / "runs").exists()
        sweep = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                               env=env)
        assert sweep.returncode == 0, sweep.stdout + sweep.stderr
        assert sweep.stdout.count("done sst2") == 2 or "every cell" in sweep.stdout
        runs = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith("sst2-")]
        assert len(runs) == 2 and all((r / "level_0" / "metrics.json").is_file() for r in runs)
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=60)
