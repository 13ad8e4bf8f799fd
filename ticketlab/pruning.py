"""Pruning: the sparsity schedule of the levels, and the criteria that pick which surviving
weights to remove next.

Only weights that survive the current mask compete; a pruned weight never comes back. Every
criterion removes an exact number of weights (ties broken by position), so the sparsities of
the paper's code come out exactly: 10 %, 20 %, ... of the prunable set.

A criterion is one entry of :data:`CRITERIA`: a scoring function (higher = keep), whether the
ranking is global or per matrix, and optionally a *statistics collector* that the training loop
feeds after every backward pass — for criteria that need what happened during training
(movement pruning's −w·∂L/∂w). Adding a criterion is one function plus one entry; the CLI's
``--method`` choices and help come from the registry.

torch is imported inside the functions, so ``import ticketlab.pruning`` stays light (the CLI
and the hparams read :data:`CRITERIA`'s names at start-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ticketlab.errors import TicketlabError

if TYPE_CHECKING:
    import torch

    from ticketlab.masks import Mask


# --- the schedule -----------------------------------------------------------------------------
def level_sparsity(level: int, rate: float, schedule: str) -> float:
    """Target sparsity of a level: ``level*rate`` (of the original) or ``1-(1-rate)^level``."""
    if schedule == "original":
        return min(round(level * rate, 12), 1.0)
    if schedule == "remaining":
        return round(1.0 - (1.0 - rate) ** level, 12)
    raise TicketlabError(f"Unknown schedule {schedule!r}.", "Use 'original' or 'remaining'.")


def sparsity_schedule(target: float, rate: float, schedule: str) -> list[float]:
    """Sparsity of every level from 0 (the full model) until the target is reached.

    The schedule is never bent to hit the target exactly, so a longer run later continues the
    same levels: with the paper's 10 %-of-original, target 0.7 gives 0, 0.1, ..., 0.7; with
    10 %-of-remaining it stops at the first level at or above the target (0.718 for 0.7).
    A target beyond the last level below 1 is refused by ``PruneHparams``.
    """
    levels = [0.0]
    while levels[-1] < target - 1e-9:
        nxt = level_sparsity(len(levels), rate, schedule)
        if nxt >= 1.0:
            break
        levels.append(nxt)
    return levels


# --- training-time statistics -----------------------------------------------------------------
class MovementScores:
    """Movement pruning's score, accumulated while a level trains (Sanh et al., 2020):
    S = −Σ_t w_t · ∂L/∂w_t over the level's optimizer steps. A weight moving away from zero
    scores high and is kept; one shrinking towards zero scores low, whatever its magnitude.

    The loop calls :meth:`after_backward` once per optimizer step, after the pruned weights'
    gradients are zeroed and before clipping (the loss's own gradient, not the clipped one).
    """

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        import torch

        self.params = params
        self.scores = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                       for n, p in params.items()}

    def after_backward(self, step: int) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                if p.grad is not None:
                    self.scores[n].sub_(p.detach().float() * p.grad.float())

    def result(self) -> dict[str, torch.Tensor]:
        return {n: s.detach().cpu() for n, s in self.scores.items()}


# --- criteria ---------------------------------------------------------------------------------
Scorer = Callable[["dict[str, torch.Tensor]", "Mask", Any, "dict[str, torch.Tensor] | None"],
                  "dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class Criterion:
    """One way of ranking weights: ``score(weights, mask, generator, stats)`` returns a score
    per entry of every matrix (higher = keep); ``scope`` is ``global`` (one ranking over the
    whole prunable set) or ``layerwise`` (every matrix pruned to the same sparsity);
    ``collector`` builds the training-time statistics the score needs (None: none)."""

    name: str
    help: str
    score: Scorer
    scope: str = "global"
    collector: Callable[[dict[str, Any]], Any] | None = None


def _magnitude(weights: dict, mask: Mask, generator: Any, stats: Any) -> dict:
    return {n: weights[n].detach().float().cpu().abs() for n in mask.tensors}


def _normalized_magnitude(weights: dict, mask: Mask, generator: Any, stats: Any) -> dict:
    out = {}
    for n, kept_bits in mask.tensors.items():
        a = weights[n].detach().float().cpu().abs()
        kept = a[kept_bits]
        out[n] = a / (kept.mean() if kept.numel() else 1.0)
    return out


def _random(weights: dict, mask: Mask, generator: Any, stats: Any) -> dict:
    import torch

    return {n: torch.rand(t.shape, generator=generator) for n, t in mask.tensors.items()}


def _movement(weights: dict, mask: Mask, generator: Any, stats: Any) -> dict:
    if stats is None:
        raise TicketlabError(
            "Movement pruning ranks weights by how they moved while training, but no "
            "training statistics were given.",
            "Use --method movement with `ticketlab find` (it collects them during each level); "
            "a one-shot mask of untrained weights needs --method global.")
    return {n: stats[n].float().cpu() for n in mask.tensors}


#: name -> criterion. The order is the order of ``--method``'s help.
CRITERIA: dict[str, Criterion] = {c.name: c for c in (
    Criterion("global", "one magnitude ranking over every prunable matrix (the paper)",
              _magnitude),
    Criterion("layerwise", "each matrix pruned to the same sparsity by its own magnitudes",
              _magnitude, scope="layerwise"),
    Criterion("global-normalized", "one ranking of |w| / its matrix's mean |w| (small-valued "
              "matrices such as MiniLM's pooler are not wiped out first)",
              _normalized_magnitude),
    Criterion("random", "surviving weights removed uniformly at random (seeded)", _random),
    Criterion("movement", "movement pruning (Sanh et al. 2020): rank by −Σ w·∂L/∂w "
              "accumulated while the level trains", _movement, collector=MovementScores),
)}


def criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise TicketlabError(f"Unknown pruning method {name!r}.",
                             f"Use one of: {', '.join(CRITERIA)}.")
    return CRITERIA[name]


def methods_help() -> str:
    """``--method``'s help, generated from the registry."""
    return "; ".join(f"{c.name}: {c.help}" for c in CRITERIA.values())


# --- pruning ----------------------------------------------------------------------------------
def _kept_target(num_total: int, sparsity: float) -> int:
    return num_total - int(round(sparsity * num_total))


def prune(
    weights: dict[str, torch.Tensor],
    mask: Mask,
    sparsity: float,
    method: str = "global",
    seed: int = 0,
    stats: dict[str, torch.Tensor] | None = None,
) -> Mask:
    """Return a new mask at ``sparsity`` (fraction of the whole prunable set), from ``mask``.

    ``method`` names a :data:`CRITERIA` entry; ``stats`` are the training-time statistics of
    criteria that collect them (movement pruning). ``seed`` drives the random criterion.
    """
    import torch

    from ticketlab.masks import Mask

    crit = criterion(method)
    if not 0 <= sparsity < 1:
        raise TicketlabError(f"Sparsity {sparsity} is outside [0, 1).", "Use e.g. 0.7.")
    names = list(mask.tensors)
    missing = [n for n in names if n not in weights]
    if missing:
        raise TicketlabError(f"No weights for masked tensors {missing[:3]}.", "Internal mismatch.")
    if sparsity < mask.sparsity - 1e-12:
        raise TicketlabError(
            f"Target sparsity {sparsity:.4f} is below the mask's current {mask.sparsity:.4f}: "
            "pruning never brings weights back.",
            "Ask for a sparsity at or above the current one.",
        )
    with torch.no_grad():
        scores = crit.score(weights, mask, torch.Generator().manual_seed(seed), stats)
        new = {n: mask.tensors[n].clone() for n in names}
        if crit.scope == "layerwise":
            for n in names:
                keep = _kept_target(new[n].numel(), sparsity)
                _remove_lowest(new[n], scores[n], int(new[n].sum()) - keep)
            return Mask(new)
        to_remove = mask.num_kept - _kept_target(mask.num_total, sparsity)
        if to_remove <= 0:
            return Mask(new)
        flat = torch.cat([scores[n][new[n]] for n in names]) if names else torch.empty(0)
        # Indices (into the concatenated survivors) of the weights to remove; stable for ties.
        order = torch.argsort(flat, stable=True)[:to_remove]
        remove = torch.zeros(flat.numel(), dtype=torch.bool)
        remove[order] = True
        offset = 0
        for n in names:
            count = int(new[n].sum())
            chunk = remove[offset:offset + count]
            kept_idx = new[n].reshape(-1).nonzero().squeeze(1)
            new[n].view(-1)[kept_idx[chunk]] = False
            offset += count
    return Mask(new)


def _remove_lowest(mask_t: torch.Tensor, score: torch.Tensor, count: int) -> None:
    """Set to False the ``count`` lowest-scoring True entries of ``mask_t`` (in place)."""
    import torch

    if count <= 0:
        return
    flat_mask = mask_t.view(-1)
    kept_idx = flat_mask.nonzero().squeeze(1)
    order = torch.argsort(score.reshape(-1)[kept_idx], stable=True)[:count]
    flat_mask[kept_idx[order]] = False


def random_mask_like(mask: Mask, seed: int = 0, layerwise: bool = False) -> Mask:
    """A random mask with the same overall (or per-matrix) sparsity as ``mask``."""
    import torch

    from ticketlab.masks import Mask

    full = Mask({n: torch.ones_like(t) for n, t in mask.tensors.items()})
    zeros = {n: torch.zeros(t.shape) for n, t in mask.tensors.items()}
    if layerwise:
        g = torch.Generator().manual_seed(seed)
        out = {}
        for n, t in mask.tensors.items():
            m = torch.ones_like(t)
            _remove_lowest(m, torch.rand(t.shape, generator=g), t.numel() - int(t.sum()))
            out[n] = m
        return Mask(out)
    return prune(zeros, full, mask.sparsity, method="random", seed=seed)
