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


# --- issue 10, items 6 and 7: weights the checkpoint lacks, damaged and pickle-only folders ---
@pytest.fixture()
def no_pooler_dir(tmp_path: Path, minilm_tokenizer) -> Path:
    """A converted checkpoint without pooler weights (as the MiniLM-L3 of the issue)."""
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=H,
                         num_hidden_layers=L, num_attention_heads=2, intermediate_size=FF),
              add_pooling_layer=False).save_pretrained(tmp_path / "no-pooler")
    minilm_tokenizer.save_pretrained(tmp_path / "no-pooler")
    return tmp_path / "no-pooler"


def test_missing_base_weights_are_reported_and_left_out_of_the_prunable_set(
        no_pooler_dir, glue_dir) -> None:
    from ticketlab.hparams import build_hparams
    from ticketlab.prepare import prepare

    values = {"model": str(no_pooler_dir), "data_dir": str(glue_dir), "max_train_samples": 8,
              "max_eval_samples": 8, "max_length": 16}
    with pytest.warns(UserWarning, match="no weights for 1 prunable matrix .*pooler"):
        setup = prepare(build_hparams("sst2", values))
    assert setup.missing == ["pooler.dense.bias", "pooler.dense.weight"]
    assert "pooler.dense.weight" not in setup.prunable and len(setup.prunable) == 6 * L
    assert not any("pooler" in k for k in setup.digests)  # random, drawn under the seed
    kept = prepare(build_hparams("sst2", {**values, "prune_missing_weights": True}))
    assert "pooler.dense.weight" in kept.prunable
    assert "pooler.dense.weight" in kept.digests  # now its values define θ0


def test_a_mask_with_a_random_pooler_of_another_seed_is_refused(no_pooler_dir, glue_dir):
    from ticketlab.hparams import build_hparams
    from ticketlab.masks import Mask
    from ticketlab.prepare import prepare

    values = {"model": str(no_pooler_dir), "data_dir": str(glue_dir), "max_train_samples": 8,
              "max_eval_samples": 8, "max_length": 16, "prune_missing_weights": True}
    seed0 = prepare(build_hparams("sst2", {**values, "seed": 0}))
    seed1 = prepare(build_hparams("sst2", {**values, "seed": 1}))
    assert seed0.fingerprint == seed1.fingerprint  # the old check could not tell them apart
    mask = Mask(Mask.ones_like(seed0.prunable).tensors, seed0.mask_meta())
    mask.check_compatible(seed0.prunable, seed0.fingerprint, digests=seed0.digests)
    with pytest.raises(TicketlabError, match="randomly initialised weight drawn under another "
                                             "seed"):
        mask.check_compatible(seed1.prunable, seed1.fingerprint, digests=seed1.digests)


def test_a_mask_found_on_other_embeddings_is_refused(tiny_bert_dir, tmp_path) -> None:
    """Same encoder matrices (same fingerprint), other word embeddings: another θ0."""
    from safetensors.torch import load_file, save_file

    from ticketlab.families.text import TextEncoderFamily
    from ticketlab.masks import Mask
    from ticketlab.models import tensor_digests

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_bert_dir, other)
    state = load_file(str(other / "model.safetensors"))
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"] + 1
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    fam = TextEncoderFamily()
    nets = [fam.load(str(p), "sequence-classification", 2, 0).model
            for p in (tiny_bert_dir, other)]
    params = [prunable_parameters(n) for n in nets]
    digests = [tensor_digests(n.base_model.state_dict()) for n in nets]
    assert fingerprint(params[0]) == fingerprint(params[1])
    mask = Mask(Mask.ones_like(params[0]).tensors, {"fingerprint": fingerprint(params[0]),
                                                   "theta0": digests[0]})
    with pytest.raises(TicketlabError, match="embeddings.word_embeddings.weight"):
        mask.check_compatible(params[1], fingerprint(params[1]), digests=digests[1])
    mask.check_compatible(params[1], fingerprint(params[1]), digests=digests[1],
                          allow_different_weights=True)


def test_a_damaged_weights_file_is_one_clear_error(tiny_bert_dir, tmp_path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(TicketlabError, match="weights file is damaged or unreadable"):
        load_model(str(broken), "sequence-classification")


def test_a_pickle_only_folder_is_refused_without_unpickling(tiny_bert_dir, tmp_path) -> None:
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    # A pickle whose loading would create the marker file: it must never be loaded.
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (pickled / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(TicketlabError, match="holds only pickle weights") as err:
        load_model(str(pickled), "sequence-classification")
    assert "safetensors" in err.value.fix and not marker.exists()
