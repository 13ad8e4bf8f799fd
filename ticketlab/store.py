"""The run store: one directory per run, one sub-directory per level, atomic files.

Layout (open_lth's vocabulary)::

    <root>/<task>-<hash>/             a run, named by the hash of its hparams
        hparams.json                  what defines the run
        rewind.safetensors            the rewind point's non-θ0 tensors (head γ0 or all of θ_i)
        level_0/ level_1/ ...         one per pruning round
            mask.safetensors          the mask this level trains with
            model.safetensors         trained weights (optional)
            metrics.json              written last: the level's completion marker

A level is finished exactly when its ``metrics.json`` exists and the checksums it records match
the files beside it. Every file is written to a temporary name, flushed, fsynced and renamed,
so a crash leaves either the old state or the new one, never half a file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ticketlab import faults
from ticketlab.errors import TicketlabError

STORE_FORMAT = 1


def default_root() -> Path:
    """Where runs live: ``$TICKETLAB_HOME/runs`` or ``~/.ticketlab/runs``."""
    home = os.environ.get("TICKETLAB_HOME")
    return (Path(home) if home else Path.home() / ".ticketlab") / "runs"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    Under ``accelerate launch`` only rank 0 may write: a write from another rank is a bug that
    could interleave two copies of a level, so it fails loudly.
    """
    if os.environ.get("RANK", "0") != "0":
        raise RuntimeError(f"rank {os.environ['RANK']} tried to write {path}; only rank 0 writes")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        faults.checkpoint("write")
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TicketlabError(
                f"No space left on the device while writing {path} "
                f"({len(data):,} bytes); the previous state is intact.",
                "Free disk space (or use --root on another disk) and rerun the same command "
                "to resume.",
            ) from e
        raise
    _fsync_dir(path.parent)
    faults.checkpoint("renamed")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path, what: str = "file") -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TicketlabError(f"{what} {path} does not exist.", "Check the path.") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TicketlabError(
            f"{what} {path} is not valid JSON ({e}).",
            "The file is corrupt or was edited by hand; restore it or delete the run.",
        ) from e


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Run:
    """A run directory. Creating the object touches nothing; :meth:`create` writes hparams."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def hparams_path(self) -> Path:
        return self.path / "hparams.json"

    @property
    def rewind_path(self) -> Path:
        return self.path / "rewind.safetensors"

    def exists(self) -> bool:
        return self.hparams_path.is_file()

    def create(self, hparams: dict[str, Any], extra: dict[str, Any]) -> None:
        """Write hparams.json (idempotent: a resumed run must carry the same hparams)."""
        hparams = json.loads(json.dumps(hparams))  # tuples become lists, as once stored
        record = {"format": STORE_FORMAT, "hparams": hparams, **extra}
        if self.exists():
            old = self.read_hparams()
            if old.get("hparams") != hparams:
                raise TicketlabError(
                    f"Run directory {self.path} holds a run with other hparams.",
                    "Use another --root, or delete that directory.",
                )
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.hparams_path, record)

    def read_hparams(self) -> dict[str, Any]:
        record = read_json(self.hparams_path, "Run hparams")
        if record.get("format") != STORE_FORMAT:
            raise TicketlabError(
                f"Run {self.path} was written by an incompatible ticketlab store format "
                f"({record.get('format')!r}, this version reads {STORE_FORMAT}).",
                "Use the ticketlab version that wrote it, or start a new run.",
            )
        return record

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level}"

    def level_done(self, level: int) -> bool:
        """True when the level's metrics.json exists and every file it lists matches its hash."""
        metrics_path = self.level_dir(level) / "metrics.json"
        if not metrics_path.is_file():
            return False
        try:
            record = json.loads(metrics_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        for name, digest in record.get("checksums", {}).items():
            f = self.level_dir(level) / name
            if not f.is_file() or sha256_file(f) != digest:
                return False
        return True

    def finish_level(self, level: int, metrics: dict[str, Any], files: list[str]) -> None:
        """Mark a level finished: write metrics.json (last) with checksums of its files."""
        d = self.level_dir(level)
        record = dict(metrics)
        record["checksums"] = {name: sha256_file(d / name) for name in files}
        atomic_write_json(d / "metrics.json", record)

    def levels(self) -> list[int]:
        """Finished levels, in order."""
        found = []
        for d in self.path.glob("level_*"):
            suffix = d.name.split("_", 1)[1]
            if suffix.isdigit() and self.level_done(int(suffix)):
                found.append(int(suffix))
        return sorted(found)

    def metrics(self, level: int) -> dict[str, Any]:
        return read_json(self.level_dir(level) / "metrics.json", "Level metrics")


def list_runs(root: Path) -> list[Run]:
    if not root.is_dir():
        return []
    return [Run(p) for p in sorted(root.iterdir()) if (p / "hparams.json").is_file()]


def find_run(ref: str, root: Path) -> Run:
    """A run by path, by full id, or by a unique prefix of its id."""
    p = Path(ref).expanduser()
    if (p / "hparams.json").is_file():
        return Run(p)
    matches = [r for r in list_runs(root) if r.path.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise TicketlabError(
            f"No run {ref!r} in {root}.", "List the runs with `ticketlab runs` (or pass --root)."
        )
    raise TicketlabError(
        f"{ref!r} matches {len(matches)} runs.", "Give more of the run id (see `ticketlab runs`)."
    )
