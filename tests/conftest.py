"""Shared test fixtures: offline hub settings, the real benchmark data, tiny random BERTs."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

# Every test runs offline: nothing may reach a model or data hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["COLUMNS"] = "200"  # rich tables unwrapped in captured CLI output

#: ../shared/data from the project root: real GLUE/SQuAD/WikiText files (CI has them too).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glue_dir(shared_data: Path) -> Path:
    return shared_data / "glue"


def _tokenizer():
    from ticketlab.models import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 random BERT saved as an HF folder, with MiniLM's uncased tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer()
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tiny_hparams(tiny_bert_dir: Path, glue_dir: Path):
    """A factory of IMP hparams for a seconds-long run of a tiny BERT on 64 real SST-2
    sentences; keyword arguments override PruneHparams (or TrainHparams with ``train=``)."""
    from ticketlab.hparams import (
        DataHparams,
        ModelHparams,
        PruneHparams,
        RunHparams,
        TrainHparams,
    )

    def make(train: dict | None = None, **prune_kwargs) -> RunHparams:
        return RunHparams(
            model=ModelHparams(model=str(tiny_bert_dir)),
            data=DataHparams(task="sst2", data_dir=str(glue_dir), max_train_samples=64,
                             max_eval_samples=32, max_length=32),
            train=TrainHparams(**{"lr": 1e-3, "batch_size": 16, "epochs": 1,
                                  "weight_decay": 0.01, "seed": 0, **(train or {})}),
            prune=PruneHparams(**{"target_sparsity": 0.2, **prune_kwargs}),
        )

    return make


@pytest.fixture()
def csv_task_dir(tmp_path: Path) -> Path:
    """A tiny generic-CSV task (48 train, 16 dev rows) that loads in milliseconds."""
    rng = random.Random(0)
    words = ["good", "bad", "fine", "awful", "great", "dull", "fun", "poor"]
    folder = tmp_path / "csv-task"
    folder.mkdir()
    for name, n in (("train.csv", 48), ("dev.csv", 16)):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                w.writerow([text, int(text.count("good") + text.count("great") > 1)])
    return folder
