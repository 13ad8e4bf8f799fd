"""A ticket inside the Hugging Face Trainer (issue 15.8): TicketMaskCallback with the real
Trainer keeps the pruned weights exactly zero under weight decay and clipping, the gradients
clipping sees are zero on them, and the example script gets ticketlab finetune's score."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from ticketlab.errors import TicketlabError
from ticketlab.hf import TicketMaskCallback, mask_parameters
from ticketlab.masks import Mask
from ticketlab.models import fingerprint, prunable_parameters
from ticketlab.pruning import prune

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_ticket_with_trainer.py"


class Rows(torch.utils.data.Dataset):
    """Random token ids with labels: what the Trainer's default collator stacks."""

    def __init__(self, n: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, vocab, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] % 2).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
                "labels": self.labels[i]}


def theta0(path: Path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def half_mask(model, tmp_path: Path) -> Path:
    """A 50 % magnitude mask of θ0's prunable set, saved as ticketlab saves masks."""
    params = prunable_parameters(model, prune_pooler=True)
    mask = prune(params, Mask.ones_like(params), 0.5)
    path = tmp_path / "mask.safetensors"
    mask.save(path, {"fingerprint": fingerprint(params), "task": "sst2", "level": 5})
    return path


class ClipSpy(Trainer):
    """Records, at every clip, the largest |gradient| of a pruned weight and the norm."""

    def __init__(self, *a, pruned: dict, **kw) -> None:
        super().__init__(*a, **kw)
        self.pruned, self.seen = pruned, []

    def _clip_grad_norm(self, model):
        worst = max(float(p.grad[~keep].abs().max()) for p, keep in self.pruned.values())
        norm = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]))
        self.seen.append((worst, float(norm)))
        return super()._clip_grad_norm(model)


def train_with(model, tmp_path: Path, callbacks: list, pruned: dict) -> ClipSpy:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, learning_rate=5e-3,
                             per_device_train_batch_size=8, weight_decay=0.1,
                             max_grad_norm=0.05, gradient_accumulation_steps=2,
                             save_strategy="no", logging_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = ClipSpy(model=model, args=args, train_dataset=Rows(96, model.config.vocab_size),
                      callbacks=callbacks, pruned=pruned)
    trainer.train()
    return trainer


def test_the_callback_keeps_pruned_weights_zero_under_decay_and_clipping(tiny_bert_dir,
                                                                         tmp_path) -> None:
    model = theta0(tiny_bert_dir)
    path = half_mask(model, tmp_path)
    callback = TicketMaskCallback(path)
    mask = Mask.load(path)
    params = mask_parameters(model, mask)
    before = {n: p.detach().clone() for n, p in params.items()}
    pruned = {n: (p, mask.tensors[n]) for n, p in params.items()}
    trainer = train_with(model, tmp_path, [callback], pruned)

    assert len(trainer.seen) == 6  # clipped at every optimizer step (norm 0.05 is tiny)
    assert all(worst == 0.0 for worst, _ in trainer.seen)  # zero before clipping
    assert all(norm > 0.05 for _, norm in trainer.seen)  # so clipping really acted
    for n, p in params.items():
        keep = mask.tensors[n]
        assert (p.detach()[~keep] == 0).all(), n  # exactly zero after decay and clipping
        assert not torch.equal(p.detach()[keep], before[n][keep]), n  # the rest trained
    assert callback._handles == []  # hooks removed at the end; the zeros stay
    assert abs(1 - sum(int(mask.tensors[n].sum()) for n in params)
               / sum(p.numel() for p in params.values()) - 0.5) < 1e-3


def test_without_the_callback_zeroed_weights_move(tiny_bert_dir, tmp_path) -> None:
    """The control: zeroing the weights once is not enough — AdamW moves them as soon as
    their gradients are not masked (so the test above has teeth)."""
    model = theta0(tiny_bert_dir)
    mask = Mask.load(half_mask(model, tmp_path))
    params = mask_parameters(model, mask)
    mask.apply_(params)
    pruned = {n: (p, mask.tensors[n]) for n, p in params.items()}
    trainer = train_with(model, tmp_path, [], pruned)
    assert trainer.seen[0][0] > 0  # clipping saw the pruned weights' gradients
    assert any((p.detach()[~mask.tensors[n]] != 0).any() for n, p in params.items())


def test_a_mask_for_other_weights_or_architecture_is_refused(tiny_bert_dir, tmp_path) -> None:
    model = theta0(tiny_bert_dir)
    path = half_mask(model, tmp_path)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)
    with pytest.raises(TicketlabError, match="other pre-trained weights"):
        TicketMaskCallback(path).attach(model)
    TicketMaskCallback(path, check_weights=False).attach(model)  # a deliberate transfer
    wrong = Mask({"encoder.layer.9.output.dense.weight": torch.ones(4, 4, dtype=torch.bool)})
    with pytest.raises(TicketlabError, match="does not have"):
        mask_parameters(model, wrong)


def run_example(output_dir: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(EXAMPLE), "--output_dir", str(output_dir), *args],
                         capture_output=True, text=True, check=False, cwd=ROOT, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((output_dir / "ticket_results.json").read_text())


def test_the_example_runs_and_draws_the_head_ticketlab_draws(tiny_bert_dir, glue_dir,
                                                              tmp_path) -> None:
    """The example on the tiny BERT: zeros kept, a standard HF folder written; and the head
    it starts from is the one `ticketlab finetune` starts from (same seed, same draw)."""
    from transformers import set_seed

    from ticketlab.families.text import TextEncoderFamily

    model = theta0(tiny_bert_dir)
    path = half_mask(model, tmp_path)
    sst2 = glue_dir / "SST-2"
    result = run_example(
        tmp_path / "hf", "--model_name_or_path", str(tiny_bert_dir), "--mask", str(path),
        "--train_file", str(sst2 / "train.tsv"), "--validation_file", str(sst2 / "dev.tsv"),
        "--max_train_samples", "48", "--max_eval_samples", "16", "--max_seq_length", "32",
        "--learning_rate", "1e-3", "--per_device_train_batch_size", "16",
        "--num_train_epochs", "1", "--seed", "3", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true")
    assert result["pruned_weights_not_zero"] == 0 and 0 < result["eval_accuracy"] <= 1
    assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    mask = Mask.load(path)
    assert all((p[~mask.tensors[n]] == 0).all()
               for n, p in mask_parameters(saved, mask).items())
    ours = TextEncoderFamily().load(str(tiny_bert_dir), "sequence-classification", 2, 3).model
    set_seed(3)
    theirs = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    assert torch.equal(ours.classifier.weight, theirs.classifier.weight)


@pytest.mark.integration
@pytest.mark.slow
def test_the_example_matches_ticketlab_finetune_within_seed_noise(glue_dir, tmp_path) -> None:
    """examples/finetune_ticket_with_trainer.py against `ticketlab finetune` on the same
    ticket, data, hparams and seed (MiniLM-L6, 512 SST-2 sentences, dev 400).

    What "within noise" means here: the two differ only in the Trainer's own data order and
    dropout draws (same θ0, same head draw, same optimizer, schedule and clipping), which is
    what changing ticketlab's --seed changes too. So the Trainer's score must lie within the
    spread of ticketlab's own scores over three seeds: |Trainer − mean| ≤ 3 std + 1 point
    (the point covers the std of three values underestimating the true one)."""
    from rich.console import Console

    from ticketlab.hparams import build_hparams
    from ticketlab.imp import find_ticket, finetune
    from ticketlab.train import Runtime

    quiet = Runtime(progress=False, save_weights=False)
    common = {"model": "minilm", "data_dir": str(glue_dir), "max_train_samples": 512,
              "max_eval_samples": 400, "max_length": 64, "lr": 1e-4, "batch_size": 32,
              "epochs": 1.0, "group_by_length": False}
    ticket = find_ticket(build_hparams("sst2", {**common, "target_sparsity": 0.3, "rate": 0.3,
                                                "max_steps": 4, "prune_pooler": False}),
                         tmp_path / "runs", quiet, Console(quiet=True))
    mask = ticket.level_dir(1) / "mask.safetensors"
    ours = []
    for seed in (0, 1, 2):
        run = finetune(build_hparams("sst2", {**common, "seed": seed}, prune=False), mask,
                       tmp_path / "runs", quiet, Console(quiet=True))
        ours.append(run.metrics(0)["score"])
    theirs = run_example(
        tmp_path / "hf", "--model_name_or_path", "minilm", "--mask", str(mask),
        "--train_file", str(glue_dir / "SST-2" / "train.tsv"),
        "--validation_file", str(glue_dir / "SST-2" / "dev.tsv"),
        "--max_train_samples", "512", "--max_eval_samples", "400", "--max_seq_length", "64",
        "--learning_rate", "1e-4",
        "--per_device_train_batch_size", "32", "--num_train_epochs", "1", "--seed", "0",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true")
    assert theirs["pruned_weights_not_zero"] == 0 and theirs["pruned_weights"] > 0
    assert theirs["sparsity"] == pytest.approx(Mask.load(mask).sparsity)
    mean, std = statistics.fmean(ours), statistics.stdev(ours)
    print(f"ticketlab finetune seeds 0-2: {ours}; Trainer seed 0: {theirs['eval_accuracy']}")
    assert mean > 0.55  # above chance (dev majority 50.9 %): the comparison means a thing
    # measured: ticketlab seeds 0-2 67.75 / 60.50 / 57.25, the Trainer (seed 0) 67.75
    assert abs(theirs["eval_accuracy"] - mean) <= 3 * std + 0.01, (theirs, ours)
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    params = mask_parameters(saved, Mask.load(mask))
    assert all((p[~Mask.load(mask).tensors[n]] == 0).all() for n, p in params.items())
