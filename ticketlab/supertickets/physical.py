"""Making a structurally pruned ticket physically smaller, and shipping it.

A removed head is ``size`` rows of Q, K and V and ``size`` columns of the attention output
projection; a removed FFN neuron is one row of FFN in and one column of FFN out. Deleting
them leaves every remaining computation as it was (the gates are folded into the reading
module's columns first), so the smaller model computes what the gated one did, and it is
faster on every engine — plain PyTorch included, not only on ticketlab's sparse kernel.

transformers 5 has no ``prune_heads`` (it was removed with the ``pruned_heads`` config
field), and a BERT-family config has one ``num_attention_heads`` (whose head size is
``hidden_size / num_attention_heads``) and one ``intermediate_size`` for all layers. Nothing
in a plain config can therefore say "layer 3 keeps 9 heads". What this module does instead:

- **In memory** (:func:`shrink`): the Linears are replaced by smaller ones. transformers'
  attention infers the number of heads from the projection's width (``view(..., -1,
  head_size)``), so per-layer head counts and FFN widths run unmodified.
- **As a plain HF folder** (:func:`export_superticket`): the FFN is cut to the widest layer's
  kept neurons (``intermediate_size`` shrinks; narrower layers keep zero neurons up to that
  width, which contribute exactly nothing) and removed heads stay in place as zeros (their
  rows and columns are exactly 0, so the unstructured path skips them). The folder loads with
  plain ``from_pretrained`` and gives the gated model's logits; ``ticket.json`` records the
  structure, and :func:`load_superticket` loads the folder at its fully physical size.

A MobileNetV2 channel is one output channel of a block's expansion conv and its BatchNorm, of
its depthwise conv and BatchNorm, and one input channel of its projection conv; :func:`shrink`
cuts all five (:data:`SLICERS`). transformers' ``MobileNetV2Config`` has one ``expand_ratio``
for all blocks, so an exported vision SuperTicket is the full-size network with the removed
channels as exact zeros (``from_pretrained`` loads it, same logits), and
:func:`load_superticket` deletes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families.base import UnitGroup
from ticketlab.masks import Mask
from ticketlab.supertickets.hparams import KIND_BY_NAME


def keep_lists(structure: dict[str, Any], groups: Sequence[UnitGroup]) -> list[list[bool]]:
    """The keep bits of every group, checked against the model's groups."""
    stored = structure.get("groups") if isinstance(structure, dict) else None
    if not isinstance(stored, list) or len(stored) != len(groups) or any(
            not isinstance(s, dict) or s.get("name") != g.name or not isinstance(s.get("keep"),
                                                                                 list)
            or len(s["keep"]) != g.count for s, g in zip(stored, groups, strict=False)):
        raise TicketlabError("The structure (heads and neurons kept) does not fit this model.",
                             "Use the model the SuperTicket was found on.")
    return [[bool(b) for b in s["keep"]] for s in stored]


def padded(keep: list[bool], width: int) -> list[bool]:
    """``keep`` with removed units put back (first ones first) until ``width`` are kept: a
    removed unit is all zeros in a folded state, so keeping it changes no output."""
    out = list(keep)
    missing = width - sum(out)
    for i, k in enumerate(out):
        if missing <= 0:
            break
        if not k:
            out[i] = True
            missing -= 1
    return out


def _weight_bias(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = module.weight.detach()
    b = module.bias.detach() if module.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    return w, b


def _filled(new: nn.Module, old: nn.Module, tensors: dict[str, torch.Tensor | None]
            ) -> nn.Module:
    with torch.no_grad():
        for name, value in tensors.items():
            if value is not None:
                getattr(new, name).copy_(value)
    return new.train(old.training)


def _sliced_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
                   ) -> nn.Module:
    w, b = _weight_bias(linear, rows, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    return _filled(new, linear, {"weight": w, "bias": b})


def _sliced_conv(conv: nn.Conv2d, rows: torch.Tensor | None, cols: torch.Tensor | None
                 ) -> nn.Module:
    """A conv with output channels ``rows`` and input channels ``cols``. A depthwise conv's
    input channels are its output channels, so cutting its rows cuts its groups too; any
    other grouped conv cannot be cut."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise or (depthwise and cols is not None):
        raise TicketlabError(f"Cannot cut the channels of a grouped convolution ({conv}).",
                             "Structural units may only cut plain and depthwise convolutions.")
    w, b = _weight_bias(conv, rows, cols)
    groups = w.shape[0] if depthwise else 1
    new = nn.Conv2d(w.shape[1] * groups, w.shape[0], conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, groups=groups,
                    bias=b is not None, padding_mode=conv.padding_mode, device=w.device,
                    dtype=w.dtype)
    return _filled(new, conv, {"weight": w, "bias": b})


def _sliced_norm(norm: nn.BatchNorm2d, rows: torch.Tensor | None, cols: torch.Tensor | None
                 ) -> nn.Module:
    """A BatchNorm of the channels ``rows``: its γ, β and running statistics."""
    if cols is not None or rows is None:
        raise TicketlabError("A BatchNorm has no input columns to cut.",
                             "Name it among a group's producing modules (rows).")
    ref = norm.running_mean if norm.running_mean is not None else norm.weight
    new = type(norm)(len(rows), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats, device=ref.device,
                     dtype=ref.dtype)
    tensors: dict[str, torch.Tensor | None] = {}
    if norm.affine:
        tensors.update(weight=norm.weight.detach()[rows], bias=norm.bias.detach()[rows])
    if norm.track_running_stats:
        tensors.update(running_mean=norm.running_mean[rows], running_var=norm.running_var[rows],
                       num_batches_tracked=norm.num_batches_tracked)
    return _filled(new, norm, tensors)


#: How each kind of module is cut to some of its output rows / input columns.
SLICERS: dict[type[nn.Module], Any] = {nn.Linear: _sliced_linear, nn.Conv2d: _sliced_conv,
                                       nn.BatchNorm2d: _sliced_norm}


def _sliced(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None
            ) -> nn.Module:
    for cls, slicer in SLICERS.items():
        if isinstance(module, cls):
            return slicer(module, rows, cols)
    raise TicketlabError(f"ticketlab cannot cut a {type(module).__name__} structurally.",
                         f"Structural units may cut: {', '.join(c.__name__ for c in SLICERS)}.")


def _replace(base: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = base.get_submodule(parent_name) if parent_name else base
    setattr(parent, child, module)


@torch.no_grad()
def shrink(base: nn.Module, groups: Sequence[UnitGroup], keep: Sequence[Sequence[bool]]
           ) -> None:
    """Delete the units whose keep bit is off, in place: the producing modules lose their
    rows (Linears, convolutions, BatchNorms), the reading module its columns. The state must
    be folded (gates in the weights, :func:`~ticketlab.supertickets.gates.fold_gates`)."""
    for g, bits in zip(groups, keep, strict=True):
        if not any(bits):
            raise TicketlabError(f"{g.name} would keep no unit.",
                                 "Every layer keeps at least one unit of each kind.")
        if all(bits):
            continue
        feats = torch.tensor(bits).repeat_interleave(g.size).nonzero().flatten()
        for name in g.rows:
            _replace(base, name, _sliced(base.get_submodule(name), feats, None))
        _replace(base, g.gated, _sliced(base.get_submodule(g.gated), None, feats))
        if g.kind == "head":
            owner_name = g.rows[0].rpartition(".")[0]
            owner = base.get_submodule(owner_name) if owner_name else base
            kept = sum(bits)
            for attr in ("num_attention_heads", "n_heads"):
                if isinstance(getattr(owner, attr, None), int):
                    setattr(owner, attr, kept)
            if isinstance(getattr(owner, "all_head_size", None), int):
                owner.all_head_size = kept * g.size


def zero_mask(model: nn.Module, names: Sequence[str]) -> Mask:
    """The mask of exactly-zero weights of ``names`` (base-relative parameter names)."""
    params = dict(model.base_model.named_parameters())
    return Mask({n: params[n].detach() != 0 for n in names})


# --- export -----------------------------------------------------------------------------------
#: Kinds of unit whose one width for all layers a plain config holds (``intermediate_size``):
#: cut to the widest layer's. Every other kind stays at full size in an export, its removed
#: units exact zeros: a BERT config has one head count, and transformers' MobileNetV2Config
#: one ``expand_ratio`` for all blocks, so neither can say "block 3 keeps 40 channels".
CONFIG_WIDTH_KINDS = ("neuron",)

#: What an export does with each kind (the model card says it).
EXPORT_NOTES = {
    "neuron": "the FFN is cut to the widest layer's {ffn_width} kept neurons (narrower layers "
              "hold exact zeros up to that width)",
    "head": "the removed heads are exact zeros (a transformers config cannot vary heads per "
            "layer)",
    "channel": "the removed expansion channels are exact zeros, left in place (transformers' "
               "MobileNetV2Config has one expand_ratio for all blocks, so it cannot hold "
               "per-block widths)",
}


def export_shapes(groups: Sequence[UnitGroup], keep: Sequence[Sequence[bool]]
                  ) -> tuple[list[list[bool]], int]:
    """What a plain config can hold: the kinds of :data:`CONFIG_WIDTH_KINDS` (the FFN) cut to
    the widest layer's kept units, every other unit kept (removed ones as zeros). Returns the
    keep bits to shrink with and that width (0 without such a kind)."""
    width = max((sum(bits) for g, bits in zip(groups, keep, strict=True)
                 if g.kind in CONFIG_WIDTH_KINDS), default=0)
    out = []
    for g, bits in zip(groups, keep, strict=True):
        out.append(padded(list(bits), width) if g.kind in CONFIG_WIDTH_KINDS
                   else [True] * g.count)
    return out, width


def structure_info(groups: Sequence[UnitGroup], keep: Sequence[Sequence[bool]]
                   ) -> dict[str, Any]:
    """The structure as ``ticket.json`` records it: per kind (``heads``, ``neurons``,
    ``channels``) and layer, the kept units' indices (the order of the original model's)."""
    out: dict[str, Any] = {KIND_BY_NAME[k].plural: {} for k in dict.fromkeys(
        g.kind for g in groups)}
    for g, bits in zip(groups, keep, strict=True):
        kept = [i for i, b in enumerate(bits) if b]
        out[KIND_BY_NAME[g.kind].plural][str(g.layer)] = kept
    out["groups"] = [{"name": g.name, "kind": g.kind, "layer": g.layer, "count": g.count}
                     for g in groups]
    return out


def exported_keep(groups: Sequence[UnitGroup], info: dict[str, Any]) -> list[list[bool]]:
    """Which units of the *exported* folder are real: in the folder, a layer's FFN holds its
    kept neurons and padding in original order, so the real ones are found again by index;
    the other kinds are at full size there."""
    structure = info.get("structure")
    if not isinstance(structure, dict) or not isinstance(structure.get("groups"), list):
        raise TicketlabError("ticket.json has no SuperTickets structure.",
                             "Export the run with `ticketlab supertickets-export`.")
    out = []
    for g in groups:
        table = structure.get(KIND_BY_NAME[g.kind].plural)
        kept = table.get(str(g.layer)) if isinstance(table, dict) else None
        if not isinstance(kept, list):
            raise TicketlabError(f"ticket.json lacks the kept {KIND_BY_NAME[g.kind].plural} "
                                 f"of layer {g.layer}.", "Export the run again.")
        if g.kind not in CONFIG_WIDTH_KINDS:
            bits = [i in set(kept) for i in range(g.count)]
        else:
            exported = structure.get("exported_neurons", {}).get(str(g.layer))
            if not isinstance(exported, list):
                raise TicketlabError(f"ticket.json lacks the exported neurons of layer "
                                     f"{g.layer}.", "Export the run again.")
            real = set(kept)
            bits = [i in real for i in exported]
        out.append(bits)
    return out


def read_ticket_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "ticket.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TicketlabError(f"{folder} has no readable ticket.json.",
                             "Pass a folder written by `ticketlab supertickets-export`.") from e


#: Config fields that hold the FFN width, by architecture (BERT/RoBERTa/ELECTRA; DistilBERT).
FFN_WIDTH_FIELDS = ("intermediate_size", "hidden_dim")


def _set_ffn_width(config: Any, old: int, new: int) -> None:
    for attr in FFN_WIDTH_FIELDS:
        if getattr(config, attr, None) == old:
            setattr(config, attr, new)
            return
    raise TicketlabError(f"The model's config names its FFN width ({old}) in no field "
                         f"ticketlab knows ({', '.join(FFN_WIDTH_FIELDS)}).",
                         "Export the unstructured ticket with `ticketlab export` instead.")


def last_interval(run: Any) -> int:
    """The run's final interval, refused while the run is unfinished."""
    record = run.read_hparams()
    if record.get("kind") != "supertickets":
        raise TicketlabError(f"{run.path.name} is a {record.get('kind')!r} run, not a "
                             "SuperTickets run.", "Pass a run made by `ticketlab supertickets` "
                             "(an IMP level ships with `ticketlab export`).")
    count = len(record.get("schedule", {}).get("ratios", []))
    if not count or not run.level_done(count):
        raise TicketlabError(f"SuperTickets run {run.path.name} is not finished (its last "
                             f"interval, {count}, is not stored).",
                             "Rerun the same `ticketlab supertickets` command: it resumes.")
    return count


def load_structured(run_ref: str | Path, root: Path | None = None,
                    level: int | None = None) -> tuple[Any, list[UnitGroup], list[list[bool]]]:
    """A finished interval (default: the last, the SuperTicket) as a plain full-size model with
    the gates folded in (:func:`ticketlab.export.load_level`), its structural units and keep
    bits."""
    from ticketlab.export import load_level
    from ticketlab.families import family_of
    from ticketlab.store import default_root, find_run, read_json

    run = find_run(str(run_ref), root or default_root())
    level = last_interval(run) if level is None else level
    ticket = load_level(run.path, level, root)
    groups = family_of(ticket.model).structural_units(ticket.model)
    keep = keep_lists(read_json(run.level_dir(level) / "structure.json", "Structure"), groups)
    return ticket, groups, keep


#: How each kind's gate is described on a model card.
GATE_TEXT = {"head": "a learnable gate on every attention head",
             "neuron": "a learnable gate on every FFN neuron",
             "channel": "every expansion channel gated by its depthwise BatchNorm scale"}


def found_by_text(record: dict[str, Any], hp: dict[str, Any], info: dict[str, Any]) -> str:
    sp, prune, train = hp.get("supertickets", {}), hp.get("prune", {}), hp.get("train", {})
    schedule = record.get("schedule", {})
    kinds = [KIND_BY_NAME[k] for k in info.get("kinds", ("head", "neuron"))]
    length = (f"{train.get('max_steps')} steps" if train.get("max_steps")
              else f"{train.get('epochs')} epoch(s)")
    return (
        "SuperTickets (You et al., ECCV 2022): one training run of "
        f"{length} (lr {train.get('lr')}, batch {train.get('batch_size')}, seed "
        f"{train.get('seed')}) with {' and '.join(GATE_TEXT[k.name] for k in kinds)} "
        f"under an L1 penalty (rho {sp.get('gate_l1')}); every {schedule.get('interval')} steps "
        "the lowest gates were removed (targets: "
        + ", ".join(f"{sp.get(k.target, 0):.0%} of the {k.plural}" for k in kinds)
        + f") and the weights pruned by {prune.get('method', 'global')} magnitude, "
        f"{prune.get('rate', 0):.0%} more each time, to "
        f"{prune.get('target_sparsity', 0):.0%} of the prunable weights"
        f"{' (reactivated after each point)' if sp.get('reactivate') else ''}. "
        + " and ".join(f"{info.get(k.plural + '_kept')} of {info.get(k.plural + '_total')} "
                       f"{k.plural}" for k in kinds) + " are kept. In this folder "
        + " and ".join(EXPORT_NOTES[k.name].format(**info) for k in kinds)
        + "; `ticketlab.supertickets.load_superticket(folder)` deletes them: the ticket at its "
        "physical size, same logits.")


def export_superticket(run_ref: str | Path, out: Path, root: Path | None = None, *,
                       level: int | None = None, force: bool = False) -> dict[str, Any]:
    """Export a SuperTicket as a plain Hugging Face folder (see the module docstring): FFN
    physically cut to the widest layer's width, removed heads zero, structure in
    ``ticket.json``. Returns the ``ticket.json`` info (with ``export``: what happened)."""
    from ticketlab.export import export_model
    from ticketlab.store import default_root, find_run

    ticket, groups, keep = load_structured(run_ref, root, level)
    run = find_run(str(ticket.run_path), root or default_root())
    record = run.read_hparams()
    model = ticket.model
    shapes, width = export_shapes(groups, keep)
    exported = {str(g.layer): [i for i, b in enumerate(bits) if b]
                for g, bits in zip(groups, shapes, strict=True) if g.kind == "neuron"}
    neuron_groups = [g for g in groups if g.kind == "neuron"]
    shrink(model.base_model, groups, shapes)
    if neuron_groups and width != neuron_groups[0].count:
        _set_ffn_width(model.config, neuron_groups[0].count, width)
    structure = {**structure_info(groups, keep), "exported_neurons": exported}
    kinds = list(dict.fromkeys(g.kind for g in groups))
    info = {**ticket.info, "ticket_sparsity": ticket.mask.sparsity, "kinds": kinds,
            "structure": structure}
    for kind in kinds:
        plural = KIND_BY_NAME[kind].plural
        info[f"{plural}_kept"] = sum(sum(b) for g, b in zip(groups, keep, strict=True)
                                     if g.kind == kind)
        info[f"{plural}_total"] = sum(g.count for g in groups if g.kind == kind)
    if neuron_groups:
        info["ffn_width"] = width
    info["found_by"] = {"text": found_by_text(record, record["hparams"], info)}
    mask = zero_mask(model, list(ticket.mask.tensors))
    result = export_model(model, mask, Path(out), ticket.tokenizer, info=info,
                          labels=ticket.labels, force=force,
                          stores=(Path(root or default_root()), ticket.run_path.parent))
    return {**info, "export": result}


def load_superticket(folder: str | Path) -> nn.Module:
    """An exported SuperTicket at its fully physical size: the plain folder loaded with
    ``from_pretrained`` (:func:`ticketlab.export.load_ticket`), then its zero heads and its
    padding neurons deleted as ``ticket.json`` records. Same logits as the folder."""
    from ticketlab.export import load_ticket
    from ticketlab.families import family_of

    model = load_ticket(folder)
    info = read_ticket_info(Path(folder))
    groups = family_of(model).structural_units(model)
    shrink(model.base_model, groups, exported_keep(groups, info))
    return model.eval()


def physical_size(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
