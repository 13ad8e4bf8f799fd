"""The prunable set is discovered from the model, for every BERT-family architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from ticketlab.errors import TicketlabError
from ticketlab.models import (
    fingerprint,
    load_model,
    matrix_stats,
    prunable_parameters,
    resolve_model_path,
    role_of,
)

H, FF, L = 32, 64, 2


def bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
        intermediate_size=FF))


def roberta():
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=L, num_attention_heads=2,
        intermediate_size=FF))


def distilbert():
    return DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=H, n_layers=L, n_heads=2, hidden_dim=FF))


def electra():
    return ElectraForSequenceClassification(ElectraConfig(
        vocab_size=100, embedding_size=H, hidden_size=H, num_hidden_layers=L,
        num_attention_heads=2, intermediate_size=FF))


BERT_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense"]


@pytest.mark.parametrize("build,names,pooler", [
    (bert, [f"encoder.layer.{i}.{n}.weight" for i in range(L) for n in BERT_LAYER], True),
    (roberta, [f"encoder.layer.{i}.{n}.weight" for i in range(L) for n in BERT_LAYER], False),
    (electra, [f"encoder.layer.{i}.{n}.weight" for i in range(L) for n in BERT_LAYER], False),
    (distilbert, [f"transformer.layer.{i}.{n}.weight" for i in range(L)
                  for n in ("attention.q_lin", "attention.k_lin", "attention.v_lin",
                            "attention.out_lin", "ffn.lin1", "ffn.lin2")], False),
])
def test_prunable_set_per_architecture(build, names, pooler) -> None:
    params = prunable_parameters(build())
    expected = names + (["pooler.dense.weight"] if pooler else [])
    assert list(params) == expected
    per_layer = 4 * H * H + 2 * H * FF
    assert sum(p.numel() for p in params.values()) == L * per_layer + (H * H if pooler else 0)
    roles = [role_of(n) for n in names[:6]]
    assert roles == ["Q", "K", "V", "attn-out", "ffn-in", "ffn-out"]


def test_heads_embeddings_biases_layernorm_are_not_prunable() -> None:
    names = list(prunable_parameters(bert()))
    assert not any("classifier" in n or "embeddings" in n or "LayerNorm" in n
                   or n.endswith("bias") for n in names)


def test_include_exclude_and_pooler_switch() -> None:
    model = bert()
    no_pooler = prunable_parameters(model, prune_pooler=False)
    assert "pooler.dense.weight" not in no_pooler and len(no_pooler) == 12
    plus = prunable_parameters(model, include=("word_embeddings",))
    assert "embeddings.word_embeddings.weight" in plus
    minus = prunable_parameters(model, exclude=(r"layer\.1\.",))
    assert len(minus) == 7 and not any(".1." in n for n in minus)
    with pytest.raises(TicketlabError, match="empty"):
        prunable_parameters(model, exclude=(".",))
    with pytest.raises(TicketlabError, match="not a valid regex"):
        prunable_parameters(model, exclude=("(",))


def test_fingerprint_tracks_weights_but_ignores_pooler() -> None:
    model = bert()
    params = prunable_parameters(model)
    fp = fingerprint(params)
    params["pooler.dense.weight"].data.add_(1.0)
    assert fingerprint(params) == fp
    params["encoder.layer.0.attention.self.query.weight"].data[0, 0] += 1e-3
    assert fingerprint(params) != fp


def test_outlier_matrix_is_flagged() -> None:
    model = bert()
    params = prunable_parameters(model)
    params["pooler.dense.weight"].data.mul_(0.1)
    flagged = [s.name for s in matrix_stats(params) if s.outlier]
    assert flagged == ["pooler.dense.weight"]


def test_missing_model_path_and_non_model_folder(tmp_path: Path) -> None:
    with pytest.raises(TicketlabError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(TicketlabError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_non_bert_model_is_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(TicketlabError, match="not a BERT-family encoder"):
        load_model(str(tmp_path), "sequence-classification")


def test_tokenizer_vocabulary_mismatch_is_refused(tmp_path: Path, minilm_tokenizer) -> None:
    BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=FF)).save_pretrained(tmp_path)
    with pytest.raises(TicketlabError, match="do not belong together"):
        load_model(str(tmp_path), "sequence-classification", tokenizer=minilm_tokenizer)


def test_head_init_is_seeded(tiny_bert_dir: Path) -> None:
    a = load_model(str(tiny_bert_dir), "sequence-classification", seed=3)
    b = load_model(str(tiny_bert_dir), "sequence-classification", seed=3)
    c = load_model(str(tiny_bert_dir), "sequence-classification", seed=4)
    assert (a.classifier.weight == b.classifier.weight).all()
    assert not (a.classifier.weight == c.classifier.weight).all()
