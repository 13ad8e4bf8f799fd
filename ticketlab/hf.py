"""A ticket inside the Hugging Face Trainer: :class:`TicketMaskCallback`.

ticketlab trains with its own loop (:mod:`ticketlab.train`), but a ticket is just a mask, and a
user with a ``run_glue.py``-style script should be able to fine-tune a stored ticket with the
``Trainer`` they know::

    from transformers import AutoModelForSequenceClassification, Trainer
    from ticketlab.hf import TicketMaskCallback

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      callbacks=[TicketMaskCallback("runs/sst2-…/level_7/mask.safetensors")])
    trainer.train()          # the pruned weights stay exactly zero throughout

What it must guarantee, and where in the Trainer's step it acts:

1. **The pruned weights are exactly zero when training starts** (``on_train_begin``).
2. **Their gradients are zero before clipping.** A callback's ``on_pre_optimizer_step`` runs
   *after* the Trainer has clipped (``clip_grad_norm_`` then ``on_pre_optimizer_step`` then
   ``optimizer.step()``), so zeroing there would let the pruned weights' gradients eat the
   clipping budget. Instead a tensor hook on each pruned parameter multiplies its gradient by
   the mask as autograd produces it — before it is even accumulated into ``.grad``, so every
   micro-batch of gradient accumulation, the clipping norm and the optimizer see zeros.
3. **They are re-zeroed after every optimizer step** (``on_optimizer_step``, right after
   ``optimizer.step()``): with a zero gradient AdamW leaves a zero weight at zero, but an
   optimizer with momentum from elsewhere, or a custom one, might not.
4. The hooks are removed when training ends (``on_train_end``); the zeros stay.

The mask's names are relative to the base model (``encoder.layer.0.attention.self.query.
weight``), so a mask found with one head applies to the same body under any head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask

__all__ = ["TicketMaskCallback", "mask_parameters"]


def _base_module(model: nn.Module) -> nn.Module:
    """The base model (``model.bert``) of a transformers model, or the module itself."""
    net = model.module if hasattr(model, "module") else model  # DDP-wrapped
    prefix = getattr(net, "base_model_prefix", "")
    return getattr(net, prefix, net) if prefix else net


def mask_parameters(model: nn.Module, mask: Mask) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that ``mask`` prunes, under the mask's names.

    A name the model lacks is refused (another architecture), except the pooler: a model with
    another head may have none, and its entry is then skipped (as ticketlab does)."""
    named = dict(_base_module(model).named_parameters())
    missing = sorted(n for n in mask.tensors if n not in named and not n.startswith("pooler."))
    if missing:
        raise TicketlabError(
            f"The mask prunes {len(missing)} matrices this model does not have (e.g. "
            f"{', '.join(missing[:2])}).",
            "Use a mask found on the same architecture (see `ticketlab show RUN`).")
    params = {n: named[n] for n in mask.tensors if n in named}
    for n, p in params.items():
        if tuple(p.shape) != tuple(mask.tensors[n].shape):
            raise TicketlabError(f"The mask has shape {tuple(mask.tensors[n].shape)} for {n}, "
                                 f"the model has {tuple(p.shape)}.",
                                 "Use a mask found on the same architecture.")
    return params


class TicketMaskCallback(TrainerCallback):
    """Keeps a ticketlab mask enforced while a ``transformers.Trainer`` trains.

    ``mask``: a :class:`~ticketlab.masks.Mask` or the path of a ``mask.safetensors``.
    ``check_weights``: when training starts from step 0, refuse a model whose pre-trained
    weights are not the ones the mask was found on (the θ0 fingerprint every ticketlab mask
    records); pass False for a deliberate transfer to other weights.
    """

    def __init__(self, mask: Mask | str | os.PathLike[str], check_weights: bool = True) -> None:
        self.mask = mask if isinstance(mask, Mask) else Mask.load(Path(mask))
        self.check_weights = check_weights
        self.params: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._handles: list[Any] = []

    # --- the mask on a model --------------------------------------------------------------
    def attach(self, model: nn.Module, check: bool | None = None) -> None:
        """Zero the pruned weights of ``model`` and hook their gradients (idempotent)."""
        from ticketlab.models import fingerprint, tensor_digests

        self.detach()
        params = mask_parameters(model, self.mask)
        if self.check_weights if check is None else check:
            digests = tensor_digests(_base_module(model).state_dict())
            self.mask.check_compatible(params, fingerprint(params), source="mask",
                                       digests=digests)
        for name, p in params.items():
            keep = self.mask.tensors[name].to(device=p.device, dtype=p.dtype)
            self.params.append(p)
            self.values.append(keep)
            self._handles.append(p.register_hook(lambda grad, keep=keep: grad * keep))
        self.zero_weights()

    def detach(self) -> None:
        """Remove the gradient hooks (the weights keep their zeros)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self.params, self.values = [], [], []

    @torch.no_grad()
    def zero_weights(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.values)

    # --- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise TicketlabError("The Trainer gave TicketMaskCallback no model.",
                                 "Pass the model to the Trainer (Trainer(model=...)).")
        # Resuming from a checkpoint: the weights are trained, not θ0; nothing to compare.
        self.attach(model, check=self.check_weights and state.global_step == 0)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.zero_weights()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.zero_weights()
        self.detach()
