"""Where masks prune, and how much masks of different tasks agree.

- Sparsity per matrix (kind × layer) and per layer: does IMP prune the FFN more than attention,
  the top layers more than the bottom ones?
- Pairwise Jaccard overlap of the *kept* weights of two masks, against what two random masks
  with the same per-matrix sparsities would share: E|A∩B| = Σ_m n_m·d_A,m·d_B,m (d = kept
  fraction of matrix m), E J = E|A∩B| / (|A| + |B| − E|A∩B|). Overlap above that expectation is
  structure the tasks share; at the expectation, the masks agree only as much as their
  per-matrix sparsities force them to.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask
from ticketlab.models import ROLE_ORDER, layer_of, role_of
from ticketlab.reports.figures import plot_mask_sparsity, plot_overlap
from ticketlab.store import Run, atomic_write_bytes, atomic_write_json, find_run


def _family(mask: Mask) -> str:
    """The model family a mask was found on (masks written before families: text)."""
    from ticketlab.families import FAMILY_MODULES

    family = mask.meta.get("family")
    return family if family in FAMILY_MODULES else "text-encoder"


def layer_label(name: str, family: str = "text-encoder") -> str:
    """"0", "1", … for a block's matrices, "pooler", else the top module (a CNN's
    ``conv_stem``, ``conv_1x1``): short enough for a plot's axis."""
    layer = layer_of(name, family)
    return "pooler" if role_of(name, family) == "pooler" else (
        str(layer) if layer is not None else name.split(".")[0])


def sparsity_by_layer(mask: Mask) -> dict[str, float]:
    """Layer ("0", "1", ... "pooler") -> fraction of its prunable weights removed."""
    kept: dict[str, list[int]] = {}
    family = _family(mask)
    for name, t in mask.tensors.items():
        k = kept.setdefault(layer_label(name, family), [0, 0])
        k[0] += int(t.sum())
        k[1] += t.numel()
    return {label: 1 - a / b for label, (a, b) in kept.items()}


def sparsity_grid(mask: Mask) -> tuple[list[str], list[str], list[list[float]]]:
    """(kinds, layers, sparsity[kind][layer]) with NaN where a kind has no matrix in a layer."""
    family = _family(mask)
    counts: dict[tuple[str, str], list[int]] = {}  # a CNN block has two 1x1 convolutions
    for n, t in mask.tensors.items():
        c = counts.setdefault((role_of(n, family, tuple(t.shape)), layer_label(n, family)),
                              [0, 0])
        c[0] += int(t.sum())
        c[1] += t.numel()
    per = {key: 1 - kept / total for key, (kept, total) in counts.items()}
    roles = {r for r, _ in per}
    kinds = [k for k in ROLE_ORDER if k in roles] + sorted(roles - set(ROLE_ORDER))
    layers = sorted({lab for _, lab in per}, key=lambda s: (not s.isdigit(), int(s)
                                                            if s.isdigit() else 0, s))
    grid = [[per.get((k, lab), float("nan")) for lab in layers] for k in kinds]
    return kinds, layers, grid


def _common(a: Mask, b: Mask) -> list[str]:
    names = sorted(a.tensors.keys() & b.tensors.keys())
    if not names:
        raise TicketlabError("The two masks share no matrix.",
                             "Compare masks of the same architecture and prunable set.")
    for n in names:
        if a.tensors[n].shape != b.tensors[n].shape:
            raise TicketlabError(f"The masks disagree on the shape of {n}.",
                                 "Compare masks of the same architecture.")
    return names


def jaccard(a: Mask, b: Mask) -> float:
    """|A ∩ B| / |A ∪ B| of the kept weights over the matrices both masks have."""
    inter = union = 0
    for n in _common(a, b):
        inter += int((a.tensors[n] & b.tensors[n]).sum())
        union += int((a.tensors[n] | b.tensors[n]).sum())
    return inter / union if union else 1.0


def expected_jaccard(a: Mask, b: Mask) -> float:
    """Jaccard overlap expected of two random masks with ``a``'s and ``b``'s per-matrix
    sparsities (ratio of expectations; exact to O(1/n) for matrices of n weights)."""
    inter = size_a = size_b = 0.0
    for n in _common(a, b):
        numel = a.tensors[n].numel()
        ka, kb = float(a.tensors[n].sum()), float(b.tensors[n].sum())
        inter += ka * kb / numel
        size_a += ka
        size_b += kb
    union = size_a + size_b - inter
    return inter / union if union else 1.0


def overlap_matrices(masks: dict[str, Mask]) -> tuple[list[list[float]], list[list[float]]]:
    """Pairwise (Jaccard, random expectation) matrices, in the order of ``masks``."""
    items = list(masks.values())
    observed = [[jaccard(a, b) for b in items] for a in items]
    expected = [[expected_jaccard(a, b) for b in items] for a in items]
    return observed, expected


def resolve_mask(ref: str, root: Path) -> tuple[str, Mask]:
    """A mask from a file path or ``RUN:LEVEL`` (run id, unique prefix or path); returns a
    label for plots and the mask."""
    path = Path(ref).expanduser()
    if path.is_file():
        mask = Mask.load(path)
        label = str(mask.meta.get("task") or path.stem)
        if mask.meta.get("level") is not None:
            label += f"@{mask.meta['level']}"
        return label, mask
    if ":" in ref:
        run_ref, _, level = ref.rpartition(":")
        if not level.isdigit():
            raise TicketlabError(f"{ref!r}: the level after ':' must be a number.",
                                 "Write RUN:LEVEL, e.g. sst2-1a2b:5.")
        run: Run = find_run(run_ref, root)
        mask_path = run.level_dir(int(level)) / "mask.safetensors"
        if not mask_path.is_file():
            raise TicketlabError(f"Run {run.path.name} has no mask at level {level}.",
                                 f"Finished levels: {run.levels()} (see `ticketlab show`).")
        task = run.read_hparams()["hparams"]
        task = task.get("finetune", task)["data"]["task"]
        return f"{task}@{level}", Mask.load(mask_path)
    raise TicketlabError(f"{ref!r} is neither a mask file nor RUN:LEVEL.",
                         "Pass a mask.safetensors path or RUN:LEVEL (see `ticketlab runs`).")


def unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def plot_mask_figure(mask: Mask, label: str, path: Path) -> None:
    """Where ``mask`` prunes: per matrix (kind × layer) and per layer, as one PNG."""
    kinds, layers, grid = sparsity_grid(mask)
    plot_mask_sparsity(label, mask.sparsity, kinds, layers, grid, sparsity_by_layer(mask), path)


def write_mask_analysis(masks: dict[str, Mask], out: Path) -> dict[str, Path]:
    """Per-mask sparsity plots, and with two masks or more the overlap heatmap and CSV."""
    paths: dict[str, Path] = {}
    summary: dict[str, object] = {}
    for i, (label, mask) in enumerate(masks.items()):
        p = out / f"mask_sparsity_{i}.png"
        plot_mask_figure(mask, label, p)
        paths[f"sparsity_{i}"] = p
        summary[label] = {"sparsity": mask.sparsity, "by_layer": sparsity_by_layer(mask),
                          "by_matrix": mask.per_tensor_sparsity()}
    if len(masks) > 1:
        observed, expected = overlap_matrices(masks)
        labels = list(masks)
        paths["overlap_png"] = out / "mask_overlap.png"
        plot_overlap(labels, observed, expected, paths["overlap_png"])
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["mask_a", "mask_b", "jaccard", "random_expectation"])
        for i, a in enumerate(labels):
            for j, b in enumerate(labels):
                w.writerow([a, b, f"{observed[i][j]:.6f}", f"{expected[i][j]:.6f}"])
        paths["overlap_csv"] = out / "mask_overlap.csv"
        atomic_write_bytes(paths["overlap_csv"], buf.getvalue().encode())
        summary["_overlap"] = {"labels": labels, "jaccard": observed, "expected": expected}
    paths["json"] = out / "masks.json"
    atomic_write_json(paths["json"], summary)
    return paths
