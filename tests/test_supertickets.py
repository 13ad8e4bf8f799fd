"""SuperTickets: gates and their penalty on hand-built models, the interval schedule,
reactivation, the training loop's resumable parts, and a structurally pruned model that is
physically smaller and computes what the gated one did."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
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
from ticketlab.families.text import TextEncoderFamily
from ticketlab.hparams import PruneHparams, TrainHparams, build_section
from ticketlab.masks import Mask
from ticketlab.supertickets.gates import (
    GatePenalty,
    attach_gates,
    detach_gates,
    fold_gates,
    remove_units,
    rho_at,
    structural_weight_mask,
    unit_penalties,
)
from ticketlab.supertickets.hparams import SuperHparams
from ticketlab.supertickets.physical import shrink
from ticketlab.supertickets.search import schedule

FAMILY = TextEncoderFamily()


def tiny(kind: str = "bert") -> torch.nn.Module:
    """A 2-layer encoder with 4 heads of size 4 and 8 FFN neurons per layer."""
    torch.manual_seed(0)
    # weights 10x BERT's initial scale, so that every unit visibly moves the logits
    common = {"vocab_size": 60, "max_position_embeddings": 40, "initializer_range": 0.2}
    if kind == "distilbert":
        model = DistilBertForSequenceClassification(DistilBertConfig(
            dim=16, n_layers=2, n_heads=4, hidden_dim=8, **common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8,
            pad_token_id=1, **common))
    elif kind == "electra":
        model = ElectraForSequenceClassification(ElectraConfig(
            hidden_size=16, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=8, **common))
    else:
        model = BertForSequenceClassification(BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=8,
            **common))
    return model.eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # padding must keep working in the smaller model
    return {"input_ids": ids, "attention_mask": mask}


# --- the units the family describes ---------------------------------------------------------
def test_units_of_a_bert_layer_are_its_heads_and_ffn_neurons() -> None:
    groups = FAMILY.structural_units(tiny())
    assert [(g.kind, g.layer, g.count, g.size) for g in groups] == [
        ("head", 0, 4, 4), ("neuron", 0, 8, 1), ("head", 1, 4, 4), ("neuron", 1, 8, 1)]
    heads, ffn = groups[0], groups[1]
    assert heads.gated == "encoder.layer.0.attention.output.dense"
    assert heads.rows == ("encoder.layer.0.attention.self.query",
                          "encoder.layer.0.attention.self.key",
                          "encoder.layer.0.attention.self.value")
    assert (ffn.gated, ffn.rows) == ("encoder.layer.0.output.dense",
                                     ("encoder.layer.0.intermediate.dense",))
    # MACs per token: a head is 3 projections of 16x4 plus its 4 columns of the 16-wide output
    assert heads.macs == 3 * 16 * 4 + 4 * 16 and ffn.macs == 16 + 16


def test_resource_penalty_is_a_units_cost_over_the_mean_units() -> None:
    groups = FAMILY.structural_units(tiny())
    # mean cost: (8 heads x 256 + 16 neurons x 32) / 24 units = 106.67 MACs
    head, neuron = unit_penalties(groups, "resource")[:2]
    assert head == pytest.approx(256 / (2560 / 24)) and neuron == pytest.approx(32 / (2560 / 24))
    assert unit_penalties(groups, "uniform") == [1.0] * 4


def test_penalty_is_rho_times_the_sum_of_gate_magnitudes_after_warm_up() -> None:
    model = tiny()
    bank = attach_gates(model, FAMILY.structural_units(model), model.base_model)
    with torch.no_grad():
        bank.units[0].gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))  # |.| sums to 3.5
        bank.units[1].keep[:4] = 0.0  # removed units cost nothing: 4 of the 8 ones remain
    penalty = GatePenalty(bank, rho=0.01, warmup_steps=10, mode="uniform", start=5)
    assert rho_at(0, 0.01, 10) == 0.0 and rho_at(5, 0.01, 10) == pytest.approx(0.005)
    assert rho_at(10, 0.01, 10) == rho_at(99, 0.01, 10) == 0.01
    # step 5 of a 10-step warm-up: half of rho; 3.5 + 4 + 4 + 8 = 19.5
    with torch.no_grad():
        assert float(penalty.loss()) == pytest.approx(0.005 * 19.5)
        penalty.after_backward(12)
        assert float(penalty.loss()) == pytest.approx(0.01 * 19.5)


# --- a gate at zero removes exactly its unit ------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "roberta", "distilbert", "electra"])
def test_a_zero_gate_removes_exactly_its_unit_and_the_smaller_model_computes_the_same(
        kind: str) -> None:
    model = tiny(kind)
    base = model.base_model
    groups = FAMILY.structural_units(model)
    bank = attach_gates(model, groups, base)
    with torch.no_grad():
        for u in bank.units:  # gates away from 1, so folding them is really tested
            u.gate.copy_(torch.linspace(0.6, 1.4, u.group.count))
        bank.units[0].gate[2] = 0.0  # head 2 of layer 0
        bank.units[3].gate[5] = 0.0  # FFN neuron 5 of layer 1
    x = batch()
    with torch.no_grad():
        gated = model(**x).logits
        probe = copy.deepcopy(model)  # the head is gone from the output: its rows may hold anything
        q = probe.base_model.get_submodule(groups[0].rows[0])
        q.weight[8:12].normal_()
        assert torch.allclose(probe(**x).logits, gated, atol=1e-5)
        q.weight[4:8].normal_()  # a live head's rows do matter
        assert not torch.allclose(probe(**x).logits, gated, atol=1e-2)

    removed = remove_units(bank, {"head": 0, "neuron": 0}, threshold=1e-3)
    assert removed == {"head": 1, "neuron": 1}
    assert bank.units[0].keep.tolist() == [1, 1, 0, 1]
    assert bank.units[3].keep.tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert all(u.keep.all() for u in (bank.units[1], bank.units[2]))

    params = {n: p for n, p in base.named_parameters() if n.endswith("weight") and p.dim() == 2}
    cleared = structural_weight_mask(bank, params)
    q_name = f"{groups[0].rows[0]}.weight"
    assert (~cleared[q_name]).nonzero()[:, 0].unique().tolist() == [8, 9, 10, 11]
    out_name = f"{groups[0].gated}.weight"
    assert (~cleared[out_name]).nonzero()[:, 1].unique().tolist() == [8, 9, 10, 11]
    assert (~cleared[f"{groups[3].rows[0]}.weight"]).nonzero()[:, 0].unique().tolist() == [5]
    assert (~cleared[f"{groups[3].gated}.weight"]).nonzero()[:, 1].unique().tolist() == [5]
    assert int((~cleared[q_name]).sum()) == 4 * 16  # 4 rows of 16, nothing else

    plain = fold_gates(model.state_dict(), bank, FAMILY.base_prefix(model))
    keep = [[bool(b) for b in u.keep] for u in bank.units]
    detach_gates(model)
    model.load_state_dict(plain)
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, gated, atol=1e-5)  # folded: same output
        before = sum(p.numel() for p in model.parameters())
        shrink(base, groups, keep)
        small = model(**x).logits
    assert torch.allclose(small, gated, atol=1e-5)
    # one head (Q, K, V: 3 x (4x16 + 4); out: 16x4) and one neuron (16 + 1; 16) are gone
    assert before - sum(p.numel() for p in model.parameters()) == 3 * 68 + 64 + 17 + 16
    assert base.get_submodule(groups[0].rows[0]).out_features == 12
    assert base.get_submodule(groups[3].rows[0]).out_features == 7


def test_every_layer_keeps_one_unit_whatever_the_gates_say() -> None:
    model = tiny()
    bank = attach_gates(model, FAMILY.structural_units(model), model.base_model)
    with torch.no_grad():
        for u in bank.units:
            u.gate.zero_()
        bank.units[0].gate[3] = 1e-4  # the strongest of layer 0's heads, still below 1e-3
    remove_units(bank, {"head": 8, "neuron": 16}, threshold=1e-3)
    assert [int(u.keep.sum()) for u in bank.units] == [1, 1, 1, 1]
    assert bank.units[0].keep.tolist() == [0, 0, 0, 1]


def test_targets_remove_the_lowest_gates_over_all_layers() -> None:
    model = tiny()
    bank = attach_gates(model, FAMILY.structural_units(model), model.base_model)
    with torch.no_grad():
        bank.units[0].gate.copy_(torch.tensor([0.9, 0.1, 0.8, 0.7]))
        bank.units[2].gate.copy_(torch.tensor([0.2, 0.95, 0.3, 0.85]))
    removed = remove_units(bank, {"head": 3, "neuron": 0}, threshold=0.0)
    assert removed["head"] == 3
    assert bank.units[0].keep.tolist() == [1, 0, 1, 1]  # 0.1
    assert bank.units[2].keep.tolist() == [0, 1, 0, 1]  # 0.2, 0.3: layer 1 ends narrower


# --- the interval schedule ------------------------------------------------------------------
def test_schedule_prunes_ten_percent_more_each_interval_up_to_the_target(tiny_hparams) -> None:
    hp = tiny_hparams(train={"max_steps": 250}, target_sparsity=0.5, rate=0.1)
    plan = schedule(hp, SuperHparams(interval=25), 64)
    assert plan.count == 10 and plan.reach == 5
    assert plan.ratios == (0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
    assert [plan.steps(k) for k in (1, 2, 10)] == [(0, 25), (25, 50), (225, 250)]
    assert [plan.progress(k) for k in (1, 3, 5, 9)] == [0.2, 0.6, 1.0, 1.0]
    # the code's default interval: 20 of 350 epochs' worth of steps
    assert schedule(hp, SuperHparams(), 64).interval == round(250 * 20 / 350) == 14
    # a short last interval: 26 steps in 3 intervals of 10 steps, 30 % at the third
    short = schedule(dataclasses.replace(hp, train=TrainHparams(max_steps=26),
                                         prune=PruneHparams(target_sparsity=0.3, rate=0.1)),
                     SuperHparams(interval=10), 64)
    assert short.count == 3 and short.steps(3) == (20, 26) and short.ratios == (0.1, 0.2, 0.3)


def test_a_target_the_run_cannot_reach_is_refused(tiny_hparams) -> None:
    hp = tiny_hparams(train={"max_steps": 40}, target_sparsity=0.5, rate=0.1)
    with pytest.raises(TicketlabError, match="reaches only 40%") as e:
        schedule(hp, SuperHparams(interval=10), 64)
    assert "--interval 8 or less" in e.value.fix  # 40 steps // 5 points


def test_super_hparams_are_built_and_checked_from_flat_options() -> None:
    sp = build_section(SuperHparams, {"head_target": 0.25, "reactivate": True,
                                      "interval": None}, "supertickets")
    assert (sp.head_target, sp.reactivate, sp.interval) == (0.25, True, None)
    with pytest.raises(TicketlabError, match="--head-target 1.0 is outside"):
        SuperHparams(head_target=1.0)
    with pytest.raises(TicketlabError, match="--interval 0"):
        SuperHparams(interval=0)
    with pytest.raises(TicketlabError, match="Unknown --penalty"):
        build_section(SuperHparams, {"penalty": "flops"}, "supertickets")
    with pytest.raises(TicketlabError, match="not a float"):
        build_section(SuperHparams, {"gate_l1": "lots"}, "supertickets")
    assert PruneHparams(rate=0.1).rate == 0.1  # the per-interval rate is the core's --rate


# --- the loop's resumable parts ----------------------------------------------------------------
def test_a_run_trained_in_parts_equals_one_uninterrupted_run(tiny_hparams) -> None:
    from ticketlab.hparams import Runtime
    from ticketlab.prepare import prepare
    from ticketlab.train import train

    hp = tiny_hparams(train={"max_steps": 10, "warmup_ratio": 0.2})  # 4 batches an epoch
    setup = prepare(hp, Runtime(progress=False))
    args = (setup.prunable, None, setup.train_features, setup.collator, hp.train,
            Runtime(progress=False))
    setup.model.load_state_dict(setup.theta0)
    whole = train(setup.model, *args, seed=0)
    expected = {k: v.clone() for k, v in setup.model.state_dict().items()}
    setup.model.load_state_dict(setup.theta0)
    state, steps = None, 0
    for stop in (3, 7, 10):  # parts that cross epoch boundaries (steps 4 and 8)
        part = train(setup.model, *args, seed=0, resume=state, stop_step=stop)
        state, steps = part.state, steps + part.steps
        assert state.step == stop
    assert steps == whole.steps == 10
    got = setup.model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_parameters_with_an_lr_scale_get_their_own_learning_rate() -> None:
    from ticketlab.train import _optimizer

    model = tiny()
    bank = attach_gates(model, FAMILY.structural_units(model), model.base_model, lr_scale=50.0)
    opt = _optimizer(model, TrainHparams(lr=1e-4))
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-4, pytest.approx(5e-3)]
    gates = {id(u.gate) for u in bank.units}
    assert {id(p) for p in opt.param_groups[2]["params"]} == gates
    assert opt.param_groups[2]["weight_decay"] == 0.0
    plain = _optimizer(tiny(), TrainHparams(lr=1e-4))
    assert len(plain.param_groups) == 2  # nothing scaled: the groups as they always were
    sgd = _optimizer(model, TrainHparams(lr=1e-4, optimizer="sgd", weight_decay=0.1))
    assert [g["lr"] for g in sgd.param_groups] == [1e-4, pytest.approx(5e-3)]  # SGD too
    assert {id(p) for p in sgd.param_groups[1]["params"]} == gates
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.1, 0.0]
    assert len(_optimizer(tiny(), TrainHparams(optimizer="sgd")).param_groups) == 1


def test_gates_stay_off_the_plain_state_dict() -> None:
    model = tiny()
    keys = set(model.state_dict())
    attach_gates(model, FAMILY.structural_units(model), model.base_model)
    assert any(k.startswith("supertickets_gates.") for k in model.state_dict())
    detach_gates(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():  # and the hooks are gone: the output is θ0's
        fresh = tiny()
        assert torch.equal(model(**batch()).logits, fresh(**batch()).logits)


def test_structural_mask_is_part_of_the_weight_mask() -> None:
    from ticketlab.supertickets.gates import structural_only, with_structure

    model = tiny()
    base = model.base_model
    bank = attach_gates(model, FAMILY.structural_units(model), base)
    params = {n: p for n, p in base.named_parameters() if n.endswith("weight") and p.dim() == 2
              and "layer" in n}
    with torch.no_grad():
        bank.units[1].keep[0] = 0.0  # one FFN neuron of layer 0
    cleared = structural_weight_mask(bank, params)
    only = structural_only(params, cleared)
    assert only.num_total - only.num_kept == 16 + 16  # its FFN-in row and FFN-out column
    half = Mask({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) > 0.5
                 for n, p in params.items()})
    both = with_structure(half, cleared)
    assert both.num_kept <= half.num_kept and all(
        not bool((both.tensors[n] & ~half.tensors[n]).any()) for n in params)



def test_removals_after_the_weights_reached_their_ratio_are_given_back_strongest_first() -> None:
    """A point whose removals would push the mask past its sparsity gives back units, the
    strongest gates first, exactly as few as needed: SuperTickets stay at IMP's sparsity."""
    from ticketlab.supertickets.gates import cap_removals, with_structure

    model = tiny()
    base = model.base_model
    bank = attach_gates(model, FAMILY.structural_units(model), base)
    params = {n: p for n, p in base.named_parameters() if n.endswith("weight") and p.dim() == 2
              and "encoder" in n}
    with torch.no_grad():
        for u in bank.units:
            u.gate.copy_(torch.linspace(0.1, 1.0, u.group.count))
    g = torch.Generator().manual_seed(0)
    mask = Mask({n: torch.rand(p.shape, generator=g) > 0.4 for n, p in params.items()}, {})
    before = [u.keep.clone() for u in bank.units]
    remove_units(bank, {"head": 4, "neuron": 12}, threshold=0.0)
    over = with_structure(mask, structural_weight_mask(bank, params)).sparsity
    budget = 0.5
    assert over > budget  # the removals alone would overshoot
    removed = [[bool(k == 0) for k in u.keep] for u in bank.units]
    back = cap_removals(bank, before, mask, params, budget)
    after = with_structure(mask, structural_weight_mask(bank, params)).sparsity
    assert after <= budget + 1e-9 and sum(back.values()) >= 1
    given = [(float(u.gate[j].detach()), ui, j) for ui, u in enumerate(bank.units)
             for j in range(u.group.count) if removed[ui][j] and u.keep[j]]
    still_gone = [float(u.gate[j].detach()) for ui, u in enumerate(bank.units)
                  for j in range(u.group.count) if removed[ui][j] and not u.keep[j]]
    assert len(given) == sum(back.values())
    assert min(g for g, _, _ in given) >= max(still_gone)  # the strongest came back
    # exactly as few as needed: removing the weakest unit given back again overshoots
    _, ui, j = min(given)
    with torch.no_grad():
        bank.units[ui].keep[j] = 0.0
    assert with_structure(mask, structural_weight_mask(bank, params)).sparsity > budget
    # under the budget already: nothing is given back
    assert cap_removals(bank, [u.keep.clone() for u in bank.units], mask, params, 1.0) == {}
