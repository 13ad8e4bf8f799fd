"""Adversarial perturbations: PGD, FGSM with a random start, and FreeLB's ascent, written here.

Why not an attack library: torchattacks needs torchvision (which does not import against the
CPU torch here) and pins an old requests; TextAttack pulls many packages and downloads its
word-substitution resources at run time. What robust tickets need is small — a projected
gradient ascent in a continuous input space — and it must cooperate with the masked training
loop (no parameter gradients from the attack steps, seeded random starts for exact resume).

An :class:`InputSpace` says where the attack moves and what stays valid:

- :class:`PixelSpace`: images, perturbed in the *unnormalised* pixel space [0, 1] (ε = 8/255
  means 8 grey levels), while the model keeps receiving normalised ``pixel_values``: the
  perturbation δ enters as ``pixel_values + δ / std``, so δ = 0 is bit-identical to no attack.
  The ball is L∞ or L2 per image.
- :class:`EmbeddingSpace`: text, whose tokens are discrete, perturbed on the word embeddings
  (``inputs_embeds = E[input_ids] + δ``), each token's δ bounded in its own ε-ball (L2 or L∞ per
  token); padding stays unperturbed and the token ids are never touched.

Conventions (those of the papers' code): PGD is untargeted on the task loss, from a uniform
random start inside the ball, projected after every step (Madry et al. 2018; Double-Win-LTH's
``LinfPGDAttack(eps=8/255, eps_iter=2/255, rand_init=True, clip 0..1)``); FGSM-RS is one step
of 1.25·ε from a random start (Wong et al. 2020, "Fast is better than free"); FreeLB
accumulates the parameter gradients of every ascent step (Zhu et al. 2020). ε = 0 takes no
attack step at all: the ball is a point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ticketlab.errors import TicketlabError

NORMS = ("linf", "l2")

Forward = Callable[[Any, dict[str, Any]], Any]


class InputSpace(ABC):
    """Where an attack moves: the clean point x0 of a batch and how x0 + δ is fed back."""

    @abstractmethod
    def start(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The clean input, with its autograd graph kept (embeddings are trained through it)."""

    @abstractmethod
    def batch_with(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor
                   ) -> dict[str, Any]:
        """The model's batch at x0 + δ."""

    @abstractmethod
    def norm_dims(self, x0: torch.Tensor) -> tuple[int, ...]:
        """The dimensions one ε-ball spans (per image; per token)."""

    def live(self, batch: dict[str, Any], x0: torch.Tensor) -> torch.Tensor:
        """1 where the input may be perturbed, 0 where it must stay (padding)."""
        return torch.ones_like(x0)

    def valid(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor
              ) -> torch.Tensor:
        """δ clipped so that x0 + δ stays a valid input (pixels in range)."""
        return delta

    # --- shared geometry ------------------------------------------------------------------
    def project(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor,
                eps: float, norm: str) -> torch.Tensor:
        """δ projected into the ε-ball, then onto the valid inputs, padding zeroed."""
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            dims = self.norm_dims(x0)
            n = delta.norm(p=2, dim=dims, keepdim=True)
            delta = delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
        return self.valid(batch, x0, delta) * self.live(batch, x0)

    def direction(self, grad: torch.Tensor, x0: torch.Tensor, norm: str) -> torch.Tensor:
        """The steepest-ascent direction of unit norm: sign(g) for L∞, g/‖g‖ for L2."""
        if norm == "linf":
            return grad.sign()
        dims = self.norm_dims(x0)
        return grad / grad.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)

    def random_start(self, batch: dict[str, Any], x0: torch.Tensor, eps: float,
                     norm: str) -> torch.Tensor:
        """A uniform point of the ε-ball (global torch RNG: seeded per level by the loop)."""
        if norm == "linf":
            delta = torch.empty_like(x0).uniform_(-eps, eps)
        else:
            dims = self.norm_dims(x0)
            delta = torch.randn_like(x0)
            delta = delta / delta.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
            size = 1
            for d in dims:
                size *= x0.shape[d]
            radius = torch.rand(delta.shape[:len(delta.shape) - len(dims)] + (1,) * len(dims),
                                device=x0.device, dtype=x0.dtype) ** (1.0 / size)
            delta = delta * radius * eps
        return self.project(batch, x0, delta, eps, norm)


class PixelSpace(InputSpace):
    """Images in [low, high] before normalisation ``(x - mean) / std`` (per channel)."""

    def __init__(self, mean: Any, std: Any, key: str = "pixel_values", low: float = 0.0,
                 high: float = 1.0) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.key, self.low, self.high = key, low, high

    def _pixels(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised * self.std.to(normalised) + self.mean.to(normalised)

    def start(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        return self._pixels(batch[self.key]).detach()

    def batch_with(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor
                   ) -> dict[str, Any]:
        return {**batch, self.key: batch[self.key] + delta / self.std.to(delta)}

    def norm_dims(self, x0: torch.Tensor) -> tuple[int, ...]:
        return tuple(range(1, x0.dim()))

    def valid(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor
              ) -> torch.Tensor:
        return torch.max(torch.min(delta, self.high - x0), self.low - x0)


class EmbeddingSpace(InputSpace):
    """Word embeddings of a text model: ``inputs_embeds = E[input_ids] + δ``."""

    def start(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        net = model.module if hasattr(model, "module") else model
        return net.get_input_embeddings()(batch["input_ids"])

    def batch_with(self, batch: dict[str, Any], x0: torch.Tensor, delta: torch.Tensor
                   ) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if k != "input_ids"}
        out["inputs_embeds"] = x0 + delta
        return out

    def norm_dims(self, x0: torch.Tensor) -> tuple[int, ...]:
        return (-1,)  # one ball per token

    def live(self, batch: dict[str, Any], x0: torch.Tensor) -> torch.Tensor:
        mask = batch.get("attention_mask")
        if mask is None:
            return torch.ones_like(x0)
        return mask.unsqueeze(-1).to(x0.dtype).expand_as(x0)


@dataclass(frozen=True)
class Attack:
    """One attack's settings: ε, step size α, steps K, the norm, and a random start."""

    eps: float
    step: float
    steps: int
    norm: str = "linf"
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise TicketlabError(f"Unknown --adv-norm {self.norm!r}.",
                                 f"Use one of: {', '.join(NORMS)}.")
        for name in ("eps", "step"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0 and value == value
                    and value != float("inf")):
                flag = "--adv-" + name
                raise TicketlabError(f"{flag} {value} must be a finite number >= 0.",
                                     "CIFAR's papers use --adv-eps 0.0314 (8/255) and "
                                     "--adv-step 0.0078 (2/255).")
        if self.steps < 1:
            raise TicketlabError(f"--adv-steps {self.steps} must be at least 1.",
                                 "The papers use 10 (PGD-10); 3 is cheaper.")


def perturb(model: Any, batch: dict[str, Any], forward: Forward, space: InputSpace,
            attack: Attack) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD: (x0, δ) with δ maximising the task loss within the ball (K projected steps).

    Only δ receives gradients (``torch.autograd.grad``), so the attack leaves the model's
    parameter gradients untouched; x0 keeps its graph for the training pass that follows.
    """
    x0 = space.start(model, batch)
    if attack.eps == 0:
        return x0, torch.zeros_like(x0)
    base = x0.detach()
    with torch.enable_grad():
        delta = (space.random_start(batch, base, attack.eps, attack.norm)
                 if attack.random_start else torch.zeros_like(base))
        for _ in range(attack.steps):
            delta = delta.detach().requires_grad_(True)
            loss = forward(model, space.batch_with(batch, base, delta)).loss
            (grad,) = torch.autograd.grad(loss, delta)
            delta = space.project(batch, base, delta.detach() + attack.step * space.direction(
                grad, base, attack.norm), attack.eps, attack.norm)
    return x0, delta.detach()


def fgsm_rs(eps: float, norm: str = "linf") -> Attack:
    """FGSM with a random start (Wong et al. 2020): one step of α = 1.25·ε."""
    return Attack(eps=eps, step=1.25 * eps, steps=1, norm=norm, random_start=True)
