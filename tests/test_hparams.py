"""One declaration per hyperparameter: the CLI and a sweep spec build identical runs, values
are validated once, run ids of older stores stay put (issues 10 item 9, 11)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.experiments.sweep import Spec
from ticketlab.hparams import (
    DataHparams,
    ModelHparams,
    PruneHparams,
    RunHparams,
    TrainHparams,
    build_hparams,
    options,
)
from ticketlab.tasks import TASK_NAMES

runner = CliRunner()

#: Per task: options a user might pass (flag values as typed), exercising task options too.
EXTRA = {
    "csv": {"text_column": "sentence", "label_column": "y"},
    "json": {"text_pair_column": "b"},
    "squad": {"doc_stride": 64, "max_length": 256},
    "mlm": {"block_size": 64, "init_mlm_head": 5},
}


def cli_hparams(monkeypatch, task: str, values: dict, command: str = "find") -> RunHparams:
    """The hparams `ticketlab <command>` builds from ``values`` (the work itself is stubbed)."""
    import ticketlab.imp as imp

    seen = {}

    class Done:
        path = __import__("pathlib").Path("x")

    def capture(hp, *args, **kwargs):
        seen["hp"] = hp
        return Done()

    monkeypatch.setattr(imp, "find_ticket", capture)
    monkeypatch.setattr(imp, "finetune", capture)
    args = [command, "--task", task]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return seen["hp"]


@pytest.mark.parametrize("task", TASK_NAMES)
def test_the_cli_and_a_spec_build_the_same_run_for_every_task(task, monkeypatch) -> None:
    values = {"lr": 1e-4, "max_train_samples": 100, "seed": 3, "prune_pooler": False,
              "target_sparsity": 0.3, **EXTRA.get(task, {})}
    from_cli = cli_hparams(monkeypatch, task, values)
    spec_values = {k: v for k, v in values.items() if k != "seed"}
    spec = Spec.from_dict({"hparams": spec_values, "grid": {"tasks": [task], "seeds": [3]}})
    from_spec = spec.hparams_for(task, 3)
    assert from_cli == from_spec
    assert from_cli.run_id() == from_spec.run_id()
    # and with nothing given, both take the task's paper settings
    bare_cli = cli_hparams(monkeypatch, task, {})
    bare_spec = Spec.from_dict({"hparams": {}, "grid": {"tasks": [task]}}).hparams_for(task, 0)
    assert bare_cli == bare_spec and bare_cli.run_id() == bare_spec.run_id()


def test_a_sweep_trains_squad_with_squads_paper_settings() -> None:
    """The issue's reproduction: the spec path used to give lr 2e-5 / batch 32 / 128 tokens."""
    hp = Spec.from_dict({"hparams": {}, "grid": {"tasks": ["squad"]}}).hparams_for("squad", 0)
    assert (hp.train.lr, hp.train.batch_size, hp.data.max_length, hp.data.doc_stride) == (
        3e-5, 16, 384, 128)
    mlm = Spec.from_dict({"hparams": {}, "grid": {"tasks": ["mlm"]}}).hparams_for("mlm", 0)
    assert (mlm.train.lr, mlm.train.batch_size, mlm.data.block_size) == (5e-5, 16, 128)


def test_finetune_takes_no_pruning_options_and_names_its_run_by_the_result(monkeypatch):
    hp = cli_hparams(monkeypatch, "sst2", {"lr": 1e-4}, command="finetune")
    assert hp.prune.target_sparsity == 0.0
    result = runner.invoke(app, ["finetune", "--task", "sst2", "--rate", "0.2"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_spec_keys_are_the_cli_option_names() -> None:
    assert {"text_column", "init_mlm_head", "train_file", "gradient_accumulation_steps"} <= set(
        options())
    with pytest.raises(TicketlabError, match="Unknown key"):
        Spec.from_dict({"hparams": {"learning_rate": 1}, "grid": {"tasks": ["sst2"]}})


@pytest.mark.parametrize("task,values,message", [
    ("sst2", {"text_column": "foo"}, "Task sst2 does not take --text-column"),
    ("squad", {"label_column": "y"}, "Task squad does not take --label-column"),
    ("sst2", {"block_size": 64}, "--block-size does not apply to task sst2"),
])
def test_stray_task_options_are_refused(task, values, message) -> None:
    with pytest.raises(TicketlabError, match=message):
        build_hparams(task, values)


@pytest.mark.parametrize("values,message", [
    ({"lr": float("inf")}, "--lr inf must be a finite number above 0"),
    ({"lr": float("nan")}, "--lr nan must be a finite number above 0"),
    ({"lr": -1e-5}, "--lr -1e-05 must be a finite number above 0"),
    ({"max_grad_norm": -1.0}, "--max-grad-norm -1.0 must be a finite number >= 0"),
    ({"weight_decay": float("nan")}, "--weight-decay nan"),
    ({"warmup_ratio": float("nan")}, "--warmup-ratio nan must be in"),
    ({"target_sparsity": 0.95, "rate": 0.3}, "beyond what --rate 0.3 with the 'original' "
                                             "schedule reaches: its levels stop at 0.9"),
    ({"target_sparsity": float("nan")}, "Target sparsity nan is outside"),
    ({"gradient_accumulation_steps": 3}, "must be at least 1 and divide --batch-size 32"),
    ({"lr": "fast"}, "--lr is 'fast', not a float"),
    ({"schedule": "remainig"}, "did you mean 'remaining'"),
])
def test_values_that_would_silently_misbehave_are_refused(values, message) -> None:
    with pytest.raises(TicketlabError, match=__import__("re").escape(message)):
        build_hparams("sst2", values)


def test_bad_values_from_the_cli_are_one_clear_error(tmp_path) -> None:
    for args in (["--lr", "inf"], ["--max-grad-norm", "-1"],
                 ["--target-sparsity", "0.95", "--rate", "0.3"]):
        result = runner.invoke(app, ["find", "--task", "sst2", "--root", str(tmp_path), *args])
        assert result.exit_code == 2, result.output
        assert "Error:" in result.output and "Fix:" in result.output
        assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_options_added_later_leave_older_run_ids_alone() -> None:
    """A store written before an option existed keeps its names: ids of runs that leave the
    new option at its default are those of ticketlab 0.1 (recorded from that version)."""
    recorded = {
        "sst2-361819075029": RunHparams(),
        "mlm-6e9616c874dc": RunHparams(
            model=ModelHparams(init_mlm_head_steps=500),
            data=DataHparams(task="mlm", data_dir="x", block_size=128, max_train_samples=10,
                             sample_seed=3),
            train=TrainHparams(lr=5e-5, batch_size=16, epochs=1.0, eval_batch_size=32)),
        "squad-1d5854800426": RunHparams(
            data=DataHparams(task="squad", max_length=384, doc_stride=128),
            train=TrainHparams(lr=3e-5, batch_size=16, epochs=2.0),
            prune=PruneHparams(rewind_step=5, keep_trained_head=True, schedule="remaining")),
    }
    for run_id, hp in recorded.items():
        assert hp.run_id() == run_id
    changed = RunHparams(train=TrainHparams(batch_size=32, gradient_accumulation_steps=2))
    assert "gradient_accumulation_steps" in changed.identity()["train"]
    assert changed.run_id() != RunHparams().run_id()
