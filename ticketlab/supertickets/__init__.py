"""SuperTickets (You et al., ECCV 2022): an architecture and its lottery ticket found in one
training run — learnable gates on heads and FFN neurons under an L1 penalty, removed at set
points, while the weights are pruned by global magnitude to a rising ratio.

:mod:`.search` runs (and resumes) a search, :mod:`.gates` holds the gates and their penalty,
:mod:`.physical` makes a found ticket physically smaller and ships it, :mod:`.compare` sets it
against IMP at equal sparsity.
"""

from __future__ import annotations

from typing import Any

from ticketlab.supertickets.hparams import SuperHparams

__all__ = ["SuperHparams", "export_superticket", "find_superticket", "load_superticket"]


def __getattr__(name: str) -> Any:  # torch-heavy parts load on first use (the CLI stays fast)
    if name == "find_superticket":
        from ticketlab.supertickets.search import find_superticket

        return find_superticket
    if name in ("export_superticket", "load_superticket"):
        from ticketlab.supertickets import physical

        return getattr(physical, name)
    raise AttributeError(name)
