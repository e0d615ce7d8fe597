"""Fused experts' second-layer statistics from the model's own gated activations (oneshot/gated.py).

Where transformers runs its grouped_mm or batched_mm experts forward, `down_proj`'s per-expert
statistics come from the `_apply_gate` output of that forward, with rows assigned per
implementation; anything else (eager, a wrapped or renamed implementation, a routing whose pairs
do not match the routed tokens) is recomputed from the routed tokens. Either way the statistics
equal the hand computation from the tokens routed to each expert.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from transformers import GptOssConfig, Llama4TextConfig, MixtralConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, batched_mm_experts_forward
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.llama4.modeling_llama4 import Llama4TextExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from lightning_prune.calibration import experts as experts_module
from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.gated import BATCHED, GROUPED, PRE_ROUTED, expert_rows, own_layout
from lightning_prune.calibration.stats import HessianStats
from lightning_prune.targets import find_targets

HIDDEN, INTER, EXPERTS = 8, 4, 3  # grouped_mm wants row strides of 16 bytes


def _experts(kind: str, implementation: str) -> Any:
    torch.manual_seed(0)
    if kind == "mixtral":  # (E, out, in), no bias, SiLU gate on the [gate; up] halves
        module: Any = MixtralExperts(
            MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS)
        )
    else:  # gpt-oss: (E, in, out), biases, its own clamped gate on interleaved columns
        module = GptOssExperts(GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS))
    for param in module.parameters():
        nn.init.normal_(param, std=0.5)
    module.config._experts_implementation = implementation
    return module


class Holder(nn.Module):
    """Calls its `experts` with a fixed top-2 routing: token t goes to experts t % 3 and (t + 1) % 3
    (or, `duplicate`, twice to expert t % 2)."""

    def __init__(self, experts: Any, duplicate: bool = False) -> None:
        super().__init__()
        self.experts: Any = experts
        self.duplicate = duplicate

    def index(self, tokens: int) -> torch.Tensor:
        t = torch.arange(tokens).unsqueeze(1)
        return torch.cat([t % 2, t % 2], 1) if self.duplicate else torch.cat([t % EXPERTS, (t + 1) % EXPERTS], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.index(x.shape[0])
        return self.experts(x, index, torch.full(index.shape, 0.5))


def _by_hand(experts: Any, gate: Callable[..., torch.Tensor], rows: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e's gated first-layer output for `rows`, with the module's own gate."""
    weight = experts.gate_up_proj[e] if experts.is_transposed else experts.gate_up_proj[e].t()
    bias = experts.gate_up_proj_bias[e] if experts.has_bias else 0.0
    return gate(experts, rows @ weight + bias)


def _stats_and_gate_calls(
    holder: Holder, batches: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[int], Callable[..., torch.Tensor]]:
    cls: Any = type(holder.experts)
    gate, calls = cls._apply_gate, []

    def counting(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        calls.append(gate_up.shape[0])
        return gate(self, gate_up)

    monkeypatch.setattr(cls, "_apply_gate", counting)
    with torch.no_grad():
        stats = collect_statistics(find_targets(holder), (HessianStats,), lambda: [holder(x) for x in batches])
    return stats, calls, gate


def _check_hessians(
    holder: Holder, batches: list[torch.Tensor], stats: dict[str, Any], gate: Callable[..., torch.Tensor]
) -> None:
    for e in range(EXPERTS):
        routed = torch.cat([x[(holder.index(x.shape[0]) == e).any(1)] for x in batches])
        with torch.no_grad():
            hidden = _by_hand(holder.experts, gate, routed, e)
        for param, rows in (("gate_up_proj", routed), ("down_proj", hidden)):
            got = stats[f"experts.{param}[{e}]"][HessianStats]
            assert int(got.count) == rows.shape[0]
            if rows.shape[0]:
                torch.testing.assert_close(got.hessian(), 2.0 / rows.shape[0] * rows.t() @ rows, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("implementation", [GROUPED, BATCHED])
def test_down_proj_statistics_come_from_the_models_own_gated_activations(
    kind: str, implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = Holder(_experts(kind, implementation))
    assert own_layout(holder.experts) == implementation
    batches = [torch.randn(7, HIDDEN), torch.randn(5, HIDDEN)]
    stats, calls, gate = _stats_and_gate_calls(holder, batches, monkeypatch)
    assert calls == [14, 10]  # the forward's own gate, once per call on every (token, slot) pair: nothing recomputed
    _check_hessians(holder, batches, stats, gate)
    assert "_apply_gate" not in vars(holder.experts)  # the instance's wrapper is gone after the pass


@pytest.mark.parametrize("implementation", ["eager", "wrapped"])
def test_eager_and_a_wrapped_implementation_are_recomputed(
    implementation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if implementation == "wrapped":  # registered under the grouped_mm name, rows laid out like batched_mm:
        # trusting the name would give experts each other's rows; only transformers' own functions are trusted
        monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS, GROUPED, lambda self, *args: batched_mm_experts_forward(self, *args))
    holder = Holder(_experts("gpt_oss", "eager" if implementation == "eager" else GROUPED))
    assert own_layout(holder.experts) is None
    batches = [torch.randn(7, HIDDEN)]
    stats, calls, gate = _stats_and_gate_calls(holder, batches, monkeypatch)
    own = [5, 5, 4] if implementation == "eager" else [14]  # gpt-oss's eager forward gates per expert
    assert calls == [*own, 5, 5, 4]  # then one recompute per expert
    _check_hessians(holder, batches, stats, gate)


def test_a_routing_whose_pairs_are_not_its_tokens_is_recomputed(monkeypatch: pytest.MonkeyPatch) -> None:
    holder = Holder(_experts("mixtral", GROUPED), duplicate=True)  # both slots of a token on one expert
    batches = [torch.randn(6, HIDDEN)]
    stats, calls, gate = _stats_and_gate_calls(holder, batches, monkeypatch)
    assert calls[0] == 12 and len(calls) == 1 + EXPERTS  # the forward's 12 pairs are dropped, each expert recomputed
    _check_hessians(holder, batches, stats, gate)  # 3 tokens each for experts 0 and 1, none for 2


def test_a_patched_or_expert_parallel_instance_is_not_captured() -> None:
    experts = _experts("mixtral", GROUPED)
    experts._is_expert_parallel = True
    assert own_layout(experts) is None
    experts = _experts("mixtral", GROUPED)
    experts._apply_gate = lambda gate_up: gate_up
    assert own_layout(experts) is None


def test_rows_are_assigned_per_implementation() -> None:
    gated = torch.arange(4.0).unsqueeze(1)  # row i holds i
    index = torch.tensor([[1, 0], [0, 2]])  # pairs in order: experts 1, 0, 0, 2
    grouped = expert_rows(GROUPED, gated, index, [2, 1, 1])  # sorted by expert: rows 0-1 | 2 | 3
    batched = expert_rows(BATCHED, gated, index, [2, 1, 1])  # in pair order: 1, 2 | 0 | 3
    assert grouped is not None and batched is not None
    assert [r.flatten().tolist() for r in grouped] == [[0.0, 1.0], [2.0], [3.0]]
    assert [r.flatten().tolist() for r in batched] == [[1.0, 2.0], [0.0], [3.0]]
    assert expert_rows(GROUPED, gated, index, [1, 2, 1]) is None  # counts differ from the routed tokens
    assert expert_rows(GROUPED, gated[:3], index, [2, 1, 1]) is None  # a row missing
    assert expert_rows(GROUPED, gated, torch.tensor([[1, 0], [0, 3]]), [2, 1, 1]) is None  # an id past the experts


class OwnForward(Llama4TextExperts):
    """Llama 4's experts with a forward of their own (here the same computation): not captured."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states)


class PreRouted(nn.Module):
    """Llama 4's layout: every token repeated per expert, scaled by 0.5 where routed (token t to
    expert t % 3), 0 elsewhere."""

    def __init__(self, own_forward: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=EXPERTS)
        self.experts = (OwnForward if own_forward else Llama4TextExperts)(config)
        for param in self.experts.parameters():
            nn.init.normal_(param, std=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = torch.arange(x.shape[0]) % EXPERTS == torch.arange(EXPERTS).unsqueeze(1)  # (E, T)
        return self.experts((x.unsqueeze(0) * 0.5 * routed.unsqueeze(-1)).reshape(-1, HIDDEN))


@pytest.mark.parametrize("own_forward", [False, True])
def test_llama4_down_proj_statistics_come_from_its_own_bmm_operand(
    own_forward: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = PreRouted(own_forward)
    assert own_layout(holder.experts) == (None if own_forward else PRE_ROUTED)
    recomputed: list[int] = []
    recompute = experts_module.expert_activations

    def spy(module: nn.Module, expert: int, *rest: Any) -> torch.Tensor:
        recomputed.append(expert)
        return recompute(module, expert, *rest)

    monkeypatch.setattr(experts_module, "expert_activations", spy)
    batches = [torch.randn(7, HIDDEN), torch.randn(5, HIDDEN)]
    with torch.no_grad():
        stats = collect_statistics(find_targets(holder), (HessianStats,), lambda: [holder(x) for x in batches])
    assert recomputed == ([0, 1, 2] * 2 if own_forward else [])
    assert "forward" not in vars(holder.experts)  # the instance's wrapper is gone after the pass
    experts = holder.experts
    for e in range(EXPERTS):
        routed = torch.cat([0.5 * x[torch.arange(x.shape[0]) % EXPERTS == e] for x in batches])
        with torch.no_grad():
            gate, up = (routed @ experts.gate_up_proj[e]).chunk(2, dim=-1)
            hidden = up * experts.act_fn(gate)
        for param, rows in (("gate_up_proj", routed), ("down_proj", hidden)):
            got = stats[f"experts.{param}[{e}]"][HessianStats]
            assert int(got.count) == rows.shape[0]
            torch.testing.assert_close(got.hessian(), 2.0 / rows.shape[0] * rows.t() @ rows, rtol=1e-4, atol=1e-5)
