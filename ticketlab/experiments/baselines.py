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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ticketlab import __version__ as VERSION
from ticketlab.errors import TicketlabError
from ticketlab.experiments.common import with_seed
from ticketlab.hparams import RunHparams, Runtime
from ticketlab.pruning import prune, random_mask_like
from ticketlab.store import Run

if TYPE_CHECKING:  # the registry below is read by --help, which must not import torch
    import torch

    from ticketlab.masks import Mask
    from ticketlab.prepare import Setup

#: A baseline's starting point: (setup, the IMP level's mask, seed, the IMP run) -> (mask,
#: full starting state, extra record fields).
Start = Callable[["Setup", "Mask", int, Run, Runtime],
                 "tuple[Mask, dict[str, torch.Tensor], dict[str, Any]]"]


@dataclass(frozen=True)
class Baseline:
    """One baseline kind: its table label, its help line, how it starts, and how many
    trainings it costs (``standard`` trains the full model first unless that is stored)."""

    kind: str
    label: str
    help: str
    start: Start
    trainings: int = 1


# --- the defining transformations (pure: mask and starting weights) ---------------------------
def reinitialised_weights(setup: Setup, seed: int) -> dict[str, torch.Tensor]:
    """θ0': the prunable matrices as the model's own initialiser draws them under ``seed``
    (the family builds a fresh model of the same class and config)."""
    return setup.family.reinitialised(setup.model, list(setup.prunable), seed)


def shuffled_weights(setup: Setup, seed: int, layers: bool = False) -> dict[str, torch.Tensor]:
    """θ0'': each prunable matrix of θ0 with its entries randomly permuted, or (``layers``)
    every matrix of layer i replaced by the same matrix of layer σ(i) for a random σ."""
    import torch

    g = torch.Generator().manual_seed(seed)
    theta0 = {name: setup.theta0[setup.full_key(name)] for name in setup.prunable}
    if not layers:
        return {name: w.reshape(-1)[torch.randperm(w.numel(), generator=g)].reshape(w.shape)
                for name, w in theta0.items()}
    layer_of = setup.family.layer_of
    indices = sorted({i for n in theta0 if (i := layer_of(n)) is not None})
    order = torch.randperm(len(indices), generator=g).tolist()
    sigma = {i: indices[j] for i, j in zip(indices, order, strict=True)}
    out = {}
    for name in theta0:
        i = layer_of(name)
        source = name if i is None else re.sub(rf"\.{i}\.", f".{sigma[i]}.", name, count=1)
        out[name] = theta0[source].clone() if source in theta0 and \
            theta0[source].shape == theta0[name].shape else theta0[name].clone()
    return out


def one_shot_mask(weights: dict[str, torch.Tensor], sparsity: float, method: str = "global",
                  seed: int = 0) -> Mask:
    """Magnitude pruning of ``weights`` (θ0) straight to ``sparsity``, with IMP's ranking
    (a criterion that needs training statistics falls back to magnitude: there was no
    training)."""
    from ticketlab.masks import Mask
    from ticketlab.pruning import criterion

    if criterion(method).collector is not None:
        method = "global"
    return prune(weights, Mask.ones_like(weights), sparsity, method, seed=seed)


def _theta0(setup: Setup) -> dict[str, torch.Tensor]:
    return dict(setup.theta0)


def _with_weights(setup: Setup, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _theta0(setup)
    state.update({setup.full_key(n): w for n, w in new.items()})
    return state


def _random(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    return random_mask_like(imp, seed=seed), _theta0(setup), {}


def _layerwise_random(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    return random_mask_like(imp, seed=seed, layerwise=True), _theta0(setup), {}


def _reinit(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    return imp, _with_weights(setup, reinitialised_weights(setup, seed)), {}


def _shuffle(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    return imp, _with_weights(setup, shuffled_weights(setup, seed)), {}


def _shuffle_layers(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    return imp, _with_weights(setup, shuffled_weights(setup, seed, layers=True)), {}


def _one_shot(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    theta0 = {n: setup.theta0[setup.full_key(n)] for n in setup.prunable}
    return one_shot_mask(theta0, imp.sparsity, setup.hp.prune.method, seed), _theta0(setup), {}


def standard_mask(setup: Setup, trained: dict[str, torch.Tensor], sparsity: float,
                  seed: int) -> Mask:
    """Standard pruning's mask: the magnitudes of the *fine-tuned* weights, pruned in one shot."""
    weights = {n: trained[setup.full_key(n)] for n in setup.prunable}
    return one_shot_mask(weights, sparsity, setup.hp.prune.method, seed)


def _standard(setup: Setup, imp: Mask, seed: int, run: Run, rt: Runtime) -> Any:
    trained, seconds = fine_tuned_full_model(run, setup, seed, rt)
    return (standard_mask(setup, trained, imp.sparsity, seed), trained,
            {"dense_seconds": seconds})


#: kind -> baseline. What each isolates is in the module docstring; ``--help`` and the tables
#: read their text from here.
BASELINES: dict[str, Baseline] = {b.kind: b for b in (
    Baseline("random", "Random pruning",
             "random pruning (global random mask, same overall sparsity) of θ0", _random),
    Baseline("layerwise-random", "Layerwise random pruning",
             "random mask with the IMP mask's per-matrix sparsity, on θ0", _layerwise_random),
    Baseline("random-reinit", "Random reinit (θ0')", "IMP mask on re-initialised weights θ0'",
             _reinit),
    Baseline("shuffle", "Shuffled weights (θ0'')",
             "IMP mask on θ0'' (θ0 permuted within each matrix)", _shuffle),
    Baseline("shuffle-layers", "Shuffled layers", "IMP mask on θ0 with whole layers permuted",
             _shuffle_layers),
    Baseline("one-shot", "One-shot pruning of θ0", "one-shot magnitude pruning of θ0",
             _one_shot),
    Baseline("standard", "Standard pruning",
             "standard pruning: prune the fine-tuned model, keep training", _standard,
             trainings=2),
)}

#: Kind -> one line for tables and ``--help`` (read from :data:`BASELINES`).
BASELINE_KINDS: dict[str, str] = {k: b.help for k, b in BASELINES.items()}
#: Kind -> short table label.
KIND_LABELS: dict[str, str] = {k: b.label for k, b in BASELINES.items()}


def check_kind(kind: str) -> str:
    if kind not in BASELINES:
        close = difflib.get_close_matches(kind, BASELINES, n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise TicketlabError(f"Unknown baseline kind {kind!r}.",
                             f"{hint}Use one of: {', '.join(BASELINES)}.")
    return kind


def baseline_start(kind: str, setup: Setup, imp_mask: Mask, seed: int, run: Run | None = None,
                   runtime: Runtime | None = None) -> tuple[Mask, dict[str, torch.Tensor]]:
    """The mask and the full starting state of a baseline (θ0 with the seed's head γ0 where
    the kind changes nothing)."""
    mask, state, _ = BASELINES[check_kind(kind)].start(
        setup, imp_mask.for_params(setup.prunable), seed, run, runtime or Runtime())
    return mask, state


# --- branches in the store --------------------------------------------------------------------
def branch_path(run: Run, kind: str, level: int, seed: int) -> Path:
    return run.path / "branches" / f"{kind}-level{level}-seed{seed}"


def imp_run_hparams(run: Run) -> tuple[RunHparams, dict[str, Any]]:
    """The hparams of an IMP run (refusing other kinds of run) and its hparams.json record
    (checked against the run's name by :meth:`Run.read_hparams`)."""
    record = run.read_hparams()
    if record.get("kind") != "imp":
        raise TicketlabError(
            f"{run.path.name} is a {record.get('kind')!r} run; baselines branch off IMP runs.",
            "Pick an IMP run from `ticketlab runs` (kind imp).",
        )
    return RunHparams.from_dict(record["hparams"]), record


def imp_mask_at(run: Run, level: int) -> Mask:
    """The IMP mask of ``level``: written when level ``level - 1`` finished."""
    from ticketlab.masks import Mask

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
    from ticketlab.imp import check_theta0
    from ticketlab.levels import LevelPlan, run_level
    from ticketlab.prepare import prepare

    console = console or Console()
    baseline = BASELINES[check_kind(kind)]
    hp, record = imp_run_hparams(run)
    imp_mask = imp_mask_at(run, level)
    branch = Run(branch_path(run, kind, level, seed))
    if branch.level_done(level):
        _print_branch(console, branch.metrics(level), stored=True)
        return branch
    hp = with_seed(hp, seed)
    setup = prepare(hp)  # validated before the branch directory is touched
    check_theta0(record, setup, f"run {run.path.name}")
    imp_mask.check_compatible(setup.prunable, setup.fingerprint, source=f"level {level} mask",
                              digests=setup.digests)
    with branch.lock():
        branch.create({"branch": kind, "level": level, "seed": seed, "run": run.path.name,
                       "run_hparams": record["hparams"]},
                      {"kind": "branch", "ticketlab_version": VERSION,
                       "fingerprint": setup.fingerprint, "theta0": setup.digests,
                       "family": setup.family.name, "main_metric": setup.task.main_metric})
        mask, start, extra = baseline.start(setup, imp_mask.for_params(setup.prunable), seed,
                                            run, runtime)
        branch_info = {"kind": kind, "seed": seed, "run": run.path.name}
        plan = LevelPlan(level=level, mask=mask, start=start, target=imp_mask.sparsity,
                         description=f"{kind} level {level} seed {seed}",
                         mask_meta={"task": hp.data.task, "level": level, "run": run.path.name,
                                    "branch": kind, "seed": seed},
                         extra={"branch": branch_info}, train_extra=extra)
        rec = run_level(setup, branch, plan, runtime)
        _print_branch(console, rec)
    return branch


def fine_tuned_full_model(run: Run, setup: Setup, seed: int, runtime: Runtime
                          ) -> tuple[dict[str, torch.Tensor], float]:
    """θ_T of the full model for this seed: the run's stored level 0 when it is the same
    computation (same seed, weights saved), else fine-tuned here. Returns (state, seconds)."""
    from ticketlab.levels import WEIGHTS_FILE, load_level_weights, train_and_evaluate
    from ticketlab.masks import Mask

    stored = run.level_dir(0) / WEIGHTS_FILE
    if _run_seed(run) == seed and run.level_done(0) and stored.is_file():
        return load_level_weights(stored), 0.0
    _, result, _, _ = train_and_evaluate(setup, Mask.ones_like(setup.prunable),
                                         dict(setup.theta0), runtime,
                                         f"standard: full model seed {seed}")
    state = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    return state, result.seconds


def _run_seed(run: Run) -> int:
    return int(run.read_hparams()["hparams"]["train"]["seed"])


def branch_records(run: Run) -> list[dict[str, Any]]:
    """The finished branches of an IMP run: their level records (with ``branch``)."""
    out: list[dict[str, Any]] = []
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
