"""lightning_prune.learned: candidate patterns, prior logits, soft and hard masks, annealing, the masked forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_prune.learned import (
    Anneal,
    LearnedMasks,
    bytes_per_weight,
    candidate_count,
    candidate_patterns,
    check_candidates,
    gumbel_noise,
    hard_mask,
    init_logits,
    pattern_indices,
    soft_mask,
)
from lightning_prune.selection import group_counts, select_n_m
from lightning_prune.targets import find_targets

ONE_TO_EIGHT = torch.arange(1.0, 9.0).reshape(1, 8)


def test_candidates_are_every_way_to_keep_n_of_m() -> None:
    patterns = candidate_patterns("2:4")
    assert patterns.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
    assert [candidate_count(p) for p in ("2:4", "1:4", "4:8")] == [6, 4, 70]
    assert candidate_patterns("4:8").sum(1).eq(4).all() and candidate_patterns("4:8").unique(dim=0).shape[0] == 70


def test_prior_indices_of_weights_one_to_eight() -> None:
    keep = select_n_m(ONE_TO_EIGHT, 2, 4)  # magnitude 2:4 of [1..8]: [0,0,1,1,0,0,1,1]
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1]]
    assert pattern_indices(keep, "2:4").tolist() == [[5, 5]]
    assert pattern_indices(torch.tensor([[1, 0, 1, 0, 0, 1, 0, 1]], dtype=torch.bool), "2:4").tolist() == [[1, 4]]
    with pytest.raises(ValueError, match=r"exactly 2 of every 4 .* group \[0, 1\] keeps 3"):
        pattern_indices(torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.bool), "2:4")


def test_a_huge_prior_makes_the_learned_mask_the_prior() -> None:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    prior = select_n_m(weight.abs(), 2, 4)
    logits = init_logits(weight.shape, "2:4", prior, prior_strength=1e4, generator=torch.Generator().manual_seed(1))
    assert logits.shape == (16, 8, 6)
    assert torch.equal(hard_mask(logits, candidate_patterns("2:4")), prior)
    # MaskLLM's prior: every candidate but the prior's moves down by strength·std(logits); the prior's stays
    plain = init_logits(weight.shape, "2:4", None, generator=torch.Generator().manual_seed(1))
    shifted = init_logits(weight.shape, "2:4", prior, 3.0, generator=torch.Generator().manual_seed(1))
    onehot = nn.functional.one_hot(pattern_indices(prior, "2:4"), 6).bool()
    assert torch.equal(shifted[onehot], plain[onehot])
    torch.testing.assert_close(shifted[~onehot], plain[~onehot] - 3.0 * plain.std())


def test_a_row_block_gets_the_logits_and_noise_of_those_rows_of_the_whole() -> None:
    """What an FSDP2 rank holds (rows 6-9 of 10) is what one process holds there: prior shift by the whole std."""
    weight = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    prior = select_n_m(weight.abs(), 2, 4)
    whole = init_logits(weight.shape, "2:4", prior, 3.0, generator=torch.Generator().manual_seed(1))
    block = init_logits(weight.shape, "2:4", prior[6:], 3.0, generator=torch.Generator().manual_seed(1), rows=(6, 4))
    assert block.shape == (4, 2, 6) and torch.equal(block, whole[6:])
    noise = gumbel_noise(whole, torch.Generator().manual_seed(2))
    assert torch.equal(gumbel_noise(block, torch.Generator().manual_seed(2), rows=(6, 4, 10)), noise[6:])


def test_as_tau_goes_to_zero_the_soft_mask_is_the_hard_mask() -> None:
    logits = torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(2))
    patterns = candidate_patterns("2:4")
    hard = hard_mask(logits, patterns)
    assert hard.shape == (4, 32) and torch.equal(group_counts(hard, 4), torch.full((4, 8), 2, dtype=torch.uint8))
    assert torch.equal(soft_mask(logits, patterns, tau=1e-6, scale=1.0), hard.float())
    warm = soft_mask(logits, patterns, tau=4.0, scale=1.0)  # hot: every weight partly kept, 2 per group on average
    assert (warm > 0).all() and (warm < 1).all()
    torch.testing.assert_close(warm.reshape(4, 8, 4).sum(-1), torch.full((4, 8), 2.0))


def test_refuses_patterns_with_too_many_candidates_naming_the_memory() -> None:
    assert check_candidates("4:8") == 70 and bytes_per_weight("2:4") == 18.0  # 6/4 fp32 logits + 2 Adam moments
    assert bytes_per_weight("2:4", torch.bfloat16) == 9.0
    with pytest.raises(ValueError, match=r"'8:16' has C\(M, N\)=12870 .* 9652 bytes per pruned weight"):
        check_candidates("8:16")


def test_anneal_linear_and_exponential() -> None:
    tau = Anneal(4.0, 0.05, steps=10)
    assert [tau(0), tau(10), tau(20), tau(-1)] == [4.0, 0.05, 0.05, 4.0] and tau(5) == pytest.approx(2.025)
    geometric = Anneal(4.0, 0.04, steps=2, shape="exponential")
    assert geometric(1) == pytest.approx(0.4) and geometric(2) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="non-zero `start` and `end` of one sign"):
        Anneal(1e-5, 0.0, 10, "exponential")
    with pytest.raises(ValueError, match="`steps`"):
        Anneal(1.0, 0.0, 0)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_the_soft_masks_gradient_reaches_the_logits_and_never_the_frozen_weights() -> None:
    model = mlp()
    targets = find_targets(model, include=["0"])
    learner = LearnedMasks(targets, "2:4", seed=0)
    model[0].weight.requires_grad_(False)
    learner.attach()
    learner.sample(tau=1.0, scale=1.0)
    model(torch.randn(5, 8)).square().sum().backward()
    logits = learner.logits["0.weight"]
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert model[0].weight.grad is None and isinstance(model[0].weight, nn.Parameter)
    assert model[2].weight.grad is not None  # the rest trains as usual


def test_a_sample_gives_the_soft_mask_in_any_mode_otherwise_the_hard_one_and_the_parameter_stays() -> None:
    model = mlp()
    (target,) = find_targets(model, include=["0"])
    dense = copy.deepcopy(model)
    learner = LearnedMasks([target], "2:4", seed=0)
    learner.attach()
    x = torch.randn(3, 8)
    hard = learner.hard_masks()["0.weight"]
    model.eval()
    with torch.no_grad():
        dense[0].weight.mul_(hard)
    assert torch.equal(model(x), dense(x))  # no sample: W where the argmax keeps it
    learner.sample(tau=4.0, scale=1.0)  # a training step, eval mode or not (Lightning keeps HF models' eval mode)
    soft = learner._soft["0.weight"]
    expected = nn.functional.linear(x, model[0].weight * soft, model[0].bias)
    assert torch.equal(model[0](x), expected) and soft.requires_grad
    model.train()
    assert torch.equal(model[0](x), expected)
    learner.clear_sample()
    assert torch.equal(model(x), dense(x))
    assert list(dict(model.named_parameters())) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert model.state_dict().keys() == dense.state_dict().keys()
    learner.detach()
    assert torch.equal(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))


def test_a_forward_that_raises_puts_the_parameter_back() -> None:
    model = mlp()
    learner = LearnedMasks(find_targets(model, include=["0"]), "2:4")
    learner.attach()
    weight = model[0].weight
    with pytest.raises(RuntimeError):
        model[0](torch.randn(3, 5))  # wrong width
    assert model[0].weight is weight


def test_regularizer_adds_minus_two_lambda_w_squared_m_to_the_masks_gradient() -> None:
    model = mlp()
    (target,) = find_targets(model, include=["0"])
    plain, regular = LearnedMasks([target], "2:4", seed=3), LearnedMasks([target], "2:4", seed=3)
    regular.regularizer = 0.5
    grads = []
    for learner in (plain, regular):
        learner.attach()
        learner.sample(tau=1.0, scale=1.0)
        model(torch.ones(2, 8)).sum().backward()
        grads.append(learner.logits["0.weight"].grad.clone())
        learner.detach()
    logits = plain.logits["0.weight"].detach().requires_grad_(True)
    torch.manual_seed(0)
    noise_generator = torch.Generator().manual_seed(4)  # the noise of seed 3 (init stream 3, noise stream 4)
    from lightning_prune.learned import gumbel_noise

    mask = soft_mask(logits, candidate_patterns("2:4"), 1.0, 1.0, gumbel_noise(logits, noise_generator))
    (-0.5 * (target.weight.detach() * mask).square().sum()).backward()
    torch.testing.assert_close(grads[1] - grads[0], logits.grad)


def test_state_dict_round_trip_restores_logits_and_the_noise_stream() -> None:
    model = mlp()
    targets = find_targets(model, include=["0", "2"])
    first = LearnedMasks(targets, "2:4", seed=0)
    state = first.state_dict()
    first.sample(1.0, 1.0)
    expected = {name: mask.detach().clone() for name, mask in first._soft.items()}
    second = LearnedMasks(targets, "2:4", seed=7)  # other logits and noise until loaded
    second.load_state_dict(state)
    second.sample(1.0, 1.0)
    for name, mask in expected.items():
        assert torch.equal(second._soft[name].detach(), mask), name
    with pytest.raises(ValueError, match="saved logits are for"):
        LearnedMasks(targets[:1], "2:4").load_state_dict(state)


def test_bf16_logits_and_memory_per_weight() -> None:
    model = mlp()
    targets = find_targets(model, include=["0"])
    learner = LearnedMasks(targets, "2:4", dtype=torch.bfloat16)
    assert learner.logits["0.weight"].dtype == torch.bfloat16
    optimizer = torch.optim.AdamW(learner.parameters(), lr=0.1)
    learner.sample(1.0, 1.0)
    learner.attach()
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    assert learner.memory(optimizer) == {"logits": 3.0, "optimizer": 6.0, "total": 9.0}
    assert group_counts(learner.hard_masks()["0.weight"], 4).eq(2).all()
