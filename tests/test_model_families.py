"""The README's table of model families (issue 15.10) is tested: for every text-encoder type it
lists, a tiny random model of that type is saved as an HF folder, its prunable set is
discovered exactly as the table says, and a two-level ticket search runs on it end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from ticketlab.families.text import SUPPORTED_MODEL_TYPES
from ticketlab.hparams import Runtime, build_hparams
from ticketlab.imp import find_ticket
from ticketlab.models import prunable_parameters, role_of

ROOT = Path(__file__).resolve().parents[1]
H, FF, L = 32, 64, 2


def readme_table() -> dict[str, dict]:
    """model type -> {layer: [names], pooler: bool} from README's "Model families" table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Model families"):]
    section = section[:section.index("\n## ", 5)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        rows[cells[0].strip("`")] = {"layer": names, "pooler": cells[3].startswith("yes")}
    return rows


def tiny_model(kind: str, folder: Path, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModel

    sizes = ({"dim": H, "n_layers": L, "n_heads": 2, "hidden_dim": FF} if kind == "distilbert"
             else {"hidden_size": H, "num_hidden_layers": L, "num_attention_heads": 2,
                   "intermediate_size": FF})
    if kind == "electra":
        sizes["embedding_size"] = H
    config = AutoConfig.for_model(kind, vocab_size=tokenizer.vocab_size, pad_token_id=0,
                                  max_position_embeddings=130, **sizes)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_table_lists_every_supported_type() -> None:
    assert sorted(readme_table()) == sorted(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("kind", SUPPORTED_MODEL_TYPES)
def test_each_family_prunes_as_the_readme_says(kind, tmp_path, glue_dir, minilm_tokenizer):
    row = readme_table()[kind]
    folder = tiny_model(kind, tmp_path / kind, minilm_tokenizer)
    hp = build_hparams("sst2", {"model": str(folder), "data_dir": str(glue_dir),
                                "max_train_samples": 32, "max_eval_samples": 16,
                                "max_length": 32, "batch_size": 16, "epochs": 1.0,
                                "lr": 1e-3, "target_sparsity": 0.1})
    run = find_ticket(hp, tmp_path / "runs", Runtime(progress=False, save_weights=False),
                      Console(quiet=True))
    assert run.levels() == [0, 1]
    prunable = run.read_hparams()["prunable"]  # stored with sorted keys
    layer0 = {n.split(".", 3)[3].removesuffix(".weight"): role_of(n) for n in prunable
              if not n.startswith("pooler") and n.split(".")[2] == "0"}
    assert sorted(layer0) == sorted(row["layer"]), kind
    assert [layer0[n] for n in row["layer"]] == ["Q", "K", "V", "attn-out", "ffn-in",
                                                 "ffn-out"]  # the table's order is the roles'
    assert ("pooler.dense.weight" in prunable) == row["pooler"], kind
    assert len(prunable) == 6 * L + row["pooler"]
    roles = run.metrics(1)["sparsity_by_role"]
    assert set(roles) == {"Q", "K", "V", "attn-out", "ffn-in", "ffn-out"} | (
        {"pooler"} if row["pooler"] else set())
    assert run.metrics(1)["sparsity"] == pytest.approx(0.1, abs=1e-3)
    from transformers import AutoModelForSequenceClassification

    net = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert sorted(prunable_parameters(net)) == sorted(prunable)
