"""Adversarial attacks and training, checked by hand (issue 13): the ε-ball and the pixel range
hold, FGSM is the closed-form worst case of a linear model, PGD beats FGSM, robust accuracy never
exceeds standard accuracy, ε = 0 is standard training bit for bit, text attacks leave the token
ids alone, pruned weights stay zero, and an adversarial run resumes bit-identically."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from ticketlab.attacks import Attack, EmbeddingSpace, PixelSpace, fgsm_rs, perturb
from ticketlab.errors import TicketlabError
from ticketlab.hparams import build_hparams
from ticketlab.masks import Mask
from ticketlab.prepare import prepare
from ticketlab.pruning import prune
from ticketlab.train import Runtime, evaluate, train

QUIET = Runtime(progress=False, save_weights=False)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LinearLoss(torch.nn.Module):
    """loss = <w, x> on the unnormalised pixels: ∂loss/∂x = w, so the worst case in an
    L∞ ball is ε·sign(w) and in an L2 ball ε·w/‖w‖ (per image)."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = w

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> object:
        x = pixel_values * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1,
                                                                                           1)
        return SimpleNamespace(loss=(x * self.w).sum())


def pixel_batch(seed: int = 0, n: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, 8, 8, generator=g)
    normalised = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3,
                                                                                         1, 1)
    return {"pixel_values": normalised, "labels": torch.zeros(n, dtype=torch.long)}


def call(model, batch):
    return model(**batch)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_perturbation_stays_in_the_ball_and_in_the_pixel_range(norm) -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 3, 8, 8)
    space = PixelSpace(MEAN, STD)
    batch = pixel_batch()
    for eps in (8 / 255, 0.5, 3.0):  # 3.0 in L2 and 0.5 in L∞ hit the [0, 1] walls too
        x0, delta = perturb(LinearLoss(w), batch, call, space, Attack(eps, eps / 3, 7, norm))
        adv = x0 + delta
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        if norm == "linf":
            assert delta.abs().max() <= eps + 1e-6
        else:
            assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-5
        fed = space.batch_with(batch, x0, delta)["pixel_values"]
        assert torch.allclose(fed * torch.tensor(STD).view(1, 3, 1, 1)
                              + torch.tensor(MEAN).view(1, 3, 1, 1), adv, atol=1e-6)


def test_fgsm_on_a_linear_model_is_the_closed_form_worst_case() -> None:
    torch.manual_seed(1)
    w = torch.randn(1, 3, 8, 8)
    space = PixelSpace(MEAN, STD)
    batch = {**pixel_batch(), "pixel_values": torch.zeros(4, 3, 8, 8)}  # pixels ≈ mean: no wall
    eps = 0.01
    _, linf = perturb(LinearLoss(w), batch, call, space, Attack(eps, eps, 1, "linf",
                                                                 random_start=False))
    assert torch.allclose(linf, (eps * w.sign()).expand_as(linf), atol=1e-7)
    _, l2 = perturb(LinearLoss(w), batch, call, space, Attack(eps, eps, 1, "l2",
                                                               random_start=False))
    assert torch.allclose(l2, (eps * w / w.norm()).expand_as(l2), atol=1e-7)
    # FGSM-RS takes one step of 1.25 ε from its random start, then projects
    assert fgsm_rs(eps).step == pytest.approx(1.25 * eps) and fgsm_rs(eps).steps == 1


@pytest.fixture()
def tiny(tiny_hparams):
    return prepare(tiny_hparams())


def text_loss(setup, batch, x0, delta) -> float:
    with torch.no_grad():
        return float(setup.task.forward(setup.model,
                                        EmbeddingSpace().batch_with(batch, x0, delta)).loss)


def first_batch(setup, n: int = 16) -> dict[str, torch.Tensor]:
    from ticketlab.train import FeatureDataset

    data = FeatureDataset(setup.eval_sets["dev"][0])
    return setup.collator([data[i] for i in range(n)])


def test_pgd_finds_a_higher_loss_than_fgsm_and_leaves_token_ids_alone(tiny) -> None:
    tiny.model.eval()
    batch = first_batch(tiny)
    ids = batch["input_ids"].clone()
    space = EmbeddingSpace()
    x0 = space.start(tiny.model, batch).detach()
    eps = 0.5
    _, fgsm = perturb(tiny.model, batch, tiny.task.forward, space,
                      Attack(eps, eps, 1, "l2", random_start=False))
    _, pgd = perturb(tiny.model, batch, tiny.task.forward, space,
                     Attack(eps, eps / 4, 10, "l2", random_start=False))
    clean = text_loss(tiny, batch, x0, torch.zeros_like(x0))
    assert text_loss(tiny, batch, x0, pgd) >= text_loss(tiny, batch, x0, fgsm) > clean
    assert torch.equal(batch["input_ids"], ids)
    assert "input_ids" not in space.batch_with(batch, x0, pgd)
    per_token = pgd.norm(dim=-1)
    assert per_token.max() <= eps + 1e-5
    assert (per_token[batch["attention_mask"] == 0] == 0).all()  # padding is never perturbed


def test_robust_accuracy_is_at_most_standard_accuracy(tiny) -> None:
    metrics = evaluate(tiny.model, tiny.task, tiny.eval_sets, tiny.collator, 16, QUIET,
                       attack=Attack(0.5, 0.2, 5, "l2"), space=EmbeddingSpace())
    assert 0 <= metrics["robust_accuracy"] <= metrics["accuracy"]
    assert metrics["robust_eval_loss"] > metrics["eval_loss"]
    again = evaluate(tiny.model, tiny.task, tiny.eval_sets, tiny.collator, 16, QUIET,
                     attack=Attack(0.5, 0.2, 5, "l2"), space=EmbeddingSpace())
    assert again == metrics  # the evaluation attack is seeded: every level is attacked alike


def trained_state(tiny_hparams, **adv) -> dict[str, torch.Tensor]:
    from ticketlab.methods import make_method

    hp = tiny_hparams()
    hp = dataclasses.replace(hp, train=dataclasses.replace(hp.train, **adv))
    setup = prepare(hp)
    mask = prune(setup.prunable, Mask.ones_like(setup.prunable), 0.5)
    train(setup.model, setup.prunable, mask, setup.train_features, setup.collator, hp.train,
          QUIET, seed=0, forward=setup.task.forward,
          method=make_method(hp.train.adversarial, hp.train, setup))
    return {"state": {k: v.detach().clone() for k, v in setup.model.state_dict().items()},
            "mask": mask, "prunable": setup.prunable}


@pytest.mark.parametrize("method", ["pgd", "freelb"])
def test_eps_zero_adversarial_training_is_standard_training_bit_for_bit(tiny_hparams, method):
    standard = trained_state(tiny_hparams)["state"]
    zero = trained_state(tiny_hparams, adversarial=method, adv_norm="l2", adv_eps=0.0,
                         adv_step=0.1, adv_steps=3)["state"]
    assert all(torch.equal(standard[k], zero[k]) for k in standard)
    moved = trained_state(tiny_hparams, adversarial=method, adv_norm="l2", adv_eps=0.5,
                          adv_step=0.2, adv_steps=2)["state"]
    assert not all(torch.equal(standard[k], moved[k]) for k in standard)


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "freelb"])
def test_pruned_weights_stay_exactly_zero_under_adversarial_training(tiny_hparams, method):
    out = trained_state(tiny_hparams, adversarial=method, adv_norm="l2", adv_eps=0.5,
                        adv_step=0.2, adv_steps=2)
    for name, p in out["prunable"].items():
        assert (p[~out["mask"].tensors[name]] == 0).all(), name


def test_adversarial_options_are_declared_once_and_validated() -> None:
    hp = build_hparams("sst2", {"adversarial": "freelb"})
    assert (hp.train.adv_norm, hp.train.adv_eps, hp.train.adv_step, hp.train.adv_steps) == (
        "l2", 0.2, 0.1, 2)  # the task's defaults (FreeLB's SST-2 settings)
    assert build_hparams("sst2", {}).train.adv_eps is None  # off: no settings, same run id
    assert build_hparams("sst2", {}).run_id() == "sst2-361819075029"
    with pytest.raises(TicketlabError, match="--adv-eps has no effect without --adversarial "
                                             "or --eval-attack"):
        build_hparams("sst2", {"adv_eps": 0.1})
    with pytest.raises(TicketlabError, match="did you mean 'pgd'"):
        build_hparams("sst2", {"adversarial": "pgdd"})
    with pytest.raises(TicketlabError, match="--adv-eps -0.1 must be a finite number"):
        build_hparams("sst2", {"adversarial": "pgd", "adv_eps": -0.1})
    robust = build_hparams("sst2", {"eval_attack": "pgd"})
    assert robust.train.eval_attack_steps == 10 and robust.train.adv_steps is None


def test_eval_attack_on_a_task_without_a_correct_prediction_is_refused(glue_dir) -> None:
    hp = build_hparams("stsb", {"eval_attack": "pgd", "data_dir": str(glue_dir)})
    with pytest.raises(TicketlabError, match="Task stsb has no robust evaluation"):
        prepare(hp)
