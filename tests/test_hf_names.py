"""The names Hugging Face users type (issue 15.7), one way across every command: aliases of
ticketlab's options, --per-device-train-batch-size as the global batch it implies, --fp16 and
--bf16, and the real --warmup-steps and --lr-scheduler-type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.cli.options import with_options, with_task_options
from ticketlab.errors import TicketlabError
from ticketlab.hparams import RunHparams, Runtime, TrainHparams, build_hparams

runner = CliRunner()
HF_NAMES = ("--learning-rate", "--per-device-train-batch-size", "--num-train-epochs",
            "--max-seq-length", "--output-dir", "--fp16", "--bf16",
            "--gradient-accumulation-steps", "--warmup-steps", "--lr-scheduler-type")
TRAINING_COMMANDS = ("find", "finetune", "matching", "transfer", "rewinding", "robust-transfer")


def help_text(command: str) -> str:
    text = runner.invoke(app, [command, "--help"]).output
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_command_takes_the_hf_names(command: str) -> None:
    text = help_text(command)
    for name in HF_NAMES:
        assert name in text, (command, name)
    assert [line for line in text.splitlines() if "<bool>" in line and "--help" not in line] \
        == []
    if command in ("find", "matching", "rewinding", "transfer", "robust-transfer"):
        assert "--target-sparsity" in text  # one name for how far IMP goes
    assert not re.search(r"--sparsity\b", text)  # the old spelling is hidden (deprecated)


def probe_app() -> typer.Typer:
    """A one-command app with the real generated options that reports what it was given."""
    probe = typer.Typer()
    seen: dict = {}

    @probe.command()
    @with_options(prune=True)
    def find(hp: RunHparams, runtime: Runtime, root: Path,
             task: str = typer.Option(...)) -> None:
        seen.update(hp=hp, runtime=runtime, root=root)

    probe.seen = seen  # type: ignore[attr-defined]
    return probe


def run_probe(*args: str):
    probe = probe_app()
    result = runner.invoke(probe, ["--task", "sst2", *args])
    return result, probe.seen  # type: ignore[attr-defined]


def test_hf_spellings_build_the_same_run_as_ticketlab_names(tmp_path) -> None:
    ours, a = run_probe("--lr", "3e-5", "--batch-size", "16", "--epochs", "2", "--max-length",
                        "64", "--root", str(tmp_path), "--precision", "fp16")
    theirs, b = run_probe("--learning-rate", "3e-5", "--per-device-train-batch-size", "16",
                          "--num-train-epochs", "2", "--max-seq-length", "64", "--output-dir",
                          str(tmp_path), "--fp16")
    assert ours.exit_code == theirs.exit_code == 0, (ours.output, theirs.output)
    assert a["hp"].run_id() == b["hp"].run_id()
    assert b["hp"].train.batch_size == 16 and b["runtime"].precision == "fp16"
    assert b["root"] == tmp_path
    _, c = run_probe("--bf16")
    assert c["runtime"].precision == "bf16"


def test_per_device_batch_is_the_global_batch_over_processes(monkeypatch) -> None:
    """ticketlab's --batch-size is the global batch of one optimizer step (split over the
    processes of `accelerate launch`); the Trainer's per-device size times the processes and
    the accumulation steps is that same number, so both name the same run."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    result, seen = run_probe("--per-device-train-batch-size", "8",
                             "--gradient-accumulation-steps", "2")
    assert result.exit_code == 0, result.output
    train = seen["hp"].train
    assert train.batch_size == 32 and train.batch_size // train.gradient_accumulation_steps == 16
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build_hparams("sst2", {"per_device_train_batch_size": 32}).run_id() == \
        build_hparams("sst2", {"batch_size": 32}).run_id()
    both, _ = run_probe("--per-device-train-batch-size", "8", "--batch-size", "32")
    assert both.exit_code == 2 and "were both given" in both.output


def test_conflicting_or_meaningless_spellings_are_refused() -> None:
    bad, _ = run_probe("--fp16", "--precision", "bf16")
    assert bad.exit_code == 2 and "--fp16 means --precision fp16" in bad.output
    bad, _ = run_probe("--fp16", "--bf16")
    assert bad.exit_code == 2 and "Give one of them" in bad.output
    bad, _ = run_probe("--warmup-steps", "10", "--warmup-ratio", "0.1")
    assert bad.exit_code == 2 and "cannot be combined with --warmup-ratio" in bad.output
    bad, _ = run_probe("--lr-scheduler-type", "cosin")
    assert bad.exit_code == 2 and "did you mean 'cosine'" in bad.output
    with pytest.raises(TicketlabError, match="constant has no warm-up"):
        TrainHparams(lr_scheduler_type="constant", warmup_steps=5)


def test_new_schedule_options_keep_old_run_ids() -> None:
    """Added with added_later: at their defaults they are not part of a run's identity."""
    hp = build_hparams("sst2", {})
    assert "warmup_steps" not in hp.identity()["train"]
    assert "lr_scheduler_type" not in hp.identity()["train"]
    cosine = build_hparams("sst2", {"lr_scheduler_type": "cosine"})
    assert cosine.identity()["train"]["lr_scheduler_type"] == "cosine"
    assert cosine.run_id() != hp.run_id()
    assert TrainHparams(warmup_steps=3).warmup_for(100) == 3
    assert TrainHparams(warmup_ratio=0.1).warmup_for(100) == 10


def test_the_loop_follows_the_chosen_schedule(tiny_hparams, tmp_path) -> None:
    """constant_with_warmup over 2 warm-up steps, read back from the level's TensorBoard log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ticketlab.imp import finetune
    from ticketlab.tracking import level_log_dir

    hp = tiny_hparams(train={"warmup_steps": 2, "lr_scheduler_type": "constant_with_warmup"})
    run = finetune(hp, None, tmp_path, Runtime(progress=False, report_to="tensorboard"),
                   Console(quiet=True))
    acc = EventAccumulator(str(level_log_dir(run.path, 0)))
    acc.Reload()
    # the lr after each of the 4 steps: half-way through the 2 warm-up steps, then constant
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_renamed_options_keep_their_old_spelling_with_a_note(tiny_bert_dir, glue_dir,
                                                              tmp_path) -> None:
    both = runner.invoke(app, ["transfer", "--sources", "sst2", "--targets", "sst2",
                               "--sparsity", "0.1", "--target-sparsity", "0.1", "--root",
                               str(tmp_path)])
    assert both.exit_code == 2 and "--sparsity is the old name of --target-sparsity" in \
        both.output


def test_task_commands_take_the_same_generated_options() -> None:
    """transfer builds hparams per task through the same generated options as find."""
    probe = typer.Typer()

    @probe.command()
    @with_task_options()
    def transfer(build, runtime: Runtime, root: Path) -> None:
        typer.echo(build("cola").train.batch_size)

    result = runner.invoke(probe, ["--per-device-train-batch-size", "4"])
    assert result.exit_code == 0 and result.output.strip() == "4"


def test_robust_transfer_needs_its_target_sparsity(tmp_path) -> None:
    result = runner.invoke(app, ["robust-transfer", "--source", "sst2", "--targets", "mrpc",
                                 "--root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "Pass --target-sparsity" in result.output
    assert not (tmp_path / "runs").exists()
