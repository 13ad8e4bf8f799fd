"""docs/bad-inputs.md is a catalogue of bad inputs; every row must name a real test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_catalogue_row_names_an_existing_test() -> None:
    rows = [line for line in (ROOT / "docs" / "bad-inputs.md").read_text().splitlines()
            if re.match(r"\|\s*\d+\s*\|", line)]
    assert len(rows) >= 20
    for row in rows:
        ref = row.rstrip(" |").rsplit("|", 1)[1].strip()
        path, _, name = ref.partition("::")
        source = (ROOT / path).read_text()
        assert re.search(rf"def {re.escape(name)}\(", source), f"{ref} does not exist"
