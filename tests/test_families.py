"""Model families: the registry picks the family of --model, and any nn.Module joins IMP
through ModuleFamily with a prunable-set rule (issue 11)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from ticketlab.errors import TicketlabError
from ticketlab.families import family_for, family_of, get_family
from ticketlab.families.base import ModuleFamily
from ticketlab.hparams import Runtime, build_hparams
from ticketlab.imp import find_ticket
from ticketlab.masks import Mask


class BagOfWords(torch.nn.Module):
    """A plain PyTorch text classifier: mean word embedding → two Linears → 2 classes."""

    def __init__(self, vocab: int = 30522) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 16)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask, labels=None, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).float()
        x = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp_min(1)
        logits = self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)


def test_any_module_runs_imp_through_module_family(csv_task_dir, tmp_path, minilm_tokenizer):
    def build() -> torch.nn.Module:
        torch.manual_seed(123)  # θ0 of this "pre-trained" model: the same on every call
        return BagOfWords()

    family = ModuleFamily(build, prunable=r"^fc\d\.weight$", inputs="text", head=r"^head\.",
                          processor=minilm_tokenizer)
    hp = build_hparams("csv", {"model": "bag-of-words", "data_dir": str(csv_task_dir),
                               "lr": 1e-2, "batch_size": 16, "epochs": 1,
                               "target_sparsity": 0.2, "max_length": 16})
    run = find_ticket(hp, tmp_path, Runtime(progress=False), Console(quiet=True), family=family)
    assert run.levels() == [0, 1, 2]
    mask = Mask.load(run.level_dir(2) / "mask.safetensors")
    assert sorted(mask.tensors) == ["fc1.weight", "fc2.weight"]
    assert mask.sparsity == pytest.approx(0.2, abs=1e-3)
    assert mask.meta["family"] == "module"
    head = run.level_dir(1) / "head.safetensors"
    from safetensors.torch import load_file

    assert sorted(load_file(str(head))) == ["head.bias", "head.weight"]


def test_the_registry_picks_a_family_and_refuses_strangers() -> None:
    assert family_for("minilm").name == "text-encoder"
    assert get_family("text-encoder") is family_for("bert-base-uncased")
    with pytest.raises(TicketlabError, match="Unknown model family"):
        get_family("quantum")
    with pytest.raises(TicketlabError, match="not a model of a family ticketlab knows"):
        family_of(BagOfWords())
