"""criteria.py: hand-computed magnitude, seeded random, Taylor |w·g| summed, Fisher ½·w²·mean g²."""

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from lightning_prune.criteria import Fisher, Magnitude, RandomScore, Taylor, make_criterion
from lightning_prune.mask_updates import update_masks
from lightning_prune.targets import find_targets

W = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])
G1 = torch.tensor([[0.5, 1.0], [-1.0, 0.0]])
G2 = torch.tensor([[-0.5, 3.0], [1.0, 2.0]])


def test_magnitude_is_abs() -> None:
    assert Magnitude().score("w", W).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_random_is_seeded_and_changes_after_reset() -> None:
    a, b, c = RandomScore(seed=3), RandomScore(seed=3), RandomScore(seed=4)
    first = a.score("layer.weight", W)
    assert torch.equal(first, b.score("layer.weight", W))
    assert not torch.equal(first, c.score("layer.weight", W))
    assert not torch.equal(first, a.score("other.weight", W))
    a.reset()
    assert not torch.equal(first, a.score("layer.weight", W))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.score("layer.weight", W), b.score("layer.weight", W))


def test_taylor_sums_abs_w_times_g_over_steps() -> None:
    taylor = Taylor()
    taylor.accumulate("w", W, G1)
    taylor.accumulate("w", W, G2)
    # |w·g1| + |w·g2| = [[0.5+0.5, 2+6], [3+3, 0+8]]
    assert taylor.score("w", W).tolist() == [[1.0, 8.0], [6.0, 8.0]]
    taylor.reset()
    with pytest.raises(RuntimeError, match="no gradients accumulated for 'w'"):
        taylor.score("w", W)


def test_fisher_is_half_w_squared_times_mean_g_squared() -> None:
    fisher = Fisher()
    fisher.accumulate("w", W, G1)
    fisher.accumulate("w", W, G2)
    # mean g² = [[0.25, 5], [1, 2]]; ½w² = [[0.5, 2], [4.5, 8]]
    assert fisher.score("w", W).tolist() == [[0.125, 10.0], [4.5, 16.0]]


def test_gradient_state_round_trips() -> None:
    fisher = Fisher()
    fisher.accumulate("w", W, G1)
    restored = Fisher()
    restored.load_state_dict(fisher.state_dict())
    fisher.accumulate("w", W, G2)
    restored.accumulate("w", W, G2)
    assert torch.equal(fisher.score("w", W), restored.score("w", W))
    assert restored.counts == {"w": 2}


def test_make_criterion() -> None:
    assert isinstance(make_criterion("taylor"), Taylor)
    custom = Fisher()
    assert make_criterion(custom) is custom
    with pytest.raises(ValueError, match=r"`criterion` must be one of .*'l2'"):
        make_criterion("l2")


def test_conv1d_scores_keep_weight_orientation() -> None:
    # Conv1D stores (in=4, out=2); scores come back in that shape and the mask prunes the same entries.
    layer = Conv1D(2, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -8.0], [2.0, 7.0], [-3.0, 6.0], [4.0, 5.0]]))
    model = torch.nn.Sequential(layer)
    taylor = Taylor()
    grad = torch.ones(4, 2)
    taylor.accumulate("0.weight", layer.weight, grad)
    scores = taylor.score("0.weight", layer.weight)
    assert scores.shape == (4, 2)
    targets = find_targets(model, ignore_output_head=False)
    update_masks(targets, {"0.weight": scores}, sparsity=0.5, scope="row", pattern=None)
    # Row-wise in matrix view (out, in): output 0 keeps |3|,|4|; output 1 keeps |8|,|7|.
    assert layer.weight.tolist() == [[0.0, -8.0], [0.0, 7.0], [-3.0, 0.0], [4.0, 0.0]]
