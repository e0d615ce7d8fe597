"""Fused mixture-of-experts weights on hand-computable routing, and one-shot's all-or-nothing."""

from __future__ import annotations

import pytest
import torch
from architectures import BY_NAME
from torch import nn
from torch.nn import functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from lightning_prune import get_masks, prune_oneshot, set_mask
from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.stats import HessianStats
from lightning_prune.targets import find_targets

HIDDEN, INTER = 8, 8


class RoutedBlock(nn.Module):
    """A residual block around transformers' `MixtralExperts` with a fixed routing `route(token)`."""

    def __init__(self, route: str) -> None:
        super().__init__()
        config = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=2, hidden_act="silu")
        config._experts_implementation = "eager"
        self.experts = MixtralExperts(config)
        nn.init.normal_(self.experts.gate_up_proj, std=0.3)
        nn.init.normal_(self.experts.down_proj, std=0.3)
        self.route = route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, HIDDEN)
        tokens = torch.arange(flat.shape[0]).unsqueeze(1)
        index = torch.zeros_like(tokens) if self.route == "all-to-0" else tokens % 2
        return x + self.experts(flat, index, torch.ones(index.shape)).reshape(x.shape)


class MoENet(nn.Module):
    def __init__(self, route: str, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(RoutedBlock(route) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_an_expert_that_receives_no_token_stays_dense_with_a_warning_and_a_record() -> None:
    net = MoENet("all-to-0")
    with pytest.warns(UserWarning, match=r"layers\.0\.experts\.gate_up_proj\[1\] \(0 tokens\)"):
        report = prune_oneshot(net, [torch.randn(2, 6, HIDDEN)], method="wanda", sparsity=0.5, progress=False)
    names = {f"layers.{i}.experts.{p}[1]" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert set(report.skipped) == names
    masks = get_masks(net)
    for i in range(2):
        for param in ("gate_up_proj", "down_proj"):
            mask = masks[f"layers.{i}.experts.{param}"]
            assert mask[1].all()  # expert 1: dense
            assert (~mask[0]).sum(1).eq(INTER // 2 if param == "down_proj" else HIDDEN // 2).all()  # half of each row
    rows = {layer.name: layer.sparsity for layer in report.layers}
    assert rows["layers.0.experts.gate_up_proj[1]"] == 0.0
    assert rows["layers.0.experts.gate_up_proj[0]"] == 0.5


def test_per_expert_hessian_equals_the_one_computed_from_the_routed_tokens() -> None:
    net = MoENet("alternate", blocks=1)
    x = torch.randn(1, 10, HIDDEN)
    targets = find_targets(net)
    assert [t.name for t in targets] == ["layers.0.experts.gate_up_proj", "layers.0.experts.down_proj"]
    stats = collect_statistics(targets, (HessianStats,), lambda: net(x))
    experts = net.layers[0].experts
    for e in range(2):
        routed = x[0, e::2]  # tokens 0, 2, 4, ... go to expert 0; 1, 3, ... to expert 1
        gate, up = F.linear(routed, experts.gate_up_proj[e]).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        for param, rows in (("gate_up_proj", routed), ("down_proj", hidden)):
            expected = 2.0 / rows.shape[0] * rows.t() @ rows
            got = stats[f"layers.0.experts.{param}[{e}]"][HessianStats].hessian()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "transposed"), [("mixtral", False), ("gpt_oss", True), ("llama4_text", True)])
def test_expert_orientation_follows_transformers_layout(name: str, transposed: bool) -> None:
    model = BY_NAME[name].build()
    hidden = model.config.hidden_size
    experts = {t.param_name: t for t in find_targets(model) if t.experts and ".layers.0." in t.name}
    assert {t.expert_transposed for t in experts.values()} == {transposed}
    gate_up, down = experts["gate_up_proj"], experts["down_proj"]
    assert gate_up.matrices(gate_up.weight)[0].shape[1] == hidden  # (out, in): input is the hidden size
    assert down.matrices(down.weight)[0].shape[0] == hidden
    assert not any("router" in t.name or t.name.endswith("gate.weight") for t in find_targets(model))


class Bypass(nn.Module):
    """A block whose layer is used as `x @ W.T` directly (like Mamba's `dt_proj`): no hook fires."""

    def __init__(self, bypass: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bypass = bypass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (F.linear(x, self.fc.weight, self.fc.bias) if self.bypass else self.fc(x))


def test_a_failing_third_block_leaves_every_weight_and_mask_unchanged() -> None:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.layers = nn.ModuleList(Bypass(bypass=i == 2) for i in range(4))
    net.forward = lambda x: [x := layer(x) for layer in net.layers][-1]  # type: ignore[method-assign]
    earlier = torch.rand(8, 8) > 0.3
    set_mask(net.layers[0].fc, earlier)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=r"layers\.2\.fc.*`ignore"):
            prune_oneshot(net, [torch.randn(4, 8)], method=method, progress=False)
        assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
        assert list(get_masks(net)) == ["layers.0.fc.weight"]
        assert torch.equal(get_masks(net)["layers.0.fc.weight"], earlier)
    prune_oneshot(net, [torch.randn(4, 8)], method="wanda", ignore=r"layers\.2\.", progress=False)
    # layers.3.fc, the plain model's last layer, counts as its output head and stays dense.
    assert sorted(get_masks(net)) == [f"layers.{i}.fc.weight" for i in (0, 1)]
