"""The mixture-of-experts layers of a model: routed experts, their router, the config key of their count.

transformers 5's sparse MoE blocks (checked on 5.25) hold a fused `experts` module (`num_experts`,
3-D `gate_up_proj`/`down_proj`, gpt-oss also their biases) beside a router whose `weight` has one
row per expert: `gate` (Mixtral, Qwen2/3-MoE, DeepSeek-V3 with its `e_score_correction_bias`
buffer) or `router` (gpt-oss with a bias, Llama 4). Shared experts (`shared_expert(s)`, Qwen2-MoE's
`shared_expert_gate`) are not routed: they are never removed and never targets.

An `ExpertLayer`'s `group` is a `GroupSet` of kind "expert": unit e owns slice e (along dim 0) of
every expert tensor, the router's row e and entry e of its biases, so `compact` slices them as it
slices neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.structured.groups import GroupSet, Part
from lightning_prune.targets import expert_parameters

# The config entries that state the number of routed experts, by family (DeepSeek-V3's
# `num_local_experts` is an attribute_map alias of `n_routed_experts`).
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
SHARED = "shared_expert"


@dataclass
class ExpertLayer:
    """One sparse MoE block: its fused experts, its router and the expert count."""

    name: str  # the MoE block, e.g. "model.layers.1.mlp"
    module: nn.Module
    experts: nn.Module
    router_name: str  # child name of the router ("gate", "router")
    router: nn.Module
    count: int
    top_k: int
    block: int | None

    @property
    def experts_name(self) -> str:
        """Qualified name of the fused experts module."""
        return f"{self.name}.experts" if self.name else "experts"

    @property
    def qualified_router(self) -> str:
        """Qualified name of the router."""
        return f"{self.name}.{self.router_name}" if self.name else self.router_name

    def group(self, config_key: str | None = None) -> GroupSet:
        """The expert units of this layer as a `GroupSet` (down_proj is the consumer)."""
        group = GroupSet(self.experts_name, "expert", self.count, block=self.block, config_key=config_key)
        for module_name, module in ((self.experts_name, self.experts), (self.qualified_router, self.router)):
            for name, _tensor in _per_expert(module, self.count):
                role = "in" if module is self.experts and name.startswith("down_proj") else "out"
                group.parts.append(Part(module_name, module, name, 0, 1, role))
        return group


def _per_expert(module: nn.Module, count: int) -> list[tuple[str, torch.Tensor]]:
    """The parameters and persistent buffers of `module` with one entry per expert along dim 0
    (masks and routing buffers are non-persistent: not the model's)."""
    buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]
    return [
        (n, t) for n, t in [*module.named_parameters(recurse=False), *buffers] if t.dim() >= 1 and t.shape[0] == count
    ]


def _router(module: nn.Module, count: int) -> tuple[str, nn.Module] | None:
    for child_name, child in module.named_children():
        if child_name == "experts" or SHARED in child_name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == count:
            return child_name, child
    return None


def _top_k(module: nn.Module, router: nn.Module, config: object) -> int:
    for owner in (router, module, config):
        value = getattr(owner, "top_k", None) or getattr(owner, "num_experts_per_tok", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"cannot find the number of experts each token is routed to (`top_k`) of {type(module).__name__}")


def _block_index(model: nn.Module, name: str) -> int | None:
    try:
        blocks_name, _blocks = find_block_stack(model)
    except ValueError:
        return None
    prefix = f"{blocks_name}."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].partition(".")[0])


def find_expert_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every sparse MoE block of `model` (a module with a fused `experts` child and a router), in order."""
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not expert_parameters(experts):
            continue
        count = int(experts.num_experts)  # type: ignore[arg-type]
        router = _router(module, count)
        if router is None:
            children = ", ".join(n for n, _ in module.named_children())
            raise ValueError(
                f"cannot find the router of {name} ({type(module).__name__}: {children}): "
                f"expected a child with a ({count}, hidden) `weight` beside `experts`"
            )
        top_k = _top_k(module, router[1], config)
        found.append(ExpertLayer(name, module, experts, router[0], router[1], count, top_k, _block_index(model, name)))
    return found


def shared_expert_names(model: nn.Module) -> list[str]:
    """Qualified names of the shared (always-on, unrouted) experts beside routed ones."""
    names = []
    for layer in find_expert_layers(model):
        names += [f"{layer.name}.{child}" for child, _ in layer.module.named_children() if SHARED in child]
    return names


def expert_count_keys(config: object, count: int) -> list[str]:
    """The config entries that state `count` routed experts (all of them are rewritten by `compact`)."""
    return [key for key in COUNT_KEYS if getattr(config, key, None) == count]
