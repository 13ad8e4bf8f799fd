"""Masked training: pruned weights stay exactly zero, gradients are masked before clipping."""

from __future__ import annotations

import accelerate
import pytest
import torch

from ticketlab.errors import TicketlabError
from ticketlab.hparams import TrainHparams
from ticketlab.masks import Mask
from ticketlab.prepare import prepare
from ticketlab.pruning import prune
from ticketlab.train import Runtime, evaluate, planned_steps, train

QUIET = Runtime(progress=False, save_weights=False)


@pytest.fixture()
def setup(tiny_hparams):
    return prepare(tiny_hparams())


def half_mask(setup) -> Mask:
    return prune(setup.prunable, Mask.ones_like(setup.prunable), 0.5)


def test_pruned_weights_stay_zero_under_adamw_decay_and_clipping(setup) -> None:
    mask = half_mask(setup)
    hp = TrainHparams(lr=5e-3, batch_size=16, epochs=2, weight_decay=0.1, max_grad_norm=0.5)
    before = {k: p.detach().clone() for k, p in setup.prunable.items()}
    train(setup.model, setup.prunable, mask, setup.train_features, setup.collator, hp, QUIET)
    for name, p in setup.prunable.items():
        kept = mask.tensors[name]
        assert (p[~kept] == 0).all(), name
        assert not torch.equal(p[kept], before[name][kept]), f"{name} did not train"


def test_gradients_are_masked_before_clipping(setup, monkeypatch) -> None:
    mask = half_mask(setup)
    seen: list[bool] = []
    original = accelerate.Accelerator.clip_grad_norm_

    def spy(self, parameters, max_norm, norm_type=2):
        seen.append(all(
            p.grad is None or (p.grad[~mask.tensors[n]] == 0).all()
            for n, p in setup.prunable.items()))
        return original(self, parameters, max_norm, norm_type)

    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", spy)
    hp = TrainHparams(lr=1e-3, batch_size=16, epochs=1)
    train(setup.model, setup.prunable, mask, setup.train_features, setup.collator, hp, QUIET)
    assert seen and all(seen)
    # the spy can fail: without a mask the same gradients are non-zero at clipping time
    seen.clear()
    train(setup.model, setup.prunable, None, setup.train_features, setup.collator, hp, QUIET)
    assert seen and not any(seen)


def test_weights_are_rezeroed_after_an_optimizer_that_moves_zeros(setup, monkeypatch) -> None:
    """The safety net: even an optimizer that nudges every weight leaves pruned ones at 0."""
    mask = half_mask(setup)
    original_step = torch.optim.AdamW.step

    def leaky_step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(1e-3)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", leaky_step)
    hp = TrainHparams(lr=1e-3, batch_size=16, epochs=1)
    train(setup.model, setup.prunable, mask, setup.train_features, setup.collator, hp, QUIET)
    for name, p in setup.prunable.items():
        assert (p[~mask.tensors[name]] == 0).all()


def test_training_is_deterministic_for_a_seed(setup) -> None:
    hp = TrainHparams(lr=1e-3, batch_size=16, epochs=1)
    start = {k: v.clone() for k, v in setup.model.state_dict().items()}
    train(setup.model, setup.prunable, None, setup.train_features, setup.collator, hp, QUIET,
          seed=5)
    first = {k: v.clone() for k, v in setup.model.state_dict().items()}
    setup.model.load_state_dict(start)
    train(setup.model, setup.prunable, None, setup.train_features, setup.collator, hp, QUIET,
          seed=5)
    assert all(torch.equal(first[k], v) for k, v in setup.model.state_dict().items())


def test_steps_follow_epochs_or_max_steps(setup) -> None:
    n = len(setup.train_features["input_ids"])  # 64
    assert planned_steps(n, TrainHparams(batch_size=16, epochs=1.5)) == 6
    assert planned_steps(n, TrainHparams(batch_size=16, max_steps=3)) == 3
    result = train(setup.model, setup.prunable, None, setup.train_features, setup.collator,
                   TrainHparams(batch_size=16, max_steps=3), QUIET)
    assert result.steps == 3


def test_on_step_sees_every_step(setup) -> None:
    steps: list[int] = []
    train(setup.model, setup.prunable, None, setup.train_features, setup.collator,
          TrainHparams(batch_size=16, epochs=1), QUIET, on_step=lambda s, m: steps.append(s))
    assert steps == [1, 2, 3, 4]


def test_non_finite_loss_stops_with_step_and_lr(setup) -> None:
    with torch.no_grad():
        setup.model.classifier.weight.fill_(float("nan"))
    with pytest.raises(TicketlabError, match=r"at step 1 \(learning rate"):
        train(setup.model, setup.prunable, None, setup.train_features, setup.collator,
              TrainHparams(batch_size=16, epochs=1), QUIET)


def test_evaluate_returns_task_metrics_in_original_order(setup) -> None:
    metrics = evaluate(setup.model, setup.task, setup.eval_sets, setup.collator, 7, QUIET)
    assert set(metrics) == {"accuracy", "eval_loss"}
    # same predictions whatever the batch size (length-sorted batches are put back in order)
    again = evaluate(setup.model, setup.task, setup.eval_sets, setup.collator, 32, QUIET)
    assert again["accuracy"] == metrics["accuracy"]
    labels = setup.eval_sets["dev"][0]["labels"]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and majority > 0


def test_gradient_accumulation_gives_the_same_training_in_micro_batches(tiny_hparams) -> None:
    """--gradient-accumulation-steps 2: each optimizer step sees the same examples, in two
    halves weighted by their share; without dropout the trained weights match the one-pass
    run to float32 rounding (and differ from a run that actually changes the batch)."""
    import dataclasses

    from ticketlab.hparams import TrainHparams

    def trained(accumulation: int, batch: int = 16) -> dict[str, torch.Tensor]:
        setup = prepare(tiny_hparams())
        for module in setup.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        hp = TrainHparams(lr=1e-3, batch_size=batch, epochs=1, group_by_length=False,
                          gradient_accumulation_steps=accumulation)
        mask = half_mask(setup)
        train(setup.model, setup.prunable, mask, setup.train_features, setup.collator, hp, QUIET)
        return {k: v.detach().clone() for k, v in setup.model.state_dict().items()}

    one, two = trained(1), trained(2)
    assert all(torch.allclose(one[k], two[k], atol=2e-5) for k in one)
    other = trained(1, batch=8)
    assert not all(torch.allclose(one[k], other[k], atol=2e-5) for k in one)
    assert dataclasses.replace(TrainHparams(), gradient_accumulation_steps=4).batch_size == 32
