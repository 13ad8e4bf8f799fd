"""IMP end to end on a tiny BERT: rewinding, exact schedules, resume, bad input, finetune."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import ticketlab.imp as imp
import ticketlab.levels as levels
from ticketlab.errors import TicketlabError
from ticketlab.hparams import DataHparams, RunHparams
from ticketlab.masks import Mask
from ticketlab.store import Run
from ticketlab.train import Runtime

QUIET = Runtime(progress=False)


def console() -> Console:
    return Console(file=open("/dev/null", "w"))  # noqa: SIM115


def masks_of(run: Run) -> list[Mask]:
    return [Mask.load(run.level_dir(level) / "mask.safetensors") for level in run.levels()]


def spy_train(monkeypatch) -> list[dict]:
    """Record, at each call of train(), the model state and mask it starts from."""
    calls: list[dict] = []
    real = levels.train

    def spy(model, prunable, mask, *args, **kwargs):
        calls.append({"state": {k: v.clone() for k, v in model.state_dict().items()},
                      "mask": mask})
        return real(model, prunable, mask, *args, **kwargs)

    monkeypatch.setattr(levels, "train", spy)
    return calls


def test_levels_rewind_to_theta0_with_exact_sparsities(tiny_hparams, tmp_path, monkeypatch):
    calls = spy_train(monkeypatch)
    hp = tiny_hparams()
    run = imp.find_ticket(hp, tmp_path, QUIET, console())
    assert run.levels() == [0, 1, 2]
    total = sum(t.numel() for t in masks_of(run)[0].tensors.values())
    for level, mask in enumerate(masks_of(run)):
        assert total - mask.num_kept == round(total * level / 10)  # exactly 0, 10, 20 %
    theta0 = calls[0]["state"]
    assert not torch.equal(theta0["classifier.weight"], run_state(run, 0)["classifier.weight"])
    for call in calls[1:]:  # every later level starts from m ⊙ θ0 and the head γ0
        mask = call["mask"]
        for name, value in call["state"].items():
            rel = name.removeprefix("bert.")
            if rel in mask.tensors:
                kept = mask.tensors[rel]
                assert torch.equal(value[kept], theta0[name][kept]), name
                assert (value[~kept] == 0).all(), name
            else:
                assert torch.equal(value, theta0[name]), name


def run_state(run: Run, level: int) -> dict[str, torch.Tensor]:
    from ticketlab.levels import load_level_weights

    return load_level_weights(run.level_dir(level) / "model.safetensors")


def test_stored_weights_keep_pruned_entries_at_zero(tiny_hparams, tmp_path) -> None:
    run = imp.find_ticket(tiny_hparams(), tmp_path, QUIET, console())
    state = run_state(run, 2)
    mask = Mask.load(run.level_dir(2) / "mask.safetensors")
    for rel, kept in mask.tensors.items():
        assert (state["bert." + rel][~kept] == 0).all()


def test_rewind_to_step_i_and_keep_trained_head(tiny_hparams, tmp_path, monkeypatch) -> None:
    calls = spy_train(monkeypatch)
    hp = tiny_hparams(rewind_step=2, keep_trained_head=True, target_sparsity=0.1)
    run = imp.find_ticket(hp, tmp_path, QUIET, console())
    from safetensors.torch import load_file

    theta_i = load_file(str(run.rewind_path))
    assert not torch.equal(theta_i["bert.encoder.layer.0.attention.self.query.weight"],
                           calls[0]["state"]["bert.encoder.layer.0.attention.self.query.weight"])
    level1 = calls[1]["state"]
    mask = calls[1]["mask"]
    q = "encoder.layer.0.attention.self.query.weight"
    kept = mask.tensors[q]
    assert torch.equal(level1["bert." + q][kept], theta_i["bert." + q][kept])
    trained_head = load_file(str(run.level_dir(0) / "head.safetensors"))
    assert torch.equal(level1["classifier.weight"], trained_head["classifier.weight"])


def test_rewind_step_beyond_training_is_refused(tiny_hparams, tmp_path) -> None:
    with pytest.raises(TicketlabError, match="rewind-step 4 is not below the 4"):
        imp.find_ticket(tiny_hparams(rewind_step=4), tmp_path, QUIET, console())
    assert list(tmp_path.iterdir()) == []


def test_resume_after_crash_gives_identical_masks(tiny_hparams, tmp_path, monkeypatch):
    hp = tiny_hparams(target_sparsity=0.3)
    reference = imp.find_ticket(hp, tmp_path / "a", QUIET, console())

    real_finish = Run.finish_level

    def crash_after_level_1(self, level, metrics, files):
        real_finish(self, level, metrics, files)
        if level == 1:
            raise KeyboardInterrupt  # as if killed right after level 1 was stored

    monkeypatch.setattr(Run, "finish_level", crash_after_level_1)
    with pytest.raises(KeyboardInterrupt):
        imp.find_ticket(hp, tmp_path / "b", QUIET, console())
    monkeypatch.setattr(Run, "finish_level", real_finish)
    crashed = Run(tmp_path / "b" / hp.run_id())
    assert crashed.levels() == [0, 1]

    calls = spy_train(monkeypatch)
    resumed = imp.find_ticket(hp, tmp_path / "b", QUIET, console())
    assert len(calls) == 2  # only levels 2 and 3 were trained again
    assert resumed.levels() == [0, 1, 2, 3]
    assert masks_of(resumed) == masks_of(reference)
    for level in resumed.levels():
        assert resumed.metrics(level)["score"] == reference.metrics(level)["score"]


def test_a_level_with_a_damaged_file_is_redone(tiny_hparams, tmp_path, monkeypatch) -> None:
    hp = tiny_hparams(target_sparsity=0.1)
    run = imp.find_ticket(hp, tmp_path, QUIET, console())
    reference = masks_of(run)
    (run.level_dir(1) / "head.safetensors").write_bytes(b"garbage")
    assert not run.level_done(1)
    calls = spy_train(monkeypatch)
    imp.find_ticket(hp, tmp_path, QUIET, console())
    assert len(calls) == 1 and masks_of(run) == reference


def test_raising_the_target_continues_the_same_run(tiny_hparams, tmp_path, monkeypatch):
    first = imp.find_ticket(tiny_hparams(target_sparsity=0.1), tmp_path, QUIET, console())
    calls = spy_train(monkeypatch)
    second = imp.find_ticket(tiny_hparams(target_sparsity=0.2), tmp_path, QUIET, console())
    assert first.path == second.path and second.levels() == [0, 1, 2] and len(calls) == 1


def test_second_process_on_the_same_run_is_refused(tiny_hparams, tmp_path) -> None:
    hp = tiny_hparams()
    run = Run(tmp_path / hp.run_id())
    with run.lock(), pytest.raises(TicketlabError, match="Another ticketlab process"):
        imp.find_ticket(hp, tmp_path, QUIET, console())


@pytest.mark.parametrize("change,match", [
    (dict(task="nosuchtask"), "unknown task"),
    (dict(data_dir="/no/such/folder"), "does not exist"),
])
def test_bad_data_leaves_no_run_directory(tiny_hparams, tmp_path, change, match) -> None:
    hp = tiny_hparams()
    data = {**hp.data.__dict__, **change}
    bad = RunHparams(model=hp.model, data=DataHparams(**data), train=hp.train, prune=hp.prune)
    with pytest.raises(TicketlabError, match=match):
        imp.find_ticket(bad, tmp_path / "root", QUIET, console())
    assert not (tmp_path / "root").exists()


def test_empty_data_file_leaves_no_run_directory(tiny_hparams, tmp_path) -> None:
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    hp = tiny_hparams()
    bad = RunHparams(model=hp.model, data=DataHparams(**{**hp.data.__dict__,
                                                          "data_dir": str(tmp_path)}),
                     train=hp.train, prune=hp.prune)
    with pytest.raises(TicketlabError, match="empty"):
        imp.find_ticket(bad, tmp_path / "root", QUIET, console())
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("kwargs", [dict(target_sparsity=1.0), dict(target_sparsity=-0.1),
                                    dict(rate=0.0), dict(rate=1.0), dict(method="magic")])
def test_bad_pruning_settings_are_refused(tiny_hparams, kwargs) -> None:
    with pytest.raises(TicketlabError):
        tiny_hparams(**kwargs)


def test_finetune_a_transferred_mask(tiny_hparams, tmp_path) -> None:
    run = imp.find_ticket(tiny_hparams(), tmp_path, QUIET, console())
    mask_path = run.level_dir(2) / "mask.safetensors"
    hp = tiny_hparams()
    transfer = RunHparams(model=hp.model, data=DataHparams(**{**hp.data.__dict__,
                                                               "task": "cola"}),
                          train=hp.train, prune=hp.prune)
    done = imp.finetune(transfer, mask_path, tmp_path, QUIET, console())
    rec = done.metrics(0)
    assert rec["main_metric"] == "matthews_correlation"
    assert rec["sparsity"] == pytest.approx(0.2, abs=1e-4)  # round(0.2 * 17,408) weights
    state = run_state(done, 0)
    for rel, kept in Mask.load(mask_path).tensors.items():
        assert (state["bert." + rel][~kept] == 0).all()


def test_finetune_refuses_a_mask_of_another_model(tiny_hparams, tmp_path) -> None:
    run = imp.find_ticket(tiny_hparams(target_sparsity=0.1), tmp_path, QUIET, console())
    mask = Mask.load(run.level_dir(1) / "mask.safetensors")
    mask.meta["fingerprint"] = "0" * 64
    foreign = tmp_path / "foreign.safetensors"
    mask.save(foreign)
    with pytest.raises(TicketlabError, match="other pre-trained weights"):
        imp.finetune(tiny_hparams(), foreign, tmp_path / "ft", QUIET, console())
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("family", ["distilbert", "roberta", "electra"])
def test_imp_runs_on_other_bert_families(family, tmp_path, minilm_tokenizer, tiny_hparams):
    """One IMP level on tiny DistilBERT / RoBERTa / ELECTRA encoders (MiniLM's tokenizer)."""
    from transformers import (
        DistilBertConfig,
        DistilBertModel,
        ElectraConfig,
        ElectraModel,
        RobertaConfig,
        RobertaModel,
    )

    vocab = minilm_tokenizer.vocab_size
    model = {
        "distilbert": lambda: DistilBertModel(DistilBertConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64)),
        "roberta": lambda: RobertaModel(RobertaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=130)),
        "electra": lambda: ElectraModel(ElectraConfig(
            vocab_size=vocab, embedding_size=16, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64)),
    }[family]()
    folder = tmp_path / family
    model.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    hp = tiny_hparams(target_sparsity=0.1)
    hp = RunHparams(model=type(hp.model)(model=str(folder)), data=hp.data, train=hp.train,
                    prune=hp.prune)
    run = imp.find_ticket(hp, tmp_path / "runs", QUIET, console())
    assert run.levels() == [0, 1]
    assert run.metrics(1)["sparsity"] == pytest.approx(0.1, abs=1e-4)
    assert "pooler" not in run.metrics(1)["sparsity_by_role"]


def test_sample_seed_draws_a_random_subset_in_file_order() -> None:
    from ticketlab.prepare import train_subset

    rows = [{"idx": i} for i in range(100)]
    assert train_subset(rows, DataHparams(max_train_samples=10)) == rows[:10]
    assert train_subset(rows, DataHparams()) == rows
    drawn = train_subset(rows, DataHparams(max_train_samples=10, sample_seed=0))
    ids = [r["idx"] for r in drawn]
    assert len(set(ids)) == 10 and ids == sorted(ids) and ids != list(range(10))
    assert drawn == train_subset(rows, DataHparams(max_train_samples=10, sample_seed=0))
    assert drawn != train_subset(rows, DataHparams(max_train_samples=10, sample_seed=1))
    assert train_subset(rows, DataHparams(max_train_samples=500, sample_seed=0)) == rows
    with pytest.raises(TicketlabError, match="no --max-train-samples"):
        DataHparams(sample_seed=0)


def test_a_new_unset_field_keeps_old_run_names(tiny_hparams) -> None:
    import dataclasses

    hp = tiny_hparams()
    assert "sample_seed" not in hp.identity()["data"]
    seeded = dataclasses.replace(hp, data=dataclasses.replace(hp.data, max_train_samples=8,
                                                              sample_seed=0))
    plain = dataclasses.replace(hp, data=dataclasses.replace(hp.data, max_train_samples=8))
    assert seeded.run_id() != plain.run_id()


@pytest.mark.parametrize("save_weights", [True, False])
def test_a_deleted_level_folder_is_redone_from_what_is_stored(tiny_hparams, tmp_path,
                                                              monkeypatch, save_weights):
    """Issue 10, item 10: deleting level_K/ (mask included) used to leave the run stuck.
    Now the mask is recomputed from level K-1's stored weights, or K-1 is trained again."""
    import shutil

    runtime = Runtime(progress=False, save_weights=save_weights)
    hp = tiny_hparams(target_sparsity=0.2)
    run = imp.find_ticket(hp, tmp_path, runtime, console())
    reference = masks_of(run)
    scores = [run.metrics(level)["score"] for level in run.levels()]
    shutil.rmtree(run.level_dir(2))
    calls = spy_train(monkeypatch)
    imp.find_ticket(hp, tmp_path, runtime, console())
    assert run.levels() == [0, 1, 2]
    assert masks_of(run) == reference
    assert [run.metrics(level)["score"] for level in run.levels()] == scores
    assert len(calls) == (1 if save_weights else 2)  # level 2 (and level 1 without weights)


def test_movement_pruning_runs_through_find_and_a_branch(tiny_hparams, tmp_path) -> None:
    """Issue 11: a criterion that needs training-time statistics, through `find --method`."""
    from safetensors.torch import load_file

    from ticketlab.experiments.baselines import run_branch
    from ticketlab.pruning import prune

    run = imp.find_ticket(tiny_hparams(target_sparsity=0.2, method="movement"), tmp_path,
                          QUIET, console())
    assert run.levels() == [0, 1, 2]
    assert "scores.safetensors" in run.metrics(0)["checksums"]
    scores = load_file(str(run.level_dir(0) / "scores.safetensors"))
    ones = Mask.load(run.level_dir(0) / "mask.safetensors")
    weights = {n: torch.zeros(t.shape) for n, t in ones.tensors.items()}  # movement ignores |w|
    recomputed = prune(weights, ones, 0.1, "movement", seed=0, stats=scores)
    assert recomputed == Mask.load(run.level_dir(1) / "mask.safetensors")
    magnitude = imp.find_ticket(tiny_hparams(target_sparsity=0.1), tmp_path, QUIET, console())
    assert masks_of(magnitude)[1] != masks_of(run)[1]
    branch = run_branch(run, 1, "random", 0, QUIET, console())
    assert branch.metrics(1)["sparsity"] == pytest.approx(0.1, abs=1e-4)


def test_train_fraction_draws_a_seeded_stratified_subset_in_file_order() -> None:
    """Issue 13: data-limited transfer (1 % / 10 %) keeps every class, in proportion."""
    from collections import Counter

    from ticketlab.prepare import train_subset

    examples = [{"label": i % 10, "idx": i} for i in range(1000)]
    tenth = train_subset(examples, DataHparams(train_fraction=0.1))
    assert len(tenth) == 100 and Counter(e["label"] for e in tenth) == {k: 10 for k in range(10)}
    assert [e["idx"] for e in tenth] == sorted(e["idx"] for e in tenth)
    assert tenth == train_subset(examples, DataHparams(train_fraction=0.1))
    other = train_subset(examples, DataHparams(train_fraction=0.1, sample_seed=1))
    assert other != tenth and len(other) == 100
    tiny = train_subset(examples, DataHparams(train_fraction=0.001))
    assert Counter(e["label"] for e in tiny) == {k: 1 for k in range(10)}  # one per class
    with pytest.raises(TicketlabError, match="--train-fraction 0.0 must be in"):
        DataHparams(train_fraction=0.0)
