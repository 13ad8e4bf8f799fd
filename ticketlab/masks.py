"""The mask: which prunable weights a subnetwork keeps.

A :class:`Mask` is one bool tensor per prunable matrix, keyed by base-model-relative names. It
is stored as safetensors with the bits packed eight to a byte, and JSON metadata in the
safetensors header: the fingerprint of θ0's prunable tensors (so a mask is never silently
applied to other weights), the task, level, sparsity, hparams, and a sha256 of the payload (so
a truncated or hand-edited file is refused rather than half-trusted).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketlab.errors import TicketlabError
from ticketlab.store import atomic_write_bytes

MASK_FORMAT = "ticketlab.mask"
MASK_VERSION = 1


class Mask:
    """One bool tensor per prunable parameter (True = kept)."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None):
        self.tensors = {k: v.to(torch.bool) for k, v in tensors.items()}
        self.meta: dict[str, Any] = dict(meta or {})

    # --- construction -------------------------------------------------------------------
    @classmethod
    def ones_like(cls, params: dict[str, torch.Tensor]) -> Mask:
        return cls({k: torch.ones(p.shape, dtype=torch.bool) for k, p in params.items()})

    # --- numbers --------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def num_kept(self) -> int:
        return sum(int(t.sum()) for t in self.tensors.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable set that is pruned."""
        return 1.0 - self.num_kept / self.num_total

    def per_tensor_sparsity(self) -> dict[str, float]:
        return {k: 1.0 - float(t.float().mean()) for k, t in self.tensors.items()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask) or self.tensors.keys() != other.tensors.keys():
            return False
        return all(torch.equal(v, other.tensors[k]) for k, v in self.tensors.items())

    def __repr__(self) -> str:
        return f"Mask({len(self.tensors)} tensors, sparsity={self.sparsity:.4f})"

    # --- using it -------------------------------------------------------------------------
    def check_compatible(
        self,
        params: dict[str, torch.Tensor],
        fingerprint: str | None = None,
        allow_different_weights: bool = False,
        source: str = "mask",
        digests: dict[str, str] | None = None,
        family: str | None = None,
    ) -> None:
        """Refuse a mask whose model family, names, shapes or θ0 differ from the model's.

        ``family`` (the model's family name) is compared with the family the mask records
        first, so a vision mask on a text model is one clear error, not a list of missing
        matrices; ``allow_different_weights`` does not lift it.

        θ0 is compared twice: the fingerprint of the prunable encoder matrices (every mask has
        it), and — for masks written since — the digest of every body tensor both sides have
        (``digests``: embeddings, LayerNorms, the pooler...). The pooler alone may be missing
        on either side: MLM and QA models have no pooler, and a mask must transfer between
        heads of the same body (a missing pooler entry stays dense).
        """
        theirs_family = self.meta.get("family")
        if family and theirs_family and theirs_family != family:
            kinds = {"vision": "an image model", "text-encoder": "a text encoder"}
            raise TicketlabError(
                f"The {source} was found on {kinds.get(theirs_family, theirs_family)} "
                f"({self.meta.get('model', '?')}, family {theirs_family}), but this is "
                f"{kinds.get(family, family)} (family {family}): a mask prunes the matrices "
                "of one architecture and means nothing on another.",
                f"Use a mask found on a {family} model (or pick the model the mask was found "
                "on with --model).")
        mine = {k for k in self.tensors if not k.startswith("pooler.")}
        theirs = {k for k in params if not k.startswith("pooler.")}
        if mine != theirs:
            missing, extra = sorted(theirs - mine), sorted(mine - theirs)
            raise TicketlabError(
                f"The {source} does not fit this model's prunable set: "
                f"{len(missing)} matrices missing (e.g. {missing[:2]}), "
                f"{len(extra)} unknown (e.g. {extra[:2]}).",
                "Use a mask found on the same architecture, with the same --include/--exclude "
                "and --prune-pooler settings.",
            )
        for k in self.tensors.keys() & params.keys():
            if tuple(self.tensors[k].shape) != tuple(params[k].shape):
                raise TicketlabError(
                    f"The {source} has shape {tuple(self.tensors[k].shape)} for {k}, the model "
                    f"has {tuple(params[k].shape)}.",
                    "Use a mask found on the same architecture.",
                )
        if allow_different_weights:
            return
        want = self.meta.get("fingerprint")
        if fingerprint and want and want != fingerprint:
            raise TicketlabError(
                f"The {source} was found on other pre-trained weights (θ0 fingerprint "
                f"{want[:12]}…, this model's is {fingerprint[:12]}…).",
                "Use the model the mask was found on, or pass --allow-different-weights "
                "(for the random-reinitialisation baseline).",
            )
        theirs_digests = self.meta.get("theta0")
        if digests and isinstance(theirs_digests, dict):
            differ = sorted(k for k in digests.keys() & theirs_digests.keys()
                            if digests[k] != theirs_digests[k])
            if differ:
                raise TicketlabError(
                    f"The {source} was found on a θ0 whose {len(differ)} tensor(s) differ from "
                    f"this model's (e.g. {', '.join(differ[:3])}): the same encoder matrices "
                    "but other embeddings, norms or pooler — or a randomly initialised weight "
                    "drawn under another seed.",
                    "Use the model (and, for --prune-missing-weights, the seed) the mask was "
                    "found with, or pass --allow-different-weights.")

    def for_params(self, params: dict[str, torch.Tensor]) -> Mask:
        """The mask restricted to ``params``' names; entries it lacks (a pooler) stay dense."""
        tensors = {
            k: self.tensors[k] if k in self.tensors else torch.ones(p.shape, dtype=torch.bool)
            for k, p in params.items()
        }
        return Mask(tensors, self.meta)

    @torch.no_grad()
    def apply_(self, params: dict[str, torch.Tensor]) -> None:
        """Zero the pruned weights in place."""
        for k, p in params.items():
            if k in self.tensors:
                p.mul_(self.tensors[k].to(device=p.device, dtype=p.dtype))

    # --- files ----------------------------------------------------------------------------
    def to_bytes(self, meta: dict[str, Any] | None = None) -> bytes:
        from safetensors.torch import save

        meta = {**self.meta, **(meta or {})}
        packed, shapes = {}, {}
        for k in sorted(self.tensors):
            t = self.tensors[k].cpu()
            shapes[k] = list(t.shape)
            packed[k] = torch.from_numpy(np.packbits(t.numpy().reshape(-1)))
        header = {
            **meta,
            "format": MASK_FORMAT,
            "version": MASK_VERSION,
            "shapes": shapes,
            "sparsity": self.sparsity,
            "payload_sha256": _payload_digest(packed),
        }
        return save(packed, metadata={"ticketlab": json.dumps(header, sort_keys=True)})

    def save(self, path: Path, meta: dict[str, Any] | None = None) -> None:
        atomic_write_bytes(Path(path), self.to_bytes(meta))

    @classmethod
    def load(cls, path: Path) -> Mask:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise TicketlabError(
                f"Mask file {path} does not exist.",
                "Pass a level's mask.safetensors (see `ticketlab show RUN`).",
            )
        bad = TicketlabError(
            f"Mask file {path} is corrupt (truncated, or not a ticketlab mask).",
            "Use an intact mask.safetensors written by ticketlab; re-run the level if needed.",
        )
        try:
            with safe_open(str(path), framework="pt") as f:
                raw_meta = (f.metadata() or {}).get("ticketlab")
                packed = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several error types for damaged files
            raise bad from e
        if raw_meta is None:
            raise bad
        try:
            meta = json.loads(raw_meta)
        except json.JSONDecodeError as e:
            raise bad from e
        if meta.get("format") != MASK_FORMAT:
            raise bad
        if meta.get("version") != MASK_VERSION:
            raise TicketlabError(
                f"Mask file {path} has format version {meta.get('version')}, this ticketlab "
                f"reads version {MASK_VERSION}.",
                "Use the ticketlab version that wrote it.",
            )
        if _payload_digest(packed) != meta.get("payload_sha256"):
            raise TicketlabError(
                f"Mask file {path} does not match its own checksum: it was modified or damaged.",
                "Restore the original file or re-run the level that wrote it.",
            )
        shapes = meta.pop("shapes", None)
        if not isinstance(shapes, dict) or set(shapes) != set(packed):
            raise bad
        claimed = meta.get("sparsity")
        if not isinstance(claimed, int | float) or isinstance(claimed, bool) or not (
                0.0 <= claimed <= 1.0):  # NaN fails the comparison too
            raise bad
        tensors = {}
        for k, shape in shapes.items():
            if not isinstance(shape, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                    for d in shape):
                raise bad
            n = int(np.prod(shape, dtype=np.int64))
            if packed[k].dtype != torch.uint8 or packed[k].numel() != (n + 7) // 8:
                raise bad  # checked before unpacking: no allocation from a claimed size
            bits = np.unpackbits(packed[k].numpy())[:n]
            tensors[k] = torch.from_numpy(bits.astype(bool)).reshape(shape)
        derived = ("format", "version", "payload_sha256")
        mask = cls(tensors, {k: v for k, v in meta.items() if k not in derived})
        if abs(mask.sparsity - float(claimed)) > 1e-9:
            raise bad
        return mask


def _payload_digest(packed: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(packed):
        h.update(k.encode())
        h.update(packed[k].numpy().tobytes())
    return h.hexdigest()
