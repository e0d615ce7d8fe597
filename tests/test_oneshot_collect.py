"""collect_statistics: layers that receive the same input tensor share one computation of its
statistics, with sums bitwise equal to adding every layer's inputs on its own; prune_target:
the experts of a fused weight pruned together get exactly the masks of pruning them one by one."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.masking import get_mask, get_masks
from lightning_prune.oneshot import FeatureNormStats, HessianStats
from lightning_prune.oneshot.method import LayerStats
from lightning_prune.oneshot.prune import prune_target, prune_targets
from lightning_prune.oneshot.wanda import Wanda
from lightning_prune.targets import PruneTarget, find_targets


class SharedInputs(nn.Module):
    """q/k/v on one tensor; `o` on the same tensor changed in place; `p` on a view of it."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o, self.p = (nn.Linear(8, 4) for _ in range(5))
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in "qkvop"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x * 1.5
        outputs = [getattr(self, name)(self._seen(name, hidden)) for name in "qkv"]
        hidden.mul_(-0.5)  # same object, new values: its statistics must be computed again
        outputs.append(self.o(self._seen("o", hidden)))
        outputs.append(self.p(self._seen("p", hidden[..., :].reshape(hidden.shape))))
        return torch.stack(outputs).sum(0)

    def _seen(self, name: str, inputs: torch.Tensor) -> torch.Tensor:
        self.seen[name].append(inputs.clone())
        return inputs


@pytest.mark.parametrize("inference", [False, True])
def test_layers_on_one_input_share_statistics_bitwise_equal_to_their_own(inference: bool) -> None:
    # Under inference_mode tensors keep no version counter: nothing is shared, sums still equal.
    torch.manual_seed(0)
    net = SharedInputs()
    batches = [torch.randn(3, 5, 8) for _ in range(3)]
    targets = [t for t in find_targets(net, ignore_output_head=False) if t.module_name in "qkvop"]
    assert len(targets) == 5

    def run() -> None:
        with torch.inference_mode(inference):
            for batch in batches:
                net(batch)

    stats = collect_statistics(targets, (FeatureNormStats, HessianStats), run)
    for target in targets:
        own_norms, own_hessian = FeatureNormStats("own", 8), HessianStats("own", 8)
        for inputs in net.seen[target.module_name]:
            own_norms.add(inputs)
            own_hessian.add(inputs)
        got = stats[target.name]
        for mine, own in ((got[FeatureNormStats], own_norms), (got[HessianStats], own_hessian)):
            for a, b in zip(mine.tensors(), own.tensors(), strict=True):
                assert torch.equal(a, b), target.name
    # o saw the changed tensor: its norms differ from q's, whose share came first
    assert not torch.equal(stats["o.weight"][FeatureNormStats].sum, stats["q.weight"][FeatureNormStats].sum)


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_wanda_prunes_matrices_together_exactly_as_one_by_one(pattern: str | None) -> None:
    # One selection over the stacked rows of matrices of one input width, each with its own norms, ties included.
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randint(-3, 4, (rows, 16), generator=generator).float() for rows in (6, 3, 8, 6, 1)]  # many ties
    stats: list[LayerStats] = []
    for e in range(5):
        norms = FeatureNormStats(f"w[{e}]", 16)
        norms.add(torch.randint(0, 3, (4, 16), generator=generator).float())
        stats.append({FeatureNormStats: norms})
    together = Wanda().prune_many(weights, stats, 0.5, pattern)
    for (weight, keep), matrix, layer_stats in zip(together, weights, stats, strict=True):
        alone_weight, alone_keep = Wanda().prune(matrix, layer_stats, 0.5, pattern)
        assert weight is matrix and alone_weight is matrix
        assert torch.equal(keep, alone_keep)


def test_experts_left_dense_keep_every_weight_when_the_others_are_pruned_together() -> None:
    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.randn(3, 4, 8))
    target = PruneTarget("experts", experts, "gate_up_proj", experts=3)
    stats: dict[str, LayerStats] = {}
    for name in target.matrix_names():
        norms = FeatureNormStats(name, 8)
        norms.add(torch.randn(5, 8))
        stats[name] = {FeatureNormStats: norms}
    prune_target(target, Wanda(), None, stats, 0.5, "2:4", dense={"experts.gate_up_proj[1]"})
    mask = get_mask(experts, "gate_up_proj")
    assert mask is not None
    assert mask[1].all() and not mask[0].all() and not mask[2].all()
    for e in (0, 2):
        assert torch.equal(
            mask[e], Wanda().prune(experts.gate_up_proj[e].detach(), stats[f"experts.gate_up_proj[{e}]"], 0.5, "2:4")[1]
        )


def test_a_blocks_layers_pruned_together_get_the_masks_of_pruning_them_one_by_one() -> None:
    torch.manual_seed(0)
    block = nn.ModuleDict(
        {
            "q": nn.Linear(16, 16),
            "k": nn.Linear(16, 8),
            "up": nn.Linear(16, 32),
            "down": nn.Linear(32, 16),
            "gate": nn.Linear(16, 32),
        }
    )
    alone = copy.deepcopy(block)
    stats: dict[str, LayerStats] = {}
    for name, weight in block.named_parameters():
        if name.endswith("weight"):
            norms = FeatureNormStats(name, weight.shape[1])
            norms.add(torch.randn(7, weight.shape[1]))
            stats[name] = {FeatureNormStats: norms}
    for pattern in (None, "2:4"):
        prune_targets(
            find_targets(block, ignore_output_head=False), Wanda(), None, stats, 0.5, pattern, dense={"k.weight"}
        )
        for target in find_targets(alone, ignore_output_head=False):
            prune_target(target, Wanda(), None, stats, 0.5, pattern, dense={"k.weight"})
        together, one_by_one = get_masks(block), get_masks(alone)
        assert together.keys() == one_by_one.keys() == stats.keys()
        for name, mask in together.items():
            assert torch.equal(mask, one_by_one[name]), (pattern, name)
        assert together["k.weight"].all()
        assert all(torch.equal(a, b) for a, b in zip(block.parameters(), alone.parameters(), strict=True))
