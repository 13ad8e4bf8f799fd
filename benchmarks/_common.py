"""What every benchmark does first: quiet, offline, passive OpenMP waiting, and real SST-2.

Imported before torch by each ``bench_*.py`` (they run as scripts, so this folder is on
``sys.path``): ``OMP_WAIT_POLICY=PASSIVE`` must be in the environment before OpenMP starts,
or a second busy process on a 2-core machine makes every step several times slower.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The project's real GLUE data (``../shared/data/glue`` from the repository root).
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "glue"


def resolve_sst2_dir(data_dir: Path) -> Path:
    """The folder holding SST-2's train.tsv: a GLUE root, the SST-2 folder, or the file itself."""
    data_dir = data_dir.expanduser().resolve()
    if data_dir.is_file():
        data_dir = data_dir.parent
    for candidate in (data_dir / "SST-2", data_dir):
        if (candidate / "train.tsv").is_file():
            return candidate
    sys.exit(
        f"error: SST-2 training data not found: neither {data_dir / 'SST-2' / 'train.tsv'} nor "
        f"{data_dir / 'train.tsv'} exists.\nPass --data-dir pointing at the GLUE root (the folder "
        "containing SST-2/train.tsv) or at the SST-2 folder itself."
    )
