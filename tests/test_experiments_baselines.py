"""Baselines as branches of an IMP run: each kind's defining property, storage, resume, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import ticketlab.levels as levels
from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.experiments.baselines import (
    BASELINE_KINDS,
    baseline_start,
    branch_path,
    branch_records,
    imp_mask_at,
    run_branch,
    standard_mask,
)
from ticketlab.experiments.common import with_seed
from ticketlab.hparams import DataHparams, ModelHparams, PruneHparams, RunHparams, TrainHparams
from ticketlab.imp import find_ticket, finetune
from ticketlab.masks import Mask
from ticketlab.models import layer_of, role_of
from ticketlab.prepare import prepare
from ticketlab.store import Run
from ticketlab.train import Runtime

QUIET = Runtime(progress=False)


def quiet() -> Console:
    return Console(quiet=True)


@pytest.fixture(scope="module")
def imp_template(tiny_bert_dir, glue_dir, tmp_path_factory) -> Run:
    """A finished tiny IMP run with levels 0, 1, 2 (0, 10, 20 % sparsity) and stored weights,
    trained once for the module."""
    hp = tiny_run_hparams(tiny_bert_dir, glue_dir)
    return find_ticket(hp, tmp_path_factory.mktemp("imp") / "runs", QUIET, quiet())


@pytest.fixture()
def imp_run(imp_template, tmp_path) -> Run:
    """A private copy of the template run (branches are written into it)."""
    return Run(Path(shutil.copytree(imp_template.path, tmp_path / "runs" / imp_template.path.name)))


def tiny_run_hparams(model: Path, glue: Path) -> RunHparams:
    """The same run as conftest's ``tiny_hparams()`` (module-scoped fixtures cannot use it)."""
    return RunHparams(
        model=ModelHparams(model=str(model)),
        data=DataHparams(task="sst2", data_dir=str(glue), max_train_samples=64,
                         max_eval_samples=32, max_length=32),
        train=TrainHparams(lr=1e-3, batch_size=16, epochs=1, weight_decay=0.01, seed=0),
        prune=PruneHparams(target_sparsity=0.2),
    )


def prunable_state(setup, state) -> dict[str, torch.Tensor]:
    return {n: state[setup.full_key(n)] for n in setup.prunable}


def assert_magnitude_mask(mask: Mask, weights: dict[str, torch.Tensor]) -> None:
    """Every kept weight is at least as large in magnitude as every pruned one (globally)."""
    kept = torch.cat([weights[n].abs()[t].flatten() for n, t in mask.tensors.items()])
    pruned = torch.cat([weights[n].abs()[~t].flatten() for n, t in mask.tensors.items()])
    assert pruned.numel() > 0 and kept.min() >= pruned.max()


def test_every_baseline_has_its_defining_property(tiny_hparams, imp_run) -> None:
    assert tiny_run_hparams(Path(tiny_hparams().model.model), Path(tiny_hparams().data.data_dir)
                            ) == tiny_hparams()
    setup = prepare(with_seed(tiny_hparams(), 3))
    imp_mask = imp_mask_at(imp_run, 2)
    theta0 = prunable_state(setup, setup.theta0)
    head = setup.head_names()

    random_mask, state = baseline_start("random", setup, imp_mask, 3)
    assert random_mask.num_kept == imp_mask.num_kept and random_mask != imp_mask
    assert random_mask.per_tensor_sparsity() != imp_mask.per_tensor_sparsity()
    assert all(torch.equal(state[k], v) for k, v in setup.theta0.items())

    layerwise, _ = baseline_start("layerwise-random", setup, imp_mask, 3)
    assert layerwise != imp_mask
    for name, kept in imp_mask.tensors.items():
        assert int(layerwise.tensors[name].sum()) == int(kept.sum()), name

    shuffled_mask, state = baseline_start("shuffle", setup, imp_mask, 3)
    assert shuffled_mask == imp_mask
    for name, w in prunable_state(setup, state).items():
        assert torch.equal(w.flatten().sort().values, theta0[name].flatten().sort().values)
        assert not torch.equal(w, theta0[name]), name
    assert all(torch.equal(state[k], setup.theta0[k]) for k in head)

    layers_mask, state = baseline_start("shuffle-layers", setup, imp_mask, 1)
    assert layers_mask == imp_mask
    moved = 0
    for name, w in prunable_state(setup, state).items():
        same_role = [theta0[n] for n in theta0 if role_of(n) == role_of(name)
                     and (layer_of(n) is None) == (layer_of(name) is None)]
        assert any(torch.equal(w, t) for t in same_role), name  # a whole layer's matrix
        moved += not torch.equal(w, theta0[name])
    assert moved > 0

    reinit_mask, state = baseline_start("random-reinit", setup, imp_mask, 3)
    again = prunable_state(setup, baseline_start("random-reinit", setup, imp_mask, 3)[1])
    other = prunable_state(setup, baseline_start("random-reinit", setup, imp_mask, 4)[1])
    assert reinit_mask == imp_mask
    std = setup.model.config.initializer_range
    for name, w in prunable_state(setup, state).items():
        assert not torch.equal(w, theta0[name])
        assert torch.equal(w, again[name]) and not torch.equal(w, other[name])
        assert abs(w.std().item() - std) < 0.25 * std, name  # the config's own initialiser
    for k, v in setup.theta0.items():  # embeddings, LayerNorms, biases, head: untouched
        if k.removeprefix(setup.model.base_model_prefix + ".") not in setup.prunable:
            assert torch.equal(state[k], v), k

    one_shot, state = baseline_start("one-shot", setup, imp_mask, 3)
    assert one_shot.num_kept == imp_mask.num_kept and one_shot != imp_mask
    assert_magnitude_mask(one_shot, theta0)

    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in setup.theta0.items()}
    standard = standard_mask(setup, trained, imp_mask.sparsity, 0)
    assert standard.num_kept == imp_mask.num_kept
    assert_magnitude_mask(standard, prunable_state(setup, trained))


def spy_train(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = levels.train

    def spy(*args, **kwargs):
        calls.append(kwargs.get("description", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(levels, "train", spy)
    return calls


def test_a_branch_is_stored_like_a_level_and_resumes(imp_run, monkeypatch) -> None:
    calls = spy_train(monkeypatch)
    done = run_branch(imp_run, 2, "random", 0, QUIET, quiet())
    assert done.path == branch_path(imp_run, "random", 2, 0) == imp_run.path / \
        "branches" / "random-level2-seed0"
    assert done.levels() == [2] and len(calls) == 1
    rec = done.metrics(2)
    assert rec["branch"] == {"kind": "random", "seed": 0, "run": imp_run.path.name}
    assert rec["sparsity"] == pytest.approx(imp_run.metrics(2)["sparsity"], abs=1e-12)
    stored = Mask.load(done.level_dir(2) / "mask.safetensors")
    assert stored.num_kept == imp_mask_at(imp_run, 2).num_kept
    from ticketlab.levels import load_level_weights

    weights = load_level_weights(done.level_dir(2) / "model.safetensors")
    for rel, kept in stored.tensors.items():
        assert (weights["bert." + rel][~kept] == 0).all()

    again = run_branch(imp_run, 2, "random", 0, QUIET, quiet())
    assert again.path == done.path and len(calls) == 1  # stored: not trained again
    assert [r["branch"]["kind"] for r in branch_records(imp_run)] == ["random"]
    assert not any((imp_run.path / "branches").glob("*/level_2/.*.tmp"))


def test_standard_pruning_reuses_the_runs_fine_tuned_model(imp_run, monkeypatch) -> None:
    calls = spy_train(monkeypatch)
    same_seed = run_branch(imp_run, 1, "standard", 0, QUIET, quiet())
    assert len(calls) == 1  # level 0's stored weights are this seed's fine-tuned model
    assert same_seed.metrics(1)["train"]["dense_seconds"] == 0.0
    other_seed = run_branch(imp_run, 1, "standard", 1, QUIET, quiet())
    assert len(calls) == 3 and other_seed.metrics(1)["train"]["dense_seconds"] > 0


@pytest.mark.parametrize("level,kind,match", [
    (2, "randm", "Unknown baseline kind 'randm'"),
    (0, "random", "is the full model"),
    (5, "random", "has no mask yet"),
])
def test_bad_branch_requests_leave_nothing_behind(imp_run, level, kind, match) -> None:
    with pytest.raises(TicketlabError, match=match):
        run_branch(imp_run, level, kind, 0, QUIET, quiet())
    assert not (imp_run.path / "branches").exists()


def test_branches_need_an_imp_run(tiny_hparams, tmp_path) -> None:
    ft = finetune(tiny_hparams(), None, tmp_path, QUIET, quiet())
    with pytest.raises(TicketlabError, match="'finetune' run"):
        run_branch(ft, 1, "random", 0, QUIET, quiet())


def test_branch_command(imp_run) -> None:
    runner = CliRunner()
    root = imp_run.path.parent
    result = runner.invoke(app, ["branch", imp_run.path.name[:10], "--level", "1", "--kind",
                                 "shuffle", "--shuffle-layers", "--seeds", "2", "--root",
                                 str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "shuffle-layers at level 1:" in result.output and "over 2 seed(s)" in result.output
    assert {r["branch"]["seed"] for r in branch_records(imp_run)} == {0, 1}
    bad = runner.invoke(app, ["branch", imp_run.path.name, "--level", "1", "--kind", "random",
                              "--shuffle-layers", "--root", str(root)])
    assert bad.exit_code == 2 and "--shuffle-layers only applies" in bad.output
    assert set(BASELINE_KINDS) >= {"random", "layerwise-random", "random-reinit", "shuffle",
                                   "one-shot", "standard"}
