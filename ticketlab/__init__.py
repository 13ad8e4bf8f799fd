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
           "TrainHparams", "__version__"]
