"""Pruning: which surviving weights to remove next, and the sparsity schedule of the levels.

Only weights that survive the current mask compete; a pruned weight never comes back. Every
method removes an exact number of weights (ties broken by position), so the sparsities of the
paper's code come out exactly: 10 %, 20 %, ... of the prunable set.
"""

from __future__ import annotations

import torch

from ticketlab.errors import TicketlabError
from ticketlab.hparams import PRUNING_METHODS
from ticketlab.masks import Mask


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
    """
    levels = [0.0]
    while levels[-1] < target - 1e-9:
        nxt = level_sparsity(len(levels), rate, schedule)
        if nxt >= 1.0:
            break
        levels.append(nxt)
    return levels


def _kept_target(num_total: int, sparsity: float) -> int:
    return num_total - int(round(sparsity * num_total))


@torch.no_grad()
def prune(
    weights: dict[str, torch.Tensor],
    mask: Mask,
    sparsity: float,
    method: str = "global",
    seed: int = 0,
) -> Mask:
    """Return a new mask at ``sparsity`` (fraction of the whole prunable set), from ``mask``.

    - ``global``: one magnitude ranking over every prunable matrix (the paper).
    - ``layerwise``: each matrix pruned to the same sparsity by its own magnitudes.
    - ``global-normalized``: one ranking of |w| / mean |w| of its matrix, so a matrix with small
      weights (MiniLM's pooler) is not wiped out before the others.
    - ``random``: surviving weights removed uniformly at random (seeded).
    """
    if method not in PRUNING_METHODS:
        raise TicketlabError(f"Unknown pruning method {method!r}.",
                             f"Use one of: {', '.join(PRUNING_METHODS)}.")
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
    new = {n: mask.tensors[n].clone() for n in names}
    if method == "layerwise":
        for n in names:
            keep = _kept_target(new[n].numel(), sparsity)
            _remove_lowest(new[n], weights[n].detach().abs().float().cpu(),
                           int(new[n].sum()) - keep)
        return Mask(new)

    generator = torch.Generator().manual_seed(seed)
    scores = []
    for n in names:
        w = weights[n].detach().float().cpu()
        if method == "global":
            s = w.abs()
        elif method == "global-normalized":
            kept = w.abs()[new[n]]
            s = w.abs() / (kept.mean() if kept.numel() else 1.0)
        else:  # random
            s = torch.rand(w.shape, generator=generator)
        scores.append(s[new[n]])
    flat = torch.cat(scores) if scores else torch.empty(0)
    to_remove = mask.num_kept - _kept_target(mask.num_total, sparsity)
    if to_remove <= 0:
        return Mask(new)
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
    if count <= 0:
        return
    flat_mask = mask_t.view(-1)
    kept_idx = flat_mask.nonzero().squeeze(1)
    order = torch.argsort(score.reshape(-1)[kept_idx], stable=True)[:count]
    flat_mask[kept_idx[order]] = False


def random_mask_like(mask: Mask, seed: int = 0, layerwise: bool = False) -> Mask:
    """A random mask with the same overall (or per-matrix) sparsity as ``mask``."""
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
