"""How much faster a SuperTicket is: the same forward pass, timed side by side in one process.

Four variants of one ticket, interleaved call by call (``ticketlab.commands.ship.time_pair``,
the best of ``reps``): the full-size model in plain PyTorch (what a dense engine does with any
unstructured ticket: zeros cost as much as weights), the physically smaller model in plain
PyTorch (heads and neurons, or a CNN's channels, deleted: faster on every engine), the smaller
model with its remaining unstructured sparsity on ticketlab's kernels
(``accelerate_ticket``), and — for reference — an unstructured ticket on those kernels (an IMP
level of the same sparsity when one is given, else this ticket at full size). Inputs are the
core bench's (``ticketlab.commands.ship.bench_inputs``): tokens, or images of the run's size.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ticketlab.supertickets.physical import load_structured, physical_size, shrink


def bench_superticket(run_ref: str | Path, root: Path | None = None, *,
                      imp: tuple[str | Path, int] | None = None,
                      batch_sizes: tuple[int, ...] = (1, 32), seq_len: int = 128,
                      threads: tuple[int, ...] | None = None, reps: int = 5,
                      level: int | None = None) -> dict[str, Any]:
    """Latency of the four variants at each (threads, batch). Returns the rows and sizes."""
    from ticketlab.commands.ship import bench_inputs, time_pair
    from ticketlab.sparse import accelerate_ticket

    ticket, groups, keep = load_structured(run_ref, root, level)
    full = ticket.model.eval()
    small = copy.deepcopy(full)
    shrink(small.base_model, groups, keep)
    small.eval()
    if imp is not None:
        reference, ref_name = imp_reference(imp[0], imp[1], root, ticket.info)
    else:
        reference = full
        ref_name = "full size + sparse kernels"
    thread_counts = list(threads or sorted({1, torch.get_num_threads()}))
    inputs, shape, tokens = bench_inputs(ticket, list(batch_sizes), seq_len)
    fast_small = accelerate_ticket(small, tokens=tokens, threads=thread_counts)
    fast_ref = accelerate_ticket(reference, tokens=tokens, threads=thread_counts)
    rows = []
    original = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for th in thread_counts:
                torch.set_num_threads(th)
                for b in batch_sizes:
                    batch = inputs[b]
                    want = full(**batch).logits
                    diff = max(float((m(**batch).logits - want).abs().max())
                               for m in (small, fast_small))
                    fns = {name: (lambda m=m, x=batch: m(**x)) for name, m in (
                        ("dense", full), ("structured", small),
                        ("structured+sparse", fast_small), ("reference", fast_ref))}
                    t = time_pair(fns, reps)
                    clock = "cpu" if th == 1 else "wall"
                    dense = t["dense"][clock]
                    rows.append({
                        "threads": th, "batch": b, "seq_len": seq_len, "input": shape,
                        "clock": clock,
                        **{f"{k}_ms": v[clock] * 1e3 for k, v in t.items()},
                        **{f"{k}_speedup": dense / v[clock] for k, v in t.items()
                           if k != "dense"},
                        "max_abs_logit_diff": diff})
    finally:
        torch.set_num_threads(original)
    return {"rows": rows, "reference": ref_name,
            "parameters": {"full": physical_size(full), "structured": physical_size(small)},
            "run": ticket.info["run"], "level": ticket.info["level"],
            "sparsity": ticket.mask.sparsity}


def imp_reference(run_ref: str | Path, level: int, root: Path | None,
                  info: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """The IMP ticket to time beside the SuperTicket: the level's trained model, or — for a run
    stored without trained weights (a sweep's IMP runs are) — θ0 with the level's mask
    applied. The sparse kernels' speed depends only on where the zeros are, so the second is
    timed exactly like the first; only its logits differ, and they are not compared.

    The IMP run must have been found on the SuperTicket's model (``info["model"]``): the bench
    feeds both the same inputs, and a speed-up against another architecture means nothing. Its
    mask is checked against θ0 (names, shapes, weights) before it is applied."""
    from ticketlab.errors import TicketlabError
    from ticketlab.export import _run_hparams, load_level
    from ticketlab.hf import mask_parameters
    from ticketlab.masks import Mask
    from ticketlab.models import fingerprint, load_model, tensor_digests
    from ticketlab.store import default_root, find_run
    from ticketlab.tasks import get_task

    run = find_run(str(run_ref), root or default_root())
    hp = _run_hparams(run.read_hparams())
    model_ref = hp["model"]["model"]
    if str(model_ref) != str(info["model"]):
        raise TicketlabError(
            f"IMP run {run.path.name} was found on {model_ref!r}, the SuperTicket on "
            f"{info['model']!r}: the bench times both on the same inputs.",
            "Pass --imp RUN:LEVEL of an IMP run on the SuperTicket's model, or leave --imp out.")
    if level not in run.levels() or (run.level_dir(level) / "model.safetensors").is_file():
        # trained weights, or an unfinished level: load_level's own error says which
        return load_level(run.path, level, root).model.eval(), f"IMP level {level} + sparse kernels"
    head = get_task(hp["data"]["task"]).head
    model = load_model(model_ref, head, info["num_labels"] if head == info["head"] else 2,
                       trust_remote_code=bool(hp["model"].get("trust_remote_code", False)))
    mask = Mask.load(run.level_dir(level) / "mask.safetensors")
    params = mask_parameters(model, mask)  # names and shapes
    mask.check_compatible(params, fingerprint(params), source=f"IMP level {level}'s mask",
                          digests=tensor_digests(model.base_model.state_dict()))
    mask.apply_(params)
    return model.eval(), f"IMP level {level}'s mask on θ0 + sparse kernels"
