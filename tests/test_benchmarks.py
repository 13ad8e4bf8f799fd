"""The benchmarks are scripts outside the package: check they still import and parse options
(their measurements are run by hand; see RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_script_starts(script: Path) -> None:
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout or "usage" in out.stdout


def test_benchmarks_were_found() -> None:
    assert len(BENCHMARKS) >= 3
