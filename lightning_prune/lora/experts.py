"""LoRA on fused mixture-of-experts parameters (peft's `target_parameters`) without losing their masks.

transformers 5 stores the experts of Mixtral, Qwen-MoE, DeepSeek, gpt-oss and Llama 4 as 3-D
parameters (`experts.gate_up_proj`, `experts.down_proj`), which no `target_modules` reaches. peft
0.21.2 adapts them with `lora.ParamWrapper`: one rank-r adapter per expert, added to the parameter
through a parametrization that lives only inside the wrapper's forward. Its forward adds the dense
delta and its merge adds it too, so the pruned entries would fill in. `MaskedParamWrapper` changes
two things and keeps peft's layout (state dict keys, `save_pretrained`, nesting of several
parameters of one module):

- the forward computes `M ⊙ (W + s·B·A)` per expert — equal to `W + M ⊙ s·B·A`, since pruned
  entries of W are +0.0 — in one `baddbmm` and one select, so no pruned value reaches the forward
  and the adapters get no gradient through a pruned entry;
- `get_delta_weight` is the masked delta, so peft's `merge`, `unmerge` and `merge_and_unload`
  keep every zero and every N:M group of every expert slice.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.masking import get_mask
from lightning_prune.targets import expert_parameters


def keep_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor:
    """The keep-mask attached to `module.<param_name>`, else its non-zeros (a base finalized under the wrapper)."""
    mask = get_mask(module, param_name)
    return mask if mask is not None else module.get_parameter(param_name).detach() != 0


def adapted_parameter(layer: object) -> str:
    """The name of the base parameter a peft LoRA layer adapts: `weight`, or a `ParamWrapper`'s parameter."""
    return layer.parameter_name if isinstance(layer, ParamWrapper) else "weight"


def fused_expert_names(model: nn.Module) -> list[str]:
    """Qualified names of every fused (E, ·, ·) expert parameter of `model` (`targets.expert_parameters`)."""
    return [
        f"{name}.{param}" if name else param
        for name, module in model.named_modules()
        for param, _ in expert_parameters(module)
    ]


def expert_parameter_names(model: nn.Module, patterns: str | Sequence[str]) -> list[str]:
    """The fused expert parameters whose qualified names match a regex of `patterns` (`re.search`).

    Raises a ValueError naming `target_parameters` for an invalid regex or when none matches.
    """
    listed = [patterns] if isinstance(patterns, str) else list(patterns)
    try:
        compiled = [re.compile(p) for p in listed]
    except re.error as error:
        raise ValueError(f"`target_parameters` has an invalid regular expression in {patterns!r}: {error}") from error
    fused = fused_expert_names(model)
    chosen = [name for name in fused if any(p.search(name) for p in compiled)]
    if not chosen:
        raise ValueError(
            f"`target_parameters`={patterns!r} matched no fused expert parameter; "
            f"the model's are {fused[:12] or 'none'}"
        )
    return chosen


class _MaskedLoraSum(nn.Module):
    """Parametrization `W ↦ M ⊙ (W + Σ s·lhs·rhs)` over (E, ·, ·) expert stacks (one `baddbmm` per adapter)."""

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor, float]], keep: torch.Tensor) -> None:
        super().__init__()
        self.factors, self.keep = factors, keep

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for lhs, rhs, scaling in self.factors:
            # A parametrization must keep W's dtype, so autocast is off (as in peft's own factors proxy).
            with torch.autocast(device_type=weight.device.type, enabled=False):
                weight = torch.baddbmm(weight, lhs, rhs, alpha=scaling)
        return torch.where(self.keep, weight, 0.0)  # a select: pruned entries +0.0, no gradient through them


class MaskedParamWrapper(ParamWrapper):
    """peft's `ParamWrapper` whose forward and merges add only the kept part of the delta (see the module docstring).

    `install_masked_experts` turns peft's wrappers into this class in place (it adds no state); the
    parameter's mask is the one attached to the base module (`set_mask(experts, mask, "gate_up_proj")`).
    """

    def get_delta_weight(self, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        """`M ⊙ s·B·A` in the parameter's layout (peft's merge, unmerge and multi-adapter forward use it)."""
        delta: torch.Tensor = super().get_delta_weight(adapter_name, *args, **kwargs)
        return torch.where(keep_mask(self.get_base_layer(), self.parameter_name), delta, 0.0)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]) -> Iterator[None]:
        # Overrides ParamWrapper._activate_lora (peft 0.21.2): same parametrization life cycle, masked sum.
        adapters = [a for a in active_adapters if a in self.lora_A]
        if not adapters or self.num_experts == 1:  # a 2-D parameter: the masked delta through peft's proxy
            with super()._activate_lora(active_adapters):
                yield
            return
        base, name = self.get_base_layer(), self.parameter_name
        requires_grad = self.get_param().requires_grad
        proxy = _MaskedLoraSum([self.get_delta_factors(a) for a in adapters], keep_mask(base, name))
        parametrize.register_parametrization(base, name, proxy)
        _parametrizations(base)[name].original.requires_grad_(requires_grad)  # registering resets it
        try:
            with parametrize.cached():
                yield
        finally:
            _remove_parametrization(base, name, proxy)


def _parametrizations(module: nn.Module) -> Any:
    """`module.parametrizations` (a ModuleDict of ParametrizationLists that torch adds on registration)."""
    return module.parametrizations


def _remove_parametrization(module: nn.Module, name: str, proxy: nn.Module) -> None:
    """Remove `proxy` from `module.<name>`'s parametrizations, and the parametrization itself when it was the last."""
    chain = _parametrizations(module)[name]
    if len(chain) == 1:
        parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        return
    del chain[next(i for i, p in enumerate(chain) if p is proxy)]


def install_masked_experts(model: nn.Module, adapter_name: str = "default") -> None:
    """Turn every peft `ParamWrapper` holding `adapter_name` into a `MaskedParamWrapper` (in place)."""
    for module in model.modules():
        if type(module) is ParamWrapper and adapter_name in module.lora_A:
            module.__class__ = MaskedParamWrapper  # a subclass without state of its own
