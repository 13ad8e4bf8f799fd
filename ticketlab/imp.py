"""Iterative magnitude pruning with rewinding — the paper's ticket search — and single fine-tunes.

One level = fine-tune m⊙θ_rewind (fresh optimizer and schedule) → evaluate → prune the lowest
weights → rewind the survivors. Level 0 is the full model. A level's files are written before
its ``metrics.json``, which is written last, so a run killed at any moment resumes at the first
unfinished level; training is deterministic for a given seed, so the resumed masks are
bit-identical to an uninterrupted run's. A level that finished but whose next mask was lost (a
deleted ``level_K/``) is healed from what is stored: the mask is recomputed from the level's
stored weights, or the level is trained again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from ticketlab import __version__ as VERSION
from ticketlab.errors import TicketlabError
from ticketlab.families.base import Family
from ticketlab.hparams import RunHparams, Runtime, stable_hash
from ticketlab.levels import (
    LevelPlan,
    load_level_weights,
    load_tensors,
    run_level,
    save_tensors,
)
from ticketlab.masks import Mask
from ticketlab.prepare import Setup, prepare
from ticketlab.pruning import criterion, level_sparsity, prune, sparsity_schedule
from ticketlab.store import Run, ensure_writable, roles_of
from ticketlab.train import get_accelerator, planned_steps

#: A level file holding a criterion's training-time statistics (movement scores).
STATS_FILE = "scores.safetensors"


def print_level(console: Console, rec: dict[str, Any], full_score: float | None,
                resumed: bool = False) -> None:
    """One line per level: sparsity, score, Δ to the full model, sparsity per role."""
    score = rec["score"] * 100
    delta = "" if full_score is None else f"  Δ {score - full_score * 100:+.2f}"
    roles = roles_of(rec)
    pooler = f"  pooler {roles['pooler'] * 100:.0f}%" if "pooler" in roles else ""
    by_role = " ".join(f"{k} {v * 100:.0f}%" for k, v in roles.items() if k != "pooler")
    tag = " [dim](stored)[/dim]" if resumed else ""
    console.print(
        f"level {rec['level']:>2}  sparsity {rec['sparsity'] * 100:5.1f}%  "
        f"{escape(rec['main_metric'])} {score:6.2f}{delta}{pooler}{tag}\n"
        f"          [dim]{escape(by_role)}[/dim]"
    )


def check_theta0(record: dict[str, Any], setup: Setup, what: str) -> None:
    """Refuse to continue a stored run on other weights than it started with."""
    digests = record.get("theta0")
    changed = record.get("fingerprint") != setup.fingerprint or (
        isinstance(digests, dict) and digests != setup.digests)
    if changed:
        raise TicketlabError(
            f"The model's weights changed since {what} started (θ0 fingerprint differs).",
            "Use the same model files (and seed, for weights the checkpoint lacks), or start "
            "a new run with another --root.")


def find_ticket(
    hp: RunHparams,
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
    family: Family | None = None,
) -> Run:
    """Run (or resume) IMP until ``hp.prune.target_sparsity``. Returns the run directory.

    ``family`` overrides the model family ``hp.model.model`` names (any ``nn.Module`` through
    :class:`~ticketlab.families.base.ModuleFamily`)."""
    console = console or Console()
    schedule = sparsity_schedule(hp.prune.target_sparsity, hp.prune.rate, hp.prune.schedule)
    ensure_writable(root)
    setup = prepare(hp, runtime, family)  # everything validated before the run is touched
    steps = planned_steps(len(next(iter(setup.train_features.values()))), hp.train)
    if hp.prune.rewind_step >= steps:
        raise TicketlabError(
            f"--rewind-step {hp.prune.rewind_step} is not below the {steps} training steps of a "
            "level, so θ_i would never be reached.",
            f"Use a rewind step below {steps} (the paper's default is 0).",
        )
    run = Run(root / hp.run_id())
    accelerator = get_accelerator(runtime)
    main = accelerator.is_main_process
    with run.lock(main):
        if main:
            run.create(hp.identity(), {
                "kind": "imp",
                "ticketlab_version": VERSION,
                "fingerprint": setup.fingerprint,
                "theta0": setup.digests,
                "family": setup.family.name,
                "prunable": {k: list(p.shape) for k, p in setup.prunable.items()},
                "main_metric": setup.task.main_metric,
            })
        accelerator.wait_for_everyone()
        check_theta0(run.read_hparams(), setup, f"run {run.path.name}")
        if main:
            console.print(f"[bold]run[/bold] {escape(str(run.path))}  "
                          f"levels at sparsity {', '.join(f'{s:.0%}' for s in schedule)}")
        ImpLevels(setup, run, runtime, console if main else Console(quiet=True)).train(schedule)
        if main:
            console.print(escape(storage_note(run)))
    return run


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def storage_note(run: Run) -> str:
    """How much the run stores, and how to store less (issue 15.11)."""
    files = [f for f in run.path.rglob("*") if f.is_file() and "logs" not in f.parts[
        len(run.path.parts):]]
    total = sum(f.stat().st_size for f in files)
    weights = sum(f.stat().st_size for f in run.path.glob("level_*/model.safetensors"))
    if not weights:
        return (f"stored: {_size(total)} in {run.path} (masks and heads; no trained weights, "
                "so `export` and `bench` need the mask fine-tuned once first)")
    return (f"stored: {_size(total)} in {run.path}, of which {_size(weights)} are the levels' "
            "trained weights (compact: the pruned weights are not stored); --no-save-weights "
            f"would keep only the masks and heads ({_size(total - weights)}), but `export` and "
            "`bench` of a level then need its mask fine-tuned once")


class ImpLevels:
    """The level loop of one IMP run. With several processes (``accelerate launch``) every
    rank trains and evaluates; only the main rank writes, and the next mask is decided once —
    on the main rank — and reaches the others through the store, after a barrier."""

    def __init__(self, setup: Setup, run: Run, runtime: Runtime, console: Console) -> None:
        self.setup, self.run, self.runtime, self.console = setup, run, runtime, console
        self.hp = setup.hp
        accelerator = get_accelerator(runtime)
        self.main, self.barrier = accelerator.is_main_process, accelerator.wait_for_everyone
        self.criterion = criterion(self.hp.prune.method)
        self.theta0 = self._theta0_state()

    def _theta0_state(self) -> dict[str, torch.Tensor]:
        """θ0 with the head γ0 as first drawn (saved once, so a resumed run — and every rank
        of a multi-process run — rewinds to exactly the same head)."""
        state = dict(self.setup.theta0)
        path = self.run.path / "init_head.safetensors"
        if self.main and not path.is_file():
            save_tensors(path, {k: state[k] for k in self.setup.head_names()})
        self.barrier()
        state.update(load_tensors(path, "Initial head"))
        return state

    def train(self, schedule: list[float]) -> None:
        """Every level of ``schedule``: stored ones are shown, the others trained."""
        full_score: float | None = None
        for level, target in enumerate(schedule):
            self.barrier()
            if self.run.level_done(level) and self._next_mask_ready(level):
                rec = self.run.metrics(level)
                full_score = rec["score"] if level == 0 else full_score
                print_level(self.console, rec, None if level == 0 else full_score, resumed=True)
                continue
            rec = run_level(self.setup, self.run, self._plan(level, target), self.runtime,
                            before_finish=lambda rec, lvl=level: self._write_next_mask(lvl))
            full_score = rec["score"] if level == 0 else full_score
            print_level(self.console, rec, None if level == 0 else full_score)
        self.barrier()

    def _plan(self, level: int, target: float) -> LevelPlan:
        hp = self.hp
        if level == 0:
            mask = Mask.ones_like(self.setup.prunable)
        else:
            mask = Mask.load(self.run.level_dir(level) / "mask.safetensors")
            mask.check_compatible(self.setup.prunable, self.setup.fingerprint,
                                  source="stored mask", digests=self.setup.digests,
                                  family=self.setup.family.name)
        if level > 0 and hp.prune.rewind_step > 0:
            start = load_tensors(self.run.rewind_path, "Rewind point θ_i")
        else:
            start = dict(self.theta0)
        if hp.prune.keep_trained_head and level > 0:
            start.update(load_tensors(self.run.level_dir(level - 1) / "head.safetensors",
                                      "Trained head"))
        hooks = ()
        if self.criterion.collector is not None:
            self.stats = self.criterion.collector(self.setup.prunable)
            hooks = (self.stats,)
        return LevelPlan(
            level=level, mask=mask, start=start, target=target,
            description=f"level {level} train", hooks=hooks,
            mask_meta={"task": hp.data.task, "level": level, "run": self.run.path.name,
                       "hparams": hp.identity()},
            on_step=self._snapshot if level == 0 and hp.prune.rewind_step > 0 else None)

    def _snapshot(self, step: int, net: torch.nn.Module) -> None:
        if step == self.hp.prune.rewind_step and self.main:  # θ_i and γ_i, while level 0 trains
            save_tensors(self.run.rewind_path, net.state_dict())

    def _write_next_mask(self, level: int, stats: dict[str, torch.Tensor] | None = None
                         ) -> list[str]:
        """Prune the trained weights into the next level's mask (also after the last level,
        so a later, higher --target-sparsity continues without retraining). Returns the
        level's own extra files (the criterion's statistics, kept for healing)."""
        hp = self.hp
        files = []
        if stats is None and self.criterion.collector is not None:
            stats = self.stats.result()
            save_tensors(self.run.level_dir(level) / STATS_FILE, stats)
            files.append(STATS_FILE)
        nxt = level_sparsity(level + 1, hp.prune.rate, hp.prune.schedule)
        if nxt < 1.0:
            mask = Mask.load(self.run.level_dir(level) / "mask.safetensors")
            new_mask = prune(self.setup.prunable, mask.for_params(self.setup.prunable), nxt,
                             hp.prune.method, seed=hp.train.seed * 1000 + level, stats=stats)
            new_mask.save(self.run.level_dir(level + 1) / "mask.safetensors",
                          {**self.setup.mask_meta(), "task": hp.data.task, "level": level + 1,
                           "run": self.run.path.name, "hparams": hp.identity()})
        return files

    def _next_mask_ready(self, level: int) -> bool:
        """A finished level's next mask exists, or is recomputed here from the level's stored
        weights (and statistics). False: the level must be trained again to recover it."""
        nxt = level_sparsity(level + 1, self.hp.prune.rate, self.hp.prune.schedule)
        path = self.run.level_dir(level + 1) / "mask.safetensors"
        if nxt >= 1.0 or path.is_file():
            return True
        d = self.run.level_dir(level)
        weights = d / "model.safetensors"
        needs_stats = self.criterion.collector is not None
        if not weights.is_file() or (needs_stats and not (d / STATS_FILE).is_file()):
            self.console.print(f"level {level}: the next level's mask is missing and the "
                               "level's weights are not stored; training it again "
                               "(deterministic: same result)")
            return False
        if self.main:
            self.setup.model.load_state_dict(load_level_weights(weights))
            stats = load_tensors(d / STATS_FILE, "Level statistics") if needs_stats else None
            self._write_next_mask(level, stats)
            self.console.print(f"level {level}: recomputed the next level's mask from the "
                               "stored weights")
        self.barrier()
        return True


def mask_digest(mask: Mask) -> str:
    """A mask's content digest (names, shapes, bits): the same mask from any file, under any
    metadata, is the same fine-tune."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(mask.tensors):
        t = mask.tensors[name].cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def finetune_identity(hp: RunHparams, mask: Mask | None) -> dict[str, Any]:
    """What a single fine-tune's result depends on: the hparams that change it (not the
    pruning-only ones) and the mask's content (not its path or file metadata)."""
    return {"finetune": hp.result_identity(), "mask": mask_digest(mask) if mask else "dense"}


def finetune_run(hp: RunHparams, mask: Mask | Path | None, root: Path) -> Run:
    """The one place a fine-tune's run directory is named (``finetune``, ``transfer``, the
    reports): from the hparams and the mask (or its file), without loading a model."""
    if isinstance(mask, str | Path):
        mask = Mask.load(Path(mask))
    return Run(root / f"finetune-{hp.data.task}-{stable_hash(finetune_identity(hp, mask))}")


def finetune(
    hp: RunHparams,
    mask_path: Path | None,
    root: Path,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
    allow_different_weights: bool = False,
    family: Family | None = None,
) -> Run:
    """Fine-tune the subnetwork m⊙θ0 once on ``hp.data.task`` (a transfer when the mask comes
    from another task). Stored as a one-level run named by :func:`finetune_identity`."""
    console = console or Console()
    source = Mask.load(mask_path) if mask_path is not None else None
    ensure_writable(root)
    setup = prepare(hp, runtime, family)
    if source is not None:
        source.check_compatible(setup.prunable, setup.fingerprint, allow_different_weights,
                                source=f"mask {mask_path}", digests=setup.digests,
                                family=setup.family.name)
        mask = source.for_params(setup.prunable)
    else:
        mask = Mask.ones_like(setup.prunable)
    run = finetune_run(hp, source, root)
    accelerator = get_accelerator(runtime)
    main = accelerator.is_main_process
    origin = {k: source.meta.get(k) for k in ("task", "level", "run")} if source else {}
    with run.lock(main):
        if main:
            run.create(finetune_identity(hp, source), {
                "kind": "finetune", "ticketlab_version": VERSION,
                "fingerprint": setup.fingerprint, "theta0": setup.digests,
                "family": setup.family.name,
                "mask_source": str(mask_path) if mask_path else None, "mask_meta": origin,
                "main_metric": setup.task.main_metric})
        accelerator.wait_for_everyone()
        console.print(escape(describe_source(origin, mask, mask_path)))
        if run.level_done(0):
            print_finetune(console, run.metrics(0), hp, full_model_score(hp, root, run),
                           resumed=True)
            return run
        plan = LevelPlan(level=0, mask=mask, start=setup.theta0, target=mask.sparsity,
                         description="finetune", save_head=False,
                         mask_meta={"task": hp.data.task, "source": origin},
                         extra={"mask_source": origin})
        rec = run_level(setup, run, plan, runtime)
        print_finetune(console, rec, hp, full_model_score(hp, root, run))
        accelerator.wait_for_everyone()
    return run


def describe_source(origin: dict[str, Any], mask: Mask, mask_path: Path | None) -> str:
    """Where a fine-tune's mask comes from, for the line printed before it trains."""
    if mask_path is None:
        return "mask: none (the full model)"
    found = []
    if origin.get("level") is not None:
        found.append(f"level {origin['level']}")
    if origin.get("run"):
        found.append(f"of run {origin['run']}")
    if origin.get("task"):
        found.append(f"(found on {origin['task']})")
    where = " ".join(found) or f"file {mask_path}"
    return f"mask: {where}, sparsity {mask.sparsity:.1%}"


def _dense_identity(hparams: dict[str, Any]) -> str:
    """What a full (unpruned) fine-tune's result depends on: model, data and training, not
    the prunable set or how IMP prunes (a dense level trains every weight either way)."""
    import json

    return json.dumps({k: hparams[k] for k in ("model", "data", "train")}, sort_keys=True)


def full_model_score(hp: RunHparams, root: Path, exclude: Run | None = None
                     ) -> tuple[float, str] | None:
    """The score of the full model fine-tuned with ``hp`` on its task, if the store has it:
    level 0 of an IMP run, or a fine-tune without a mask, with the same model, data and
    training hparams. Returns (score, where it is) or None."""
    from ticketlab.store import list_runs

    want = _dense_identity(hp.identity())  # as stored: options added later left out
    for run in list_runs(root):
        if exclude is not None and run.path == exclude.path:
            continue
        try:
            record = run.read_hparams()
            ident = record["hparams"]
            if record.get("kind") == "finetune":
                if ident.get("mask") != "dense":
                    continue
                ident = ident["finetune"]
            elif record.get("kind") != "imp":
                continue
            if _dense_identity(ident) == want and run.level_done(0):
                return float(run.metrics(0)["score"]), f"run {run.path.name} level 0"
        except (TicketlabError, KeyError, TypeError):
            continue
    return None


def print_finetune(console: Console, rec: dict[str, Any], hp: RunHparams,
                   full: tuple[float, str] | None, resumed: bool = False) -> None:
    """The fine-tune's result, against the target's full model when the store has it."""
    task = hp.data.task
    line = (f"finetune on {task}: sparsity {rec['sparsity'] * 100:.1f}%  "
            f"{rec['main_metric']} {rec['score'] * 100:.2f}")
    if full is not None:
        score, where = full
        line += (f"  Δ {(rec['score'] - score) * 100:+.2f} vs the full model on {task} "
                 f"({score * 100:.2f}, {where})")
    elif rec["sparsity"] > 0:
        line += (f"  (no full model of {task} with these settings is stored; the same "
                 "`ticketlab finetune` without --mask stores one)")
    console.print(escape(line) + (" [dim](stored)[/dim]" if resumed else ""))
