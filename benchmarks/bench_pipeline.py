"""Training throughput of ticketlab's data pipeline vs the paper code's "seed" pipeline.

What is measured
----------------
Examples per second of ticketlab's real training loop, ``ticketlab.train.train()``, fine-tuning
MiniLM-L6 (sequence classification, batch 32, AdamW, clipping 1.0) on the first ``--examples``
real SST-2 training sentences, for the same number of optimizer steps, with two data pipelines:

``ticketlab``  ``task.featurize`` (tokenised, truncated to 128, *not* padded) + ``task.collator``
               (pads each batch to its longest member) + ``LengthGroupedSampler``
               (``TrainHparams.group_by_length=True``: batches of similar lengths).
``seed``       the paper's code: the tokenizer with ``padding="max_length", max_length=128``
               (every example 128 tokens), ``transformers.default_data_collator`` and a plain
               ``RandomSampler`` (``group_by_length=False``).

Both sides run the *same* loop (``train()``, no mask, same model, same θ0 restored before each
run, same seed), so the ratio isolates the pipeline: how many padding tokens the model has to
push through. SST-2 sentences are short (~13 tokens on average), so padding everything to 128
wastes most of the compute. ``train()`` measures its own ``examples_per_second`` over the
training loop (data loading and collation included, featurisation done beforehand on both
sides). The collators are wrapped to record each batch's padded length and real-token count.

Why the default step count is 16 (quick: 4): ``LengthGroupedSampler`` sorts every "megabatch"
(here 8 batches for 1,024 examples, 2 for 256) by length, longest first. Stopping in the middle
of a megabatch would time only its longest batches and understate ticketlab's speed, so the
steps cover whole megabatches; a warning is printed when ``--steps`` does not.

How: one warm-up run per variant, then the variants are interleaved (ticketlab, seed, seed,
ticketlab, ...) in ``--rounds`` rounds; medians are reported. Target: ticketlab >= 3x seed.

Run: ``python benchmarks/bench_pipeline.py [--quick]`` from anywhere.
"""

from __future__ import annotations

# isort: off
from _common import DEFAULT_DATA_DIR, resolve_sst2_dir  # first: sets the environment
# isort: on

import argparse
import copy
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import default_data_collator

from ticketlab.hparams import TrainHparams
from ticketlab.models import load_model, load_tokenizer, prunable_parameters
from ticketlab.tasks import DataSource, get_task
from ticketlab.train import Runtime, TrainResult, train

MAX_LENGTH = 128



class RecordingCollator:
    """Wrap a collator and record each batch's padded length and number of real tokens."""

    def __init__(self, inner: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.inner = inner
        self.padded_lengths: list[int] = []
        self.real_tokens: list[int] = []
        self.total_tokens: list[int] = []

    def reset(self) -> None:
        self.padded_lengths.clear()
        self.real_tokens.clear()
        self.total_tokens.clear()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        self.padded_lengths.append(int(ids.shape[1]))
        self.real_tokens.append(int(attn.sum()))
        self.total_tokens.append(int(ids.numel()))
        return batch


@dataclass
class Pipeline:
    name: str
    features: dict[str, list]
    collator: RecordingCollator
    group_by_length: bool
    results: list[TrainResult] = field(default_factory=list)
    padded_lengths: list[float] = field(default_factory=list)
    real_fraction: list[float] = field(default_factory=list)


def seed_features(examples: list[dict[str, Any]], tokenizer: Any) -> dict[str, list]:
    """The paper code's featurisation: every example padded to ``max_length`` up front."""
    enc = tokenizer([ex["text_a"] for ex in examples], padding="max_length", truncation=True,
                    max_length=MAX_LENGTH)
    features = {k: list(v) for k, v in enc.items()}
    features["labels"] = [int(ex["label"]) for ex in examples]
    return features


def megabatch_batches(num_examples: int, batch_size: int) -> int:
    """Batches per LengthGroupedSampler megabatch (transformers' default mega_batch_mult)."""
    return max(1, min(num_examples // (batch_size * 4), 50))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 256 examples, 4 steps per run")
    parser.add_argument("--examples", type=int, default=None,
                        help="first N SST-2 train sentences (default 1024, quick 256)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per run (default 16, quick 4)")
    parser.add_argument("--rounds", type=int, default=2, help="measured runs per variant")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"GLUE root or SST-2 folder (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    n = args.examples if args.examples is not None else (256 if args.quick else 1024)
    steps = args.steps if args.steps is not None else (4 if args.quick else 16)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    task = get_task("sst2")
    examples = task.load(DataSource(resolve_sst2_dir(args.data_dir)), "train")[:n]
    tokenizer = load_tokenizer("minilm")
    pipelines = [
        Pipeline("ticketlab", task.featurize(examples, tokenizer, MAX_LENGTH, "train"),
                 RecordingCollator(task.collator(tokenizer)), group_by_length=True),
        Pipeline("seed", seed_features(examples, tokenizer),
                 RecordingCollator(default_data_collator), group_by_length=False),
    ]
    model = load_model("minilm", "sequence-classification", num_labels=2, seed=0)
    theta0 = copy.deepcopy(model.state_dict())
    prunable = prunable_parameters(model)
    runtime = Runtime(progress=False, save_weights=False)

    def run(p: Pipeline, max_steps: int) -> TrainResult:
        model.load_state_dict(theta0)
        p.collator.reset()
        hp = TrainHparams(max_steps=max_steps, batch_size=args.batch_size,
                          group_by_length=p.group_by_length)
        return train(model, prunable, None, p.features, p.collator, hp, runtime, seed=0,
                     description=p.name)

    lengths = [len(x) for x in pipelines[0].features["input_ids"]]
    mb = megabatch_batches(n, args.batch_size)
    log(f"MiniLM-L6 sequence classification on the first {n} SST-2 train sentences "
        f"(tokens: mean {statistics.mean(lengths):.1f}, max {max(lengths)}), batch "
        f"{args.batch_size}, {steps} optimizer steps per run")
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
        f"{os.getloadavg()[0]:.2f}; LengthGroupedSampler megabatch = {mb} batches")
    if steps % mb:
        log(f"warning: {steps} steps is not a whole number of megabatches ({mb} batches): the "
            "ticketlab runs see the longest batches of a partial megabatch, a pessimistic sample")
    if steps * args.batch_size > n:
        log(f"note: {steps} x {args.batch_size} > {n} examples, so runs go past one epoch")

    for p in pipelines:  # warm-up: allocator, thread pools, first-call overheads
        run(p, 1 if args.quick else 2)
    log("warm-up done")
    for r in range(args.rounds):
        order = pipelines if r % 2 == 0 else pipelines[::-1]
        for p in order:
            result = run(p, steps)
            p.results.append(result)
            c = p.collator
            p.padded_lengths.append(statistics.mean(c.padded_lengths))
            p.real_fraction.append(sum(c.real_tokens) / sum(c.total_tokens))
            log(f"  round {r + 1}/{args.rounds} {p.name:<9}: {result.examples_per_second:7.1f} "
                f"ex/s ({result.steps} steps in {result.seconds:.1f} s, mean padded length "
                f"{p.padded_lengths[-1]:.1f})")

    med = {p.name: statistics.median(x.examples_per_second for x in p.results) for p in pipelines}
    log("")
    runs = " ".join(f"{'run ' + str(i + 1):>9}" for i in range(args.rounds))
    log(f"{'pipeline':<11}{runs}{'median ex/s':>13}{'s/step':>8}{'padded len':>12}"
        f"{'real tokens':>13}")
    for p in pipelines:
        per_run = " ".join(f"{x.examples_per_second:>9.1f}" for x in p.results)
        s_step = statistics.median(x.seconds / x.steps for x in p.results)
        log(f"{p.name:<11}{per_run}{med[p.name]:>13.1f}{s_step:>8.3f}"
            f"{statistics.mean(p.padded_lengths):>12.1f}"
            f"{100 * statistics.mean(p.real_fraction):>12.1f}%")
    ratio = med["ticketlab"] / med["seed"]
    verdict = "meets" if ratio >= 3.0 else "misses"
    log("")
    log(f"HEADLINE: ticketlab pipeline / seed pipeline throughput = {ratio:.2f}x "
        f"({verdict} the >= 3x target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
