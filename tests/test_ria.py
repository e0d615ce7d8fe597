"""RIA: hand-computed scores and masks, the registered method, and prune_oneshot on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_prune.masking import get_masks
from lightning_prune.oneshot import FeatureNormStats, Ria, prune_oneshot, ria_mask, ria_scores
from lightning_prune.registry import ONESHOT_METHODS

# Row sums |W|: 8, 4; column sums: 5, 3, 3, 1. ‖X‖ = [1, 4, 9, 1], so ‖X‖^0.5 = [1, 2, 3, 1].
W = torch.tensor([[4.0, 2.0, -1.0, 1.0], [1.0, -1.0, 2.0, 0.0]])
NORMS = torch.tensor([1.0, 4.0, 9.0, 1.0])
# (|W|/row sum + |W|/column sum)·‖X‖^0.5, e.g. [0, 1]: (2/8 + 2/3)·2 = 11/6; [1, 2]: (2/4 + 2/3)·3 = 7/2.
SCORES = torch.tensor([[13 / 10, 11 / 6, 11 / 8, 9 / 8], [9 / 20, 7 / 6, 7 / 2, 0.0]])


def test_scores_by_hand() -> None:
    torch.testing.assert_close(ria_scores(W, NORMS), SCORES)
    # a = 0: relative importance alone; a = 1: times ‖X‖ itself.
    relative = torch.tensor([[13 / 10, 11 / 12, 11 / 24, 9 / 8], [9 / 20, 7 / 12, 7 / 6, 0.0]])
    torch.testing.assert_close(ria_scores(W, NORMS, a=0.0), relative)
    torch.testing.assert_close(ria_scores(W, NORMS, a=1.0), relative * NORMS)


def test_layer_scope_prunes_the_lowest_half_of_the_layer() -> None:
    # Lowest 4 of 8: 0 ([1, 3]), 9/20 ([1, 0]), 9/8 ([0, 3]), 7/6 ([1, 1]); row 0 keeps 3, row 1 keeps 1.
    expected = torch.tensor([[True, True, True, False], [False, False, True, False]])
    assert torch.equal(ria_mask(W, NORMS, 0.5), expected)


def test_row_scope_and_2_of_4_prune_the_lowest_half_of_each_row() -> None:
    # Row 0 drops 9/8 and 13/10; row 1 drops 0 and 9/20.
    expected = torch.tensor([[False, True, True, False], [False, True, True, False]])
    assert torch.equal(ria_mask(W, NORMS, 0.5, scope="row"), expected)
    assert torch.equal(ria_mask(W, NORMS, 0.5, pattern="2:4"), expected)  # one group of 4 per row


def test_all_zero_row_scores_zero_not_nan() -> None:
    weight = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    scores = ria_scores(weight, torch.ones(2))
    assert torch.isfinite(scores).all() and (scores[0] == 0).all()
    torch.testing.assert_close(scores[1], torch.tensor([1 / 4 + 1.0, 3 / 4 + 1.0]))


def test_registered_method_reads_the_feature_norms() -> None:
    stats = FeatureNormStats("x", 4)
    stats.add(torch.tensor([[1.0, 4.0, 9.0, 1.0]]))  # one token: ‖X‖ = [1, 4, 9, 1]
    method = ONESHOT_METHODS.create("ria", scope="row")
    assert isinstance(method, Ria) and not method.updates_weights
    weight, keep = method.prune(W, {FeatureNormStats: stats}, 0.5, None)
    assert weight is W and torch.equal(keep, ria_mask(W, NORMS, 0.5, scope="row"))


@pytest.mark.parametrize(
    "options, match", [({"a": -1.0}, "`a`"), ({"scope": "column"}, "`scope`"), ({"alpha": 1.0}, "does not take")]
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ONESHOT_METHODS.create("ria", **options)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_oneshot_with_ria_on_a_tiny_llama(pattern: str | None) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(2)]
    report = prune_oneshot(model, data, method="ria", sparsity=0.5, pattern=pattern, progress=False)
    assert report.global_sparsity == pytest.approx(0.5)
    masks = get_masks(model)
    assert len(masks) == 14
    for mask in masks.values():
        assert (~mask).sum() == mask.numel() // 2
        if pattern:
            assert mask.reshape(mask.shape[0], -1, 4).sum(-1).eq(2).all()


def test_pruning_ria_yaml_composes_and_builds_the_callback() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_prune.cli import CONFIG_DIR
    from lightning_prune.oneshot import DSnoT

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["recipe=wanda_2of4", "pruning=ria", "pruning.refine=dsnot", "pruning.method_options.a=1.0"],
        )
    callback = instantiate(cfg.pruning)
    assert isinstance(callback.solver, Ria) and callback.solver.a == 1.0 and callback.solver.scope == "layer"
    assert isinstance(callback.refiner, DSnoT) and callback.pattern == "2:4"
