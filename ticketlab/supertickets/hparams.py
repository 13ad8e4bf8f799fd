"""SuperTickets' own hyperparameters: one declaration each (``option(...)``), from which the
``ticketlab supertickets`` options are generated, as the core sections are.

Every default says where it comes from in the public code (GATECH-EIC/SuperTickets, commit
36d7edd; ``cls_imagenet_g.yml`` is its ImageNet SuperTickets config, ``seg_cityscapes_g_0.9_
reset.yml`` the one with reactivation). What the code expresses in epochs of a 350-epoch run is
kept as the same *share* of the run here, because a BERT fine-tune is a few hundred steps.

The rest of a SuperTickets run is the core's: the model, data and training sections
(``--epochs``/``--max-steps`` are the length of the *one* run), the prunable set
(``--prune-pooler``, ``--include``, ``--exclude``), the weight-pruning criterion (``--method``,
global magnitude by default: the code's ``method: mag`` with ``scope='global'``,
``train.py`` l. 596), the overall ``--target-sparsity`` and the per-interval ``--rate``
(+10 % a pruning point: ``train.py`` l. 568, ``(epoch + 1) // prune_interval / 10``, capped at
``target_ratio``, l. 572).

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ticketlab.errors import TicketlabError
from ticketlab.hparams import option

SUPER = "SuperTickets"
PENALTIES = ("resource", "uniform")

#: The code's pruning interval as a share of its run: ``prune_interval: 20`` of
#: ``num_epochs: 350`` (``cls_imagenet_g.yml`` l. 104 and l. 13).
INTERVAL_SHARE = 20 / 350


@dataclass(frozen=True)
class UnitKind:
    """One kind of structural unit (:class:`ticketlab.families.base.UnitGroup.kind`): the
    ``SuperHparams`` field holding its target, and the words messages and records use. Which
    kinds a model has is its family's answer; a target for a kind it lacks is refused."""

    name: str
    plural: str
    target: str
    what: str

    @property
    def flag(self) -> str:
        return "--" + self.target.replace("_", "-")


#: Every kind of unit, one declaration each.
UNIT_KINDS = (UnitKind("head", "heads", "head_target", "attention heads (text encoders)"),
              UnitKind("neuron", "neurons", "ffn_target", "FFN neurons (text encoders)"),
              UnitKind("channel", "channels", "channel_target",
                       "expansion channels (MobileNetV2's inverted residuals)"))
KIND_BY_NAME = {k.name: k for k in UNIT_KINDS}


@dataclass(frozen=True)
class SuperHparams:
    """How a SuperTickets run searches structure and prunes weights in one training run."""

    #: No counterpart in the code, where the L1 strength alone decides how much goes: a target
    #: makes runs comparable at a chosen architecture size.
    head_target: float = option(0.0, "Fraction of all attention heads removed by the end "
                                "(the lowest gates, one ranking over all layers).", SUPER)
    ffn_target: float = option(0.0, "Fraction of all FFN neurons removed by the end.", SUPER)
    #: MobileNetV2: the channels of every inverted residual's expansion, gated by the
    #: depthwise BatchNorm's scale (HR-NAS ``models/mobilenet_base.py`` l. 490-508).
    channel_target: float = option(0.0, "CNNs (MobileNetV2): fraction of all expansion "
                                   "channels removed by the end (the lowest |BatchNorm "
                                   "scale|, one ranking over all blocks).", SUPER,
                                   added_later=True)
    interval: int | None = option(None, "Optimizer steps between pruning points (default: "
                                  "20/350 of the run's steps, the code's prune_interval 20 "
                                  "of 350 epochs).", SUPER)
    #: The code's rho is 1.8e-4 (``cls_imagenet_g.yml`` l. 91; 1.4e-4 with reactivation,
    #: ``seg_cityscapes_g_0.9_reset.yml`` l. 88), on BatchNorm scales with RMSprop. Here it
    #: is set against the task gradient a gate receives: at θ0 on SST-2 (MiniLM-L6, batch 32)
    #: the median |dL/dg| is 1.1e-4 for a head's gate and 1.6e-5 for an FFN neuron's
    #: (README "SuperTickets"); rho 5e-5 pulls a neuron's gate about 3x harder than its task
    #: gradient and a head's about half as hard, so the gates drift apart without collapsing.
    gate_l1: float = option(5e-5, "L1 weight (rho) on the gates, after the warm-up.", SUPER)
    #: ``epoch_warmup: 25`` of 350 epochs, ``epoch_free: 0``, ``scheduler: linear``,
    #: ``stepwise: True`` (``cls_imagenet_g.yml`` l. 92-95; ``utils/prune.py``
    #: ``get_rho_scheduler``).
    gate_warmup: float = option(round(25 / 350, 4), "Share of the run over which rho rises "
                                "linearly from 0 (the code: 25 of 350 epochs).", SUPER)
    #: The code trains BN scales with the network's optimizer and lr; a BERT fine-tune's lr
    #: (1e-4) moves a gate at most ~0.01 in 100 AdamW steps, so the gates get their own.
    gate_lr: float = option(1e-2, "Learning rate of the gates (the weights keep --lr).",
                            SUPER)
    #: ``model_shrink_threshold: 1.0e-3`` (``cls_imagenet_g.yml`` l. 110; ``train.py``
    #: l. 522).
    threshold: float = option(1e-3, "Units whose |gate| is below this are removed at every "
                              "pruning point (the code's model_shrink_threshold).", SUPER)
    #: The code's ``bn_prune_filter: expansion_only`` (``cls_imagenet_g.yml`` l. 90) weights
    #: each channel's L1 by its FLOPs (``utils/prune.py`` ``get_bn_to_prune``, l. 179-185):
    #: ``resource`` here. It is not the default because with per-kind targets heads and
    #: neurons never compete for one budget, and on MiniLM-L6 the resource weights are 43 (a
    #: head) and 0.67 (a neuron): one rho then pulls a head's gate 20x harder than its task
    #: gradient (Adam moves every head gate down at the same speed) or a neuron's not at all.
    #: ``uniform`` is the code's network-slimming baseline (``equal_penalty_skip_expand1``).
    penalty: str = option("uniform", "Per-unit L1 weights: 'uniform' (network slimming) or "
                          "'resource' (a unit's compute over the mean unit's, HR-NAS).", SUPER,
                          choices=PENALTIES)
    #: ``reset_mask: True`` (``seg_cityscapes_g_0.9_reset.yml`` l. 105; ``train.py`` l. 631,
    #: ``pruner.alpha_mask(1)``); absent (off) in ``cls_imagenet_g.yml``.
    reactivate: bool = option(False, "Reset the weight mask to all-ones after every pruning "
                              "point, so pruned weights may grow back (pruned again at the "
                              "next point).", SUPER)

    def __post_init__(self) -> None:
        for kind in UNIT_KINDS:
            flag, value = kind.flag, getattr(self, kind.target)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise TicketlabError(
                    f"{flag} {value} is outside [0, 1): it is the fraction of the units "
                    "removed by the end.", f"Use e.g. {flag} 0.25 (every layer keeps at "
                    "least one unit).")
        if self.interval is not None and self.interval < 1:
            raise TicketlabError(f"--interval {self.interval} must be at least 1 step.",
                                 "Leave it out for the code's 20/350 of the run.")
        for flag, value in (("--gate-l1", self.gate_l1), ("--threshold", self.threshold)):
            if not (math.isfinite(value) and value >= 0):
                raise TicketlabError(f"{flag} {value} must be a finite number >= 0.",
                                     f"Leave {flag} out for the default.")
        if not (math.isfinite(self.gate_lr) and self.gate_lr > 0):
            raise TicketlabError(f"--gate-lr {self.gate_lr} must be a positive number.",
                                 "Leave it out for 1e-2.")
        if not (math.isfinite(self.gate_warmup) and 0 <= self.gate_warmup < 1):
            raise TicketlabError(f"--gate-warmup {self.gate_warmup} must be in [0, 1): a "
                                 "share of the run.", "Leave it out for the code's 25/350.")
        if self.penalty not in PENALTIES:
            raise TicketlabError(f"Unknown --penalty {self.penalty!r}.",
                                 f"Use one of: {', '.join(PENALTIES)}.")

    @property
    def targets(self) -> dict[str, float]:
        """Unit kind -> fraction removed by the end."""
        return {k.name: getattr(self, k.target) for k in UNIT_KINDS}

    def identity(self) -> dict[str, object]:
        """The hashed part of a run's SuperTickets settings: every field, less those added
        after runs were first stored while at their default (``Option.added_later``), so an
        older run directory keeps its name."""
        out = asdict(self)
        for f in fields(self):
            opt = f.metadata.get("option")
            if opt is not None and opt.added_later and out[f.name] == f.default:
                del out[f.name]
        return out
