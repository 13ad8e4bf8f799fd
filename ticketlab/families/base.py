"""What a model family is: how θ0 is loaded, what its prunable set is, what a batch holds.

The training loop, the evaluator and the IMP driver know nothing about text or images: they see
a module whose ``forward(**batch)`` returns an output with ``.loss`` (and ``.logits``), a
prunable set of named parameters, and the head's parameter names. Everything that differs
between BERT-family encoders and CNNs — loading, the preprocessing a task needs (a tokenizer or
an image normalisation), which matrices the paper prunes, which names are the head, how the
random-reinit baseline re-draws weights — is answered by a :class:`Family`.

A family is one module and one entry in :data:`ticketlab.families.FAMILIES`. Any other
``torch.nn.Module`` joins through :class:`ModuleFamily` with a prunable-set rule.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError


@dataclass
class Loaded:
    """θ0 as loaded: the module (head γ0 drawn under the seed), what a task needs to turn
    examples into inputs (``processor``: a tokenizer, an image spec), and the base-model
    parameters the checkpoint did not provide (randomly initialised, so not pre-trained)."""

    model: nn.Module
    processor: Any
    missing: list[str] = field(default_factory=list)
    missing_head: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class UnitGroup:
    """One set of structural units a search may remove as a whole: the attention heads of one
    layer, the FFN neurons of one layer (a CNN: the channels of one expansion layer).

    Every unit is ``size`` consecutive features on the *input* of the module ``gated`` (the
    attention output projection reads the heads' concatenated contexts, the FFN output
    projection reads the neurons' activations; a 1x1 projection conv reads channels along
    ``axis`` 1). The modules in ``rows`` produce those features (Q, K, V; FFN in; an expansion
    conv, its depthwise conv and BatchNorm), so their output rows are the same units; ``gated``
    is the one module that reads them, along its input columns. Removing a unit removes those
    rows and columns, which is what makes a structurally pruned model physically smaller.
    ``macs`` is what one unit costs per token (a CNN: per image at the config's input size),
    for a resource-aware penalty; only ratios between units matter.

    ``gate`` names a parameter the network already has whose entries are the units' gates
    (a CNN's depthwise BatchNorm scale γ: HR-NAS gates channels by it), listed among ``rows``
    modules' parameters; None means the network has no such scale (a BERT block) and the
    search adds a gate of its own on the input of ``gated``. ``axis`` is the units' axis in
    that input (-1: features last; 1: NCHW channels). Names are base-model-relative.
    """

    name: str
    kind: str
    layer: int
    count: int
    size: int
    gated: str
    rows: tuple[str, ...]
    macs: int
    axis: int = -1
    gate: str | None = None


class Family(ABC):
    """One kind of pre-trained network. Subclasses are stateless."""

    #: Registry name, stored in masks and runs.
    name: str
    #: What a task must feed it: ``"text"`` or ``"image"``. Checked against ``Task.inputs``
    #: once, when a run is prepared (a clear error for a text task on a CNN); never consulted
    #: by the training loop.
    inputs: str
    #: The head used where any head will do (``describe`` looks only at the body).
    default_head: str = "sequence-classification"

    @abstractmethod
    def claims(self, model_ref: str) -> bool:
        """Does ``--model model_ref`` name a model of this family?"""

    @abstractmethod
    def owns(self, model: nn.Module) -> bool:
        """Is ``model`` (already loaded) one of this family's?"""

    @abstractmethod
    def load(self, model_ref: str, head: str, num_labels: int, seed: int,
             trust_remote_code: bool = False) -> Loaded:
        """Load θ0 with a task head (``Task.head``), the head's random init seeded."""

    @abstractmethod
    def processor(self, model_ref: str, trust_remote_code: bool = False) -> Any:
        """What the task's ``featurize`` needs (tokenizer, image spec), without the weights."""

    def max_length(self, processor: Any, requested: int) -> int:
        """The sequence length featurisation may use (text: the tokenizer's limit)."""
        return requested

    @abstractmethod
    def base_prefix(self, model: nn.Module) -> str:
        """State-dict prefix of the body (``bert``); prunable names are relative to it, so a
        mask found with one head applies to the same body with another."""

    def base_module(self, model: nn.Module) -> nn.Module:
        prefix = self.base_prefix(model)
        return model.get_submodule(prefix) if prefix else model

    @abstractmethod
    def default_prunable(self, model: nn.Module, prune_pooler: bool = True) -> list[str]:
        """The paper's prunable set for this family (base-relative names)."""

    def head_names(self, model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        """State-dict names outside the body: the task head γ, never pruned."""
        prefix = self.base_prefix(model) + "."
        return [n for n in state if not n.startswith(prefix)]

    def role_of(self, name: str, shape: tuple[int, ...] | None = None) -> str:
        """Which kind of matrix a prunable name is (for per-role sparsity summaries); the
        ``shape`` tells a CNN's 1×1, depthwise and k×k convolutions apart."""
        return "other"

    def layer_of(self, name: str) -> int | None:
        """The block a prunable name belongs to (for per-layer plots and layer shuffles)."""
        m = re.search(r"\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def reinitialised(self, model: nn.Module, names: list[str], seed: int
                      ) -> dict[str, torch.Tensor]:
        """θ0' for ``names``: the matrices as a freshly built model of the same class and
        config draws them under ``seed`` (the random-reinit baseline)."""
        raise TicketlabError(f"Family {self.name} cannot re-initialise its weights.",
                             "Use another baseline.")

    def input_space(self, model: nn.Module, processor: Any) -> Any:
        """Where adversarial training and robust evaluation perturb the inputs
        (:class:`ticketlab.attacks.InputSpace`: pixels, word embeddings)."""
        raise TicketlabError(f"Family {self.name} has no adversarial input space.",
                             "Leave --adversarial and --eval-attack out for this model.")

    def outlier_advice(self) -> str:
        """What ``describe`` tells a user whose matrix is far smaller than the rest."""
        return "--exclude it, or use --method global-normalized"

    def describe_notes(self, stats: list[Any], at: dict[float, dict[str, float]]) -> list[str]:
        """Lines ``describe`` prints after the table (``stats``: :class:`~ticketlab.models.
        MatrixStats` rows; ``at``: overall sparsity -> matrix -> its sparsity under one
        global ranking; a line starting ``Warning: `` is shown as a warning). Vision
        summarises each kind of convolution."""
        return []

    def prepare_loaded(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Anything every loaded model needs before its state is stored (tied weights)."""

    def structural_units(self, model: nn.Module) -> list[UnitGroup]:
        """The units a structural search (SuperTickets) may gate and remove, one group per
        layer and kind; see :class:`UnitGroup`."""
        raise TicketlabError(f"Family {self.name} does not describe structural units (heads, "
                             "neurons, channels), so it cannot be searched structurally.",
                             "Use IMP (`ticketlab find`) for this model.")


class ModuleFamily(Family):
    """Any ``torch.nn.Module`` as a family, for the Python API.

    ``build()`` returns the module at θ0 (its forward must take the task's batch keys as
    keyword arguments and return an object with ``.loss`` and ``.logits``); ``prunable`` is
    a regex over parameter names or a function of the module returning names. The whole
    module is the body (prefix ""), and ``head`` is a regex of its head parameters.
    """

    name = "module"

    def __init__(self, build: Callable[[], nn.Module],
                 prunable: str | Callable[[nn.Module], list[str]], inputs: str = "image",
                 head: str = r"^$", processor: Any = None) -> None:
        self.build, self.rule, self.inputs = build, prunable, inputs
        self.head_rx, self._processor = re.compile(head), processor

    def claims(self, model_ref: str) -> bool:
        return False

    def owns(self, model: nn.Module) -> bool:
        return False

    def load(self, model_ref: str, head: str, num_labels: int, seed: int,
             trust_remote_code: bool = False) -> Loaded:
        torch.manual_seed(seed)
        return Loaded(self.build(), self._processor)

    def processor(self, model_ref: str, trust_remote_code: bool = False) -> Any:
        return self._processor

    def base_prefix(self, model: nn.Module) -> str:
        return ""

    def default_prunable(self, model: nn.Module, prune_pooler: bool = True) -> list[str]:
        if callable(self.rule):
            return list(self.rule(model))
        rx = re.compile(self.rule)
        return [n for n, p in model.named_parameters() if rx.search(n) and p.dim() >= 2]

    def head_names(self, model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        return [n for n in state if self.head_rx.search(n)]
