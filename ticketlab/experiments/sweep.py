"""Experiment specs and sweeps: a grid of cells, run in-process or on Ray, finished cells skipped.

A spec is a TOML file::

    name = "sst2-cola"
    root = "runs"                       # run store, relative to this file (or --root)
    description = "Why these settings"  # optional: shown at the top of the reproduce report

    [hparams]                           # any run option, named as its CLI flag, for every task
    model = "minilm"
    data_dir = "../glue"                # relative paths are relative to this file
    lr = 1e-4
    epochs = 2
    target_sparsity = 0.6
    prune_pooler = false

    [task_hparams.cola]                 # per-task overrides
    max_train_samples = 4000

    [grid]
    tasks = ["sst2", "cola"]
    seeds = 3                           # 3 seeds from hparams' seed, or a list [0, 1, 2]
    baselines = ["random", "random-reinit"]
    baseline_seeds = 1                  # optional: fewer seeds for baselines (default: seeds)
    baseline_levels = ["matching"]      # IMP levels, or "matching": the highest matching one

    [rewinding]                         # optional
    tasks = ["sst2"]
    fractions = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]
    seeds = 1
    sparsity = 0.5                      # the fixed sparsity of the score plot

    [transfer]                          # optional
    sources = ["sst2", "cola"]          # default: the grid's tasks
    targets = ["sst2", "cola"]
    sparsity = 0.5
    seeds = 1
    one_shot = true

    [vision]                            # optional, run by `reproduce --parts vision` only
    [robust]                            # optional, run by `reproduce --parts robust` only
    [supertickets]                      # optional, run by `reproduce --parts supertickets` only

The last three are tables of their own (see :mod:`ticketlab.experiments.reproduce`, which
validates and runs them); ``ticketlab sweep`` runs the grid, rewinding and transfer only.

A *cell* is one unit of work that writes its own files into the store: an IMP run (all its
levels), a baseline branch, or one transfer fine-tune. Cells come in *parts* that run in order
(IMP, rewinding, baselines, transfer) because later parts read earlier ones' masks; inside a
part the cells are independent, which is what the Ray backend runs in parallel. Whether a cell
is finished is read from the store (the checksummed ``metrics.json`` files), never from a
separate journal, so a sweep killed at any moment resumes by running the same command.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ticketlab.errors import RunBusy, TicketlabError
from ticketlab.experiments.baselines import BASELINE_KINDS, branch_done, run_branch
from ticketlab.experiments.common import (
    group_of,
    level_of_sparsity,
    quiet_console,
    seed_list,
)
from ticketlab.experiments.matching import baseline_level, summarize_group
from ticketlab.experiments.rewinding import rewind_hparams, train_size
from ticketlab.experiments.transfer import (
    ONE_SHOT,
    check_transfer,
    one_shot_mask_path,
    source_hparams,
    stored_score,
    transfer_cells,
    transfer_score,
)
from ticketlab.hparams import RunHparams, Runtime, build_hparams, options
from ticketlab.imp import find_ticket
from ticketlab.pruning import sparsity_schedule
from ticketlab.store import Run
from ticketlab.tasks import get_task

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ImportError:  # the error says how to fix it when a spec is read
        tomllib = None

#: The keys of [hparams] and [task_hparams.<task>]: exactly the CLI's option names
#: (``--text-column`` is ``text_column``), from the same declarations.
HPARAM_KEYS: tuple[str, ...] = tuple(options())
#: The order parts run in.
PARTS = ("imp", "rewinding", "baselines", "transfer")
#: Optional tables that ``ticketlab reproduce`` runs (with the library functions of
#: ``matching``, ``robust-transfer`` and ``supertickets-compare``); a spec only carries them.
EXTRA_SECTIONS = ("vision", "robust", "supertickets")


def _check_keys(table: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise TicketlabError(f"Unknown key(s) {', '.join(map(repr, unknown))} in {where}.",
                             f"Allowed keys there: {', '.join(allowed)}.")


def _seeds(value: Any, first: int, where: str) -> list[int]:
    if isinstance(value, bool) or not isinstance(value, int | list):
        raise TicketlabError(f"{where} must be a count or a list of seeds, not {value!r}.",
                             "Write e.g. seeds = 3 or seeds = [0, 1, 2].")
    if isinstance(value, int):
        return seed_list(first, value)
    if not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise TicketlabError(f"{where} must list integer seeds, not {value!r}.",
                             "Write e.g. seeds = [0, 1, 2].")
    return list(dict.fromkeys(value))


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TicketlabError(f"{where} must be a list of names, not {value!r}.",
                             'Write e.g. ["sst2", "cola"].')
    return value


@dataclass(frozen=True)
class Cell:
    """One unit of work. ``part`` says which; the other fields say what."""

    part: str
    task: str
    seed: int
    fraction: float = 0.0  # rewinding: the rewind point
    baseline: str = ""  # baselines: the kind
    level: int | str = 0  # baselines: the IMP level, or "matching"
    source: str = ""  # transfer: source task, "one-shot", or "" for the full model

    def label(self) -> str:
        if self.part == "imp":
            return f"imp {self.task} seed {self.seed}"
        if self.part == "rewinding":
            return f"imp {self.task} rewind {self.fraction:.0%} seed {self.seed}"
        if self.part == "baselines":
            return f"{self.baseline} {self.task} level {self.level} seed {self.seed}"
        return f"transfer {self.source or 'full model'} → {self.task} seed {self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Spec:
    """A validated experiment spec (see the module docstring for the file format)."""

    name: str
    hparams: dict[str, Any]
    task_hparams: dict[str, dict[str, Any]]
    tasks: list[str]
    seeds: list[int]
    baselines: list[str] = field(default_factory=list)
    #: Seeds of the baseline branches: the first ``len`` of ``seeds`` (default: all of them).
    #: Fewer than the IMP seeds is a budget choice; the matching rule still uses every IMP seed.
    baseline_seeds: list[int] = field(default_factory=list)
    baseline_levels: list[int | str] = field(default_factory=lambda: ["matching"])
    rewinding: dict[str, Any] | None = None
    transfer: dict[str, Any] | None = None
    root: str | None = None
    #: Free text (Markdown) on why the spec is what it is; ``reproduce`` prints it in its report.
    description: str = ""
    #: The :data:`EXTRA_SECTIONS` tables given, as plain data (validated by ``reproduce``).
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- loading --------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> Spec:
        """Read and validate a TOML spec; relative paths are taken from the file's folder."""
        path = Path(path)
        if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
            raise TicketlabError("Reading TOML specs on Python 3.10 needs tomli.",
                                 "Run: pip install tomli  (Python 3.11+ has tomllib built in)")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise TicketlabError(f"Spec file {path} does not exist.", "Check the path.") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TicketlabError(f"Spec file {path} is not valid TOML: {e}.",
                                 "Fix the syntax (see the example in `ticketlab sweep --help`)."
                                 ) from e
        return cls.from_dict(raw, base=path.resolve().parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base: Path | None = None) -> Spec:
        _check_keys(raw, ["name", "root", "description", "hparams", "task_hparams", "grid",
                          "rewinding", "transfer", *EXTRA_SECTIONS], "the spec")
        for key in ("hparams", "grid"):
            if not isinstance(raw.get(key), dict):
                raise TicketlabError(f"The spec has no [{key}] table.",
                                     "See the example in `ticketlab sweep --help`.")
        hparams = _resolve_paths(dict(raw["hparams"]), base, "[hparams]")
        task_hparams = {t: _resolve_paths(dict(v), base, f"[task_hparams.{t}]")
                        for t, v in dict(raw.get("task_hparams", {})).items()}
        grid = raw["grid"]
        _check_keys(grid, ["tasks", "seeds", "baselines", "baseline_seeds", "baseline_levels"],
                    "[grid]")
        first = int(hparams.get("seed", 0))
        levels = grid.get("baseline_levels", ["matching"])
        if not isinstance(levels, list) or not all(
                v == "matching" or (isinstance(v, int) and v >= 1) for v in levels):
            raise TicketlabError(f"[grid] baseline_levels {levels!r} is not a list of IMP "
                                 "levels (1 or more) or \"matching\".",
                                 'Write e.g. baseline_levels = ["matching"] or [3, 5].')
        root = raw.get("root")
        if root is not None and base is not None and not Path(root).is_absolute():
            root = str(base / root)
        seeds = _seeds(grid.get("seeds", 1), first, "[grid] seeds")
        baseline_seeds = _seeds(grid.get("baseline_seeds", seeds), first,
                                "[grid] baseline_seeds")
        if not set(baseline_seeds) <= set(seeds):
            raise TicketlabError(
                f"[grid] baseline_seeds {baseline_seeds} are not all among the IMP seeds "
                f"{seeds}: a baseline is compared with the IMP runs of its own seeds.",
                f"Use a count up to {len(seeds)} or a subset of {seeds}.")
        spec = cls(
            name=str(raw.get("name", "sweep")), hparams=hparams, task_hparams=task_hparams,
            tasks=_string_list(grid.get("tasks", []), "[grid] tasks"),
            seeds=seeds, baseline_seeds=baseline_seeds,
            baselines=_string_list(grid.get("baselines", []), "[grid] baselines"),
            baseline_levels=list(levels), root=root,
            description=str(raw.get("description", "")),
            rewinding=_section(raw, "rewinding", ["tasks", "fractions", "seeds", "sparsity"]),
            transfer=_section(raw, "transfer", ["sources", "targets", "sparsity", "seeds",
                                                "one_shot"]),
            extra={k: _resolve_nested(raw[k], base, f"[{k}]")
                   for k in EXTRA_SECTIONS if k in raw},
        )
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (what :meth:`from_dict` reads back; seeds as lists)."""
        out: dict[str, Any] = {"name": self.name, "hparams": self.hparams,
                               "task_hparams": self.task_hparams,
                               "grid": {"tasks": self.tasks, "seeds": self.seeds,
                                        "baselines": self.baselines,
                                        "baseline_seeds": self.baseline_seeds or self.seeds,
                                        "baseline_levels": self.baseline_levels}}
        if self.root is not None:
            out["root"] = self.root
        if self.description:
            out["description"] = self.description
        if self.rewinding is not None:
            out["rewinding"] = self.rewinding
        if self.transfer is not None:
            out["transfer"] = self.transfer
        for key in EXTRA_SECTIONS:
            if key in self.extra:
                out[key] = self.extra[key]
        return json.loads(json.dumps(out))

    def validate(self) -> None:
        """Every problem a spec can have, found before any training starts."""
        if not self.tasks:
            raise TicketlabError("[grid] tasks is empty.", 'Name at least one task: ["sst2"].')
        for task in [*self.tasks, *self.task_hparams]:
            get_task(task)  # unknown names fail here with a suggestion
        for kind in self.baselines:
            if kind not in BASELINE_KINDS:
                raise TicketlabError(f"Unknown baseline {kind!r} in [grid] baselines.",
                                     f"Use any of: {', '.join(BASELINE_KINDS)}.")
        for task in self.tasks:
            hp = self.hparams_for(task, self.seeds[0])
            for level in self.baseline_levels:
                if isinstance(level, int) and level >= len(sparsity_schedule(
                        hp.prune.target_sparsity, hp.prune.rate, hp.prune.schedule)):
                    raise TicketlabError(
                        f"[grid] baseline level {level} is beyond {task}'s target sparsity "
                        f"{hp.prune.target_sparsity}.",
                        "Raise target_sparsity in [hparams] or use a lower level.")
        if self.rewinding is not None:
            rw = self.rewinding
            rw["tasks"] = _string_list(rw.get("tasks", self.tasks), "[rewinding] tasks")
            rw["fractions"] = [float(f) for f in rw.get("fractions", [0.0])]
            rw["seeds"] = _seeds(rw.get("seeds", 1), self.seeds[0], "[rewinding] seeds")
            for task in rw["tasks"]:
                get_task(task)
                if rw.get("sparsity") is not None:
                    level_of_sparsity(self.hparams_for(task, 0), float(rw["sparsity"]))
        if self.transfer is not None:
            tr = self.transfer
            tr["sources"] = _string_list(tr.get("sources", self.tasks), "[transfer] sources")
            tr["targets"] = _string_list(tr.get("targets", self.tasks), "[transfer] targets")
            tr["seeds"] = _seeds(tr.get("seeds", 1), self.seeds[0], "[transfer] seeds")
            tr["one_shot"] = bool(tr.get("one_shot", True))
            if "sparsity" not in tr:
                raise TicketlabError("[transfer] needs a sparsity.", "Add e.g. sparsity = 0.5.")
            check_transfer(tr["sources"], tr["targets"], tr["seeds"])
            for task in dict.fromkeys([*tr["sources"], *tr["targets"]]):
                if task not in self.tasks:
                    raise TicketlabError(
                        f"[transfer] task {task!r} is not in [grid] tasks, so it has no IMP run.",
                        "Add it to [grid] tasks.")
                hp = self.hparams_for(task, self.seeds[0])
                level = level_of_sparsity(hp, float(tr["sparsity"]))
                if len(sparsity_schedule(hp.prune.target_sparsity, hp.prune.rate,
                                         hp.prune.schedule)) <= level:
                    raise TicketlabError(
                        f"[transfer] sparsity {tr['sparsity']} is beyond {task}'s target "
                        f"sparsity {hp.prune.target_sparsity}.",
                        "Raise target_sparsity in [hparams] or lower the transfer sparsity.")

    # --- hparams --------------------------------------------------------------------------
    def hparams_for(self, task: str, seed: int) -> RunHparams:
        """The RunHparams of ``task`` with ``seed``: [hparams], then [task_hparams.<task>],
        through :func:`~ticketlab.hparams.build_hparams` — the CLI's own path, so keys left
        out take the task's paper settings exactly as ``ticketlab find --task T`` does."""
        flat = {**self.hparams, **self.task_hparams.get(task, {})}
        _check_keys(flat, HPARAM_KEYS, f"[hparams]/[task_hparams.{task}]")
        flat["seed"] = seed
        return build_hparams(task, flat)

    # --- cells ----------------------------------------------------------------------------
    def cell_counts(self) -> dict[str, int]:
        """Cells per part, counted from the grid's sizes (nothing is read from the store)."""
        rw, tr = self.rewinding, self.transfer
        n_seeds = len(self.baseline_seeds or self.seeds)
        counts = {
            "imp": len(self.tasks) * len(self.seeds),
            "rewinding": 0 if rw is None else
            len(rw["tasks"]) * len(rw["fractions"]) * len(rw["seeds"]),
            "baselines": len(self.tasks) * len(self.baselines) * len(self.baseline_levels)
            * n_seeds,
            "transfer": 0,
        }
        if tr is not None:
            rows = 1 + len(dict.fromkeys([*tr["sources"], *tr["targets"]])) + bool(tr["one_shot"])
            counts["transfer"] = rows * len(tr["targets"]) * len(tr["seeds"])
        return counts

    def cell_count(self) -> int:
        return sum(self.cell_counts().values())

    def cells(self, part: str) -> list[Cell]:
        """The cells of one part (baseline levels stay symbolic until they run)."""
        if part == "imp":
            return [Cell("imp", t, s) for t in self.tasks for s in self.seeds]
        if part == "rewinding":
            rw = self.rewinding
            if rw is None:
                return []
            return [Cell("rewinding", t, s, fraction=f) for t in rw["tasks"]
                    for f in rw["fractions"] for s in rw["seeds"]]
        if part == "baselines":
            return [Cell("baselines", t, s, baseline=k, level=lvl) for t in self.tasks
                    for k in self.baselines for lvl in self.baseline_levels
                    for s in self.baseline_seeds or self.seeds]
        if part == "transfer":
            tr = self.transfer
            if tr is None:
                return []
            return [Cell("transfer", tgt, seed, source=src or "")
                    for src, tgt, seed in transfer_cells(tr["sources"], tr["targets"],
                                                         tr["seeds"], tr["one_shot"])]
        raise ValueError(part)

    def imp_hparams(self, cell: Cell) -> RunHparams:
        hp = self.hparams_for(cell.task, cell.seed)
        if cell.part == "rewinding":
            hp = rewind_hparams(hp, cell.fraction, train_size(hp))
        return hp

    def reference_run(self, task: str, root: Path) -> Run:
        return Run(root / self.hparams_for(task, self.seeds[0]).run_id())

    def resolve_level(self, cell: Cell, root: Path) -> int | None:
        """A baseline cell's IMP level; None while the IMP runs it depends on are unfinished."""
        if isinstance(cell.level, int):
            return cell.level
        hp = self.hparams_for(cell.task, self.seeds[0])
        group = group_of(hp, self.seeds, root)
        n_levels = len(sparsity_schedule(hp.prune.target_sparsity, hp.prune.rate,
                                         hp.prune.schedule))
        if len(group.runs) < len(self.seeds) or any(
                len(r.levels()) < n_levels for r in group.runs.values()):
            return None
        summary = summarize_group(group)
        return None if summary is None else baseline_level(summary)


def _section(raw: dict[str, Any], key: str, allowed: list[str]) -> dict[str, Any] | None:
    if key not in raw:
        return None
    if not isinstance(raw[key], dict):
        raise TicketlabError(f"[{key}] must be a table.", f"Write [{key}] on its own line.")
    _check_keys(raw[key], allowed, f"[{key}]")
    return dict(raw[key])


def _resolve_nested(table: Any, base: Path | None, where: str) -> dict[str, Any]:
    """An extra section: its ``hparams`` sub-tables get their relative paths resolved too."""
    if not isinstance(table, dict):
        raise TicketlabError(f"{where} must be a table.", f"Write {where} on its own line.")
    table = dict(table)
    for key, value in table.items():
        if isinstance(value, dict) and key.endswith("hparams"):
            table[key] = _resolve_paths(dict(value), base, f"{where} {key}")
    return table


def _resolve_paths(table: dict[str, Any], base: Path | None, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise TicketlabError(f"{where} must be a table.", "See `ticketlab sweep --help`.")
    for key in ("data_dir", "model", "train_file", "eval_file"):
        value = table.get(key)
        if isinstance(value, str) and base is not None and value.startswith((".", "..")):
            table[key] = str((base / value).resolve())
    return table


# --- is a cell finished, and running one ------------------------------------------------------
def cell_done(spec: Spec, cell: Cell, root: Path,
              levels: dict[str, int | None] | None = None) -> bool:
    """Read from the store: has this cell's work been stored completely? ``levels`` caches
    each task's resolved "matching" level across the cells of one pass."""
    if cell.part in ("imp", "rewinding"):
        hp = spec.imp_hparams(cell)
        n = len(sparsity_schedule(hp.prune.target_sparsity, hp.prune.rate, hp.prune.schedule))
        run = Run(root / hp.run_id())
        return all(run.level_done(level) for level in range(n))
    if cell.part == "baselines":
        if levels is None:
            level = spec.resolve_level(cell, root)
        else:
            key = f"{cell.task}:{cell.level}"
            if key not in levels:
                levels[key] = spec.resolve_level(cell, root)
            level = levels[key]
        return level is not None and branch_done(spec.reference_run(cell.task, root),
                                                 cell.baseline, level, cell.seed)
    tr = spec.transfer
    assert tr is not None
    source = cell.source or None
    seed0 = spec.seeds[0]
    if source is None:
        mask_path = None
    elif source == ONE_SHOT:
        mask_path = one_shot_mask_path(spec.hparams_for(cell.task, seed0), tr["sparsity"], root)
    else:
        hp, level = source_hparams(spec.hparams_for, source, tr["sparsity"], seed0)
        mask_path = Run(root / hp.run_id()).level_dir(level) / "mask.safetensors"
    if mask_path is not None and not mask_path.is_file():
        return False
    return stored_score(spec.hparams_for, source, cell.task, cell.seed, tr["sparsity"], seed0,
                         root, mask_path) is not None


def run_cell(spec: Spec, cell: Cell, root: Path, runtime: Runtime,
             console: Console | None = None) -> None:
    """Do one cell's work (resumable: finished pieces inside it are skipped too)."""
    console = console or quiet_console()
    if cell.part in ("imp", "rewinding"):
        find_ticket(spec.imp_hparams(cell), root, runtime, console)
    elif cell.part == "baselines":
        level = spec.resolve_level(cell, root)
        if level is None:
            raise TicketlabError(f"{cell.label()}: the IMP runs of {cell.task} are not finished.",
                                 "Run the sweep again: IMP cells run first.")
        run_branch(spec.reference_run(cell.task, root), level, cell.baseline, cell.seed,
                   runtime, console)
    elif cell.part == "transfer":
        tr = spec.transfer
        assert tr is not None
        transfer_score(spec.hparams_for, cell.source or None, cell.task, cell.seed,
                       tr["sparsity"], spec.seeds[0], root, runtime, console)
    else:
        raise ValueError(cell.part)


# --- running a sweep --------------------------------------------------------------------------
@dataclass
class PartReport:
    """What one part of a sweep did: cells in all, already finished, run now, and seconds."""

    part: str
    total: int
    skipped: int
    ran: int
    seconds: float


def run_sweep(
    spec: Spec,
    root: Path,
    runtime: Runtime = Runtime(progress=False),
    console: Console | None = None,
    backend: str = "inprocess",
    ray_address: str | None = None,
    parts: Sequence[str] = PARTS,
    on_part: Callable[[PartReport], None] | None = None,
) -> list[PartReport]:
    """Run every missing cell, part after part; finished cells are skipped."""
    console = console or Console()
    if backend not in ("inprocess", "ray"):
        raise TicketlabError(f"Unknown backend {backend!r}.", "Use inprocess or ray.")
    reports = []
    for part in parts:
        cells = spec.cells(part)
        if not cells:
            continue
        levels: dict[str, int | None] = {}
        todo = [c for c in cells if not cell_done(spec, c, root, levels)]
        console.print(f"[bold]{spec.name}: {part}[/bold]  {len(cells)} cells, "
                      f"{len(cells) - len(todo)} finished, {len(todo)} to run")
        t0 = time.perf_counter()
        ran = 0
        try:
            if todo and backend == "ray":
                _run_on_ray(spec, todo, root, runtime, console, ray_address)
                ran = len(todo)
            else:
                for cell in todo:
                    console.rule(cell.label())
                    try:
                        run_cell(spec, cell, root, runtime, console)
                    except RunBusy as e:
                        console.print(f"[yellow]skipped[/yellow] {cell.label()}: {e.problem} "
                                      "Run the sweep again once it is done.")
                        continue
                    ran += 1
        finally:  # also when interrupted: the time spent so far is reported
            report = PartReport(part, len(cells), len(cells) - len(todo), ran,
                                time.perf_counter() - t0)
            reports.append(report)
            if on_part is not None:
                on_part(report)
    return reports


def sweep_status(spec: Spec, root: Path) -> Iterator[tuple[Cell, bool]]:
    """Every cell with whether it is finished (``ticketlab sweep --dry-run``), one at a time,
    so a large grid prints as it goes; each task's matching level is resolved once."""
    levels: dict[str, int | None] = {}
    for part in PARTS:
        for cell in spec.cells(part):
            yield cell, cell_done(spec, cell, root, levels)


# --- Ray --------------------------------------------------------------------------------------
def ray_cell(spec_json: str, cell_json: str, root: str, runtime_json: str) -> dict[str, Any]:
    """The body of a Ray task: everything crosses the process boundary as JSON text, and the
    result goes into the store; the return value only reports success or the user error."""
    spec = Spec.from_dict(json.loads(spec_json))
    cell = Cell(**json.loads(cell_json))
    runtime = Runtime(**json.loads(runtime_json))
    t0 = time.perf_counter()
    try:
        run_cell(spec, cell, Path(root), runtime)
    except RunBusy as e:
        return {"cell": cell.label(), "busy": e.problem}
    except TicketlabError as e:
        return {"cell": cell.label(), "error": e.problem, "fix": e.fix}
    return {"cell": cell.label(), "seconds": time.perf_counter() - t0}


def _run_on_ray(spec: Spec, cells: Sequence[Cell], root: Path, runtime: Runtime,
                console: Console, address: str | None) -> None:
    try:
        import ray
    except ImportError as e:
        raise TicketlabError("--backend ray needs the ray package.",
                             "Run: pip install 'ticketlab[ray]'  (or pip install ray)") from e
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except (ConnectionError, ValueError) as e:
                raise TicketlabError(
                    f"Cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}",
                    "Check the address (`ray status` on a node prints it; `auto` finds the "
                    "cluster of this node) and, for a cluster with token authentication, set "
                    "RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as on its nodes.") from e
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(ray_cell)
    spec_json = json.dumps(spec.to_dict())
    runtime_json = json.dumps({**dataclasses.asdict(runtime), "progress": False})
    pending = [task.remote(spec_json, json.dumps(c.to_dict()), str(root.resolve()),
                           runtime_json) for c in cells]
    errors = []
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        result = ray.get(done[0])
        if "busy" in result:
            console.print(f"[yellow]skipped[/yellow] {result['cell']}: {result['busy']} Run "
                          "the sweep again once it is done.")
        elif "error" in result:
            errors.append(result)
            console.print(f"[red]failed[/red] {result['cell']}: {result['error']}")
        else:
            console.print(f"[green]done[/green] {result['cell']} ({result['seconds']:.0f} s)")
    if errors:
        first = errors[0]
        raise TicketlabError(f"{len(errors)} cell(s) failed; first: {first['cell']}: "
                             f"{first['error']}", first["fix"])
