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
import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ticketlab import faults
from ticketlab.errors import RunBusy, TicketlabError

STORE_FORMAT = 1

#: The temporary names :func:`atomic_write_bytes` writes (``tempfile.mkstemp`` with prefix
#: ``.NAME.`` and suffix ``.tmp``: 8 random characters between). Only files matching this are
#: ever removed as orphans, so nothing ticketlab did not write is deleted.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")

#: errno values that mean "you cannot write here" rather than a bug.
_UNWRITABLE = {errno.EROFS: "the file system is read-only",
               errno.EACCES: "permission denied", errno.EPERM: "the operation is not permitted",
               errno.ENOTDIR: "a part of the path is a file, not a folder",
               errno.ENOENT: "a part of the path cannot be created",
               errno.EEXIST: "a file is in the way"}


def default_root() -> Path:
    """Where runs live: ``$TICKETLAB_HOME/runs`` or ``~/.ticketlab/runs``."""
    home = os.environ.get("TICKETLAB_HOME")
    return (Path(home) if home else Path.home() / ".ticketlab") / "runs"


def current_umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def unwritable(path: Path, e: OSError, what: str = "a file") -> TicketlabError:
    """The clear error for an OSError that means ``path`` cannot be written."""
    why = _UNWRITABLE.get(e.errno or 0, e.strerror or str(e))
    return TicketlabError(f"Cannot write {what} at {path}: {why}.",
                          "Pass a folder you can write to (e.g. --root ~/ticketlab-runs), or "
                          "fix the permissions.")


def ensure_writable(folder: Path, what: str = "--root") -> None:
    """Check, before any work starts, that files can be created in ``folder`` (which may not
    exist yet): its nearest existing ancestor must be a folder that accepts a new file.

    Why a real probe instead of ``os.access``: as root, ``os.access`` says yes to read-only
    mounts' parents, ``/proc`` and ``/sys``; creating (and removing) one temporary file is
    what every later write does, so it is the honest test. Nothing is left behind.
    """
    folder = Path(folder).expanduser()
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise TicketlabError(f"{what} {folder} is not a folder: {probe_dir} is a file.",
                             f"Pass a folder for {what} (a new or an existing one).")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".ticketlab-probe.", suffix=".tmp")
    except OSError as e:
        raise TicketlabError(f"{what} {folder} cannot be written: "
                             f"{_UNWRITABLE.get(e.errno or 0, e.strerror)}.",
                             f"Pass a {what} folder you can write to, e.g. --root ~/ticketlab-runs."
                             ) from e
    os.close(fd)
    os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets the permissions a plain ``open()`` would give (0666 less the umask), not
    ``mkstemp``'s private 0600: an exported ticket or a shared run store must be readable by
    whoever the user's umask allows.

    Under ``accelerate launch`` only rank 0 may write: a write from another rank is a bug that
    could interleave two copies of a level, so it fails loudly.
    """
    if os.environ.get("RANK", "0") != "0":
        raise RuntimeError(f"rank {os.environ['RANK']} tried to write {path}; only rank 0 writes")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in _UNWRITABLE:
            raise unwritable(path, e) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
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
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:
            raise unwritable(path, e) from e
        raise
    fsync_dir(path.parent)
    faults.checkpoint("renamed")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: not every filesystem allows it)."""
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


def stable_hash_of(obj: Any) -> str:
    """:func:`ticketlab.hparams.stable_hash` (imported here lazily: hparams imports store's
    errors only, never the other way round at import time)."""
    from ticketlab.hparams import stable_hash

    return stable_hash(obj)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def level_record_problem(record: Any) -> str | None:
    """What is wrong with a level's ``metrics.json`` record, or None when it is well-formed.

    Every reader (``find`` resuming, ``show``, ``runs``, the reports) relies on these types; a
    hand-edited file with ``"score": "high"`` must read as a damaged level, not crash them.
    """
    if not isinstance(record, dict):
        return "it is not a JSON object"
    for key in ("score", "sparsity"):
        if not _is_number(record.get(key)):
            return f"{key!r} is {record.get(key)!r}, not a finite number"
    if "robust_score" in record and not _is_number(record["robust_score"]):
        return f"'robust_score' is {record['robust_score']!r}, not a finite number"
    if not isinstance(record.get("level"), int) or isinstance(record.get("level"), bool):
        return f"'level' is {record.get('level')!r}, not an integer"
    metrics = record.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and (_is_number(v) or v is None) for k, v in metrics.items()):
        return "'metrics' is not a table of numbers"
    checksums = record.get("checksums", {})
    if not isinstance(checksums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in checksums.items()):
        return "'checksums' is not a table of file names and digests"
    for key in ("sparsity_by_role", "sparsity_by_kind", "sparsity_by_matrix"):
        table = record.get(key, {})
        if not isinstance(table, dict) or not all(_is_number(v) for v in table.values()):
            return f"{key!r} is not a table of numbers"
    if not isinstance(record.get("main_metric", ""), str):
        return "'main_metric' is not a name"
    return None


def roles_of(record: dict[str, Any]) -> dict[str, float]:
    """A level record's per-role sparsity (records written before the rename call it
    ``sparsity_by_kind``)."""
    return dict(record.get("sparsity_by_role", record.get("sparsity_by_kind", {})))


class Run:
    """A run directory. Creating the object touches nothing; :meth:`create` writes hparams."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        """``Run('…/sst2-1a2b…', imp on sst2, levels [0, 1, 2], best score 85.12 at level
        1)``: what it is and how far it got, read from disk (never raises)."""
        try:
            record = self.read_hparams()
            hp = record["hparams"]
            hp = hp.get("finetune", hp)
            task = hp["data"]["task"] if "data" in hp else hp.get("run_hparams", {}).get(
                "data", {}).get("task", "?")
            levels = self.levels()
            what = f"{record.get('kind', '?')} on {task}, levels {levels}"
            if levels:
                scores = self.scores()
                best = max(scores, key=lambda k: scores[k])
                what += f", best {record.get('main_metric', 'score')} " \
                        f"{scores[best] * 100:.2f} at level {best}"
        except Exception:  # noqa: BLE001 — a repr must not fail on a damaged or missing run
            what = "not created yet" if not self.hparams_path.exists() else "unreadable"
        return f"Run({str(self.path)!r}, {what})"

    @property
    def hparams_path(self) -> Path:
        return self.path / "hparams.json"

    @property
    def rewind_path(self) -> Path:
        return self.path / "rewind.safetensors"

    def exists(self) -> bool:
        return self.hparams_path.is_file()

    @contextmanager
    def lock(self, main: bool = True) -> Iterator[None]:
        """One job per run directory. flock is released by the OS if the owner dies.

        Under ``accelerate launch`` only the main process takes the lock: its sibling ranks
        are the same job. Holding the lock, the directory's orphaned temporary files (from a
        process killed between writing and renaming, possibly model-sized) are removed: no
        other process can be writing them.
        """
        if not main:
            yield
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno in _UNWRITABLE:
                raise unwritable(self.path, e, "a run directory") from e
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise RunBusy(
                    f"Another ticketlab process is working on {self.path}.",
                    "Wait for it to finish (or stop it); a crashed process releases the lock.",
                ) from e
            self.remove_orphans()
            yield
        finally:
            os.close(fd)

    def remove_orphans(self) -> list[Path]:
        """Delete temporary files left by a killed writer in this run (its own folder and
        level folders; ``branches/`` hold their own locks). Call only while holding
        :meth:`lock`. Only names :data:`TEMP_NAME` matches are touched."""
        removed = []
        folders = [self.path, *(d for d in self.path.glob("level_*") if d.is_dir())]
        for folder in folders:
            for f in folder.iterdir():
                if f.is_file() and not f.is_symlink() and TEMP_NAME.match(f.name):
                    f.unlink(missing_ok=True)
                    removed.append(f)
        return removed

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
        """The run's hparams.json record, after checking that it still defines this run.

        A run directory is named by the hash of its hparams (a branch by its kind, level and
        seed under its IMP run), so an edit to hparams.json — a learning rate changed by hand
        — no longer matches the name; every command that reads a run refuses it here instead
        of training a baseline or exporting under hparams the run never had.
        """
        record = read_json(self.hparams_path, "Run hparams")
        if not isinstance(record, dict) or record.get("format") != STORE_FORMAT:
            found = record.get("format") if isinstance(record, dict) else None
            raise TicketlabError(
                f"Run {self.path} was written by an incompatible ticketlab store format "
                f"({found!r}, this version reads {STORE_FORMAT}).",
                "Use the ticketlab version that wrote it, or start a new run.",
            )
        problem = self.identity_problem(record)
        if problem:
            raise TicketlabError(
                f"Run {self.path} does not match its own hparams.json ({problem}): the file "
                "was edited by hand, or the folder was renamed.",
                "Restore the original hparams.json (or the folder name); to run with other "
                "hparams, start a new run with those options.")
        return record

    def identity_problem(self, record: dict[str, Any]) -> str | None:
        """Why ``record`` does not define this directory, or None when it does."""
        hparams = record.get("hparams")
        if not isinstance(hparams, dict):
            return "no hparams table"
        if self.path.parent.name == "branches":
            m = re.fullmatch(r"(?P<kind>[a-z-]+)-level(?P<level>\d+)-seed(?P<seed>\d+)",
                             self.path.name)
            parent = self.path.parent.parent
            if m is None:
                return "a branch folder name must read KIND-levelK-seedS"
            if (hparams.get("branch"), hparams.get("level"), hparams.get("seed"),
                    hparams.get("run")) != (m["kind"], int(m["level"]), int(m["seed"]),
                                            parent.name):
                return "the branch's kind, level, seed or run differ from its folder name"
            run_hparams = hparams.get("run_hparams")
            if not parent.name.endswith("-" + stable_hash_of(run_hparams)):
                return "the copy of the IMP run's hparams differs from that run's"
            return None
        if not self.path.name.endswith("-" + stable_hash_of(hparams)):
            return "the hash of the hparams differs from the folder name"
        return None

    def level_dir(self, level: int) -> Path:
        return self.path / f"level_{level}"

    def level_problem(self, level: int) -> str | None:
        """Why the level is not finished (None when it is): no metrics.json, a damaged one,
        or a file whose checksum no longer matches."""
        metrics_path = self.level_dir(level) / "metrics.json"
        if not metrics_path.is_file():
            return "not finished"
        try:
            record = json.loads(metrics_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "metrics.json is not valid JSON"
        problem = level_record_problem(record)
        if problem:
            return f"metrics.json is damaged: {problem}"
        for name, digest in record.get("checksums", {}).items():
            f = self.level_dir(level) / name
            if not f.is_file() or sha256_file(f) != digest:
                return f"{name} is missing or does not match its checksum"
        return None

    def level_done(self, level: int) -> bool:
        """True when the level's metrics.json is well-formed and every file it lists matches
        its hash."""
        return self.level_problem(level) is None

    def finish_level(self, level: int, metrics: dict[str, Any], files: list[str]) -> None:
        """Mark a level finished: write metrics.json (last) with checksums of its files."""
        d = self.level_dir(level)
        record = dict(metrics)
        record["checksums"] = {name: sha256_file(d / name) for name in files}
        atomic_write_json(d / "metrics.json", record)

    def level_numbers(self) -> list[int]:
        """Every level folder, finished or not, in order."""
        found = []
        for d in self.path.glob("level_*"):
            suffix = d.name.split("_", 1)[1]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def levels(self) -> list[int]:
        """Finished levels, in order."""
        return [n for n in self.level_numbers() if self.level_done(n)]

    def damaged_levels(self) -> dict[int, str]:
        """Levels whose metrics.json exists but cannot be trusted, with the reason."""
        out = {}
        for n in self.level_numbers():
            if (self.level_dir(n) / "metrics.json").is_file():
                problem = self.level_problem(n)
                if problem:
                    out[n] = problem
        return out

    def records(self) -> list[dict[str, Any]]:
        """Every finished level's record (``metrics.json``), in level order."""
        return [self.metrics(level) for level in self.levels()]

    def scores(self, metric: str | None = None) -> dict[int, float]:
        """level -> the main metric (or ``metric``, e.g. ``"mm_accuracy"``) of every finished
        level; a level without that metric is left out."""
        out = {}
        for rec in self.records():
            value = rec["score"] if metric is None else rec.get("metrics", {}).get(metric)
            if value is not None:
                out[rec["level"]] = float(value)
        return out

    def metrics(self, level: int) -> dict[str, Any]:
        """Level ``level``'s record: score, metrics, sparsity (overall, per role, per matrix),
        training statistics; refused when damaged."""
        record = read_json(self.level_dir(level) / "metrics.json", "Level metrics")
        problem = level_record_problem(record)
        if problem:
            raise TicketlabError(
                f"Level {level} of {self.path.name} has a damaged metrics.json ({problem}).",
                "Rerun the command that made the run (e.g. the same `ticketlab find`): a "
                "damaged level is trained again.")
        return record


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
