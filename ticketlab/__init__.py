"""ticketlab: find, test, transfer and ship lottery tickets of pre-trained transformers.

The vocabulary follows the paper (Chen et al., NeurIPS 2020) and open_lth: θ0 is the
pre-trained network, a :class:`~ticketlab.masks.Mask` picks a subnetwork of its prunable set,
IMP finds masks level by level, and every run lives in a directory named by its hparams.
"""

import os

# Two busy processes on few cores: OpenMP spin-waiting made train steps ~4x slower here.
# Only a default; set OMP_WAIT_POLICY yourself to override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ticketlab.errors import TicketlabError  # noqa: E402
from ticketlab.hparams import (  # noqa: E402
    DataHparams,
    ModelHparams,
    PruneHparams,
    RunHparams,
    TrainHparams,
)
from ticketlab.masks import Mask  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DataHparams", "Mask", "ModelHparams", "PruneHparams", "RunHparams", "TicketlabError",
           "TrainHparams", "__version__", "accelerate_ticket", "load_ticket"]

#: Heavy entry points, imported on first use so that ``import ticketlab`` stays light.
_LAZY = {"load_ticket": "ticketlab.export", "accelerate_ticket": "ticketlab.sparse"}


def __getattr__(name: str) -> object:
    """Lazy attributes (PEP 562): the export and sparse-engine entry points."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ticketlab' has no attribute {name!r}")
