"""Group scores on hand-computable weights, unit selection, and the refusals of `prune_structured`."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lightning_prune.calibration.stats import FeatureNormStats
from lightning_prune.masking import get_mask
from lightning_prune.registry import STRUCTURED_SCORES
from lightning_prune.structured import (
    BlockInfluence,
    FeatureMomentStats,
    GroupFluctuation,
    GroupMagnitude,
    GroupTaylor,
    GroupWanda,
    choose_removed,
    find_groups,
    prune_structured,
)
from tests.conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama


def _mlp() -> nn.Sequential:
    """2 → 3 → 2: neuron i is row i of `up` (and its bias) and column i of `down`."""
    net = nn.Sequential(OrderedDict([("up", nn.Linear(2, 3)), ("act", nn.ReLU()), ("down", nn.Linear(3, 2))]))
    with torch.no_grad():
        net.up.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 1.0]]))
        net.up.bias.copy_(torch.tensor([9.0, 9.0, 9.0]))
        net.down.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [-1.0, 4.0, 0.0]]))
    return net


def test_registered_scores() -> None:
    assert {"magnitude", "wanda", "flap", "taylor", "block_influence"} <= set(STRUCTURED_SCORES.names())


def test_magnitude_is_the_group_norm_of_its_weights() -> None:
    group = find_groups(_mlp(), "neuron")[0]
    # L1: |1|+|-2| + |1|+|-1| = 5; 0.5+0.5 + 0+4 = 5; 3+1 + 2+0 = 6 (biases are not weights).
    assert GroupMagnitude(p=1).score(group, {}).tolist() == [5.0, 5.0, 6.0]
    expected_l2 = torch.tensor([1 + 4 + 1 + 1, 0.25 + 0.25 + 16, 9 + 1 + 4]).sqrt()
    assert torch.allclose(GroupMagnitude(p=2).score(group, {}), expected_l2)


def test_wanda_sums_weight_times_input_norm_over_the_group() -> None:
    group = find_groups(_mlp(), "neuron")[0]
    up_in, down_in = FeatureNormStats("up", 2), FeatureNormStats("down", 3)
    up_in.add(torch.tensor([[3.0, 4.0]]))  # ‖X‖ = (3, 4)
    down_in.add(torch.tensor([[1.0, 2.0, 0.0]]))  # ‖X‖ = (1, 2, 0)
    # neuron 0: 1·3 + 2·4 + (1 + 1)·1 = 13; neuron 1: 0.5·3 + 0.5·4 + (0 + 4)·2 = 11.5; neuron 2: 9 + 4 + 0 = 13
    assert GroupWanda().score(group, {"up": up_in, "down": down_in}).tolist() == [13.0, 11.5, 13.0]


def test_flap_fluctuation_and_bias_compensation() -> None:
    net = _mlp()
    group = find_groups(net, "neuron")[0]
    stats = FeatureMomentStats("down", 3)
    stats.add(torch.tensor([[1.0, 2.0, 5.0], [3.0, 2.0, 1.0]]))  # mean (2, 2, 3), variance (1, 0, 4)
    flap = GroupFluctuation()
    # Var_j · ‖W_:,j‖²: 1·2 = 2, 0·16 = 0, 4·4 = 16
    assert flap.score(group, {"down": stats}).tolist() == [2.0, 0.0, 16.0]
    bias = net.down.bias.detach().clone()
    flap.compensate(group, torch.tensor([False, True, False]), {"down": stats})
    # the removed neuron's mean output W_:,1 · E[X_1] = (0, 4)·2 moves into the bias
    assert torch.allclose(net.down.bias, bias + torch.tensor([0.0, 8.0]))


def test_taylor_squares_the_group_first_order_term_and_averages_steps() -> None:
    net = _mlp()
    group = find_groups(net, "neuron")[0]
    taylor = GroupTaylor()
    for scale in (1.0, 3.0):
        for layer in (net.up, net.down):
            layer.weight.grad = torch.full_like(layer.weight, scale)
        taylor.accumulate([group])
    # Σ w over each group: -1 + 0 = -1; 1 + 4 = 5; -2 + 2 = 0 → (Σ w·g)² = s²·(1, 25, 0),
    # mean over s = 1, 3 → 5·(1, 25, 0)
    assert taylor.score(group, {}).tolist() == [5.0, 125.0, 0.0]
    taylor.reset()
    with pytest.raises(ValueError, match="needs training steps"):
        taylor.score(group, {})


def test_block_influence_is_one_minus_cosine() -> None:
    x_in = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    x_out = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert BlockInfluence.token_influence(x_in, x_out).tolist() == [1.0, 2.0]


def test_choose_removed_lowest_first_ties_by_index_and_monotone() -> None:
    scores = torch.tensor([3.0, 1.0, 1.0, 0.5])
    assert choose_removed(scores, 2).tolist() == [False, True, False, True]
    assert choose_removed(scores, 1, already=torch.tensor([True, False, False, False])).tolist() == [
        True,
        False,
        False,
        False,
    ]


def test_prune_structured_masks_exact_counts_and_keeps_gradients_out() -> None:
    model = tiny_llama()
    report = prune_structured(model, None, mlp_sparsity=0.25)
    down = model.model.layers[0].mlp.down_proj
    assert int((~get_mask(down)).all(0).sum()) == 16  # 16 of 64 columns
    assert report.kept == {"model.layers.0.mlp": (48, 64)}
    assert report.parameters_before - report.parameters_after == 16 * 32 * 3


def test_refusals_name_what_can_be_pruned_instead() -> None:
    with pytest.raises(ValueError, match=r"heads.*mlp_sparsity"):
        prune_structured(tiny_bert_classifier(), None, head_sparsity=0.5)
    with pytest.raises(ValueError, match=r"heads.*mlp_sparsity"):
        prune_structured(tiny_gpt2(), None, head_sparsity=0.5)
    with pytest.raises(ValueError, match="normalises after the residual"):
        prune_structured(_bert(2), [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], drop_layers=1)
    with pytest.raises(ValueError, match="`mlp_sparsity` must be"):
        prune_structured(tiny_llama(), None, mlp_sparsity=1.0)
    with pytest.raises(ValueError, match="`drop_layers` must be"):
        prune_structured(tiny_llama(), None, drop_layers=1)
    with pytest.raises(ValueError, match="nothing to prune"):
        prune_structured(tiny_llama(), None)
    with pytest.raises(ValueError, match="`method` must be"):
        prune_structured(tiny_llama(), None, mlp_sparsity=0.5, method="block_influence")
    with pytest.raises(ValueError, match="calibration"):
        prune_structured(tiny_llama(), None, mlp_sparsity=0.5, method="wanda")
    with pytest.raises(ValueError, match="full width"):
        prune_structured(_llama(2), None, mlp_sparsity=0.5, ignore=r"layers\.0\.")


def test_flap_refuses_a_bias_the_config_cannot_add_and_leaves_the_model_untouched() -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=48,
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot add one"):
        prune_structured(model, [{"input_ids": torch.zeros(1, 4, dtype=torch.long)}], mlp_sparsity=0.5, method="flap")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rounding_that_changes_the_request_is_warned_and_recorded() -> None:
    with pytest.warns(UserWarning, match="removing 0"):
        report = prune_structured(tiny_llama(), None, head_sparsity=0.2)
    assert report.notes and "removing 0" in report.notes[0]


def test_conv_layers_refuse_activation_scores() -> None:
    from lightning_prune.models.classifier import build_digits_net

    net = build_digits_net("cnn", hidden=16)
    group = find_groups(net, "filter")[0]
    with pytest.raises(ValueError, match="Conv2d"):
        GroupWanda().check(group)


def test_unknown_follower_is_named() -> None:
    net = nn.Sequential(
        OrderedDict([("conv", nn.Conv2d(1, 4, 3)), ("odd", nn.Upsample(scale_factor=2)), ("conv2", nn.Conv2d(4, 4, 3))])
    )
    with pytest.raises(ValueError, match="odd"):
        find_groups(net, "filter")


def _llama(layers: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=48,
        )
    )


def _bert(layers: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(
        BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, vocab_size=48)
    )


def test_head_counts_the_config_rejects_are_refused_before_pruning() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=48,
        )
    )
    with pytest.raises(ValueError, match=r"keeps 3 of 4 .*accepts: \[0.5, 0.75\]"):
        prune_structured(model, None, head_sparsity=0.25)
    assert get_mask(model.model.layers[0].self_attn.q_proj) is None
