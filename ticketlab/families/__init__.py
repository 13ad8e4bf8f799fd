"""The model families ticketlab knows, and how ``--model`` picks one.

Each family is one module (:mod:`.text`: BERT-family encoders; :mod:`.vision`: image classifiers)
and one entry in :data:`FAMILIES`, tried in order: the first whose ``claims(model_ref)`` is true
loads the model. The text family claims everything else (a Hugging Face folder or hub id), so
it comes last.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ticketlab.errors import TicketlabError

if TYPE_CHECKING:
    from torch import nn

    from ticketlab.families.base import Family

#: Registered family names, in the order ``--model`` is matched; see :func:`families`.
FAMILY_MODULES: dict[str, str] = {
    "vision": "ticketlab.families.vision:VisionFamily",
    "text-encoder": "ticketlab.families.text:TextEncoderFamily",
}

_INSTANCES: dict[str, Family] = {}


def get_family(name: str) -> Family:
    """The family registered as ``name`` (masks and runs store it)."""
    if name not in FAMILY_MODULES:
        raise TicketlabError(f"Unknown model family {name!r}.",
                             f"Known families: {', '.join(FAMILY_MODULES)}.")
    if name not in _INSTANCES:
        import importlib

        module, _, cls = FAMILY_MODULES[name].partition(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]


def families() -> list[Family]:
    """Every family, in matching order (the fallback text family last)."""
    names = [n for n in FAMILY_MODULES if n != "text-encoder"] + ["text-encoder"]
    return [get_family(n) for n in names]


def family_for(model_ref: str) -> Family:
    """The family that loads ``--model model_ref``."""
    for fam in families():
        if fam.claims(model_ref):
            return fam
    raise AssertionError("the text family claims every model reference")


def family_of(model: nn.Module) -> Family:
    """The family of an already loaded module."""
    for fam in families():
        if fam.owns(model):
            return fam
    raise TicketlabError(
        f"{type(model).__name__} is not a model of a family ticketlab knows "
        f"({', '.join(FAMILY_MODULES)}).",
        "Wrap it in ticketlab.families.base.ModuleFamily with a prunable-set rule.")
