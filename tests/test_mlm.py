"""Masked language modelling: blocks, masking rates, fixed evaluation masks, metrics, the head."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save
from typer.testing import CliRunner

from ticketlab.cli import app
from ticketlab.errors import TicketlabError
from ticketlab.hparams import (
    DataHparams,
    ModelHparams,
    RunHparams,
    TrainHparams,
    build_hparams,
)
from ticketlab.models import load_model
from ticketlab.prepare import prepare
from ticketlab.store import list_runs
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource
from ticketlab.tasks.mlm import (
    MlmCollator,
    MlmTask,
    fixed_masking,
    make_blocks,
    masked_positions_forward,
)

TEXT = ["The European lobster is a species of clawed lobster .",
        "It is closely related to the American lobster , H. americanus .",
        "Mating occurs in the summer , producing <unk> eggs ."]


def _random_blocks(tokenizer, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Blocks of ordinary (non-special) token ids framed by [CLS] … [SEP]."""
    rng = np.random.default_rng(seed)
    ordinary = np.setdiff1d(np.arange(1000, tokenizer.vocab_size), tokenizer.all_special_ids)
    body = rng.choice(ordinary, size=(n, length - 2))
    return [[tokenizer.cls_token_id, *row.tolist(), tokenizer.sep_token_id] for row in body]


def _rates(original: list[list[int]], inputs: torch.Tensor, labels: torch.Tensor, mask_id: int
           ) -> dict[str, float]:
    original_t = torch.tensor(original)
    chosen = labels != -100
    assert torch.equal(labels[chosen], original_t[chosen])  # labels are the original tokens
    picked = inputs[chosen]
    return {
        "chosen": chosen[:, 1:-1].float().mean().item(),  # of the non-special positions
        "special_chosen": chosen[:, [0, -1]].sum().item(),
        "mask": (picked == mask_id).float().mean().item(),
        "random": ((picked != mask_id) & (picked != original_t[chosen])).float().mean().item(),
        "kept": (picked == original_t[chosen]).float().mean().item(),
    }


def _assert_bert_rates(rates: dict[str, float]) -> None:
    # 2,000 × 126 positions: ~37,800 chosen, so each share's standard error is < 0.003.
    assert rates["special_chosen"] == 0
    assert abs(rates["chosen"] - 0.15) < 0.005
    assert abs(rates["mask"] - 0.8) < 0.015
    assert abs(rates["random"] - 0.1) < 0.015
    assert abs(rates["kept"] - 0.1) < 0.015


def test_training_masking_rates_over_a_large_sample(minilm_tokenizer) -> None:
    blocks = _random_blocks(minilm_tokenizer, 2000, 128)
    torch.manual_seed(0)
    batch = MlmCollator(minilm_tokenizer)([{"input_ids": b} for b in blocks])
    _assert_bert_rates(_rates(blocks, batch["input_ids"], batch["labels"],
                              minilm_tokenizer.mask_token_id))
    torch.manual_seed(1)  # training masks are drawn anew: another seed, other masks
    again = MlmCollator(minilm_tokenizer)([{"input_ids": b} for b in blocks])
    assert not torch.equal(again["labels"], batch["labels"])


def test_evaluation_masking_is_fixed(minilm_tokenizer) -> None:
    blocks = _random_blocks(minilm_tokenizer, 2000, 128, seed=1)
    torch.manual_seed(0)
    inputs, labels = fixed_masking(blocks, minilm_tokenizer)
    _assert_bert_rates(_rates(blocks, torch.tensor(inputs), torch.tensor(labels),
                              minilm_tokenizer.mask_token_id))
    torch.manual_seed(123)  # the global RNG does not matter
    assert fixed_masking(blocks, minilm_tokenizer) == (inputs, labels)


def test_two_runs_evaluate_on_identical_masks(minilm_tokenizer, shared_data: Path) -> None:
    source = DataSource(path=shared_data / "wikitext" / "wikitext-2")
    features = []
    for seed in (0, 7):
        torch.manual_seed(seed)
        task = get_task("mlm", source)
        examples = task.load(source, "dev")[:200]
        features.append(task.featurize(examples, minilm_tokenizer, 128, "dev"))
    assert features[0]["input_ids"] == features[1]["input_ids"]
    assert features[0]["labels"] == features[1]["labels"]
    labels = np.array(features[0]["labels"])
    assert 0.1 < (labels != -100).mean() < 0.2
    # The evaluation collator only pads: the fixed masks reach the model unchanged.
    rows = [{k: features[0][k][i] for k in ("input_ids", "attention_mask", "labels")}
            for i in range(4)]
    batch = MlmCollator(minilm_tokenizer)(rows)
    assert batch["labels"].tolist() == features[0]["labels"][:4]
    assert batch["input_ids"].tolist() == features[0]["input_ids"][:4]


def test_blocks_follow_the_paper_code(minilm_tokenizer) -> None:
    tok = minilm_tokenizer
    stream = tok(" ".join(TEXT).replace("<unk>", tok.unk_token), add_special_tokens=False)
    stream = stream["input_ids"]
    blocks = make_blocks(TEXT, tok, 10)
    assert len(blocks) == len(stream) // 8  # 8 tokens per block; the rest is dropped
    assert all(len(b) == 10 and b[0] == tok.cls_token_id and b[-1] == tok.sep_token_id
               for b in blocks)
    assert [t for b in blocks for t in b[1:-1]] == stream[: 8 * len(blocks)]
    assert tok.unk_token_id in stream  # WikiText's <unk> is one unknown token, not "<", "un"…


def test_metrics_by_hand() -> None:
    task = MlmTask()
    # Vocabulary of 4, all logits 0: every masked token costs ln 4 and the prediction is id 0.
    # One row of logits per masked token (masked_positions_forward), three masked tokens.
    logits = torch.zeros(3, 4)
    labels = torch.tensor([[0, -100, 3], [-100, -100, 0]])
    reduced = task.batch_outputs(SimpleNamespace(logits=logits), {"labels": labels})
    assert reduced["masked"].tolist() == [2, 1] and reduced["correct"].tolist() == [1, 1]
    assert np.allclose(reduced["loss_sum"], [2 * math.log(4), math.log(4)])
    metrics = task.compute_metrics(reduced, {}, [])
    assert math.isclose(metrics["accuracy"], 2 / 3)
    assert math.isclose(metrics["loss"], math.log(4), rel_tol=1e-6)
    assert math.isclose(metrics["perplexity"], 4.0, rel_tol=1e-6)


@pytest.mark.parametrize("architecture", ["bert", "roberta"])
def test_masked_positions_forward_equals_the_full_forward(architecture: str) -> None:
    """Scores only at masked positions: same loss, same gradients, same scores there."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.for_model(architecture, vocab_size=50, hidden_size=16,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(config).eval()
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[0, 7], labels[2, 11], labels[1, 0] = 9, 17, 4, 33
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    full = model(**batch)
    full.loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    fast = masked_positions_forward(model, batch)
    fast.loss.backward()
    assert fast.logits.shape == (4, 50)
    assert torch.allclose(fast.logits, full.logits[labels != -100], atol=1e-5)
    assert torch.allclose(fast.loss, full.loss, atol=1e-6)
    for name, grad in full_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-6), name
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape == (3, 12, 50)  # and the model is unchanged afterwards


def test_data_sources(tmp_path: Path, minilm_tokenizer) -> None:
    task = MlmTask()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} ." for i in range(40)) + "\n\n")
    one_file = DataSource(path=corpus)
    train, dev = task.load(one_file, "train"), task.load(one_file, "dev")
    assert [ex["text"] for ex in train + dev] == [f"line {i} ." for i in range(40)]
    assert len(dev) == 2  # the last 5 % of the lines
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(TicketlabError, match="no train file"):
        task.load(DataSource(path=tmp_path / "empty-dir"), "train")
    with pytest.raises(TicketlabError, match="shorter than one block"):
        task.featurize(dev, minilm_tokenizer, 128, "dev")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(TicketlabError, match="has no text"):
        task.load(DataSource(path=None, options={"train_file": str(empty)}), "train")
    task.block_size = 1024
    with pytest.raises(TicketlabError, match="--block-size 1024 is longer than"):
        task.featurize(train, minilm_tokenizer, 128, "train")
    with pytest.raises(TicketlabError, match="could not load Salesforce/wikitext"):
        task.load(DataSource(path=None), "dev")  # the tests run with the hub offline


def test_cli_defaults_for_mlm() -> None:
    mlm = build_hparams("mlm", {})
    assert (mlm.train.lr, mlm.train.batch_size, mlm.train.epochs, mlm.data.block_size,
            mlm.train.eval_batch_size, mlm.data.doc_stride) == (5e-5, 16, 1.0, 128, 32, None)
    assert build_hparams("mlm", {"block_size": 512}).data.block_size == 512
    with pytest.raises(TicketlabError, match="--block-size does not apply to task squad"):
        build_hparams("squad", {"block_size": 512})
    with pytest.raises(TicketlabError, match="--max-length does not apply to task mlm") as err:
        build_hparams("mlm", {"max_length": 256})
    assert "--block-size" in err.value.fix


# --------------------------------------------------------------------------------------------
# The MLM head: refused when missing, trained alone with --init-mlm-head, never pruned
# --------------------------------------------------------------------------------------------


def _mlm_hparams(model: Path, data: Path, steps: int | None = None, task: str = "mlm"
                 ) -> RunHparams:
    return RunHparams(
        model=ModelHparams(model=str(model), init_mlm_head_steps=steps),
        data=DataHparams(task=task, data_dir=str(data), max_train_samples=40,
                         max_eval_samples=20, block_size=32 if task == "mlm" else None),
        train=TrainHparams(lr=1e-3, batch_size=8, epochs=1, eval_batch_size=16),
    )


def test_a_checkpoint_without_mlm_head_is_refused(tiny_bert_dir, shared_data) -> None:
    wikitext = shared_data / "wikitext" / "wikitext-2"
    with pytest.raises(TicketlabError) as err:
        prepare(_mlm_hparams(tiny_bert_dir, wikitext))
    assert "has no MLM head" in err.value.problem and "cls.predictions" in err.value.problem
    assert "--init-mlm-head" in err.value.fix
    with pytest.raises(TicketlabError, match="--init-mlm-head trains a masked-language-model"):
        prepare(_mlm_hparams(tiny_bert_dir, shared_data / "glue", steps=3, task="sst2"))


def test_init_mlm_head_trains_the_head_alone(tiny_bert_dir, shared_data) -> None:
    setup = prepare(_mlm_hparams(tiny_bert_dir, shared_data / "wikitext" / "wikitext-2", 3))
    untrained = load_model(str(tiny_bert_dir), "masked-lm", seed=0)  # the same seeded head
    before = untrained.state_dict()
    model = setup.model
    after = model.state_dict()
    head = setup.head_names()
    assert sorted(head) == sorted(k for k in before if k.startswith("cls.")
                                  and "decoder" not in k)  # the tied aliases are stored once
    assert any(not torch.equal(before[k], after[k]) for k in head)  # the head learned
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("bert."))
    assert all(p.requires_grad for p in model.parameters())  # the body is trainable again
    assert all(torch.equal(setup.theta0[k], after[k]) for k in after)  # θ0/γ0 include the head
    # Never pruned: the prunable set is the encoder's layers; the tied decoder weight is the
    # word embedding, which is outside it.
    assert all(n.startswith("encoder.layer.") for n in setup.prunable)
    decoder = model.cls.predictions.decoder.weight
    assert decoder is model.bert.embeddings.word_embeddings.weight
    assert all(p is not decoder for p in setup.prunable.values())
    # One name per tensor, so the level files can be written, and loaded back strictly.
    save({k: v.contiguous() for k, v in after.items()})
    model.load_state_dict(setup.theta0)


# --------------------------------------------------------------------------------------------
# Integration: MiniLM-L6 (no MLM head), two IMP levels on a slice of WikiText-2, via the CLI
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_find_on_wikitext_with_minilm(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    args = ["find", "--task", "mlm", "--data-dir", str(shared_data / "wikitext"),
            "--model", "minilm", "--max-train-samples", "24", "--max-eval-samples", "12",
            "--block-size", "64", "--batch-size", "8", "--max-steps", "3",
            "--target-sparsity", "0.1",
            "--root", str(root), "--no-progress", "--no-save-weights"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "has no MLM head" in refused.output
    assert not root.exists()
    result = CliRunner().invoke(app, [*args, "--init-mlm-head", "2"])
    assert result.exit_code == 0, result.output
    [run] = list_runs(root)
    hp = run.read_hparams()["hparams"]
    assert hp["model"]["init_mlm_head_steps"] == 2 and hp["data"]["block_size"] == 64
    assert hp["train"]["lr"] == 5e-5  # the paper's MLM setting
    for level in (0, 1):
        rec = run.metrics(level)
        assert rec["main_metric"] == "accuracy"
        metrics = rec["metrics"]
        assert 0.0 < metrics["accuracy"] < 1.0
        assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-6)
    assert math.isclose(run.metrics(1)["sparsity"], 0.1, abs_tol=1e-3)
