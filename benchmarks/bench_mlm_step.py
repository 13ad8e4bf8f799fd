"""Cost of a masked-language-modelling step: scores at every position vs at masked ones only.

What is measured
----------------
The wall time of one training step (forward + backward + AdamW) of MiniLM-L6 with a BERT MLM
head on real WikiText-2 blocks (``--batch`` x ``--block`` tokens, 15 % masked by ticketlab's
collator), two ways:

``full``    ``model(**batch).loss``: transformers computes hidden x vocabulary scores at every
            position (384 x 30,522 per token for MiniLM) and the loss ignores 85 % of them.
``masked``  ``ticketlab.tasks.mlm.masked_positions_forward``: a pre-hook on the output layer
            keeps only the masked rows, so the scores are (masked tokens x vocabulary).

Both variants are two copies of the same model (same weights, same AdamW); steps are
interleaved (full, masked, masked, full, ...) on the same batches, medians are reported.
Before timing, the benchmark checks that the two give the same loss and gradients on a batch.

Run: ``python benchmarks/bench_mlm_step.py [--quick]`` from anywhere.
"""

from __future__ import annotations

# isort: off
from _common import REPO_ROOT  # first: sets the environment
# isort: on

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch

from ticketlab.models import load_model, load_tokenizer
from ticketlab.tasks import DataSource
from ticketlab.tasks.mlm import MlmTask, masked_positions_forward

DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "wikitext" / "wikitext-2"


def batches(text_dir: Path, batch: int, block: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` training batches of real WikiText-2 blocks, masked by the task's collator."""
    task = MlmTask()
    task.block_size = block
    tokenizer = load_tokenizer("minilm")
    lines = task.load(DataSource(text_dir), "train")[:4000]
    features = task.featurize(lines, tokenizer, block, "train")
    collate = task.collator(tokenizer)
    torch.manual_seed(0)
    rows = [{k: v[i] for k, v in features.items()} for i in range(batch * count)]
    return [collate(rows[i * batch:(i + 1) * batch]) for i in range(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_TEXT,
                        help=f"WikiText folder (default {DEFAULT_TEXT})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds

    data = batches(args.data_dir, args.batch, args.block, rounds + 1)
    base = load_model("minilm", "masked-lm", 0, seed=0)  # head drawn fresh: MiniLM has none
    models = {"full": base, "masked": copy.deepcopy(base)}
    forwards = {"full": lambda m, b: m(**b), "masked": masked_positions_forward}
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for k, m in models.items()}

    check = {k: forwards[k](m, data[0]) for k, m in models.items()}
    for out in check.values():
        out.loss.backward()
    grads = {k: torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
             for k, m in models.items()}
    loss_diff = abs(check["full"].loss.item() - check["masked"].loss.item())
    grad_diff = (grads["full"] - grads["masked"]).abs().max().item()
    assert loss_diff < 1e-4 and grad_diff < 1e-4, (loss_diff, grad_diff)
    for m in models.values():
        m.zero_grad(set_to_none=True)

    def step(name: str, batch: dict[str, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        loss = forwards[name](models[name], batch).loss
        loss.backward()
        optims[name].step()
        optims[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up
        step(name, data[0])
    times: dict[str, list[float]] = {"full": [], "masked": []}
    for r in range(rounds):
        order = ("full", "masked") if r % 2 == 0 else ("masked", "full")
        for name in order:
            times[name].append(step(name, data[r + 1]))
    full, masked = statistics.median(times["full"]), statistics.median(times["masked"])
    masked_tokens = int((data[1]["labels"] != -100).sum())
    print(f"MiniLM-L6 MLM step, batch {args.batch} x {args.block} tokens ({masked_tokens} masked "
          f"in the first timed batch), {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; same loss (|Δ| {loss_diff:.1e}) and gradients "
          f"(max |Δ| {grad_diff:.1e})")
    print(f"scores at every position: {full * 1000:8.1f} ms a step (median of {rounds})")
    print(f"scores at masked only:    {masked * 1000:8.1f} ms a step")
    print(f"speed-up: {full / masked:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
