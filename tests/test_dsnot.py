"""DSnoT: hand-checked swaps, never a larger expected error, exact counts and N:M, the statistics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_prune.masking import get_masks
from lightning_prune.oneshot import (
    DSnoT,
    FeatureNormStats,
    HessianStats,
    dsnot_refine,
    expected_error,
    magnitude_mask,
    prune_oneshot,
    ria_mask,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_prune.oneshot.method import LayerStats
from lightning_prune.registry import MASK_REFINERS


def unit_stats(columns: int) -> FeatureNormStats:
    """Inputs 0 and 2 in every feature: E[X] = 1, Var[X] = 1, ‖X‖ = 2."""
    stats = FeatureNormStats("x", columns)
    stats.add(torch.tensor([[0.0] * columns, [2.0] * columns]))
    return stats


def test_statistics_sum_first_moments_and_reduce_across_ranks() -> None:
    inputs = torch.tensor([[1.0, -2.0], [3.0, 0.0], [2.0, 2.0]])
    whole, part_a, part_b = FeatureNormStats("x", 2), FeatureNormStats("x", 2), FeatureNormStats("x", 2)
    whole.add(inputs)
    part_a.add(inputs[:1])
    part_b.add(inputs[1:])
    for a, b in zip(part_a.tensors(), part_b.tensors()):  # what an all-reduce sum does
        a += b
    for a, b in zip(part_a.tensors(), whole.tensors()):
        assert torch.equal(a, b)
    assert len(whole.tensors()) == 3 and whole.first.dtype == torch.float32
    torch.testing.assert_close(whole.mean(), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(whole.variance(), torch.tensor([2 / 3, 8 / 3]))
    torch.testing.assert_close(whole.feature_norms(), torch.tensor([14.0, 8.0]).sqrt())


def test_one_swap_by_hand() -> None:
    # Pruned 1 and 2 leave ε = 1 + 2 = 3. Grow the pruned weight with the largest W·E[X]/Var (2, column
    # 1) and prune the kept one that lowers ε (−2.5, column 3): ε = 3 − 2 − 2.5 = −1.5, |ε| shrinks.
    # Then ε < 0 and no pruned weight has W·E[X] < 0: the row stops.
    dense = torch.tensor([[1.0, 2.0, 3.0, -2.5]])
    keep = torch.tensor([[False, False, True, True]])
    weight, refined = dsnot_refine(dense, dense, keep, unit_stats(4))
    assert torch.equal(refined, torch.tensor([[False, True, True, False]]))
    assert torch.equal(weight, torch.tensor([[0.0, 2.0, 3.0, 0.0]])) and not torch.signbit(weight).any()
    torch.testing.assert_close(expected_error(dense, weight, unit_stats(4).mean()), torch.tensor([-1.5]))
    # Keeping the sign of ε refuses that swap (it crosses zero), so nothing changes.
    _, same_sign = dsnot_refine(dense, dense, keep, unit_stats(4), without_same_sign=False)
    assert torch.equal(same_sign, keep)


def test_n_m_swaps_stay_inside_the_group() -> None:
    # 2:4, ε = 1 + 2 + 0.5 + 0.5 = 4. Grow column 1 (W·E[X] = 2), prune the lowest |W|·‖X‖ kept weight
    # of its group (column 3, −1): ε = 4 − 2 − 1 = 1. Next: grow column 0 (1) and prune column 2 (3),
    # the group's only other original: ε = 1 − 1 + 3 = 3 > 1, refused; the row stops.
    dense = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5, 0.5, 1.0, 1.0]])
    keep = torch.tensor([[False, False, True, True, False, False, True, True]])
    weight, refined = dsnot_refine(dense, dense, keep, unit_stats(8), pattern="2:4")
    assert torch.equal(refined, torch.tensor([[False, True, True, False, False, False, True, True]]))
    torch.testing.assert_close(expected_error(dense, weight, unit_stats(8).mean()), torch.tensor([1.0]))


def random_case(seed: int, rows: int = 48, columns: int = 64) -> tuple[torch.Tensor, FeatureNormStats, HessianStats]:
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, columns, generator=generator)
    inputs = torch.randn(256, columns, generator=generator) * torch.rand(columns, generator=generator) * 2
    inputs += torch.randn(columns, generator=generator)  # non-zero means: the expected error is not ≈ 0
    norms, hessian = FeatureNormStats("x", columns), HessianStats("x", columns)
    norms.add(inputs)
    hessian.add(inputs)
    return dense, norms, hessian


def initial_mask(
    method: str,
    dense: torch.Tensor,
    norms: FeatureNormStats,
    hessian: HessianStats,
    sparsity: float,
    pattern: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "sparsegpt":
        return sparsegpt_prune(dense, hessian.hessian(), sparsity, pattern, blocksize=32)
    if method == "magnitude":
        return dense, magnitude_mask(dense, sparsity, pattern)
    if method == "ria":
        return dense, ria_mask(dense, norms.feature_norms(), sparsity, pattern)
    return dense, wanda_mask(dense, norms.feature_norms(), sparsity, pattern)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "ria"])
@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.7, None), (0.5, "2:4"), (0.5, "4:8")])
def test_never_raises_the_error_and_keeps_counts_and_patterns(
    method: str, sparsity: float, pattern: str | None
) -> None:
    swaps = 0
    for seed in range(3):
        dense, norms, hessian = random_case(seed)
        pruned, keep = initial_mask(method, dense, norms, hessian, sparsity, pattern)
        weight, refined = dsnot_refine(dense, pruned, keep, norms, pattern)
        before = expected_error(dense, pruned.masked_fill(~keep, 0.0), norms.mean()).abs()
        after = expected_error(dense, weight, norms.mean()).abs()
        assert (after <= before + 1e-5).all() and after.sum() <= before.sum()
        assert torch.equal(refined.sum(1), keep.sum(1))
        if pattern is not None:
            n, m = map(int, pattern.split(":"))
            assert refined.reshape(refined.shape[0], -1, m).sum(-1).eq(n).all()
        assert (weight[~refined] == 0).all() and not torch.signbit(weight[~refined]).any()
        grown, stayed = refined & ~keep, refined & keep
        assert torch.equal(weight[grown], dense[grown]) and torch.equal(weight[stayed], pruned.float()[stayed])
        swaps += int(grown.sum())
    assert swaps > 0  # the refinement did act on these inputs


class RecordingDSnoT(DSnoT):
    """DSnoT that records each layer's summed |ε| before and after refining."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[tuple[float, float]] = []

    def refine(
        self, dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, stats: LayerStats, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight, refined = super().refine(dense, pruned, keep, stats, pattern)
        mean = stats[FeatureNormStats].mean()
        before = expected_error(dense, pruned.float().masked_fill(~keep, 0.0), mean).abs()
        after = expected_error(dense, weight, mean).abs()
        assert (after <= before + 1e-5).all() and torch.equal(refined.sum(1), keep.sum(1))
        self.errors.append((float(before.sum()), float(after.sum())))
        return weight, refined


@pytest.mark.parametrize("method, pattern", [("wanda", None), ("sparsegpt", None), ("wanda", "2:4")])
def test_tiny_llama_layers_never_get_a_larger_error(method: str, pattern: str | None) -> None:
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
    refiner = RecordingDSnoT()
    report = prune_oneshot(model, data, method=method, sparsity=0.5, pattern=pattern, refine=refiner, progress=False)
    assert len(refiner.errors) == 14 and report.global_sparsity == pytest.approx(0.5)
    assert sum(after for _, after in refiner.errors) < sum(before for before, _ in refiner.errors)
    for mask in get_masks(model).values():  # the refiner checked that every row kept its count
        assert (~mask).sum() == mask.numel() // 2
        if pattern:
            assert mask.reshape(mask.shape[0], -1, 4).sum(-1).eq(2).all()


def test_refine_by_name_with_options_through_prune_oneshot() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    data = [{"input_ids": torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))}]
    report = prune_oneshot(
        model,
        data,
        method="magnitude",
        sparsity=0.6,
        refine="dsnot",
        refine_options={"max_cycle_time": 5},
        progress=False,
    )
    assert report.global_sparsity == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"max_cycle_time": 0}, "`max_cycle_time`"),
        ({"update_threshold": -1.0}, "`update_threshold`"),
        ({"pow_of_var_regrowing": float("nan")}, "`pow_of_var_regrowing`"),
        ({"without_same_sign": "yes"}, "`without_same_sign`"),
        ({"pow_of_var_pruning": 1.0}, "does not take"),
    ],
)
def test_bad_options_raise(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MASK_REFINERS.create("dsnot", **options)
