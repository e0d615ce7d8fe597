"""lightning_prune.parallel.sharded in one process (the two-rank cases run in tests/test_fsdp.py), and which
strategies the callbacks accept."""

from __future__ import annotations

import pytest
import torch

from lightning_prune.callbacks.strategy import check_strategy
from lightning_prune.parallel.sharded import _sortable_keys, select_masks_sharded, sharded_lowest_k
from lightning_prune.selection import lowest_k, select_masks


def test_keys_order_like_the_floats_and_count_negative_zero_as_zero() -> None:
    values = torch.tensor([float("-inf"), -3.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    for dtype in (torch.float32, torch.float64):
        keys = _sortable_keys(values.to(dtype))
        assert keys[:4].diff().gt(0).all() and keys[5:].diff().gt(0).all()
        assert keys[4] == keys[5]


def test_k_lowest_with_ties_goes_to_the_lower_index_across_segments() -> None:
    a, b = torch.tensor([1.0, 0.0, 1.0, 2.0]), torch.tensor([1.0, 0.0, -1.0])
    dropped = sharded_lowest_k([a, b, a, b], [[0], [1], [2, 3]], [2, 2, 4], None)
    assert dropped[0].tolist() == [True, True, False, False]  # 0.0, then the first of the tied 1.0s
    assert dropped[1].tolist() == [False, True, True]
    # one problem over both segments: -1, 0, 0, then the first tied 1.0 (segment a comes first)
    assert torch.cat(dropped[2:]).tolist() == [True, True, False, False, False, True, True]


@pytest.mark.parametrize("k", [-1, 0, 1, 5, 17, 18, 40])
def test_k_lowest_in_one_process_is_lowest_k(k: int) -> None:
    scores = torch.randint(0, 4, (18,), generator=torch.Generator().manual_seed(k + 2)).float()
    (dropped,) = sharded_lowest_k([scores], [[0]], [k], None)
    assert torch.equal(dropped, lowest_k(scores, k))


@pytest.mark.parametrize(
    ("scope", "pattern", "sparsity"),
    [
        ("layer", None, 0.6),
        ("row", None, 0.5),
        ("global", None, 0.7),
        ("channel", None, 0.5),
        ("layer", "2:4", 0.3),
        ("layer", "2:4", 0.5),
    ],
)
def test_sharded_selection_in_one_process_is_select_masks(scope: str, pattern: str | None, sparsity: float) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(6, 8, generator=generator), "b": torch.randint(0, 3, (4, 8), generator=generator).float()}
    pruned = {"a": torch.rand(6, 8, generator=generator) < 0.2}
    expected = select_masks(scores, sparsity, scope=scope, pattern=pattern, pruned=pruned)
    masks = select_masks_sharded(scores, {"a": 6, "b": 4}, sparsity, scope=scope, pattern=pattern, pruned=pruned)
    for name in scores:
        assert torch.equal(masks[name], expected[name]), name


def test_nan_scores_raise() -> None:
    scores = {"a": torch.tensor([[1.0, float("nan")], [0.5, 2.0]])}
    with pytest.raises(ValueError, match="scores contain NaN"):
        select_masks_sharded(scores, {"a": 2}, 0.5, scope="row")


def test_every_segment_belongs_to_one_problem() -> None:
    with pytest.raises(ValueError, match="`problems` must use every segment exactly once"):
        sharded_lowest_k([torch.ones(2), torch.ones(2)], [[0], [0, 1]], [1, 1], None)


def test_strategies() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

    assert check_strategy(ModelParallelStrategy(), sharded_ok=True) is True
    assert check_strategy(DDPStrategy(), sharded_ok=True) is False
    with pytest.raises(ValueError, match=r"FSDPStrategy.*strategy='ddp'.*ModelParallelStrategy \(FSDP2"):
        check_strategy(FSDPStrategy(), sharded_ok=True)
    with pytest.raises(ValueError, match=r"ModelParallelStrategy.*prune before sharding.*`offload`"):
        check_strategy(ModelParallelStrategy(), sharded_ok=False)


@pytest.mark.parametrize("callback", ["oneshot", "structured", "gradual"])
def test_callbacks_that_need_whole_weights_refuse_fsdp2_at_fit_start(callback: str) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_prune import GradualPruning, OneShotPruning

    made = {
        "oneshot": lambda: OneShotPruning("wanda", 0.5, calibration=[torch.zeros(1, 4)]),
        "structured": lambda: GradualPruning(0.5, structure="neuron"),
        "gradual": lambda: GradualPruning(0.5, end_step=4, frequency=2),
    }[callback]()
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), optimizers=[], lightning_module=None)
    if callback == "gradual":  # accepted, but every target must be sharded by FSDP2 (checked before training)
        with pytest.raises(
            ValueError, match=r"target '0.weight' cannot be pruned beside FSDP2-sharded weights.*`fully_shard` it"
        ):
            made.attach(trainer, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))  # type: ignore[arg-type]
        assert made._sharded
    else:
        with pytest.raises(ValueError, match=r"ModelParallelStrategy.*prune before sharding"):
            made.attach(trainer, nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))  # type: ignore[arg-type]


def test_structured_pruning_refuses_fsdp2_at_fit_start() -> None:
    """StructuredPruning scores coupled groups and compacts whole weights: refused under FSDP2, like one-shot."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_prune import StructuredPruning

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(), optimizers=[], lightning_module=None)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"`strategy`=ModelParallelStrategy .*prune before sharding"):
        StructuredPruning(mlp_sparsity=0.5).attach(trainer, model)  # type: ignore[arg-type]
