"""selection.py: exact counts, deterministic ties, N:M validity, global scope, property tests."""

from unittest.mock import patch

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_prune.mask_updates import update_masks
from lightning_prune.selection import (
    _kth_lowest,
    _kth_lowest_by_topk,
    check_scores,
    check_sparsity,
    lowest_k_per_row,
    n_m_candidates,
    parse_pattern,
    prune_count,
    select_channels,
    select_global,
    select_layer_wise,
    select_masks,
    select_n_m,
    select_row_wise,
)
from lightning_prune.targets import find_targets
from tests.conftest import DEVICES


def as_ints(mask: torch.Tensor) -> list:
    return mask.int().tolist()


def test_prune_count_rounds_halves_up() -> None:
    assert [prune_count(10, s) for s in (0.0, 0.25, 0.5, 0.94, 0.95)] == [0, 3, 5, 9, 10]
    assert prune_count(7, 0.5) == 4


def test_weights_one_to_eight_give_the_2_4_mask() -> None:
    weights = torch.arange(1.0, 9.0).reshape(1, 8)
    assert as_ints(select_n_m(weights, 2, 4)) == [[0, 0, 1, 1, 0, 0, 1, 1]]
    assert as_ints(select_n_m(weights, 4, 8)) == [[0, 0, 0, 0, 1, 1, 1, 1]]


def test_layer_wise_prunes_exactly_round_s_n() -> None:
    scores = torch.tensor([[5.0, 1.0, 4.0], [2.0, 6.0, 3.0]])
    assert as_ints(select_layer_wise(scores, 0.5)) == [[1, 0, 1], [0, 1, 0]]
    assert int((~select_layer_wise(torch.rand(7, 13), 0.3)).sum()) == round(0.3 * 91)


def test_ties_go_to_the_lower_index() -> None:
    assert as_ints(select_layer_wise(torch.ones(2, 3), 0.5)) == [[0, 0, 0], [1, 1, 1]]
    assert as_ints(select_row_wise(torch.ones(2, 4), 0.5)) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert as_ints(select_n_m(torch.ones(1, 4), 2, 4)) == [[0, 0, 1, 1]]


def test_row_wise_prunes_the_same_count_in_every_row() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0], [9.0, 9.0, 0.0, 9.0]])
    assert as_ints(select_row_wise(scores, 0.5)) == [[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]]


def test_channel_prunes_whole_rows_by_l2_norm() -> None:
    scores = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 6.0], [2.0, 0.0]])  # norms 5, 1.41, 6, 2
    assert as_ints(select_channels(scores, 0.5)) == [[1, 1], [0, 0], [1, 1], [0, 0]]


def test_global_uses_one_threshold_across_layers() -> None:
    masks = select_global({"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0, 4.0, 5.0, 6.0]])}, 0.5)
    assert as_ints(masks["a"]) == [[0, 1]]  # each layer keeps its best weight
    assert as_ints(masks["b"]) == [[0, 0, 1, 1]]
    # One threshold (4) over both layers: 75% of `a` and 25% of `b` go.
    masks = select_global({"a": torch.tensor([[1.0, 2.0, 3.0, 8.0]]), "b": torch.tensor([[4.0, 5.0, 6.0, 7.0]])}, 0.5)
    assert as_ints(masks["a"]) == [[0, 0, 0, 1]] and as_ints(masks["b"]) == [[0, 1, 1, 1]]


def test_global_never_empties_a_layer_and_refuses_when_it_must() -> None:
    masks = select_global({"small": torch.full((1, 4), 0.1), "big": torch.arange(1.0, 17.0).reshape(2, 8)}, 0.8)
    assert int(masks["small"].sum()) == 1
    assert int((~masks["small"]).sum() + (~masks["big"]).sum()) == 16
    with pytest.raises(ValueError, match=r"`sparsity`=0.9 would empty a layer"):
        select_global({"a": torch.rand(1, 2), "b": torch.rand(1, 2)}, 0.9)


def test_gradual_n_m_prunes_only_candidates_and_lands_on_the_pattern() -> None:
    weights = torch.arange(1.0, 9.0).reshape(1, 8)
    quarter = select_n_m(weights, 2, 4, sparsity=0.25)  # the 2 lowest of the 2:4 candidates {1, 2, 5, 6}
    assert as_ints(quarter) == [[0, 0, 1, 1, 1, 1, 1, 1]]
    assert as_ints(select_n_m(weights.flip(1), 2, 4, sparsity=0.5, pruned=~quarter)) == [[0, 0, 1, 1, 1, 1, 0, 0]]


def test_n_m_needs_divisible_inputs() -> None:
    with pytest.raises(ValueError, match=r"`pattern` 2:4 needs the input dimension to divide by 4, got 6"):
        select_n_m(torch.rand(2, 6), 2, 4)


def test_pruned_entries_stay_pruned_and_count() -> None:
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0]])
    pruned = torch.tensor([[True, False, False, False]])
    assert as_ints(select_layer_wise(scores, 0.5, pruned)) == [[0, 0, 1, 1]]


def test_select_masks_dispatch_and_argument_errors() -> None:
    scores = {"w": torch.arange(1.0, 9.0).reshape(2, 4)}
    assert as_ints(select_masks(scores, 0.5, pattern="2:4")["w"]) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert as_ints(select_masks(scores, 0.5, scope="channel")["w"]) == [[0, 0, 0, 0], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match=r"`scope` must be one of .*got 'rows'"):
        select_masks(scores, 0.5, scope="rows")
    with pytest.raises(ValueError, match=r"`pattern` needs 0 < N < M, got '4:4'"):
        parse_pattern("4:4")
    with pytest.raises(ValueError, match=r"`pattern` must look like 'N:M'.*got '2-4'"):
        parse_pattern("2-4")
    with pytest.raises(ValueError, match=r"`sparsity` must be a number in \[0, 1\), got 1.0"):
        check_sparsity(1.0)
    with pytest.raises(ValueError, match="scores contain NaN"):
        select_layer_wise(torch.tensor([[float("nan"), 1.0]]), 0.5)


def test_conv1d_orientation_n_m_runs_along_the_input_dimension() -> None:
    layer = Conv1D(2, 8)  # weight stored (in=8, out=2)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 17.0).reshape(8, 2))
    target = find_targets(nn.Sequential(layer, nn.Linear(2, 1)))[0]
    mask = update_masks([target], {target.name: target.weight.abs()}, 0.5, pattern="2:4")[target.name]
    assert mask.shape == (8, 2)
    assert as_ints(mask.t()) == [[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 0, 0, 1, 1]]


matrices = st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))


def scores_from(rows: int, groups: int, seed: int, m: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (rows, groups * m), generator=generator).float()  # many ties


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(matrices, st.floats(0.0, 0.99))
def test_property_counts_are_exact(device: str, shape, sparsity: float) -> None:
    scores = scores_from(*shape).to(device)
    rows, cols = scores.shape
    assert int((~select_layer_wise(scores, sparsity)).sum()) == prune_count(rows * cols, sparsity)
    assert ((~select_row_wise(scores, sparsity)).sum(1) == prune_count(cols, sparsity)).all()
    assert int((~select_channels(scores, sparsity)).all(1).sum()) == prune_count(rows, sparsity)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(matrices, st.integers(0, 40), st.floats(0.0, 0.5))
def test_property_row_wise_equals_a_stable_sort(device: str, shape, k: int, pruned_share: float) -> None:
    # The selection uses a per-row k-th value (no sort); the definition is a stable sort per row:
    # the k lowest scores, ties to the lower column, already pruned entries (-inf) first.
    scores = scores_from(*shape)
    k = min(k, scores.shape[1])
    pruned = torch.rand(scores.shape, generator=torch.Generator().manual_seed(k)) < pruned_share
    masked = scores.masked_fill(pruned, float("-inf"))
    order = torch.sort(masked, dim=1, stable=True).indices[:, :k]
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
    assert torch.equal(lowest_k_per_row(masked.to(device), k).cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(matrices, st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8)]))
def test_property_n_m_keeps_exactly_n_of_every_m(device: str, shape, pattern) -> None:
    n, m = pattern
    rows, groups, seed = shape
    mask = select_n_m(scores_from(rows, groups, seed, m).to(device), n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


@settings(max_examples=80, deadline=None)
@given(
    matrices,
    st.sampled_from([(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (7, 8), (4, 16)]),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_property_n_m_candidates_equal_a_stable_sort_of_each_group(shape, pattern, dtype: torch.dtype) -> None:
    # On the CPU, groups of up to 8 are ranked by pairwise comparison, not sorted. The definition
    # (the sort path, used off the CPU and for M > 8): a stable sort of each group, the M−N lowest
    # first; ties, ±0.0, already pruned entries (-inf) and +inf included.
    n, m = pattern
    rows, groups, seed = shape
    generator = torch.Generator().manual_seed(seed)
    scores = scores_from(rows, groups, seed, m).sub(2.0).to(dtype)
    special = torch.randint(0, 8, scores.shape, generator=generator)
    scores = (
        scores.masked_fill(special == 0, float("-inf"))
        .masked_fill(special == 1, float("inf"))
        .masked_fill(special == 2, -0.0)
    )
    order = torch.sort(scores.reshape(rows, groups, m), dim=-1, stable=True).indices[..., : m - n]
    expected = torch.zeros(rows, groups, m, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, groups * m)
    assert torch.equal(n_m_candidates(scores, n, m), expected)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(matrices, st.floats(0.0, 0.5), st.floats(0.0, 0.49), st.sampled_from(["layer", "row", "global"]))
def test_property_masks_are_monotone_with_pruned(device: str, shape, first: float, more: float, scope: str) -> None:
    scores = scores_from(*shape).to(device)
    assume(scope != "global" or prune_count(scores.numel(), first + more) < scores.numel())  # else: emptied, an error
    before = select_masks({"w": scores}, first, scope="layer")["w"]
    later = select_masks({"w": torch.rand_like(scores)}, first + more, scope=scope, pruned={"w": ~before})["w"]
    assert not (later & ~before).any()
    if scope != "row":
        assert int((~later).sum()) == max(prune_count(scores.numel(), first + more), int((~before).sum()))


@pytest.mark.parametrize("scope", ["layer", "row", "channel", "global"])
def test_pruned_weights_stay_pruned_where_a_row_already_exceeds_its_share(scope: str) -> None:
    # Row 1 already holds 3 pruned weights; row-wise 50% asks only 2 per row. None may come back.
    pruned = torch.tensor([[False, False, False, False], [True, True, True, False]])
    masks = select_masks({"w": torch.rand(2, 4)}, 0.5, scope=scope, pruned={"w": pruned})
    assert not (masks["w"] & pruned).any()


def test_n_m_never_revives_a_group_with_more_than_m_minus_n_pruned() -> None:
    pruned = torch.tensor([[True, True, True, False]])
    assert as_ints(select_n_m(torch.rand(1, 4), 2, 4, pruned=pruned)) == [[0, 0, 0, 1]]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.bfloat16]))
def test_property_topk_threshold_is_the_kth_value(n: int, seed: int, dtype: torch.dtype) -> None:
    # The threshold used off the CPU (topk) equals kthvalue's for every k, ties and -inf included.
    generator = torch.Generator().manual_seed(seed)
    scores = (
        torch.randint(-2, 3, (n,), generator=generator)
        .to(dtype)
        .masked_fill(torch.rand(n, generator=generator) < 0.2, float("-inf"))
    )
    for k in range(1, n + 1):
        assert _kth_lowest_by_topk(scores, k) == torch.kthvalue(scores.float(), k).values


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=30, deadline=None)
@given(matrices, st.floats(0.0, 0.9), st.floats(0.0, 0.5))
def test_property_every_selection_matches_the_cpu_on_the_device(
    device: str, shape, sparsity: float, pruned_share: float
) -> None:
    # Same exact masks, ties included, wherever the scores live. On the CPU, the selections run
    # with the threshold the other devices use (topk) against the CPU's own (kthvalue).
    scores = scores_from(*shape)
    pruned = torch.rand(scores.shape, generator=torch.Generator().manual_seed(shape[2])) < pruned_share
    on_device = {"w": scores.to(device), "v": scores.flip(0).to(device)}
    on_cpu = {"w": scores, "v": scores.flip(0)}
    cases = [
        dict(scope="layer"),
        dict(scope="row"),
        dict(scope="channel"),
        dict(pattern="2:4", sparsity=0.5 * sparsity),
    ]
    if prune_count(2 * scores.numel(), sparsity) <= 2 * scores.numel() - 2:
        cases.append(dict(scope="global"))
    for case in cases:
        case = {"sparsity": sparsity, **case}
        expected = select_masks(on_cpu, pruned={"w": pruned}, **case)
        with patch("lightning_prune.selection._kth_lowest", _kth_lowest_by_topk if device == "cpu" else _kth_lowest):
            got = select_masks(on_device, pruned={"w": pruned.to(device)}, **case)
        for name in expected:
            assert got[name].device.type == device
            assert torch.equal(got[name].cpu(), expected[name]), (case, name)


def test_check_scores_raises_on_nan_only() -> None:
    # The sum clears a layer at once; +inf and -inf together (a NaN sum) are checked entry by entry.
    check_scores(torch.tensor([[float("inf"), float("-inf"), 1.0, 0.0]]))
    with pytest.raises(ValueError, match="scores contain NaN"):
        check_scores(torch.tensor([[1.0, float("nan"), 2.0, 3.0]]))
