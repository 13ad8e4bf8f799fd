"""The command line: clear errors without tracebacks, and real runs end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.masks import Mask
from ticketlab.store import list_runs

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\x1b\[[0-9;]*m", "", text))


def tiny_find_args(model: Path, glue: Path, root: Path, *extra: str) -> list[str]:
    return ["find", "--task", "sst2", "--data-dir", glue, "--model", model,
            "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size", "16",
            "--epochs", "1", "--max-length", "32", "--root", root, "--no-progress", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--target-sparsity", "1.5"], "Target sparsity 1.5 is outside [0, 1)"),
    (["--rate", "0"], "Prune rate 0.0 is outside (0, 1)"),
    (["--max-train-samples", "0"], "--max-train-samples is 0"),
    (["--method", "magic"], "Unknown pruning method"),
])
def test_bad_flags_give_one_clear_error(tiny_bert_dir, glue_dir, tmp_path, extra, message):
    args = tiny_find_args(tiny_bert_dir, glue_dir, tmp_path / "root")
    if extra[0] == "--max-train-samples":
        i = args.index("--max-train-samples")
        args[i + 1] = extra[1]
    else:
        args += extra
    result = invoke(*args)
    assert result.exit_code == 2
    out = plain(result.output)
    assert message in out and "Fix:" in out and "Traceback" not in out
    assert not (tmp_path / "root").exists()


def test_unknown_task_and_missing_paths(tiny_bert_dir, glue_dir, tmp_path) -> None:
    args = tiny_find_args(tiny_bert_dir, glue_dir, tmp_path / "root")
    args[args.index("sst2")] = "sst3"
    out = plain(invoke(*args).output)
    assert "unknown task 'sst3'" in out and "sst2" in out
    args = tiny_find_args(tmp_path / "no-model", glue_dir, tmp_path / "root")
    result = invoke(*args)
    assert result.exit_code == 2 and "does not exist" in plain(result.output)
    args = tiny_find_args(tiny_bert_dir, tmp_path / "no-data", tmp_path / "root")
    result = invoke(*args)
    assert result.exit_code == 2 and "does not exist" in plain(result.output)
    assert not (tmp_path / "root").exists()


def test_debug_shows_the_traceback(tiny_bert_dir, glue_dir, tmp_path) -> None:
    args = tiny_find_args(tiny_bert_dir, glue_dir, tmp_path / "root", "--rate", "0")
    result = runner.invoke(app, ["--debug", *map(str, args)])
    assert result.exit_code == 2 and "Traceback" in result.output


def test_find_runs_show_finetune_on_a_tiny_bert(tiny_bert_dir, glue_dir, tmp_path) -> None:
    root = tmp_path / "root"
    result = invoke(*tiny_find_args(tiny_bert_dir, glue_dir, root, "--target-sparsity", "0.1"))
    assert result.exit_code == 0, result.output
    out = plain(result.output)
    assert "level 0" in out and "level 1" in out and "sparsity 10.0%" in out
    [run] = list_runs(root)
    listing = plain(invoke("runs", "--root", root).output)
    assert run.path.name in listing and "10.0%" in listing
    shown = plain(invoke("show", run.path.name[:8], "--root", root, "--matrices", "1").output)
    assert "pooler.dense.weight" in shown and "level 1: sparsity per matrix" in shown
    mask = run.level_dir(1) / "mask.safetensors"
    ft = invoke("finetune", "--task", "wnli", "--data-dir", glue_dir, "--model", tiny_bert_dir,
                "--mask", mask, "--max-train-samples", "16", "--max-eval-samples", "8",
                "--epochs", "1", "--root", root, "--no-progress")
    assert ft.exit_code == 0, ft.output
    assert len(list_runs(root)) == 2


def test_finetune_with_a_corrupt_mask_is_one_clear_error(tiny_bert_dir, glue_dir, tmp_path):
    bad = tmp_path / "mask.safetensors"
    bad.write_bytes(b"\x00" * 40)
    result = invoke("finetune", "--task", "sst2", "--data-dir", glue_dir, "--model",
                    tiny_bert_dir, "--mask", bad, "--root", tmp_path / "root")
    assert result.exit_code == 2 and "corrupt" in plain(result.output)
    assert not (tmp_path / "root").exists()


def test_describe_warns_about_a_tiny_pooler(tmp_path) -> None:
    import torch
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))
    with torch.no_grad():
        model.pooler.dense.weight.mul_(0.05)
    model.save_pretrained(tmp_path)
    out = plain(invoke("describe", "--model", tmp_path).output)
    assert "13 matrices" in out and "Warning: pooler.dense.weight" in out
    assert "--no-prune-pooler" in out


@pytest.mark.integration
def test_minilm_on_real_sst2_two_levels_through_the_cli(glue_dir, tmp_path) -> None:
    """MiniLM-L6 (offline), 64 real SST-2 sentences, 2 IMP levels, end to end."""
    root = tmp_path / "root"
    result = invoke("find", "--task", "sst2", "--data-dir", glue_dir, "--model", "minilm",
                    "--max-train-samples", "64", "--max-eval-samples", "64", "--epochs", "1",
                    "--target-sparsity", "0.2", "--root", root, "--no-progress",
                    "--no-save-weights")
    assert result.exit_code == 0, result.output
    [run] = list_runs(root)
    assert run.levels() == [0, 1, 2]
    masks = [Mask.load(run.level_dir(k) / "mask.safetensors") for k in run.levels()]
    assert [round(m.sparsity, 3) for m in masks] == [0.0, 0.1, 0.2]
    assert masks[1].meta["fingerprint"] == run.read_hparams()["fingerprint"]
    # MiniLM's pooler is its smallest matrix: the global ranking takes far more than 10 % of it
    assert run.metrics(1)["sparsity_by_role"]["pooler"] > 0.3
    for level in run.levels():
        assert 0.0 <= run.metrics(level)["score"] <= 1.0


@pytest.mark.integration
def test_demo_runs_offline_on_a_small_budget(tmp_path) -> None:
    result = invoke("demo", "--root", tmp_path / "runs", "--train-samples", "32",
                    "--dev-samples", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    out = plain(result.output)
    assert "demo: ticket search summary" in out and "full model" in out
    for sparsity in ("0.0%", "20.0%", "40.0%", "60.0%", "80.0%"):
        assert sparsity in out
    import csv

    data = tmp_path / "data" / "rotten_tomatoes"
    rows = {name: list(csv.DictReader(open(data / name, encoding="utf-8")))
            for name in ("train.csv", "dev.csv")}
    assert len(rows["dev.csv"]) == 1000 and len(rows["train.csv"]) == 8530 - 1000
    assert {r["label"] for r in rows["dev.csv"]} == {"0", "1"}


def test_error_text_with_brackets_is_printed_literally(tmp_path) -> None:
    """Issue 10, item 8: '[grid]' and '[MASK]' used to vanish as rich markup."""
    spec = tmp_path / "spec.toml"
    spec.write_text('[hparams]\nmodel = "minilm"\n')
    result = invoke("sweep", spec, "--dry-run")
    assert result.exit_code == 2
    assert "The spec has no [grid] table." in plain(result.output)
    from ticketlab.cli.app import console, print_error
    from ticketlab.errors import TicketlabError

    with console.capture() as captured:
        print_error(TicketlabError("token [MASK] and [bold]x[/bold]", "use [grid] tables"))
    assert "token [MASK] and [bold]x[/bold]" in captured.get()
    assert "use [grid] tables" in captured.get()


def test_a_long_error_is_not_broken_into_lines() -> None:
    """A long path before a phrase used to push a newline into the phrase (rich wrapped at 80
    columns): the terminal wraps, so logs and pipes keep paths and phrases whole."""
    from ticketlab.cli.app import console, print_error
    from ticketlab.errors import TicketlabError

    path = "/tmp/" + "a-long-folder-name/" * 6 + "mask.safetensors"
    width = console.width
    console.width = 80  # what rich takes where there is no terminal (CI, a pipe)
    try:
        with console.capture() as captured:
            print_error(TicketlabError(f"The mask {path} was found on a text encoder.",
                                       f"Use a mask found under {path}."))
    finally:
        console.width = width
    lines = captured.get().splitlines()
    assert lines == [f"Error: The mask {path} was found on a text encoder.",
                     f"Fix: Use a mask found under {path}."]


def test_version_and_flags_without_value_hints() -> None:
    import ticketlab

    assert invoke("--version").output.strip() == f"ticketlab {ticketlab.__version__}"
    text = invoke("find", "--help").output
    assert "--no-progress" in text
    assert [line for line in text.splitlines() if "<bool>" in line and "--help" not in line] == []


def test_import_and_help_load_neither_torch_nor_transformers() -> None:
    """Issue 11: `import ticketlab` and `ticketlab --help` stay light."""
    import subprocess
    import sys

    code = ("import sys, ticketlab, ticketlab.cli\n"
            "from typer.testing import CliRunner\n"
            "r = CliRunner().invoke(ticketlab.cli.app, ['find', '--help'])\n"
            "assert r.exit_code == 0, r.output\n"
            "dir(ticketlab)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
