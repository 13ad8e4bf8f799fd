"""Training methods: what one (micro-)batch contributes to the gradients.

The training loop (:func:`ticketlab.train.train`) owns everything IMP needs around a step —
masking gradients before clipping, re-zeroing pruned weights, snapshots, seeding — and hands
the loss itself to a method: standard fine-tuning, or adversarial training (PGD, FGSM with a
random start, FreeLB) in the input space the model family declares (pixels or word
embeddings, :mod:`ticketlab.attacks`). A method composes with every task, because it only calls
the task's ``forward(model, batch)`` and the loop's ``backward(loss)``.

A method may call ``backward`` more than once (FreeLB accumulates the gradients of its ascent
steps), and returns the loss value it reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ticketlab.errors import TicketlabError

Forward = Callable[[Any, dict[str, Any]], Any]
Backward = Callable[[Any], None]


class TrainingMethod:
    """The standard step: one forward pass, one backward pass of the task's loss."""

    name = "standard"

    def step(self, model: Any, batch: dict[str, Any], forward: Forward,
             backward: Backward) -> float:
        loss = forward(model, batch).loss
        backward(loss)
        return loss.item()


StandardTraining = TrainingMethod


class AdversarialTraining(TrainingMethod):
    """PGD adversarial training (Madry et al.): the loss at the worst point of the ε-ball
    found by K projected steps; the attack steps leave the parameter gradients alone."""

    name = "pgd"

    def __init__(self, space: Any, attack: Any) -> None:
        self.space, self.attack = space, attack

    def step(self, model: Any, batch: dict[str, Any], forward: Forward,
             backward: Backward) -> float:
        from ticketlab.attacks import perturb

        x0, delta = perturb(model, batch, forward, self.space, self.attack)
        loss = forward(model, self.space.batch_with(batch, x0, delta)).loss
        backward(loss)
        return loss.item()


class FreeLB(TrainingMethod):
    """FreeLB (Zhu et al. 2020): K ascent steps on δ, each one's loss back-propagated with
    weight 1/K into the parameters too, so the update averages the gradients along the
    ascent path ("free" adversarial training)."""

    name = "freelb"

    def __init__(self, space: Any, attack: Any) -> None:
        self.space, self.attack = space, attack

    def step(self, model: Any, batch: dict[str, Any], forward: Forward,
             backward: Backward) -> float:
        import torch

        space, attack = self.space, self.attack
        base = space.start(model, batch).detach()
        if attack.eps == 0:
            loss = forward(model, space.batch_with(batch, space.start(model, batch),
                                                   torch.zeros_like(base))).loss
            backward(loss)
            return loss.item()
        delta = (space.random_start(batch, base, attack.eps, attack.norm)
                 if attack.random_start else torch.zeros_like(base))
        total = 0.0
        for _ in range(attack.steps):
            delta = delta.detach().requires_grad_(True)
            # x0 is looked up again each step: its graph (the embeddings train through it) is
            # freed by each backward, and the lookup costs nothing next to the forward pass
            x0 = space.start(model, batch)
            loss = forward(model, space.batch_with(batch, x0, delta)).loss / attack.steps
            backward(loss)
            total += loss.item()
            delta = space.project(batch, base, delta.detach() + attack.step * space.direction(
                delta.grad, base, attack.norm), attack.eps, attack.norm)
        return total


def _attack_of(hp: Any, task: Any) -> Any:
    from ticketlab.attacks import Attack, fgsm_rs

    if hp.adv_eps is None or hp.adv_step is None or hp.adv_steps is None:
        raise TicketlabError(
            f"Task {getattr(task, 'name', '?')} has no default adversarial budget.",
            "Give --adv-eps, --adv-step and --adv-steps (e.g. 0.0314, 0.0078 and 3 for "
            "CIFAR images in [0, 1]).")
    if hp.adversarial == "fgsm-rs":
        return fgsm_rs(hp.adv_eps, hp.adv_norm)
    return Attack(hp.adv_eps, hp.adv_step, hp.adv_steps, hp.adv_norm)


#: name -> factory(train_hparams, setup) building the method.
METHODS: dict[str, Callable[[Any, Any], TrainingMethod]] = {
    "none": lambda hp, setup: TrainingMethod(),
    "pgd": lambda hp, setup: AdversarialTraining(setup.input_space(),
                                                 _attack_of(hp, setup.task)),
    "fgsm-rs": lambda hp, setup: AdversarialTraining(setup.input_space(),
                                                     _attack_of(hp, setup.task)),
    "freelb": lambda hp, setup: FreeLB(setup.input_space(), _attack_of(hp, setup.task)),
}


def make_method(name: str, hp: Any = None, setup: Any = None) -> TrainingMethod:
    """The training method called ``name`` (``--adversarial``) for these hparams and setup."""
    if name not in METHODS:
        raise TicketlabError(f"Unknown --adversarial {name!r}.",
                             f"Use one of: {', '.join(METHODS)}.")
    return METHODS[name](hp, setup)
