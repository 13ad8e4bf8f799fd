"""Figures (issue 15.6): the transfer heatmap is coloured by each cell's value on a diverging
scale — a loss of 40.5 points no longer looks like a gain of 0.2 — and keeps the dark-cell
marker; figures take plain data and the reports import nothing from the experiments."""

from __future__ import annotations

import ast
import math
from pathlib import Path

from matplotlib.patches import Rectangle

from ticketlab.reports.documents import shade_colour
from ticketlab.reports.figures import transfer_figure

ROOT = Path(__file__).resolve().parents[1]


def test_transfer_heatmap_is_coloured_by_value_with_the_dark_marker() -> None:
    deltas = [[-0.405, 0.002], [0.031, math.nan]]
    dark = [[False, True], [True, False]]
    fig = transfer_figure(["SST-2", "CoLA"], ["SST-2", "CoLA"], deltas, dark, 0.5)
    ax = fig.axes[0]
    image = ax.images[0]

    def colour(v: float) -> tuple[float, ...]:
        return image.cmap(image.norm(v * 100))

    loss, tiny, gain = colour(-0.405), colour(0.002), colour(0.031)
    assert loss[0] > 0.35 and loss[2] < 0.2  # deep red
    assert min(tiny[:3]) > 0.9  # +0.2 points is almost white
    assert gain[2] > gain[0]  # a gain is blue
    texts = {t.get_text() for t in ax.texts}
    assert {"-40.5", "+0.2 ■", "+3.1 ■", "–"} <= texts
    frames = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
    assert sorted((round(p.get_x() + 0.47), round(p.get_y() + 0.47)) for p in frames) == \
        [(0, 1), (1, 0)]  # (column, row) of the dark cells


def test_html_shades_follow_the_same_diverging_scale() -> None:
    assert shade_colour(0.0) == "#ffffff"
    assert shade_colour(-1.0) == "#b2182b" and shade_colour(1.0) == "#2166ac"
    assert shade_colour(-0.005) > "#fe"  # a tiny change stays near white


def test_reports_import_nothing_from_the_experiments() -> None:
    """Experiments compute, reports render: no import (not even for type checking) of
    ticketlab.experiments from ticketlab/reports/, so the old import circle cannot return."""
    for module in (ROOT / "ticketlab" / "reports").glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not [n for n in names if n.startswith("ticketlab.experiments")], module
