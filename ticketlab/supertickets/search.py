"""The SuperTickets search: architecture search and weight pruning in one training run.

One run of ``--epochs`` (or ``--max-steps``) trains θ0 with a gate on every head and FFN
neuron under an L1 penalty (:mod:`.gates`). Every ``--interval`` steps is a *pruning point*:

1. units are removed — every gate below ``--threshold`` (HR-NAS), and the lowest gates of
   each kind until the share of ``--head-target``/``--ffn-target`` that this point of the
   schedule calls for (the targets are reached at the same point as the weight target);
2. the weights are pruned by the run's criterion (global magnitude: the code's
   ``method: mag``, ``scope='global'``) to ``min(k·rate, target)`` of the prunable set, the
   removed units' rows and columns counted in (``ticketlab.pruning.prune``: only survivors
   compete);
3. the pruned model is evaluated (the code validates after pruning, ``train.py`` l. 606).

With ``--reactivate`` the next interval trains with the mask reset to all-ones except the
removed units (``pruner.alpha_mask(1)``, ``train.py`` l. 631): pruned weights may grow back,
and are pruned again from the current weights at the next point. In ticketlab pruned weights
are held at exactly zero, so a reactivated weight grows back *from zero*; in the code the
masked layers multiply ``weight_mask * weight`` in the forward pass and ``set_zeros`` is a
no-op (``pruners/pruner.py`` l. 71-73 rebinds a local), so there it comes back with the value
it had when pruned. The final ticket is the last point's pruned model (the code's
``pruned_checkpoint``, saved before the reset).

Storage is the run store's: a run directory named by the hash of its hparams, and one
``level_K/`` per interval, written like an IMP level — ``mask.safetensors`` (the weight mask,
structural removals included), ``structure.json`` (the heads and neurons kept),
``model.safetensors`` (a plain model: gates folded into the weights), then ``metrics.json``
last with their checksums. ``state.safetensors`` holds what the next interval continues from
(model with gates, optimizer, schedule, RNG); its digest is in ``metrics.json`` too, outside
the level's checksums, because it is deleted once the next interval is finished. Every
interval starts from the previous interval's files, killed or not, so a resumed run is the
uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from ticketlab import __version__ as VERSION
from ticketlab.errors import TicketlabError
from ticketlab.families.base import Family, UnitGroup
from ticketlab.hparams import RunHparams, Runtime, stable_hash
from ticketlab.imp import check_theta0
from ticketlab.levels import role_sparsity
from ticketlab.masks import Mask
from ticketlab.methods import make_method
from ticketlab.prepare import Setup, prepare
from ticketlab.pruning import criterion, level_sparsity, prune
from ticketlab.store import Run, atomic_write_bytes, atomic_write_json, ensure_writable, sha256_file
from ticketlab.supertickets.gates import (
    GATES,
    GateBank,
    GatePenalty,
    PenalizedTraining,
    attach_gates,
    cap_removals,
    check_kinds,
    detach_gates,
    fold_gates,
    gate_summary,
    held_at_zero,
    removal_targets,
    remove_units,
    structural_only,
    structural_weight_mask,
    with_structure,
    zero_removed,
)
from ticketlab.supertickets.hparams import (
    INTERVAL_SHARE,
    KIND_BY_NAME,
    UNIT_KINDS,
    SuperHparams,
)
from ticketlab.train import TrainState, evaluate, get_accelerator, planned_steps, train

KIND = "supertickets"
STATE_FILE = "state.safetensors"
STRUCTURE_FILE = "structure.json"
#: Options of IMP's rewinding that a one-run search has no use for.
IMP_ONLY = ("rewind_step", "keep_trained_head")


@dataclass(frozen=True)
class Schedule:
    """The pruning points of one run: interval ``k`` (1-based) trains steps
    ``[(k-1)·interval, min(k·interval, total))`` and then prunes to ``ratios[k-1]``; the
    structural targets are met in proportion, in full from interval ``reach`` on."""

    total: int
    interval: int
    ratios: tuple[float, ...]
    reach: int
    warmup: int

    @property
    def count(self) -> int:
        return len(self.ratios)

    def steps(self, k: int) -> tuple[int, int]:
        return (k - 1) * self.interval, min(k * self.interval, self.total)

    def progress(self, k: int) -> float:
        """The share of the structural targets due at interval ``k``."""
        return min(1.0, k / self.reach)


def schedule(hp: RunHparams, sp: SuperHparams, num_examples: int) -> Schedule:
    """The pruning points for a run on ``num_examples`` training examples; refused when the
    run ends before the ratio reaches the target."""
    total = planned_steps(num_examples, hp.train)
    interval = sp.interval or max(1, round(total * INTERVAL_SHARE))
    count = math.ceil(total / interval)
    target = hp.prune.target_sparsity
    ratios = tuple(min(level_sparsity(k, hp.prune.rate, hp.prune.schedule), target)
                   for k in range(1, count + 1))
    if ratios[-1] < target - 1e-9:
        need = next((k for k in range(1, 10_000)
                     if level_sparsity(k, hp.prune.rate, hp.prune.schedule) >= target - 1e-9),
                    None)
        raise TicketlabError(
            f"The run has {count} pruning point(s) ({total} steps, one every {interval}), and "
            f"--rate {hp.prune.rate} reaches only {ratios[-1]:.0%} by the last, short of "
            f"--target-sparsity {target}.",
            f"Use --interval {max(1, total // need) if need else 1} or less, a larger --rate, "
            "or a longer run (--epochs / --max-steps).")
    reach = next(k for k, r in enumerate(ratios, start=1) if r >= target - 1e-9)
    return Schedule(total=total, interval=interval, ratios=ratios, reach=reach,
                    warmup=int(round(sp.gate_warmup * total)))


def run_identity(hp: RunHparams, sp: SuperHparams) -> dict[str, Any]:
    """What names a SuperTickets run: the core sections (the target sparsity included: it
    shapes the whole run, unlike IMP's, which only says how far to go) and SuperHparams."""
    d = hp.identity()
    d["prune"]["target_sparsity"] = hp.prune.target_sparsity
    for key in IMP_ONLY:
        d["prune"].pop(key, None)
    d[KIND] = sp.identity()
    return d


def superticket_run(hp: RunHparams, sp: SuperHparams, root: Path) -> Run:
    """The run directory of these hparams (nothing is read or written)."""
    return Run(Path(root) / f"{KIND}-{hp.data.task}-{stable_hash(run_identity(hp, sp))}")


def check_supported(hp: RunHparams) -> None:
    defaults = {"rewind_step": 0, "keep_trained_head": False}
    for key, default in defaults.items():
        if getattr(hp.prune, key) != default:
            flag = "--" + key.replace("_", "-")
            raise TicketlabError(f"{flag} rewinds IMP's levels; a SuperTickets run is one "
                                 "training run and never rewinds.", f"Leave {flag} out.")


def unit_weights(groups: list[UnitGroup], params: dict[str, torch.Tensor]) -> list[int]:
    """Prunable weights one unit of each group holds (its rows and its columns)."""
    out = []
    for g in groups:
        n = 0
        for name in g.rows:
            p = params.get(f"{name}.weight")
            if p is not None:
                n += g.size * p[0].numel()
        p = params.get(f"{g.gated}.weight")
        if p is not None:
            n += g.size * p.shape[0] * (p[0, 0].numel() if p.dim() > 2 else 1)
        out.append(n)
    return out


def check_targets(groups: list[UnitGroup], params: dict[str, torch.Tensor], hp: RunHparams,
                  sp: SuperHparams) -> float:
    """The share of the prunable set the structural targets remove; refused above the overall
    target (the weight target counts every removed weight, structural or not)."""
    check_kinds(groups, sp.targets)
    total = sum(p.numel() for p in params.values())
    per_unit = unit_weights(groups, params)
    removed = 0
    for kind, target in sp.targets.items():
        units = [(g, w) for g, w in zip(groups, per_unit, strict=True) if g.kind == kind]
        count = sum(g.count for g, _ in units)
        if units:
            removed += math.floor(target * count + 1e-9) * (sum(w for _, w in units) // len(units))
    share = removed / max(total, 1)
    if share > hp.prune.target_sparsity + 1e-9:
        given = " and ".join(f"{KIND_BY_NAME[k].flag} {t}" for k, t in sp.targets.items() if t)
        raise TicketlabError(
            f"{given} remove{'s' if ' and ' not in given else ''} "
            f"{share:.1%} of the prunable weights, more than --target-sparsity "
            f"{hp.prune.target_sparsity} (the overall sparsity counts those weights too).",
            f"Raise --target-sparsity to at least {math.ceil(share * 100) / 100}, or lower "
            "the structural targets.")
    return share


def check_gate_lr(groups: list[UnitGroup], sp: SuperHparams) -> None:
    """``--gate-lr`` sets the learning rate of the gates the search adds; a model whose gates
    are its own parameters (a CNN's BatchNorm scales) trains them with the network, as the
    code does, so a changed ``--gate-lr`` would be ignored: refused instead."""
    default = next(f.default for f in fields(SuperHparams) if f.name == "gate_lr")
    if sp.gate_lr != default and any(g.gate is not None for g in groups):
        raise TicketlabError(
            f"--gate-lr {sp.gate_lr}: this model's gates are its own BatchNorm scales, which "
            "train with the network's weights (--lr, --optimizer), as in the code.",
            "Leave --gate-lr out (or set --lr).")


def find_superticket(hp: RunHparams, sp: SuperHparams, root: Path,
                     runtime: Runtime = Runtime(), console: Console | None = None,
                     family: Family | None = None) -> Run:
    """Run (or resume) a SuperTickets search; returns the run directory."""
    console = console or Console()
    check_supported(hp)
    ensure_writable(root)
    setup = prepare(hp, runtime, family)
    accelerator = get_accelerator(runtime)
    if accelerator.num_processes > 1:
        raise TicketlabError("A SuperTickets search runs in one process (its pruning points "
                             "and structural removals are decided on one copy of the model).",
                             "Run it without accelerate launch.")
    groups = setup.family.structural_units(setup.model)
    check_gate_lr(groups, sp)
    share = check_targets(groups, setup.prunable, hp, sp)
    plan = schedule(hp, sp, len(next(iter(setup.train_features.values()))))
    run = superticket_run(hp, sp, root)
    with run.lock():
        run.create(run_identity(hp, sp), {
            "kind": KIND, "ticketlab_version": VERSION, "fingerprint": setup.fingerprint,
            "theta0": setup.digests, "family": setup.family.name,
            "prunable": {k: list(p.shape) for k, p in setup.prunable.items()},
            "main_metric": setup.task.main_metric,
            "schedule": {"total_steps": plan.total, "interval": plan.interval,
                         "ratios": list(plan.ratios), "reach": plan.reach,
                         "gate_warmup_steps": plan.warmup, "structural_share": share}})
        check_theta0(run.read_hparams(), setup, f"run {run.path.name}")
        console.print(f"[bold]run[/bold] {escape(str(run.path))}  {plan.count} intervals of "
                      f"{plan.interval} steps; weights pruned to "
                      f"{', '.join(f'{r:.0%}' for r in plan.ratios)}")
        search = Search(setup, run, sp, plan, groups, runtime, console)
        try:
            search.run()
        finally:
            detach_gates(setup.model)
    return run


class Search:
    """The interval loop of one SuperTickets run."""

    def __init__(self, setup: Setup, run: Run, sp: SuperHparams, plan: Schedule,
                 groups: list[UnitGroup], runtime: Runtime, console: Console) -> None:
        self.setup, self.run_dir, self.sp, self.plan = setup, run, sp, plan
        self.runtime, self.console, self.hp = runtime, console, setup.hp
        self.model = setup.model
        self.base = setup.family.base_module(self.model)
        self.prefix = setup.family.base_prefix(self.model)
        self.params = setup.prunable
        self.bank: GateBank = attach_gates(self.model, groups, self.base,
                                           lr_scale=sp.gate_lr / self.hp.train.lr)
        gates = {f"{GATES}.{k}": v.detach().clone()
                 for k, v in self.bank.state_dict().items()}
        self.initial = {**setup.theta0, **gates}
        self.criterion = criterion(self.hp.prune.method)

    # --- resuming -------------------------------------------------------------------------
    def state_ok(self, k: int) -> bool:
        path = self.run_dir.level_dir(k) / STATE_FILE
        if not path.is_file():
            return False
        return self.run_dir.metrics(k).get("state_sha256") == sha256_file(path)

    def resume_point(self) -> int:
        """The interval to continue after: the last of an unbroken row of finished intervals
        whose state is present (all of them when the run is complete)."""
        last = 0
        while last < self.plan.count and self.run_dir.level_done(last + 1):
            last += 1
        if last == self.plan.count:
            return last
        for k in range(last, 0, -1):
            if self.state_ok(k):
                return k
        if last:
            self.console.print(f"interval {last}: the state to continue from is missing; "
                               "training again from the start (deterministic: same result)")
        return 0

    def run(self) -> None:
        start = self.resume_point()
        for k in range(1, start + 1):
            self.show(self.run_dir.metrics(k), stored=True)
        for k in range(start + 1, self.plan.count + 1):
            self.show(self.interval(k))
        self.cleanup(self.plan.count + 1)

    def show(self, rec: dict[str, Any], stored: bool = False) -> None:
        s = rec["structure"]
        units = "  ".join(f"{k.plural} {s[k.name]['kept']}/{s[k.name]['total']}"
                          for k in UNIT_KINDS if k.name in s)
        tag = " [dim](stored)[/dim]" if stored else ""
        self.console.print(
            f"interval {rec['level']:>2}/{self.plan.count}  steps {rec['steps'][0]}-"
            f"{rec['steps'][1]}  sparsity {rec['sparsity'] * 100:5.1f}% (structure "
            f"{rec['structural_sparsity'] * 100:.1f}%)  {units}"
            f"  {escape(rec['main_metric'])} {rec['score'] * 100:6.2f}{tag}")

    # --- one interval -----------------------------------------------------------------------
    def start_of(self, k: int) -> tuple[TrainState | None, Mask]:
        """Load what interval ``k`` starts from: θ0 with gates at 1, or interval k-1's state
        and mask (all-ones but the removed units with ``--reactivate``)."""
        if k == 1:
            self.model.load_state_dict(self.initial)
            return None, Mask.ones_like(self.params)
        d = self.run_dir.level_dir(k - 1)
        state = read_state(d / STATE_FILE)
        self.model.load_state_dict(state.pop("model"))
        if self.sp.reactivate:
            return state["train"], structural_only(
                self.params, structural_weight_mask(self.bank, self.params))
        mask = Mask.load(d / "mask.safetensors")
        mask.check_compatible(self.params, self.setup.fingerprint, source="stored mask",
                              digests=self.setup.digests)
        return state["train"], mask.for_params(self.params)

    def interval(self, k: int) -> dict[str, Any]:
        setup, hp, sp = self.setup, self.hp, self.sp
        first, stop = self.plan.steps(k)
        resume, mask = self.start_of(k)
        penalty = GatePenalty(self.bank, sp.gate_l1, self.plan.warmup, sp.penalty, start=first)
        hooks: tuple[Any, ...] = (penalty,)
        stats_collector = None
        if self.criterion.collector is not None:
            stats_collector = self.criterion.collector(self.params)
            hooks += (stats_collector,)
        method = PenalizedTraining(make_method(hp.train.adversarial, hp.train, setup), penalty)
        # the removed units' biases and BatchNorm γ/β are held at zero like pruned weights
        held = held_at_zero(self.bank, self.base, self.params)
        params = {**self.params, **{n: p for n, (p, _) in held.items()}}
        enforced = Mask({**mask.tensors, **{n: m.cpu() for n, (_, m) in held.items()}},
                        mask.meta)
        result = train(self.model, params, enforced, setup.train_features, setup.collator,
                       hp.train, self.runtime, seed=hp.train.seed,
                       description=f"interval {k}/{self.plan.count} train",
                       forward=setup.task.forward, method=method, hooks=hooks,
                       feature_keys=setup.task.feature_keys, length_key=setup.task.length_key,
                       resume=resume, stop_step=stop)
        assert result.state is not None
        rho = penalty.current_rho()
        # the pruning point: units first, then weights, both from the trained values
        wanted = removal_targets(self.bank, sp.targets, self.plan.progress(k))
        before = [u.keep.clone() for u in self.bank.units]
        removed = remove_units(self.bank, wanted, sp.threshold)
        for kind, n in cap_removals(self.bank, before, mask, self.params,
                                    self.plan.ratios[k - 1]).items():
            removed[kind] -= n  # never past this point's sparsity (see cap_removals)
        structural = structural_weight_mask(self.bank, self.params)
        mask = with_structure(mask, structural)
        structural_sparsity = structural_only(self.params, structural).sparsity
        mask.apply_(self.params)
        zero_removed(self.bank, self.base)
        stats = stats_collector.result() if stats_collector is not None else None
        mask = prune(self.params, mask, max(self.plan.ratios[k - 1], mask.sparsity),
                     hp.prune.method, seed=hp.train.seed * 1000 + k, stats=stats)
        mask.apply_(self.params)
        t0 = time.perf_counter()
        metrics = evaluate(self.model, setup.task, setup.eval_sets, setup.collator,
                           hp.train.eval_batch_size, self.runtime)
        eval_seconds = time.perf_counter() - t0
        main = setup.task.main_metric
        record = {
            "kind": KIND, "level": k, "interval": k, "steps": [first, stop],
            "target_sparsity": self.plan.ratios[k - 1], "sparsity": mask.sparsity,
            "structural_sparsity": structural_sparsity, "main_metric": main,
            "score": metrics[main], "metrics": metrics,
            "sparsity_by_role": role_sparsity(setup, mask),
            "sparsity_by_matrix": mask.per_tensor_sparsity(),
            "structure": gate_summary(self.bank), "removed": removed, "rho": rho,
            "train": {"steps": result.steps, "epochs": result.epochs,
                      "loss": result.train_loss, "seconds": result.seconds,
                      "cpu_seconds": result.cpu_seconds,
                      "examples_per_second": result.examples_per_second},
            "eval_seconds": eval_seconds,
        }
        self.write(k, mask, result.state, record)
        return self.run_dir.metrics(k)

    def write(self, k: int, mask: Mask, state: TrainState, record: dict[str, Any]) -> None:
        """The interval's files, the state to continue from, then ``metrics.json`` last."""
        d = self.run_dir.level_dir(k)
        hp = self.hp
        mask.save(d / "mask.safetensors", {**self.setup.mask_meta(), "task": hp.data.task,
                                           "level": k, "run": self.run_dir.path.name,
                                           "kind": KIND, "hparams": hp.identity()})
        atomic_write_json(d / STRUCTURE_FILE, self.bank.structure())
        files = ["mask.safetensors", STRUCTURE_FILE]
        if self.runtime.save_weights or k == self.plan.count:
            plain = fold_gates(self.model.state_dict(), self.bank, self.prefix)
            atomic_write_bytes(d / "model.safetensors", save_bytes(
                {n: t.detach().cpu().contiguous() for n, t in plain.items()}))
            files.append("model.safetensors")
        write_state(d / STATE_FILE, self.model.state_dict(), state)
        record["state_sha256"] = sha256_file(d / STATE_FILE)
        self.run_dir.finish_level(k, record, files)
        self.cleanup(k)

    def cleanup(self, upto: int) -> None:
        """Delete the states of intervals before ``upto`` (only the newest is ever resumed
        from; each is ~3x the model's size). Called after a newer interval is finished."""
        for j in range(1, min(upto, self.plan.count + 1)):
            (self.run_dir.level_dir(j) / STATE_FILE).unlink(missing_ok=True)


# --- the state file ---------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def write_state(path: Path, model_state: dict[str, torch.Tensor], state: TrainState) -> None:
    """Model (gates included), optimizer and schedule state and RNG in one safetensors file;
    the optimizer's non-tensor parts and the schedule go in its JSON header."""
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
    opt = state.optimizer
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in opt["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng"] = state.rng.contiguous()
    header = {"step": state.step, "param_groups": opt["param_groups"], "scalars": scalars,
              "scheduler": state.scheduler}
    atomic_write_bytes(path, save_bytes(tensors, metadata={
        "ticketlab": json.dumps(header, default=_json_default, sort_keys=True)}))


def read_state(path: Path) -> dict[str, Any]:
    """:func:`write_state`'s file as ``{"model": state dict, "train": TrainState}``."""
    from safetensors import safe_open

    try:
        blob = path.read_bytes()
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["ticketlab"])
        tensors = load_bytes(blob)
    except Exception as e:  # safetensors and json raise several types for damaged files
        raise TicketlabError(f"The interval state {path} is missing or damaged.",
                             "Rerun the same command: the interval is trained again.") from e
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    per_param: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, index, name = k.split("/", 2)
            per_param.setdefault(int(index), {})[name] = v
    for index, entries in header["scalars"].items():
        per_param.setdefault(int(index), {}).update(entries)
    optimizer = {"state": per_param, "param_groups": header["param_groups"]}
    return {"model": model,
            "train": TrainState(step=int(header["step"]), optimizer=optimizer,
                                scheduler=header["scheduler"], rng=tensors["rng"])}
