"""Every figure ticketlab draws, with matplotlib's object API on the Agg canvas.

No pyplot: a library must not switch the global backend or keep figures alive in a global
registry, and Agg needs no display. The functions take plain data (labels, numbers, small
objects described by a Protocol) — the experiments compute it — and write one PNG atomically
(:func:`save_png`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ticketlab.reports.tables import MeanStd, mean_std
from ticketlab.store import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: The diverging colour map of the transfer heatmap: red below the full model, blue above,
#: white at it.
DIVERGING = "RdBu"


def new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def transfer_figure(sources: Sequence[str], targets: Sequence[str],
                    deltas: Sequence[Sequence[float]], dark: Sequence[Sequence[bool]],
                    sparsity: float) -> Figure:
    """Figure 2's layout: sources down, targets across, each cell transfer − full model in
    points, coloured on a diverging scale by its value (−40.5 deep red, +0.2 near white, a
    gain blue); a *dark* cell — at least the target's own IMP subnetwork — keeps its marker
    (■ and a black frame); the number of dark cells of each row on its right."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    s, t = len(sources), len(targets)
    fig = new_figure(max(5.4, 2.4 + 1.05 * t), 1.5 + 0.55 * s)
    ax = fig.add_subplot()
    values = [[v * 100 for v in row] for row in deltas]
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    limit = max(max(finite, default=1.0), 1.0)
    norm = Normalize(-limit, limit)
    cmap = colormaps[DIVERGING].with_extremes(bad="#eeeeee")
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto")
    count_x = t - 0.5 + 0.35
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            text = "–" if math.isnan(v) else f"{v:+.1f}" + (" ■" if dark[i][j] else "")
            strong = not math.isnan(v) and abs(v) > 0.6 * limit
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if strong else "black",
                    fontweight="bold" if dark[i][j] else "normal")
            if dark[i][j]:
                ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, lw=2,
                                       edgecolor="black"))
        ax.text(count_x, i, str(sum(dark[i])), ha="center", va="center", fontsize=10,
                fontweight="bold")
    ax.set_xticks([*range(t), count_x], [*targets, "■"])
    ax.set_yticks(range(s), list(sources))
    ax.tick_params(length=0)
    ax.xaxis.tick_top()
    ax.set_xlabel("target task")
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("source of the mask")
    ax.set_xlim(-0.5, t - 0.5 + 0.7)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.colorbar(image, ax=ax, shrink=0.8, label="score − full model (points)")
    fig.suptitle(f"Transfer at {sparsity:.0%} sparsity: score − full model (points)\n"
                 "■ framed: at least the target's own IMP subnetwork", fontsize=9)
    return fig


def plot_transfer(sources: Sequence[str], targets: Sequence[str],
                  deltas: Sequence[Sequence[float]], dark: Sequence[Sequence[bool]],
                  sparsity: float, path: Path) -> None:
    """:func:`transfer_figure` as a PNG."""
    save_png(transfer_figure(sources, targets, deltas, dark, sparsity), path)


def plot_curves(title: str, metric: str, full: MeanStd,
                series: dict[str, Sequence[tuple[float, MeanStd]]], path: Path,
                robust: tuple[MeanStd, dict[str, Sequence[tuple[float, MeanStd]]]] | None = None
                ) -> None:
    """Score against sparsity for IMP and each baseline, mean ± std bands, with the full
    model's mean ± std as a horizontal band; ``robust`` (the same for robust scores) adds a
    second panel, so a double-win level reads as inside both bands."""
    panels = [(metric, full, series)] + ([(f"robust {metric}", *robust)] if robust else [])
    fig = new_figure(6.4 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name_of_metric, band, lines) in zip(axes, panels, strict=True):
        ax.axhspan((band.mean - band.std) * 100, (band.mean + band.std) * 100, color="0.85",
                   label=f"full model {mean_std(band)}")
        ax.axhline(band.mean * 100, color="0.4", lw=1)
        for name, pts in lines.items():
            if not pts:
                continue
            pts = sorted(pts, key=lambda p: p[0])
            x = [p[0] * 100 for p in pts]
            mean = [p[1].mean * 100 for p in pts]
            lo = [(p[1].mean - p[1].std) * 100 for p in pts]
            hi = [(p[1].mean + p[1].std) * 100 for p in pts]
            (line,) = ax.plot(x, mean, marker="o", ms=4, label=name)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("sparsity (% of prunable weights removed)")
        ax.set_ylabel(f"{name_of_metric} (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)


class RewindPointLike(Protocol):
    """One rewind point (:class:`ticketlab.experiments.rewinding.RewindPoint`)."""

    fraction: float
    step: int
    highest_matching: float | None
    score_at: MeanStd | None


def plot_rewinding(title: str, pts: Sequence[RewindPointLike], sparsity: float | None,
                   path: Path) -> None:
    """Left: the highest matching sparsity against the rewind point; right: the score at a
    fixed sparsity against the rewind point (mean ± std over seeds)."""
    fig = new_figure(9.0, 3.6)
    left, right = fig.subplots(1, 2)
    labels = [f"{p.fraction:.0%}\n(step {p.step})" for p in pts]
    ticks = range(len(pts))
    left.plot(ticks, [(p.highest_matching or 0.0) * 100 for p in pts], marker="o")
    left.set_ylabel("highest matching sparsity (%)")
    left.set_ylim(bottom=0)
    scored = [(i, p.score_at) for i, p in enumerate(pts) if p.score_at is not None]
    if scored:
        right.errorbar([i for i, _ in scored], [s.mean * 100 for _, s in scored],
                       yerr=[s.std * 100 for _, s in scored], marker="o", capsize=3)
    right.set_ylabel(f"score at {sparsity:.0%} sparsity (%)" if sparsity else "score (%)")
    for ax in (left, right):
        ax.set_xticks(list(ticks), labels, fontsize=8)
        ax.set_xlabel("rewind point i (% of training steps)")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    save_png(fig, path)


def plot_mask_sparsity(label: str, sparsity: float, kinds: Sequence[str],
                       layers: Sequence[str], grid: Sequence[Sequence[float]],
                       by_layer: dict[str, float], path: Path) -> None:
    """Left: sparsity of every matrix (``grid[kind][layer]``, NaN where a kind has no matrix
    in a layer); right: sparsity per layer, with the mask's overall ``sparsity``."""
    fig = new_figure(4.0 + 0.45 * len(layers) * 2, 3.4)
    left, right = fig.subplots(1, 2, width_ratios=[1.3, 1])
    im = left.imshow([[v * 100 for v in row] for row in grid], cmap="viridis", vmin=0,
                     vmax=100, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                left.text(j, i, f"{v * 100:.0f}", ha="center", va="center", fontsize=7,
                          color="white" if v < 0.6 else "black")
    left.set_xticks(range(len(layers)), list(layers))
    left.set_yticks(range(len(kinds)), list(kinds))
    left.set_xlabel("layer")
    left.set_title("sparsity per matrix (%)", fontsize=9)
    fig.colorbar(im, ax=left, shrink=0.8)
    right.bar(list(by_layer), [v * 100 for v in by_layer.values()], color="#4c72b0")
    right.axhline(sparsity * 100, color="0.3", ls="--", lw=1, label="overall")
    right.set_ylim(0, 100)
    right.set_xlabel("layer")
    right.set_ylabel("sparsity (%)")
    right.legend(fontsize=8)
    fig.suptitle(f"{label}: {sparsity:.1%} of the prunable weights removed", fontsize=10)
    save_png(fig, path)


def plot_overlap(labels: Sequence[str], observed: Sequence[Sequence[float]],
                 expected: Sequence[Sequence[float]], path: Path) -> None:
    """Pairwise Jaccard overlap of kept weights, each cell with the random-mask expectation."""
    n = len(labels)
    fig = new_figure(1.6 + 1.1 * n, 1.2 + 0.9 * n)
    ax = fig.add_subplot()
    im = ax.imshow(observed, cmap="magma", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            v = observed[i][j]
            ax.text(j, i, f"{v:.2f}\n(rand {expected[i][j]:.2f})", ha="center", va="center",
                    fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(n), list(labels), rotation=30, ha="right")
    ax.set_yticks(range(n), list(labels))
    ax.set_title("Jaccard overlap of kept weights\n(in brackets: two random masks with the "
                 "same per-matrix sparsities)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    save_png(fig, path)


def plot_robust_transfer(targets: Sequence[str], deltas: dict[str, Sequence[float]],
                         robust_deltas: dict[str, Sequence[float]] | None, title: str,
                         path: Path) -> None:
    """Grouped bars: score − full model per target, one bar per ticket (vanilla beside
    robust), and the same for robust accuracy in a second panel when it was measured."""
    panels = [deltas] + ([robust_deltas] if robust_deltas else [])
    fig = new_figure(4 + 1.6 * len(targets), 3.6, layout="tight")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.38
    for ax, values, robust in zip(axes, panels, (False, True), strict=False):
        xs = range(len(targets))
        for k, (ticket, row) in enumerate(values.items()):
            ax.bar([x + (k - 0.5) * width for x in xs], [v * 100 for v in row], width,
                   label=ticket)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs), list(targets))
        ax.set_ylabel(("robust " if robust else "") + "score − full model (points)")
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)


def plot_supertickets(points: dict[str, tuple[tuple[float, float], float]],
                      speedups: dict[str, dict[int, float]], title: str, path: Path) -> None:
    """SuperTickets against IMP: score against training CPU seconds (left; the trade-off the
    paper is about, one point per model, ± std over seeds) and, when the speed bench ran,
    the speed-up over the dense model per batch size for each way of running a ticket
    (right)."""
    fig = new_figure(10 if speedups else 5.5, 3.8, layout="tight")
    axes = fig.subplots(1, 2 if speedups else 1, squeeze=False)[0]
    ax = axes[0]
    for name, ((mean, std), seconds) in points.items():
        ax.errorbar([seconds], [mean * 100], yerr=[std * 100], fmt="o", capsize=3, label=name)
    ax.set_xlabel("training CPU time (s, mean over seeds)")
    ax.set_ylabel("score (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if speedups:
        bx = axes[1]
        batches = sorted({b for row in speedups.values() for b in row})
        width = 0.8 / max(1, len(speedups))
        for k, (name, row) in enumerate(speedups.items()):
            bx.bar([i + (k - (len(speedups) - 1) / 2) * width for i in range(len(batches))],
                   [row.get(b, 0.0) for b in batches], width, label=name)
        bx.axhline(1.0, color="grey", lw=0.8, ls="--")
        bx.set_xticks(list(range(len(batches))), [f"batch {b}" for b in batches])
        bx.set_ylabel("speed-up over the dense model (x)")
        top = max((v for row in speedups.values() for v in row.values()), default=1.0)
        bx.set_ylim(0, 1.35 * top)  # headroom for the legend above the bars
        bx.legend(fontsize=7, loc="upper left")
    fig.suptitle(title)
    save_png(fig, path)


#: One point of bench's sweep: (sparsity, wall-time speed-up, CPU-time speed-up or None).
BenchPoint = tuple[float, float, "float | None"]


def bench_figure(results: dict[tuple[int, int], tuple[float, float | None]],
                 pts: dict[int, list[BenchPoint]], batch: int, sparsity: float, level: int,
                 title: str) -> Figure:
    """``bench``'s speed-up plot: wall time (left) and, beside it, CPU time on one thread
    (right). ``results``: (threads, batch) -> (wall, CPU-time or None) speed-up of the level
    benchmarked (a star at its ``sparsity``); ``pts``: threads -> the run's levels at ``batch``.

    Wall time alone misleads on a shared machine: another process taking the core makes a
    faster kernel look slower (a 0.69x "slow-down" at 50 % that is not one). The CPU time of
    the one thread doing the work does not include that share, so the two panels together
    show whether a ratio is the kernel's or the machine's.
    """
    fig = new_figure(11, 4.2, layout="tight")
    wall_ax, cpu_ax = fig.subplots(1, 2, sharey=True)
    for ax, col in ((wall_ax, 1), (cpu_ax, 2)):
        for th, line in pts.items():
            line = [p for p in line if p[col] is not None]
            if line:
                ax.plot([100 * p[0] for p in line], [p[col] for p in line], "o-",
                        label=f"levels of the run, batch {batch}, {th} thread(s)")
        for (th, b), ratios in sorted(results.items()):
            if ratios[col - 1] is not None:
                ax.scatter([100 * sparsity], [ratios[col - 1]], marker="*", s=120, zorder=3,
                           label=f"level {level}, batch {b}, {th} thread(s)")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("sparsity of the prunable set (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    wall_ax.set_ylabel("speed-up over dense PyTorch (x)")
    wall_ax.set_title("wall time")
    cpu_ax.set_title("CPU time of the working thread (1 thread)")
    if not any(r[1] is not None for r in results.values()) and not any(
            p[2] is not None for line in pts.values() for p in line):
        cpu_ax.text(0.5, 0.5, "CPU time is measured on 1 thread:\nadd --threads 1",
                    ha="center", va="center", transform=cpu_ax.transAxes)
    fig.suptitle(title)
    return fig
