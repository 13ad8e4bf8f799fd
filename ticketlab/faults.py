"""Fault injection for crash-safety tests: die with SIGKILL at a named point.

Set ``TICKETLAB_FAULT=site:n`` and the process kills itself (SIGKILL: no cleanup, no
``finally``, exactly like ``kill -9`` or a lost machine) the n-th time it reaches ``site``.
Sites: ``write`` (a file fully written to its temporary name, not yet renamed), ``renamed``
(just after the rename), ``step`` (after an optimizer step), ``eval`` (after an evaluation
batch). Unset, the check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def checkpoint(site: str) -> None:
    spec = os.environ.get("TICKETLAB_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != site:
        return
    _counts[site] = _counts.get(site, 0) + 1
    if _counts[site] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
