"""Pruning: global vs layerwise ranking, exact schedules, only survivors compete."""

from __future__ import annotations

import pytest
import torch

from ticketlab.errors import TicketlabError
from ticketlab.masks import Mask
from ticketlab.pruning import prune, random_mask_like, sparsity_schedule


def hand_weights() -> dict[str, torch.Tensor]:
    # "big" has large magnitudes, "small" tiny ones: a global ranking prunes "small" first,
    # a layerwise one prunes both equally.
    return {
        "big": torch.tensor([[1.0, -2.0, 3.0, -4.0], [5.0, -6.0, 7.0, -8.0]]),
        "small": torch.tensor([[0.1, -0.2, 0.3, -0.4], [0.5, -0.6, 0.7, -0.8]]),
    }


def test_global_ranking_prunes_smallest_over_all_matrices() -> None:
    w = hand_weights()
    mask = prune(w, Mask.ones_like(w), 0.5, "global")
    assert not mask.tensors["small"].any()  # all 8 smallest weights are in "small"
    assert mask.tensors["big"].all()
    assert mask.sparsity == 0.5


def test_layerwise_ranking_prunes_each_matrix_equally() -> None:
    w = hand_weights()
    mask = prune(w, Mask.ones_like(w), 0.5, "layerwise")
    # the 4 lowest |w| of each matrix: 1,2,3,4 and 0.1..0.4 (first row of each)
    expected = torch.tensor([[False] * 4, [True] * 4])
    assert torch.equal(mask.tensors["big"], expected)
    assert torch.equal(mask.tensors["small"], expected)


def test_global_normalized_ranking_spares_uniformly_small_matrix() -> None:
    w = hand_weights()
    mask = prune(w, Mask.ones_like(w), 0.5, "global-normalized")
    # after dividing by each matrix's mean |w| both matrices are identical, so each loses half
    assert mask.per_tensor_sparsity() == {"big": 0.5, "small": 0.5}


def test_only_surviving_weights_compete() -> None:
    w = hand_weights()
    first = prune(w, Mask.ones_like(w), 0.25, "global")
    # make the already-pruned weights the *largest*: they must not be counted as survivors
    w2 = {k: torch.where(first.tensors[k], v, torch.full_like(v, 100.0)) for k, v in w.items()}
    second = prune(w2, first, 0.5, "global")
    assert second.num_kept == 8
    for k in w:  # nothing that was pruned comes back
        assert not (second.tensors[k] & ~first.tensors[k]).any()
    # the next 4 removed are the smallest survivors: 0.5..0.8 of "small"
    assert not second.tensors["small"].any()


def test_schedule_of_original_is_exact() -> None:
    assert sparsity_schedule(0.9, 0.1, "original") == [round(0.1 * k, 12) for k in range(10)]
    params = {"a": torch.randn(50, 40), "b": torch.randn(30, 20)}  # 2,600 weights
    mask = Mask.ones_like(params)
    for level, s in enumerate(sparsity_schedule(0.9, 0.1, "original")[1:], start=1):
        mask = prune(params, mask, s)
        assert mask.num_total - mask.num_kept == round(2600 * level / 10)


def test_schedule_of_remaining_is_one_minus_point_nine_to_the_k() -> None:
    levels = sparsity_schedule(0.7, 0.1, "remaining")
    assert levels == pytest.approx([1 - 0.9**k for k in range(len(levels))])
    assert levels[-1] >= 0.7 > levels[-2]


def test_random_pruning_is_seeded_and_exact() -> None:
    params = {"a": torch.randn(64, 64)}
    m1 = prune(params, Mask.ones_like(params), 0.3, "random", seed=1)
    m2 = prune(params, Mask.ones_like(params), 0.3, "random", seed=1)
    m3 = prune(params, Mask.ones_like(params), 0.3, "random", seed=2)
    assert m1 == m2 and not m1 == m3
    assert m1.num_total - m1.num_kept == round(0.3 * 64 * 64)


def test_random_mask_like_keeps_overall_or_per_matrix_sparsity() -> None:
    w = hand_weights()
    imp = prune(w, Mask.ones_like(w), 0.5, "global")
    assert random_mask_like(imp, seed=0).sparsity == 0.5
    layerwise = random_mask_like(imp, seed=0, layerwise=True)
    assert layerwise.per_tensor_sparsity() == imp.per_tensor_sparsity()


def test_target_below_current_sparsity_is_refused() -> None:
    w = hand_weights()
    mask = prune(w, Mask.ones_like(w), 0.5)
    with pytest.raises(TicketlabError, match="below the mask's current"):
        prune(w, mask, 0.25)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range_is_refused(bad: float) -> None:
    w = hand_weights()
    with pytest.raises(TicketlabError, match="outside"):
        prune(w, Mask.ones_like(w), bad)


# --- the criteria registry and a criterion with training-time statistics (issue 11) ---------
def test_movement_scores_accumulate_minus_w_times_grad_over_steps() -> None:
    from ticketlab.pruning import MovementScores

    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    stats = MovementScores({"w": w})
    w.grad = torch.tensor([[1.0, 1.0], [-1.0, 0.0]])
    stats.after_backward(1)
    w.grad = torch.tensor([[0.5, 0.0], [-1.0, 2.0]])
    stats.after_backward(2)
    # S = -(w*g1 + w*g2) with w fixed here: [[-(1+0.5), -(-2+0)], [-(-3-3), -(0+1)]]
    assert torch.equal(stats.result()["w"], torch.tensor([[-1.5, 2.0], [6.0, -1.0]]))


def test_movement_pruning_keeps_weights_moving_away_from_zero_whatever_their_size() -> None:
    w = hand_weights()
    # Every "big" weight is being pulled towards zero (w·g > 0), every "small" one pushed away:
    # magnitude pruning would remove "small", movement pruning removes "big".
    stats = {"big": w["big"].sign() * 0.5, "small": -w["small"].sign()}
    stats = {n: -(w[n] * g) for n, g in stats.items()}
    mask = prune(w, Mask.ones_like(w), 0.5, "movement", stats=stats)
    assert not mask.tensors["big"].any() and mask.tensors["small"].all()
    with pytest.raises(TicketlabError, match="no training statistics"):
        prune(w, Mask.ones_like(w), 0.5, "movement")


def test_a_new_criterion_is_one_registry_entry(monkeypatch) -> None:
    from ticketlab import pruning
    from ticketlab.hparams import PruneHparams

    def last_row_first(weights, mask, generator, stats):
        return {n: torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape)
                for n, t in mask.tensors.items()}

    monkeypatch.setitem(pruning.CRITERIA, "position",
                        pruning.Criterion("position", "prune by position", last_row_first))
    w = hand_weights()
    mask = prune(w, Mask.ones_like(w), 0.5, "position")
    assert mask.tensors["big"][1].all() and not mask.tensors["big"][0].any()
    assert PruneHparams(method="position").method == "position"  # the hparams accept it
    assert "position: prune by position" in pruning.methods_help()
