"""ticketlab: find, test, transfer and ship lottery tickets of pre-trained networks.

The vocabulary follows the paper (Chen et al., NeurIPS 2020) and open_lth: θ0 is the
pre-trained network, a :class:`~ticketlab.masks.Mask` picks a subnetwork of its prunable set,
IMP finds masks level by level, and every run lives in a directory named by its hparams.

Everything below is imported on first use (PEP 562), so ``import ticketlab`` and
``ticketlab --help`` load neither torch nor transformers. ``dir(ticketlab)`` lists the entry
points; the README's "Python API" section shows each in a few lines.
"""

import os

# Two busy processes on few cores: OpenMP spin-waiting made train steps ~4x slower here.
# Only a default; set OMP_WAIT_POLICY yourself to override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.2.0"

#: Public name -> the module that defines it.
_LAZY = {
    "TicketlabError": "ticketlab.errors",
    "RunHparams": "ticketlab.hparams", "ModelHparams": "ticketlab.hparams",
    "DataHparams": "ticketlab.hparams", "TrainHparams": "ticketlab.hparams",
    "PruneHparams": "ticketlab.hparams", "Runtime": "ticketlab.hparams",
    "build_hparams": "ticketlab.hparams",
    "Mask": "ticketlab.masks",
    "Run": "ticketlab.store", "find_run": "ticketlab.store", "list_runs": "ticketlab.store",
    "prepare": "ticketlab.prepare", "Setup": "ticketlab.prepare",
    "find_ticket": "ticketlab.imp", "finetune": "ticketlab.imp",
    "export_level": "ticketlab.export", "load_ticket": "ticketlab.export",
    "load_level": "ticketlab.export",
    "accelerate_ticket": "ticketlab.sparse",
    "TicketMaskCallback": "ticketlab.hf", "mask_parameters": "ticketlab.hf",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> object:
    """Lazy attributes: the module is imported the first time one of its names is used."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ticketlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
