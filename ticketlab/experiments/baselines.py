"""The baselines of Table 2, as branches of an IMP run.

A branch (open_lth's word) is an experiment that starts from an existing IMP run's level: it
takes that level's mask or only its sparsity, changes one thing, and fine-tunes once. Each
branch lives in ``<run>/branches/<kind>-level<K>-seed<S>/`` with the level-file conventions of
a run (``hparams.json``, ``level_K/{mask,head}.safetensors``, ``metrics.json`` written last with
checksums), so it is atomic and resumable exactly like IMP, and ``ticketlab show`` reads it.

What each kind isolates (the seed ``S`` draws the random parts *and* the training: head γ0,
data order, dropout — as a run with ``--seed S`` would):

==================  ============================================================================
``random``          a random mask with the IMP mask's overall sparsity, on θ0: does *which*
                    weights IMP keeps matter?
``layerwise-random`` a random mask with the IMP mask's sparsity *in every matrix*: is IMP's
                    per-matrix allocation all that matters?
``random-reinit``   the IMP mask on θ0', the prunable matrices re-drawn from the model config's
                    own initialiser (``initializer_range``): do the pre-trained *values* matter?
``shuffle``         the IMP mask on θ0'', θ0 permuted within each prunable matrix: do the values
                    matter beyond their distribution per matrix?
``shuffle-layers``  the IMP mask on θ0 with whole layers permuted (the seed code's variant)
``one-shot``        global magnitude pruning of θ0 straight to the sparsity, no training before
                    pruning: is the iterative search needed?
``standard``        prune the *fine-tuned* full model by magnitude and keep training from the
                    fine-tuned weights, no rewinding (Han et al.'s prune-and-retrain)
==================  ============================================================================

Only the prunable matrices change in ``random-reinit`` and the shuffles: embeddings, biases and
LayerNorms stay pre-trained, so the comparison with IMP is about the masked weights alone.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from ticketlab import __version__ as VERSION
from ticketlab.errors import TicketlabError
from ticketlab.experiment import Setup, prepare
from ticketlab.experiments.common import full_key, train_subnetwork, with_seed
from ticketlab.hparams import RunHparams
from ticketlab.imp import _level_record, _load_tensors, _save_tensors, run_lock
from ticketlab.masks import Mask
from ticketlab.models import layer_of
from ticketlab.pruning import prune, random_mask_like
from ticketlab.store import Run
from ticketlab.train import Runtime

#: Baseline kind -> one line for tables and ``--help``.
BASELINE_KINDS: dict[str, str] = {
    "random": "random pruning (global random mask, same overall sparsity) of θ0",
    "layerwise-random": "random mask with the IMP mask's per-matrix sparsity, on θ0",
    "random-reinit": "IMP mask on re-initialised weights θ0'",
    "shuffle": "IMP mask on θ0'' (θ0 permuted within each matrix)",
    "shuffle-layers": "IMP mask on θ0 with whole layers permuted",
    "one-shot": "one-shot magnitude pruning of θ0",
    "standard": "standard pruning: prune the fine-tuned model, keep training",
}

#: Short names for tables.
KIND_LABELS: dict[str, str] = {
    "random": "Random pruning",
    "layerwise-random": "Layerwise random pruning",
    "random-reinit": "Random reinit (θ0')",
    "shuffle": "Shuffled weights (θ0'')",
    "shuffle-layers": "Shuffled layers",
    "one-shot": "One-shot pruning of θ0",
    "standard": "Standard pruning",
}


def check_kind(kind: str) -> str:
    if kind not in BASELINE_KINDS:
        close = difflib.get_close_matches(kind, BASELINE_KINDS, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise TicketlabError(f"Unknown baseline kind {kind!r}.",
                             f"{hint}Use one of: {', '.join(BASELINE_KINDS)}.")
    return kind


# --- the defining transformations (pure: mask and starting weights) ---------------------------
def reinitialised_weights(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    """θ0': the prunable matrices as the model's own ``__init__`` draws them under ``seed``.

    A fresh model of the same class and config is built, so the initialiser is the config's
    (``initializer_range`` for BERT), whatever the family; transformers skips weights loaded
    from a checkpoint in ``init_weights()``, so re-initialising in place would be a no-op.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(setup.model)(setup.model.config)
    fresh_params = dict(fresh.base_model.named_parameters())
    return {name: fresh_params[name].detach().clone() for name in setup.prunable}


def shuffled_weights(setup: Setup, seed: int, layers: bool = False) -> dict[str, torch.Tensor]:
    """θ0'': each prunable matrix of θ0 with its entries randomly permuted, or (``layers``)
    every matrix of layer i replaced by the same matrix of layer σ(i) for a random σ."""
    g = torch.Generator().manual_seed(seed)
    theta0 = {name: setup.theta0[full_key(setup, name)] for name in setup.prunable}
    if not layers:
        return {name: w.reshape(-1)[torch.randperm(w.numel(), generator=g)].reshape(w.shape)
                for name, w in theta0.items()}
    indices = sorted({i for n in theta0 if (i := layer_of(n)) is not None})
    order = torch.randperm(len(indices), generator=g).tolist()
    sigma = {i: indices[j] for i, j in zip(indices, order, strict=True)}
    out = {}
    for name in theta0:
        i = layer_of(name)
        source = name if i is None else re.sub(rf"\.{i}\.", f".{sigma[i]}.", name, count=1)
        out[name] = theta0[source].clone()
    return out


def one_shot_mask(weights: dict[str, torch.Tensor], sparsity: float, method: str = "global",
                  seed: int = 0) -> Mask:
    """Magnitude pruning of ``weights`` (θ0) straight to ``sparsity``, with IMP's ranking."""
    return prune(weights, Mask.ones_like(weights), sparsity, method, seed=seed)


def baseline_start(kind: str, setup: Setup, imp_mask: Mask, seed: int
                   ) -> tuple[Mask, dict[str, torch.Tensor]]:
    """The mask and the full starting state of a baseline that starts before fine-tuning.

    ``imp_mask`` is the IMP level's mask; the returned state is θ0 (with the seed's head γ0)
    where the kind changes nothing. ``standard`` starts after fine-tuning: see
    :func:`standard_mask`.
    """
    check_kind(kind)
    imp_mask = imp_mask.for_params(setup.prunable)
    state = dict(setup.theta0)
    if kind == "random":
        return random_mask_like(imp_mask, seed=seed), state
    if kind == "layerwise-random":
        return random_mask_like(imp_mask, seed=seed, layerwise=True), state
    if kind == "one-shot":
        theta0 = {n: state[full_key(setup, n)] for n in setup.prunable}
        return one_shot_mask(theta0, imp_mask.sparsity, setup.hp.prune.method, seed), state
    if kind == "random-reinit":
        new = reinitialised_weights(setup, seed)
    elif kind in ("shuffle", "shuffle-layers"):
        new = shuffled_weights(setup, seed, layers=kind == "shuffle-layers")
    else:
        raise TicketlabError(f"Baseline {kind!r} does not start from θ0.", "Internal error.")
    state.update({full_key(setup, n): w for n, w in new.items()})
    return imp_mask, state


def standard_mask(setup: Setup, trained: dict[str, torch.Tensor], sparsity: float,
                  seed: int) -> Mask:
    """Standard pruning's mask: the magnitudes of the *fine-tuned* weights, pruned in one shot."""
    weights = {n: trained[full_key(setup, n)] for n in setup.prunable}
    return one_shot_mask(weights, sparsity, setup.hp.prune.method, seed)


# --- branches in the store --------------------------------------------------------------------
def branch_path(run: Run, kind: str, level: int, seed: int) -> Path:
    return run.path / "branches" / f"{kind}-level{level}-seed{seed}"


def imp_run_hparams(run: Run) -> tuple[RunHparams, dict[str, Any]]:
    """The hparams of an IMP run (refusing other kinds of run) and its hparams.json record."""
    record = run.read_hparams()
    if record.get("kind") != "imp":
        raise TicketlabError(
            f"{run.path.name} is a {record.get('kind')!r} run; baselines branch off IMP runs.",
            "Pick an IMP run from `ticketlab runs` (kind imp).",
        )
    return RunHparams.from_dict(record["hparams"]), record


def imp_mask_at(run: Run, level: int) -> Mask:
    """The IMP mask of ``level``: written when level ``level - 1`` finished."""
    if level < 1:
        raise TicketlabError(f"Level {level} of {run.path.name} is the full model, not a "
                             "subnetwork.", "Pick a pruned level (1 or more).")
    path = run.level_dir(level) / "mask.safetensors"
    if not path.is_file():
        done = run.levels()
        raise TicketlabError(
            f"Level {level} of {run.path.name} has no mask yet (finished levels: {done}).",
            "Continue the IMP run first: `ticketlab find` with the same options and a higher "
            "--target-sparsity.",
        )
    return Mask.load(path)


def branch_done(run: Run, kind: str, level: int, seed: int) -> bool:
    return Run(branch_path(run, kind, level, seed)).level_done(level)


def run_branch(
    run: Run,
    level: int,
    kind: str,
    seed: int,
    runtime: Runtime = Runtime(),
    console: Console | None = None,
) -> Run:
    """Train (or find stored) the ``kind`` baseline at ``level`` of IMP run ``run``."""
    console = console or Console()
    check_kind(kind)
    hp, record = imp_run_hparams(run)
    imp_mask = imp_mask_at(run, level)
    branch = Run(branch_path(run, kind, level, seed))
    if branch.level_done(level):
        _print_branch(console, branch.metrics(level), stored=True)
        return branch
    hp = with_seed(hp, seed)
    setup = prepare(hp)  # validated before the branch directory is touched
    if record.get("fingerprint") != setup.fingerprint:
        raise TicketlabError(
            f"The model's weights changed since run {run.path.name} was made "
            "(θ0 fingerprint differs).", "Use the model files the run was made with.")
    imp_mask.check_compatible(setup.prunable, setup.fingerprint, source=f"level {level} mask")
    with run_lock(branch):
        branch.create({"branch": kind, "level": level, "seed": seed, "run": run.path.name,
                       "run_hparams": record["hparams"]},
                      {"kind": "branch", "ticketlab_version": VERSION,
                       "fingerprint": setup.fingerprint,
                       "main_metric": setup.task.main_metric})
        extra: dict[str, Any] = {}
        desc = f"{kind} level {level} seed {seed}"
        if kind == "standard":
            trained, extra["dense_seconds"] = _fine_tuned_full_model(run, setup, seed, runtime)
            mask, start = standard_mask(setup, trained, imp_mask.sparsity, seed), trained
        else:
            mask, start = baseline_start(kind, setup, imp_mask, seed)
        metrics, result, eval_seconds = train_subnetwork(setup, mask, start, runtime, desc)
        d = branch.level_dir(level)
        meta = {"task": hp.data.task, "level": level, "fingerprint": setup.fingerprint,
                "model": hp.model.model, "run": run.path.name, "branch": kind, "seed": seed}
        mask.save(d / "mask.safetensors", meta)
        _save_tensors(d / "head.safetensors",
                      {k: setup.model.state_dict()[k] for k in setup.head_names()})
        files = ["mask.safetensors", "head.safetensors"]
        if runtime.save_weights:
            _save_tensors(d / "model.safetensors", setup.model.state_dict())
            files.append("model.safetensors")
        rec = _level_record(setup, level, imp_mask.sparsity, mask, metrics, result, eval_seconds)
        rec["train"].update(extra)
        rec["branch"] = {"kind": kind, "seed": seed, "run": run.path.name}
        branch.finish_level(level, rec, files)
        _print_branch(console, rec)
    return branch


def _fine_tuned_full_model(run: Run, setup: Setup, seed: int, runtime: Runtime
                           ) -> tuple[dict[str, torch.Tensor], float]:
    """θ_T of the full model for this seed: the run's stored level 0 when it is the same
    computation (same seed, weights saved), else fine-tuned here. Returns (state, seconds)."""
    stored = run.level_dir(0) / "model.safetensors"
    if _run_seed(run) == seed and run.level_done(0) and stored.is_file():
        return _load_tensors(stored, "Level 0 weights"), 0.0
    _, result, _ = train_subnetwork(setup, Mask.ones_like(setup.prunable), dict(setup.theta0),
                                    runtime, f"standard: full model seed {seed}")
    state = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    return state, result.seconds


def _run_seed(run: Run) -> int:
    return int(run.read_hparams()["hparams"]["train"]["seed"])


def branch_records(run: Run) -> list[dict[str, Any]]:
    """The finished branches of an IMP run: their level records (with ``branch``)."""
    out = []
    folder = run.path / "branches"
    if not folder.is_dir():
        return out
    for d in sorted(folder.iterdir()):
        m = re.fullmatch(r"(?P<kind>[a-z-]+)-level(?P<level>\d+)-seed(?P<seed>\d+)", d.name)
        if m and Run(d).level_done(int(m["level"])):
            out.append(Run(d).metrics(int(m["level"])))
    return out


def _print_branch(console: Console, rec: dict[str, Any], stored: bool = False) -> None:
    b = rec["branch"]
    tag = " [dim](stored)[/dim]" if stored else ""
    console.print(f"{b['kind']:<16} level {rec['level']:>2}  seed {b['seed']}  sparsity "
                  f"{rec['sparsity'] * 100:5.1f}%  {rec['main_metric']} "
                  f"{rec['score'] * 100:6.2f}{tag}")
