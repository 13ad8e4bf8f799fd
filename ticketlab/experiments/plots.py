"""Figures, drawn with matplotlib's object API on the Agg canvas.

No pyplot: a library must not switch the global backend or keep figures alive in a global
registry, and Agg needs no display. Each function writes one PNG atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ticketlab.store import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ticketlab.experiments.common import Stats
    from ticketlab.experiments.rewinding import RewindPoint
    from ticketlab.experiments.transfer import TransferResult
    from ticketlab.masks import Mask

DARK, LIGHT = "#1f3a68", "#e4ebf5"


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_transfer(result: TransferResult, path: Path) -> None:
    """Figure 2's layout: sources down, targets across, each cell transfer − full model in
    points; dark where the transfer is at least the target's own IMP subnetwork; the number of
    dark cells of each row on its right."""
    from matplotlib.colors import ListedColormap

    from ticketlab.experiments.matching import task_label

    s, t = len(result.sources), len(result.targets)
    fig = _figure(max(4.8, 1.6 + 1.05 * t), 1.4 + 0.55 * s)
    ax = fig.add_subplot()
    dark = [[1.0 if result.dark(a, b) else 0.0 for b in result.targets] for a in result.sources]
    ax.imshow(dark, cmap=ListedColormap([LIGHT, DARK]), vmin=0, vmax=1, aspect="auto")
    count_x = t - 0.5 + 0.35
    for i, row in enumerate(result.matrix()):
        for j, v in enumerate(row):
            text = "–" if math.isnan(v) else f"{v * 100:+.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if dark[i][j] else "black")
        ax.text(count_x, i, str(result.dark_counts()[i]), ha="center", va="center",
                fontsize=10, fontweight="bold")
    ax.set_xticks([*range(t), count_x], [*(task_label(x) for x in result.targets), "dark"])
    ax.set_yticks(range(s), [task_label(x) for x in result.sources])
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_xlabel("target task")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("source of the mask")
    ax.set_xlim(-0.5, t - 0.5 + 0.7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"Transfer at {result.sparsity:.0%} sparsity: score − full model (points)\n"
                 "dark: at least the target's own IMP subnetwork", fontsize=9)
    _save(fig, path)


def plot_curves(title: str, metric: str, full: Stats,
                series: dict[str, Sequence[tuple[float, Stats]]], path: Path) -> None:
    """Score against sparsity for IMP and each baseline, mean ± std bands, with the full
    model's mean ± std as a horizontal band."""
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    ax.axhspan((full.mean - full.std) * 100, (full.mean + full.std) * 100, color="0.85",
               label=f"full model {full.fmt()}")
    ax.axhline(full.mean * 100, color="0.4", lw=1)
    for name, points in series.items():
        if not points:
            continue
        points = sorted(points, key=lambda p: p[0])
        x = [p[0] * 100 for p in points]
        mean = [p[1].mean * 100 for p in points]
        lo = [(p[1].mean - p[1].std) * 100 for p in points]
        hi = [(p[1].mean + p[1].std) * 100 for p in points]
        (line,) = ax.plot(x, mean, marker="o", ms=4, label=name)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("sparsity (% of prunable weights removed)")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_rewinding(title: str, points: Sequence[RewindPoint], sparsity: float | None,
                   path: Path) -> None:
    """Left: the highest matching sparsity against the rewind point; right: the score at a
    fixed sparsity against the rewind point (mean ± std over seeds)."""
    fig = _figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    labels = [f"{p.fraction:.0%}\n(step {p.step})" for p in points]
    ticks = range(len(points))
    left.plot(ticks, [(p.highest_matching or 0.0) * 100 for p in points], marker="o")
    left.set_ylabel("highest matching sparsity (%)")
    left.set_ylim(bottom=0)
    scored = [(i, p.score_at) for i, p in enumerate(points) if p.score_at is not None]
    if scored:
        right.errorbar([i for i, _ in scored], [s.mean * 100 for _, s in scored],
                       yerr=[s.std * 100 for _, s in scored], marker="o", capsize=3)
    right.set_ylabel(f"score at {sparsity:.0%} sparsity (%)" if sparsity else "score (%)")
    for ax in (left, right):
        ax.set_xticks(list(ticks), labels, fontsize=8)
        ax.set_xlabel("rewind point i (% of training steps)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_mask_sparsity(mask: Mask, label: str, path: Path) -> None:
    """Left: sparsity of every matrix (kind × layer); right: sparsity per layer."""
    from ticketlab.experiments.analysis import sparsity_by_layer, sparsity_grid

    kinds, layers, grid = sparsity_grid(mask)
    by_layer = sparsity_by_layer(mask)
    fig = _figure(4.0 + 0.45 * len(layers) * 2, 3.4)
    left, right = fig.subplots(1, 2, width_ratios=[1.3, 1])
    im = left.imshow([[v * 100 for v in row] for row in grid], cmap="viridis", vmin=0,
                     vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                left.text(j, i, f"{v * 100:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if v < 0.6 else "black")
    left.set_xticks(range(len(layers)), layers)
    left.set_yticks(range(len(kinds)), kinds)
    left.set_xlabel("layer")
    left.set_title("sparsity per matrix (%)", fontsize=9)
    fig.colorbar(im, ax=left, shrink=0.8)
    right.bar(list(by_layer), [v * 100 for v in by_layer.values()], color="#4c72b0")
    right.axhline(mask.sparsity * 100, color="0.3", ls="--", lw=1, label="overall")
    right.set_ylim(0, 100)
    right.set_xlabel("layer")
    right.set_ylabel("sparsity (%)")
    right.legend(fontsize=8)
    fig.suptitle(f"{label}: {mask.sparsity:.1%} of the prunable weights removed", fontsize=10)
    _save(fig, path)


def plot_overlap(labels: Sequence[str], observed: Sequence[Sequence[float]],
                 expected: Sequence[Sequence[float]], path: Path) -> None:
    """Pairwise Jaccard overlap of kept weights, each cell with the random-mask expectation."""
    n = len(labels)
    fig = _figure(1.6 + 1.1 * n, 1.2 + 0.9 * n)
    ax = fig.add_subplot()
    im = ax.imshow(observed, cmap="magma", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            v = observed[i][j]
            ax.text(j, i, f"{v:.2f}\n(rand {expected[i][j]:.2f})", ha="center", va="center",
                    fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_title("Jaccard overlap of kept weights\n(in brackets: two random masks with the "
                 "same per-matrix sparsities)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)
