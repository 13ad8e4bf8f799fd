"""Cost of an adversarial training step, as a ratio to a standard step, side by side.

What is measured
----------------
One optimizer step of ticketlab's real training loop (``ticketlab.train.train`` with
``max_steps``), on the same model, data and batches, with each training method of
``ticketlab.methods``: ``none`` (standard), ``pgd`` (PGD-K: K attack passes of forward and
input-gradient, then the training pass), ``fgsm-rs`` (one attack pass) and ``freelb`` (K
ascent passes, each also back-propagated into the parameters). Methods are interleaved in
rounds (none, pgd, fgsm-rs, freelb, none, ...), each round a fresh model at θ0; the median
per-step time is reported in wall time and in the process's CPU time (the machine is shared:
CPU time is what another process's load does not inflate), with the ratio to ``none``.

Defaults: MiniLM-L6 on real SST-2 sentences (batch 32, 128 tokens: the README's step) with the
text defaults (embedding PGD in an L2 ball of 0.2 per token). ``--model mobilenet_v2 --task
cifar10`` measures the CNN case (batch 64, 32 px; ε 8/255) once the vision family is installed.

Run: ``python benchmarks/bench_adversarial_step.py [--quick] [--steps-k 3]``.
"""

from __future__ import annotations

# isort: off
from _common import DEFAULT_DATA_DIR  # first: sets the environment
# isort: on

import argparse
import statistics
import time
from pathlib import Path

import torch

from ticketlab.hparams import Runtime, build_hparams
from ticketlab.methods import make_method
from ticketlab.prepare import prepare
from ticketlab.train import train

METHODS = ("none", "pgd", "fgsm-rs", "freelb")


def one_step(setup, theta0: dict, method: str, adv: dict, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per optimizer step of ``steps`` steps with ``method``."""
    import dataclasses

    hp = dataclasses.replace(setup.hp.train, max_steps=steps, adversarial=method, **adv)
    setup.model.load_state_dict(theta0)
    wall, cpu = time.perf_counter(), time.process_time()
    train(setup.model, setup.prunable, None, setup.train_features, setup.collator, hp,
          Runtime(progress=False), seed=0, forward=setup.task.forward,
          method=make_method(method, hp, setup), feature_keys=setup.task.feature_keys,
          length_key=setup.task.length_key)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--batch", type=int, default=None, help="default: 32 text, 64 images")
    parser.add_argument("--steps-k", type=int, default=3, help="attack steps K (PGD-K)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps = 1, 2
    torch.set_num_threads(args.threads)
    text = args.task not in ("cifar10", "cifar100")
    batch = args.batch or (32 if text else 64)
    values = {"model": args.model, "data_dir": str(args.data_dir), "batch_size": batch,
              "max_train_samples": batch * args.steps, "max_eval_samples": 8,
              "group_by_length": False, "adversarial": "pgd"}
    if text:
        values["max_length"] = 128
    hp = build_hparams(args.task, values)
    setup = prepare(hp)
    if text:  # every sentence padded to the full 128 tokens: the README's step size
        setup.collator = _padded(setup.collator, 128)
    theta0 = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    adv = {"adv_steps": args.steps_k}
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    one_step(setup, theta0, "none", adv, 1)  # warm-up
    for _ in range(args.rounds):
        for method in METHODS:
            times[method].append(one_step(setup, theta0, method, adv, args.steps))
    base_wall = statistics.median(t[0] for t in times["none"])
    base_cpu = statistics.median(t[1] for t in times["none"])
    print(f"{args.model} on {args.task}: batch {batch}, attack steps K={args.steps_k}, "
          f"ε={hp.train.adv_eps} ({hp.train.adv_norm}), {args.threads} thread(s), "
          f"{args.rounds} interleaved round(s) of {args.steps} step(s)")
    print(f"{'method':<10} {'wall s/step':>12} {'CPU s/step':>11} {'ratio (wall)':>13} "
          f"{'ratio (CPU)':>12}")
    for method in METHODS:
        wall = statistics.median(t[0] for t in times[method])
        cpu = statistics.median(t[1] for t in times[method])
        print(f"{method:<10} {wall:>12.3f} {cpu:>11.3f} {wall / base_wall:>12.2f}x "
              f"{cpu / base_cpu:>11.2f}x")
    return 0


def _padded(collator, length: int):
    """The task's collator, padding every batch to ``length`` tokens."""
    def collate(features):
        batch = collator(features)
        pad = length - batch["input_ids"].shape[1]
        if pad > 0:
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in batch:
                    batch[key] = torch.nn.functional.pad(batch[key], (0, pad))
        return batch

    return collate


if __name__ == "__main__":
    raise SystemExit(main())
