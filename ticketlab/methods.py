"""Training methods: what one (micro-)batch contributes to the gradients.

The training loop (:func:`ticketlab.train.train`) owns everything IMP needs around a step —
masking gradients before clipping, re-zeroing pruned weights, snapshots, seeding — and hands
the loss itself to a method: standard fine-tuning here; adversarial training (PGD, FGSM with a
random start, FreeLB on word embeddings) registers beside it. A method composes with every task,
because it only calls the task's ``forward(model, batch)`` and the loop's ``backward(loss)``.

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

#: name -> factory(train_hparams, task) building the method. Adversarial methods join here.
METHODS: dict[str, Callable[..., TrainingMethod]] = {
    "standard": lambda hp=None, task=None: TrainingMethod(),
}


def make_method(name: str, hp: Any = None, task: Any = None) -> TrainingMethod:
    """The training method called ``name`` for these hparams and task."""
    if name not in METHODS:
        raise TicketlabError(f"Unknown training method {name!r}.",
                             f"Use one of: {', '.join(METHODS)}.")
    return METHODS[name](hp, task)
