"""``bench``'s plot (issue 15.5): CPU time beside wall time, so that a shared machine's false
slow-down (wall time only: 0.69x at 50 %) can be told from the kernel's."""

from __future__ import annotations

import pytest

from ticketlab.commands.ship import _cpu_ratio
from ticketlab.reports.figures import bench_figure

TICKET = {"sparsity": 0.5, "level": 1, "title": "minilm (sst2), seq 128"}


def _lines(ax) -> list[list[float]]:
    return [list(line.get_ydata()) for line in ax.get_lines() if line.get_marker() == "o"]


def _stars(ax) -> list[float]:
    return [float(c.get_offsets()[0][1]) for c in ax.collections]


def test_bench_plot_shows_cpu_time_beside_wall_time():
    results = {(1, 1): (0.69, 1.42), (2, 1): (1.10, None)}  # wall falsely < 1 on one thread
    points = {1: [(0.0, 1.0, 1.0), (0.5, 0.69, 1.42)], 2: [(0.0, 1.0, None), (0.5, 1.1, None)]}
    fig = bench_figure(results, points, batch=1, **TICKET)
    wall, cpu = fig.axes
    assert wall.get_title() == "wall time" and cpu.get_title().startswith("CPU time")
    assert _lines(wall) == [[1.0, 0.69], [1.0, 1.1]] and _stars(wall) == [0.69, 1.10]
    assert _lines(cpu) == [[1.0, 1.42]] and _stars(cpu) == [1.42]  # one thread only
    assert list(cpu.get_lines()[0].get_xdata()) == [0.0, 50.0]


def test_bench_plot_without_one_thread_says_how_to_get_cpu_time():
    fig = bench_figure({(2, 1): (1.1, None)}, {2: [(0.5, 1.1, None)]}, 1, **TICKET)
    assert "--threads 1" in " ".join(t.get_text() for t in fig.axes[1].texts)


def test_cpu_ratio_is_for_one_thread_only():
    t = {"dense": {"wall": 2.0, "cpu": 2.0}, "accel": {"wall": 1.0, "cpu": 0.5}}
    assert _cpu_ratio(t, 1) == pytest.approx(4.0) and _cpu_ratio(t, 2) is None
