"""Structural gates: a learnable scale on every unit (attention head, FFN neuron, expansion
channel), their L1 penalty, and the removal of units whose gate has fallen.

HR-NAS and SuperTickets score their structural choices by the BatchNorm scale of each channel
(``models/mobilenet_base.py`` l. 490-508: the depthwise BN of every expansion branch), pushed
towards zero by an L1 penalty and removed below a threshold (``compress_by_threshold``,
l. 569-577). A CNN's family names that parameter as the group's gate
(:attr:`~ticketlab.families.base.UnitGroup.gate`) and nothing is added to the network. A BERT
block has no BatchNorm, so each unit gets a scale of its own: a gate ``g`` multiplies the
unit's features where the next module reads them — each head's context on the input of the
attention output projection, each FFN neuron's activation on the input of FFN out. With every
gate at 1 the model is exactly θ0's; a gate at 0 removes its unit's contribution, which is
what makes removal exact: the rows that produce the unit (Q, K, V / FFN in) and the columns
that read it can then be deleted (:mod:`ticketlab.supertickets.physical`) without changing
the output.

A removed unit's vectors — the biases, BatchNorm γ and β of the modules that produce it — are
held at exactly zero during training by the same enforcer that holds pruned weights
(:func:`held_at_zero`). For a channel that is what makes removal exact: with γ = β = 0 its
BatchNorm emits exactly 0 (β alone would still emit a constant through ReLU6 into the
projection), so the projection conv reads nothing from it and deleting it changes no output.

Which modules are gated comes from the family (:meth:`Family.structural_units`), so this
module never names an architecture. The gates live in a submodule of the model
(``supertickets_gates``): the shared training loop optimises them like any parameter (at
their own learning rate, through ``lr_scale``), and the model's state dict checkpoints them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families.base import UnitGroup
from ticketlab.masks import Mask
from ticketlab.methods import TrainingMethod
from ticketlab.supertickets.hparams import KIND_BY_NAME, UNIT_KINDS

#: Name of the gates' submodule on the model (keys ``supertickets_gates.units.<i>.gate``).
GATES = "supertickets_gates"

#: The kinds of unit (``ticketlab.supertickets.hparams.UNIT_KINDS``). A unit is *alive* while
#: its keep bit is set; a removed unit never comes back (HR-NAS's shrinkage deletes the
#: channels: ``train.py`` ``shrink_model``), with ``--reactivate`` too.
KINDS = tuple(k.name for k in UNIT_KINDS)


class UnitGate(nn.Module):
    """The gates of one :class:`~ticketlab.families.base.UnitGroup` and a keep bit per unit.

    The gates are a learnable scale per unit (initialised to 1, so the gated model starts as
    θ0), or — when the group names one (``group.gate``) — the network's own parameter
    ``bound`` (a BatchNorm's γ), which is referenced, not registered: it stays the network's,
    trained and checkpointed with it, and the bank's state holds only the keep bits."""

    def __init__(self, group: UnitGroup, bound: nn.Parameter | None = None) -> None:
        super().__init__()
        self.group = group
        if bound is None:
            self.gate = nn.Parameter(torch.ones(group.count))
        else:
            if bound.shape != (group.count,):
                raise TicketlabError(f"{group.gate} has shape {tuple(bound.shape)}, not one "
                                     f"gate per unit of {group.name} ({group.count}).",
                                     "The family's structural units do not fit this model.")
            object.__setattr__(self, "_bound", bound)  # bypasses nn.Module's registration
        self.register_buffer("keep", torch.ones(group.count))

    @property
    def owns_gate(self) -> bool:
        return self.group.gate is None

    def values(self) -> torch.Tensor:
        """Every unit's gate: its own scale, or the network's parameter."""
        return self.gate if self.owns_gate else self._bound

    def scale(self) -> torch.Tensor:
        """The factor every input feature of the gated module is multiplied by, beyond what
        the network computes itself (a network's own gate is already applied by its module:
        only the keep bits remain)."""
        own = self.gate * self.keep if self.owns_gate else self.keep
        return own.repeat_interleave(self.group.size)

    def alive(self) -> torch.Tensor:
        return self.keep.bool()

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        shape = [1] * x.dim()
        shape[self.group.axis] = -1
        return (x * self.scale().to(x.dtype).view(shape), *args[1:])


class GateBank(nn.Module):
    """Every unit gate of a model, in the family's order."""

    def __init__(self, groups: list[UnitGroup], base: nn.Module | None = None) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            UnitGate(g, base.get_parameter(g.gate) if g.gate is not None and base is not None
                     else None) for g in groups)

    @property
    def groups(self) -> list[UnitGroup]:
        return [u.group for u in self.units]

    def of_kind(self, kind: str) -> list[UnitGate]:
        return [u for u in self.units if u.group.kind == kind]

    def structure(self) -> dict[str, Any]:
        """The structural mask: which units of every group are kept (JSON-able)."""
        return {"groups": [{"name": u.group.name, "kind": u.group.kind, "layer": u.group.layer,
                            "count": u.group.count, "keep": [bool(b) for b in u.alive()]}
                           for u in self.units]}

    def load_structure(self, structure: dict[str, Any]) -> None:
        groups = structure.get("groups")
        if not isinstance(groups, list) or len(groups) != len(self.units) or any(
                not isinstance(g, dict) or g.get("name") != u.group.name
                or not isinstance(g.get("keep"), list) or len(g["keep"]) != u.group.count
                for g, u in zip(groups, self.units, strict=False)):
            raise TicketlabError("A stored structural mask does not fit this model's "
                                 "structural units (heads, neurons, channels).",
                                 "Use the model the SuperTickets run was made with (or rerun "
                                 "it: a damaged interval is redone).")
        with torch.no_grad():
            for g, u in zip(groups, self.units, strict=True):
                u.keep.copy_(torch.tensor([1.0 if b else 0.0 for b in g["keep"]]))

    def kept(self, kind: str) -> tuple[int, int]:
        """(units kept, units in all) of one kind."""
        units = self.of_kind(kind)
        return (sum(int(u.alive().sum()) for u in units), sum(u.group.count for u in units))


def attach_gates(model: nn.Module, groups: list[UnitGroup], base: nn.Module,
                 lr_scale: float = 1.0) -> GateBank:
    """Add a :class:`GateBank` to ``model`` and the pre-hooks that apply it; returns it.

    ``base`` is the module the groups' names are relative to (the base model). ``lr_scale``
    makes the gates' learning rate ``lr * lr_scale`` in the shared loop; a group whose gate is
    a parameter of the network keeps it as the network trains it (the code trains BN scales
    with the network's optimizer). A model carries one bank at a time (:func:`detach_gates`
    removes it).
    """
    if hasattr(model, GATES):
        raise RuntimeError("the model already carries SuperTickets gates")
    bank = GateBank(groups, base)
    for unit in bank.units:
        if not unit.owns_gate:
            continue  # the network's own scale: no hook, and the network's optimizer settings
        unit.gate.lr_scale = lr_scale  # read by ticketlab.train._optimizer
        module = base.get_submodule(unit.group.gated)
        handle = module.register_forward_pre_hook(unit.hook)
        unit._handle = handle  # type: ignore[attr-defined]
    model.add_module(GATES, bank)
    return bank


def detach_gates(model: nn.Module) -> None:
    """Remove the gates and their hooks: the model is plain again (its weights untouched)."""
    bank = getattr(model, GATES, None)
    if bank is None:
        return
    for unit in bank.units:
        if unit.owns_gate:
            unit._handle.remove()
    delattr(model, GATES)


def unit_penalties(groups: list[UnitGroup], mode: str) -> list[float]:
    """The L1 weight of one unit of each group, relative to the average unit.

    ``resource`` is HR-NAS's resource-aware penalty (``utils/prune.py`` ``get_bn_to_prune``,
    ``bn_prune_filter: expansion_only``): a unit's penalty is its per-unit cost (there FLOPs
    per channel, here multiply-accumulates per token) divided by the unit-count-weighted mean
    cost, so an expensive unit (a head: 4·hidden·head_size MACs) is pushed harder than a cheap
    one (an FFN neuron: 2·hidden). ``uniform``: every unit 1 (network slimming, the code's
    ``equal_penalty_skip_expand1`` baseline).
    """
    if mode == "uniform":
        return [1.0] * len(groups)
    total_units = sum(g.count for g in groups)
    mean = sum(g.count * g.macs for g in groups) / max(total_units, 1)
    return [g.macs / mean for g in groups]


def rho_at(step: int, rho: float, warmup_steps: int) -> float:
    """The L1 weight at optimizer step ``step`` (0-based): linear from 0 to ``rho`` over the
    warm-up, then ``rho`` — HR-NAS ``utils/prune.py`` ``get_rho_scheduler``, ``linear`` and
    ``stepwise: True`` (with ``epoch_free: 0``, the configs' setting)."""
    if step >= warmup_steps:
        return rho
    return step / warmup_steps * rho


class GatePenalty:
    """L1 on the live gates, weighted per unit and ramped up over the warm-up.

    It is a training hook of the shared loop: ``after_backward(step)`` is called once per
    optimizer step, so the penalty knows which step the next loss belongs to; the step count
    starts where the training part starts (``start``), so a resumed run ramps exactly as the
    uninterrupted one.
    """

    def __init__(self, bank: GateBank, rho: float, warmup_steps: int, mode: str,
                 start: int = 0) -> None:
        self.bank, self.rho, self.warmup = bank, rho, warmup_steps
        self.weights = unit_penalties(bank.groups, mode)
        self.step = start

    def after_backward(self, step: int) -> None:
        self.step = step

    def current_rho(self) -> float:
        return rho_at(self.step, self.rho, self.warmup)

    def loss(self) -> torch.Tensor | float:
        """ρ(step) · Σ_groups penalty · Σ_units |g·keep| — the code's ``cal_bn_l1_loss``
        (``utils/prune.py``): a sum over units, not a mean."""
        rho = self.current_rho()
        if rho == 0.0:
            return 0.0
        total = sum(w * (u.values() * u.keep).abs().sum()
                    for w, u in zip(self.weights, self.bank.units, strict=True))
        return rho * total


class PenalizedTraining(TrainingMethod):
    """A training method with the gates' L1 penalty added to the loss it back-propagates
    (SuperTickets ``train.py``: ``loss = loss + loss_l2 + loss_bn_l1``). The loss it reports
    is the inner method's task loss, so training curves compare with IMP's."""

    name = "supertickets"

    def __init__(self, inner: TrainingMethod, penalty: GatePenalty) -> None:
        self.inner, self.penalty = inner, penalty

    def step(self, model: Any, batch: dict[str, Any], forward: Callable[..., Any],
             backward: Callable[[Any], None]) -> float:
        return self.inner.step(model, batch, forward,
                               lambda loss: backward(loss + self.penalty.loss()))


# --- removal ----------------------------------------------------------------------------------
def removal_targets(bank: GateBank, targets: dict[str, float], progress: float
                    ) -> dict[str, int]:
    """How many units of each kind must be gone at this point: the kind's final target times
    ``progress`` (0..1: the share of the weight schedule done), rounded down."""
    out = {}
    for kind, target in targets.items():
        _, total = bank.kept(kind)
        out[kind] = int(math.floor(target * min(1.0, progress) * total + 1e-9))
    return out


def remove_units(bank: GateBank, targets: dict[str, int], threshold: float) -> dict[str, int]:
    """Remove units: every live unit whose |gate| is below ``threshold`` (HR-NAS
    ``cal_mask_network_slimming_by_threshold``, ``model_shrink_threshold``), then the lowest
    |gate| of each kind until ``targets[kind]`` units of it are gone — one ranking over all
    layers, so the layers end with different widths (the architecture the search finds).

    Every group keeps at least its strongest unit: a layer without heads cannot be run by
    transformers' attention (its head count is inferred from the weight's width), and one
    without FFN neurons (a block without expansion channels) would be a different
    architecture. Returns units removed per kind.
    """
    removed: dict[str, int] = {}
    with torch.no_grad():
        for kind in KINDS:
            units = bank.of_kind(kind)
            if not units:
                continue
            kept_before, total = bank.kept(kind)
            want_gone = max(targets.get(kind, 0), total - kept_before)
            candidates: list[tuple[float, int, int]] = []  # (|g|, group, unit)
            for gi, u in enumerate(units):
                mags = (u.values() * u.keep).abs()
                for j in torch.nonzero(u.alive()).flatten().tolist():
                    candidates.append((float(mags[j]), gi, j))
            candidates.sort()
            alive_left = [int(u.alive().sum()) for u in units]
            gone = total - kept_before
            for mag, gi, j in candidates:
                below = mag < threshold
                if not below and gone >= want_gone:
                    break
                if alive_left[gi] <= 1:
                    continue
                units[gi].keep[j] = 0.0
                alive_left[gi] -= 1
                gone += 1
            removed[kind] = gone - (total - kept_before)
    return removed


def cap_removals(bank: GateBank, before: list[torch.Tensor], mask: Mask,
                 params: dict[str, torch.Tensor], budget: float) -> dict[str, int]:
    """Give back this point's removals, strongest |gate| first, until ``mask`` with the
    structure cleared is no sparser than ``budget`` (the point's sparsity); returns the units
    given back per kind.

    Why: a removed unit clears its rows and columns, and weights pruned before cannot grow back
    (they are held at zero), so removals that come after the weights reached their ratio — the
    geometric schedule of the image tasks reaches it between points — would push the overall
    sparsity past the target, and SuperTickets would no longer be compared with IMP at equal
    sparsity. ``before`` holds every unit's keep bits before this point's removals. The count
    given back is found by bisection (sparsity only falls as units come back)."""
    fresh = [(float(u.values()[j].detach().abs()), ui, j)
             for ui, (u, was) in enumerate(zip(bank.units, before, strict=True))
             for j in torch.nonzero((was > 0) & ~u.alive()).flatten().tolist()]
    fresh.sort(reverse=True)  # strongest first: the last this point removed

    def sparsity_with(back: int) -> float:
        with torch.no_grad():
            for _, ui, j in fresh[:back]:
                bank.units[ui].keep[j] = 1.0
            s = with_structure(mask, structural_weight_mask(bank, params)).sparsity
            for _, ui, j in fresh[:back]:
                bank.units[ui].keep[j] = 0.0
        return s

    if not fresh or sparsity_with(0) <= budget + 1e-9:
        return {}
    lo, hi = 1, len(fresh)  # the fewest given back that meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if sparsity_with(mid) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid + 1
    back: dict[str, int] = {}
    with torch.no_grad():
        for _, ui, j in fresh[:lo]:
            bank.units[ui].keep[j] = 1.0
            kind = bank.units[ui].group.kind
            back[kind] = back.get(kind, 0) + 1
    return back


def structural_weight_mask(bank: GateBank, params: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """For every prunable matrix a removed unit touches, a bool mask with the unit's rows (in
    the modules that produce it) and columns (in the module that reads it) cleared: what the
    weight mask must lose when units are removed. Matrices outside the prunable set (e.g. an
    excluded one) are left alone; their rows still stop mattering, since the gate is 0."""
    out: dict[str, torch.Tensor] = {}
    for u in bank.units:
        g = u.group
        feats = u.alive().repeat_interleave(g.size)
        for module_name in g.rows:
            key = f"{module_name}.weight"
            if key in params:
                m = out.setdefault(key, torch.ones(params[key].shape, dtype=torch.bool))
                m &= feats.view(-1, *([1] * (m.dim() - 1)))
        key = f"{g.gated}.weight"
        if key in params:
            m = out.setdefault(key, torch.ones(params[key].shape, dtype=torch.bool))
            m &= feats.view(1, -1, *([1] * (m.dim() - 2)))
    return out


def with_structure(mask: Mask, structural: dict[str, torch.Tensor]) -> Mask:
    """``mask`` with every structurally removed weight cleared as well."""
    tensors = {k: (v & structural[k]) if k in structural else v.clone()
               for k, v in mask.tensors.items()}
    return Mask(tensors, mask.meta)


def structural_only(params: dict[str, torch.Tensor], structural: dict[str, torch.Tensor]
                    ) -> Mask:
    """The all-ones mask less the removed units: what ``--reactivate`` resets to (removed
    units stay removed; every other pruned weight may grow back)."""
    return with_structure(Mask.ones_like(params), structural)


def row_parameters(bank: GateBank, base: nn.Module
                   ) -> list[tuple[str, nn.Parameter, torch.Tensor]]:
    """Every parameter of the modules that produce a unit with a removed unit (weights,
    biases, BatchNorm γ and β), with the bool mask that keeps the live units' entries along
    its first axis: ``(base-relative name, parameter, mask)``."""
    out = []
    for u in bank.units:
        if bool(u.alive().all()):
            continue
        feats = u.alive().repeat_interleave(u.group.size)
        for module_name in u.group.rows:
            for name, p in base.get_submodule(module_name).named_parameters(recurse=False):
                keep = feats.to(p.device).view(-1, *([1] * (p.dim() - 1))).expand(p.shape)
                out.append((f"{module_name}.{name}", p, keep.clone()))
    return out


def held_at_zero(bank: GateBank, base: nn.Module, prunable: Container[str]
                 ) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    """The removed units' parameters outside the prunable set (biases, BatchNorm γ and β, an
    excluded matrix), with their masks: the training loop holds them at exactly zero like
    pruned weights (``ticketlab.train.MaskEnforcer``). A BERT unit needs it only for a clean
    state (its gate is 0); a channel needs it, since its gate *is* γ, which the optimizer
    would otherwise move (momentum), and β would still emit a constant."""
    return {name: (p, keep) for name, p, keep in row_parameters(bank, base)
            if name not in prunable}


@torch.no_grad()
def zero_removed(bank: GateBank, base: nn.Module) -> None:
    """Set every parameter of the removed units in the producing modules to zero (weights,
    biases, BatchNorm γ and β): the unit is then all-zero, so it contributes exactly nothing
    whether the gate is ours (0) or the network's (γ), and a plain export computes the same."""
    for _, p, keep in row_parameters(bank, base):
        p.mul_(keep.to(p.dtype))


def fold_gates(state: dict[str, torch.Tensor], bank: GateBank, prefix: str
               ) -> dict[str, torch.Tensor]:
    """A plain state dict (no gates) that computes what the gated model computes: each gated
    module's input columns multiplied by their gate (0 for removed units), and the removed
    units' rows and biases zeroed. ``prefix`` is the base model's state-dict prefix."""
    out = {k: v for k, v in state.items() if not k.startswith(GATES + ".")}
    p = f"{prefix}." if prefix else ""
    for u in bank.units:
        g = u.group
        scale = u.scale().detach().to(torch.float32)
        w = out[f"{p}{g.gated}.weight"]
        shape = [1] * w.dim()
        shape[1] = -1
        out[f"{p}{g.gated}.weight"] = w * scale.to(w.dtype).view(shape)
        feats = u.alive().repeat_interleave(g.size)
        for module_name in g.rows:
            for suffix in ("weight", "bias"):
                key = f"{p}{module_name}.{suffix}"
                if key in out:
                    t = out[key]
                    out[key] = t * feats.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
    return out


def gate_summary(bank: GateBank) -> dict[str, Any]:
    """Per kind: units kept, and the live gates' mean and min |g| (for the records)."""
    out: dict[str, Any] = {}
    for kind in KINDS:
        units = bank.of_kind(kind)
        if not units:
            continue
        live = torch.cat([(u.values().detach() * u.keep)[u.alive()].abs() for u in units])
        kept, total = bank.kept(kind)
        out[kind] = {"kept": kept, "total": total,
                     "kept_per_layer": [int(u.alive().sum()) for u in units],
                     "gate_mean": float(live.mean()) if live.numel() else 0.0,
                     "gate_min": float(live.min()) if live.numel() else 0.0}
    return out


def check_kinds(groups: Iterable[UnitGroup], targets: dict[str, float]) -> None:
    """Refuse a structural target for a kind of unit the model does not have (a channel
    target on a text encoder, a head target on a CNN)."""
    have = [k for k in UNIT_KINDS if any(g.kind == k.name for g in groups)]
    for kind, target in targets.items():
        if target > 0 and kind not in {k.name for k in have}:
            k = KIND_BY_NAME[kind]
            raise TicketlabError(
                f"{k.flag} {target}: this model has no {k.plural} to remove ({k.flag} is for "
                f"{k.what}; this model's units are its "
                f"{', '.join(h.plural for h in have) or 'none'}).",
                f"Leave {k.flag} out" + (f"; use {', '.join(h.flag for h in have)}."
                                          if have else "."))
