"""`compact`'s share for mixture-of-experts layers: slice the removed experts out, rewrite their count.

A removed expert (one its router routes around, `structured/routing.py`) owns slice e of every
fused expert tensor, row e of the router's weight and entry e of its biases and buffers
(`moe.ExpertLayer.group`); the state dict keeps the others and the config's expert count
(`num_local_experts`, `num_experts`, `n_routed_experts`) becomes the kept count. The stock router
of the rebuilt model normalises over the kept experts only: exactly what the masked model does
with `renormalize`=True. With `renormalize`=False a router whose weights then differ (a softmax
over all experts without top-k renormalisation) cannot be represented, and `compact` refuses.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_prune.structured.moe import ExpertLayer, expert_count_keys, find_expert_layers
from lightning_prune.structured.routing import RENORMALIZE, routing_keep, routing_renormalizes


def _outputs_equal(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor):
        return torch.allclose(first, second, atol=1e-6, rtol=1e-5)
    return all(_outputs_equal(a, b) for a, b in zip(first, second, strict=True))


@torch.no_grad()
def check_representable(layer: ExpertLayer) -> None:
    """Refuse a `renormalize`=False routing whose gate weights a stock router over the kept experts differs from."""
    if routing_renormalizes(layer.router):
        return
    weight: torch.Tensor = layer.router.weight  # type: ignore[assignment]
    probe = torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight)
    dense_scale = layer.router(probe)
    setattr(layer.router, RENORMALIZE, True)
    try:
        renormalized = layer.router(probe)
    finally:
        setattr(layer.router, RENORMALIZE, False)
    if not _outputs_equal(dense_scale, renormalized):
        raise ValueError(
            f"cannot compact {layer.name}: its experts were removed with renormalize=False and its router "
            "normalises over all experts, which a stock config over the kept experts cannot state; "
            "prune with renormalize=True to compact"
        )


def slice_experts(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Slice the removed experts out of `state` (in place); returns the config entries to rewrite."""
    kept: dict[str, int] = {}
    counts = set()
    layers = [layer for layer in find_expert_layers(model) if routing_keep(layer.router) is not None]
    if not layers:
        return {}
    for layer in layers:
        check_representable(layer)
        keep = routing_keep(layer.router).cpu()  # type: ignore[union-attr]
        counts.add((layer.count, int(keep.sum())))
        for part in layer.group().parts:
            tensor = state[part.qualified_name]
            state[part.qualified_name] = tensor.index_select(0, part.kept_index(keep).to(tensor.device))
        kept[layer.name] = int(keep.sum())
    every = find_expert_layers(model)
    if len(layers) != len(every) or len(counts) != 1:
        raise ValueError(
            f"cannot compact: the MoE layers keep different numbers of experts "
            f"{ {layer.name: kept.get(layer.name, layer.count) for layer in every} }; "
            "a stock config states one expert count (prune every MoE layer to the same count)"
        )
    total, left = counts.pop()
    config = next(m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict"))
    return dict.fromkeys(expert_count_keys(config, total), left)
