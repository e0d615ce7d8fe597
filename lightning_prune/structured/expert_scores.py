"""Expert scores (higher = keep), registered by name, and the routing statistics they read.

From the model's own router and experts forward, per expert e of a MoE layer (DESIGN, "Expert
removal"):
- "reap": REAP's saliency (Cerebras, ICLR 2026), the mean over the tokens routed to e of
  g_e(x)·‖f_e(x)‖₂ — the norm of what e adds to the token's output. f_e(x) is recomputed with the
  experts module's own forward, routing every (token, slot) pair to its expert with weight 1.
  Llama 4 scales a token before its experts (f_e(g·x)); there the norm of that output is used.
- "frequency": the number of tokens routed to e.
- "routing_weight": the summed gate weight g_e(x) over those tokens.
- "random": a seeded uniform draw (a baseline; ignores the statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.experts import routing, routing_index
from lightning_prune.registry import register_structured_score
from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.moe import ExpertLayer
from lightning_prune.structured.scores import StructuredScore


class RoutingStats:
    """Per expert of one MoE layer: tokens routed, summed gate weight, summed contribution norm."""

    def __init__(self, count: int) -> None:
        self.tokens = torch.zeros(count, dtype=torch.float64)
        self.gate = torch.zeros(count, dtype=torch.float64)
        self.contribution = torch.zeros(count, dtype=torch.float64)

    def add(self, experts: torch.Tensor, gate: torch.Tensor, norms: torch.Tensor) -> None:
        """Add routed (token, expert) pairs: expert ids, gate weights and contribution norms, one per pair."""
        experts = experts.cpu()
        self.tokens.index_add_(0, experts, torch.ones_like(experts, dtype=torch.float64))
        self.gate.index_add_(0, experts, gate.detach().double().cpu())
        self.contribution.index_add_(0, experts, norms.detach().double().cpu())


@torch.no_grad()
def _observe_indexed(layer: ExpertLayer, stats: RoutingStats, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    values = [*args, *kwargs.values()]
    hidden, index, weights = values[0], values[1], values[2]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    slots = index.shape[-1]
    ids = index.reshape(-1)
    tokens = torch.arange(hidden.shape[0], device=hidden.device).repeat_interleave(slots)
    gates = weights.reshape(-1)
    valid = (ids >= 0) & (ids < layer.count)  # transformers' "masking index" (E) is no expert
    ids, tokens, gates = ids[valid], tokens[valid], gates[valid]
    # the module's own forward (hooks bypassed), each pair routed to its expert with weight 1
    outputs = layer.experts.forward(hidden[tokens], ids.unsqueeze(1), torch.ones_like(gates).unsqueeze(1))
    stats.add(ids, gates, gates.float() * outputs.float().norm(dim=-1))


@torch.no_grad()
def _observe_pre_routed(
    layer: ExpertLayer, stats: RoutingStats, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, gate: Any
) -> None:
    _hidden, masks = routing(layer.experts, args, kwargs)  # (E, T, hidden), (E, T)
    out = output.reshape(layer.count, -1, output.shape[-1])
    # Llama4Router returns (scores (T, E), logits) (transformers 5.25): the sigmoid gate, 0 where not routed.
    scores = gate[0] if isinstance(gate, tuple) else gate
    if not isinstance(scores, torch.Tensor) or scores.shape != masks.t().shape:
        raise ValueError(
            f"cannot read the gate weights of {layer.qualified_router}: expected its first output to be "
            f"(tokens, {layer.count}) scores"
        )
    experts = torch.arange(layer.count, device=masks.device).unsqueeze(1).expand_as(masks)[masks]
    stats.add(experts, scores.t()[masks], out.float().norm(dim=-1)[masks])


def observe_routing(layer: ExpertLayer, stats: RoutingStats) -> Callable[[], None]:
    """Hook `layer` so that every forward adds its routing to `stats`; returns the function that unhooks."""
    last_gate: list[Any] = [None]

    def on_router(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        last_gate[0] = output

    def on_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if routing_index(args, kwargs) is not None:
            _observe_indexed(layer, stats, args, kwargs)
        else:
            _observe_pre_routed(layer, stats, args, kwargs, output, last_gate[0])

    handles = [
        layer.router.register_forward_hook(on_router),
        layer.experts.register_forward_hook(on_experts, with_kwargs=True),
    ]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


class ExpertScore(StructuredScore):
    """Base of the expert scores: `score(group, stats)` reads `stats[group.name]`, a `RoutingStats`.

    `needs_calibration` is False for scores that read no statistics (then `calibration` may be empty).
    """

    unit = "expert"
    needs_calibration = True

    def score(self, group: GroupSet, stats: Mapping[str, Any]) -> torch.Tensor:
        return self.expert_scores(stats[group.name], group).float()

    def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
        """Importance of each expert of `group` from its routing statistics."""
        raise TypeError(f"{type(self).__name__} must define `expert_scores`")


@register_structured_score("reap")
class ExpertReap(ExpertScore):
    """REAP: mean over the routed tokens of g_e(x)·‖f_e(x)‖₂ (0 for an expert no token reached)."""

    def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
        return stats.contribution / stats.tokens.clamp_min(1)


@register_structured_score("frequency")
class ExpertFrequency(ExpertScore):
    """The number of tokens routed to each expert."""

    def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
        return stats.tokens.clone()


@register_structured_score("routing_weight")
class ExpertRoutingWeight(ExpertScore):
    """The gate weight each expert received, summed over its routed tokens."""

    def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
        return stats.gate.clone()


@register_structured_score("random")
class ExpertRandom(ExpertScore):
    """A uniform random score per expert, seeded by `seed` and the layer's block (a baseline)."""

    needs_calibration = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def expert_scores(self, stats: RoutingStats, group: GroupSet) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + (group.block or 0))
        return torch.rand(group.count, generator=generator)
