"""Fine-tune a stored ticket with the Hugging Face Trainer (a run_glue.py-style script).

Everything here is plain transformers + datasets; ticketlab contributes one line — the
callback that keeps the mask enforced (pruned weights exactly zero, their gradients zeroed
before clipping, re-zeroed after every optimizer step)::

    trainer = Trainer(..., callbacks=[TicketMaskCallback(mask_path)])

Run it on a mask from any ticketlab run (``ticketlab show RUN`` lists the levels)::

    python examples/finetune_ticket_with_trainer.py \\
        --model_name_or_path minilm --mask ~/.ticketlab/runs/sst2-…/level_3/mask.safetensors \\
        --train_file ../shared/data/glue/SST-2/train.tsv \\
        --validation_file ../shared/data/glue/SST-2/dev.tsv \\
        --output_dir out/sst2-ticket --learning_rate 2e-5 --per_device_train_batch_size 32 \\
        --num_train_epochs 3 --max_seq_length 128 --seed 0

It gets the score ``ticketlab finetune --task sst2 --mask … --lr 2e-5 --batch-size 32
--epochs 3 --max-length 128 --seed 0`` gets, within seed-to-seed noise: the head starts from
the same draw (both seed the RNG the same way just before ``from_pretrained``), the loss,
optimizer (AdamW, no decay on biases and LayerNorms), linear schedule and clipping are the
same, but the Trainer's random data order and dropout draws are its own
(tests/test_hf_trainer.py measures it). The output folder is a standard HF model (the pruned
weights are zeros) plus ``ticket_results.json``.
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ticketlab.hf import TicketMaskCallback, mask_parameters


@dataclass
class TicketArguments:
    model_name_or_path: str = field(metadata={"help": "θ0: a model folder, hub id, or "
                                                      "'minilm' (ticketlab's offline MiniLM)."})
    mask: str = field(metadata={"help": "A ticketlab mask.safetensors (a run's level_K/)."})
    train_file: str = field(metadata={"help": "Training data: .tsv, .csv or .json."})
    validation_file: str = field(metadata={"help": "Evaluation data: .tsv, .csv or .json."})
    text_column: str = field(default="sentence")
    text_pair_column: str | None = field(default=None)
    label_column: str = field(default="label")
    max_seq_length: int = field(default=128)
    max_train_samples: int | None = field(default=None, metadata={"help": "The first N."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "The first N."})
    allow_different_weights: bool = field(default=False, metadata={
        "help": "Use the mask on other pre-trained weights than it was found on."})


def load_split(path: str, limit: int | None):
    suffix = Path(path).suffix
    if suffix in (".tsv", ".csv"):
        data = load_dataset("csv", data_files=path, split="train",
                            delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
    else:
        data = load_dataset("json", data_files=path, split="train")
    return data.select(range(min(limit, len(data)))) if limit else data


def model_path(name: str) -> str:
    if name == "minilm":  # the offline MiniLM-L6 that ticketlab ships a path to
        from ticketlab.families.text import resolve_model_path

        return resolve_model_path(name)
    return name


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((TicketArguments, TrainingArguments))
    ticket, args = parser.parse_args_into_dataclasses(argv)
    train = load_split(ticket.train_file, ticket.max_train_samples)
    dev = load_split(ticket.validation_file, ticket.max_eval_samples)
    labels = sorted(set(train[ticket.label_column]))
    label_id = {v: i for i, v in enumerate(labels)}

    path = model_path(ticket.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def tokenize(batch):
        pair = batch[ticket.text_pair_column] if ticket.text_pair_column else None
        out = tokenizer(batch[ticket.text_column], pair, truncation=True,
                        max_length=ticket.max_seq_length)
        out["labels"] = [label_id[v] for v in batch[ticket.label_column]]
        return out

    columns = train.column_names
    train = train.map(tokenize, batched=True, remove_columns=columns)
    dev = dev.map(tokenize, batched=True, remove_columns=dev.column_names)

    set_seed(args.seed)  # before from_pretrained: the new head is drawn from this seed
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))

    def accuracy(pred) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    callback = TicketMaskCallback(ticket.mask, check_weights=not ticket.allow_different_weights)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      processing_class=tokenizer, compute_metrics=accuracy,
                      callbacks=[callback])
    trainer.train()
    metrics = trainer.evaluate()
    params = mask_parameters(model, callback.mask)
    pruned = sum(int((~callback.mask.tensors[n]).sum()) for n in params)
    nonzero = sum(int((p.detach().cpu()[~callback.mask.tensors[n]] != 0).sum())
                  for n, p in params.items())
    results = {**metrics, "sparsity": callback.mask.sparsity, "pruned_weights": pruned,
               "pruned_weights_not_zero": nonzero}
    trainer.save_model(args.output_dir)
    Path(args.output_dir, "ticket_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
