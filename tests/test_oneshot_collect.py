"""collect_statistics: layers that receive the same input tensor share one computation of its
statistics, with sums bitwise equal to adding every layer's inputs on its own."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.oneshot import FeatureNormStats, HessianStats
from lightning_prune.oneshot.collect import collect_statistics
from lightning_prune.targets import find_targets


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


def test_layers_on_one_input_share_statistics_bitwise_equal_to_their_own() -> None:
    torch.manual_seed(0)
    net = SharedInputs()
    batches = [torch.randn(3, 5, 8) for _ in range(3)]
    targets = [t for t in find_targets(net, ignore_output_head=False) if t.module_name in "qkvop"]
    assert len(targets) == 5

    def run() -> None:
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
