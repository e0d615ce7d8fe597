"""LoRA recovery on top of peft that keeps the sparsity pattern: wrap, train adapters, merge `W + M ⊙ ΔW`.

peft's own `merge_and_unload` adds the dense delta `s·B·A` to the pruned weight and densifies it
(Wanda users saw 40% sparsity fall to 32.7%, locuslab/wanda #83). Here the base weights keep their
masks (`masking.set_mask`; derived from the exact zeros of a finalized model), adapters are the only
trainable parameters, and `merge_lora` adds `M ⊙ (s·B·A)` with `keep_only_`, so every pruned entry
stays exactly `+0.0` and an N:M pattern stays N:M. The two training modes (`masked_delta`) and the
fused experts (`lora.experts`) are described in README, "One-shot Wanda and SparseGPT, then LoRA
recovery".

Lifecycle::

    peft_model = attach_lora(model, r=8, alpha=16, masked_delta=True)  # adapters on the pruned layers
    ...train (only adapter parameters require grad)...
    model = merge_lora(peft_model)        # same zero set as before; masks attached as before
    # or keep it unmerged: peft_model.save_pretrained(dir), later load_lora(sparse_base, dir)

Module names under peft gain `base_model.model.` and `.base_layer` (e.g.
`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight`); `base_name` maps them back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import nn

from lightning_prune.lora.conv import CONVOLUTIONS, check_lora_convolutions, conv_delta_forward
from lightning_prune.lora.experts import (
    adapted_parameter,
    expert_parameter_names,
    fused_expert_names,
    install_masked_experts,
    keep_mask,
)
from lightning_prune.masking import get_mask, keep_only_, masked_parameters, remove_mask, set_mask
from lightning_prune.targets import find_targets
from lightning_prune.validation import check_integer, check_number

# Base-layer attribute: [param_name, ...] whose masks attach_lora derived from zeros.
_DERIVED = "_lightning_prune_lora_derived_masks"
# Base-layer attribute under FSDP2: a callable giving the whole keep-mask in the forward, where the
# mask buffer is a row block (lora.sharded).
FORWARD_MASK = "_lightning_prune_lora_forward_mask"


class MaskedDelta(LoraVariant):
    """peft LoRA variant whose forward adds `(M ⊙ s·B·A)·x`: the delta never reaches a pruned weight.

    Its merge hooks add the same masked delta, so even peft's own `merge_and_unload` keeps the zeros.
    """

    @staticmethod
    def init(module: LoraLayer, adapter_name: str) -> None:
        """Nothing to initialise: the mask lives on the base layer (`weight_mask`)."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """A new tensor `W + M ⊙ ΔW` (peft's `merge(safe_merge=True)`), pruned entries +0.0."""
        return _masked_sum(module, orig_weight, masked_delta_weight(module, active_adapter))

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        """`W ← W + M ⊙ ΔW` in place (peft's `merge()` and `merge_and_unload()`)."""
        orig_weight.data = _masked_sum(module, orig_weight.data, masked_delta_weight(module, active_adapter))

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        """`W − M ⊙ ΔW` (peft's `unmerge()`)."""
        return _masked_sum(module, orig_weight, -masked_delta_weight(module, active_adapter))

    @staticmethod
    def forward(
        module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """`result + (M ⊙ ΔW) x` with ΔW = s·B·A in the base weight's layout (peft's `get_delta_weight`);
        for a convolution, the base's convolution of x with `M ⊙ ΔW` (ΔW: peft's k×k `lora_A` then 1×1 `lora_B`)."""
        delta = masked_delta_weight(module, active_adapter).to(x.dtype)
        x = module.lora_dropout[active_adapter](x)
        base = module.get_base_layer()
        if isinstance(base, CONVOLUTIONS):
            return result + conv_delta_forward(base, x, delta)  # the merged layer's forward, exactly
        if getattr(module, "fan_in_fan_out", False):  # GPT-2 Conv1D stores (in, out); set on peft's Linear only
            delta = delta.t()
        return result + F.linear(x, delta)


def masked_delta_weight(module: LoraLayer, adapter_name: str) -> torch.Tensor:
    """`M ⊙ s·B·A` in the base weight's shape; pruned entries are +0.0 (a select, never `* 0`).

    The LoRA forward differentiates through it, so it is a select rather than `keep_only_`.
    """
    # Every concrete peft LoRA layer (Linear, Conv, Embedding) defines get_delta_weight; the LoraLayer
    # base does not (peft 0.21.2).
    delta: torch.Tensor = module.get_delta_weight(adapter_name)  # type: ignore[attr-defined]
    base = module.get_base_layer()
    forward_mask = getattr(base, FORWARD_MASK, None)
    keep = forward_mask(base) if forward_mask is not None else keep_mask(base, adapted_parameter(module))
    return torch.where(keep, delta, 0.0)  # one pass, no ~mask


def _masked_sum(module: LoraLayer, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """`weight + delta` with the pruned entries rewritten as +0.0 (no -0.0 can survive)."""
    return keep_only_(weight + delta.detach().to(weight.dtype), keep_mask(module.get_base_layer()))


def base_name(name: str) -> str:
    """The unwrapped model's name of a parameter or module named inside a peft model."""
    name = re.sub(r"^base_model\.model\.", "", name)
    return name.replace(".base_layer", "")


def unwrapped_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA-injected model's state dict under the plain model's keys: adapters dropped, `base_layer` unwrapped
    (nested for several adapted parameters of one module)."""
    return {re.sub(r"(\.base_layer)+\.", ".", key): value for key, value in state.items() if ".lora_" not in key}


def pruned_module_names(model: nn.Module) -> list[str]:
    """Default LoRA `target_modules`: modules with an attached mask, else prunable layers holding exact zeros."""
    masked = list(masked_parameters(model))
    if masked:
        return [name.rpartition(".")[0] for name, _, param in masked if param == "weight"]
    return [t.module_name for t in find_targets(model, experts=False) if bool((t.weight == 0).any())]


def pruned_expert_names(model: nn.Module) -> list[str]:
    """Default LoRA `target_parameters`: fused expert parameters with an attached mask, else holding exact zeros."""
    fused = fused_expert_names(model)
    masked = {name for name, _, _ in masked_parameters(model)}
    if masked:
        return [name for name in fused if name in masked]
    return [name for name in fused if bool((model.get_parameter(name) == 0).any())]


def _ensure_masks(model: nn.Module) -> None:
    """Attach a mask `W != 0` to every adapted parameter without one (a finalized model), flagged for removal."""
    for _, layer in lora_layers(model):
        base, param_name = layer.get_base_layer(), adapted_parameter(layer)
        if get_mask(base, param_name) is not None:
            continue
        set_mask(base, base.get_parameter(param_name).detach() != 0, param_name)
        object.__setattr__(base, _DERIVED, [*getattr(base, _DERIVED, []), param_name])


def check_lora_arguments(
    r: int, alpha: float, dropout: float, target_parameters: str | Sequence[str] | None = None
) -> None:
    """Validate LoRA's rank, scaling numerator and dropout; the error names the argument and value.

    Fused expert parameters take no dropout (peft's `ParamWrapper` cannot factor it out of `B·A·x`).
    """
    check_integer(r, "r", low=1)
    check_number(alpha, "alpha", low=0.0, low_open=True)
    check_number(dropout, "dropout", low=0.0, high=1.0, high_open=True)
    if dropout and target_parameters:
        raise ValueError(
            f"`dropout`={dropout} cannot apply to `target_parameters`={target_parameters!r} "
            "(fused experts take no LoRA dropout); use dropout=0"
        )


def lora_target_names(
    model: nn.Module, target_modules: str | Sequence[str] | None, target_parameters: str | Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(module names, expert parameter names) that `attach_lora` adapts; see its arguments."""
    if target_modules is None:
        names = pruned_module_names(model)
        parameters = (
            pruned_expert_names(model)
            if target_parameters is None
            else expert_parameter_names(model, target_parameters)
        )
        if not names and not parameters:
            raise ValueError(
                "`target_modules`=None found no pruned layer (no masks, no exact zeros); "
                "prune first or name the targets"
            )
        return names, parameters
    names = [
        t.module_name for t in find_targets(model, include=target_modules, ignore_output_head=False, experts=False)
    ]
    return names, [] if target_parameters is None else expert_parameter_names(model, target_parameters)


def attach_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] | None = None,
    masked_delta: bool = True,
    adapter_name: str = "default",
    target_parameters: str | Sequence[str] | None = None,
) -> PeftModel:
    r"""Wrap a pruned `model` (in place) with LoRA adapters; only adapter parameters stay trainable.

    Args:
        model: a model with masks attached (`set_mask`) or with pruned entries already exact zeros.
        r, alpha, dropout: LoRA rank, scaling numerator (s = alpha / r) and dropout on the adapter input.
        target_modules: regular expressions over module names (as `find_targets(include=...)`);
            None = the pruned layers (`pruned_module_names`).
        masked_delta: multiply the delta by the mask in the forward pass (see the module docstring).
        adapter_name: peft adapter name.
        target_parameters: regular expressions over qualified names of fused expert parameters
            (`re.search`, e.g. `r"experts\.down_proj"`); one rank-r adapter per expert. None = the
            pruned ones when `target_modules` is None too, else none. Needs `dropout=0`.

    Returns the `PeftModel`; `model` itself now holds the LoRA layers (peft injects in place).
    Convolutions (`nn.Conv1d/2d/3d`) are adapted as peft does (`lora.conv`); grouped ones are refused.
    """
    check_lora_arguments(r, alpha, dropout, target_parameters)
    names, parameters = lora_target_names(model, target_modules, target_parameters)
    check_lora_arguments(r, alpha, dropout, parameters)
    check_lora_convolutions(model, names, masked_delta)
    # peft annotates lora_alpha as int but only divides it by r (peft 0.21.2): a fractional alpha works.
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]
        lora_dropout=dropout,
        target_modules=names,
        target_parameters=parameters,
        bias="none",
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    _ensure_masks(peft_model)
    if masked_delta:
        install_masked_delta(peft_model, adapter_name)
    return peft_model


def install_masked_delta(model: nn.Module, adapter_name: str = "default") -> None:
    """Switch every LoRA layer's `adapter_name` to the `MaskedDelta` forward (`MaskedParamWrapper` for experts)."""
    install_masked_experts(model, adapter_name)
    for _, layer in lora_layers(model):
        if adapter_name in layer.lora_A and adapted_parameter(layer) == "weight":
            layer.lora_variant[adapter_name] = MaskedDelta()


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """(name, layer) of every peft LoRA layer in `model`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA adapter parameters (`lora_A`, `lora_B`, ...) of `model`."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


@torch.no_grad()
def merge_lora(peft_model: PeftModel) -> nn.Module:
    """Merge the active adapters as `W ← W + M ⊙ (s·B·A)` and return the unwrapped model.

    Every pruned entry stays exactly +0.0 and N:M stays N:M. Masks attached before `attach_lora`
    stay attached; masks it derived from zeros are removed again, leaving a plain model.
    """
    for _, layer in lora_layers(peft_model):
        base, param_name = layer.get_base_layer(), adapted_parameter(layer)
        weight = base.get_parameter(param_name)
        mask = keep_mask(base, param_name)
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                delta = masked_delta_weight(layer, adapter)
                weight.add_(delta.to(weight.dtype))
        # Guard: pruned entries were +0.0 and received +0.0; rewrite them so no -0.0 can survive.
        keep_only_(weight, mask)
        remove_derived_mask(base, param_name)
    return peft_model.unload()


def remove_derived_mask(base: nn.Module, param_name: str) -> None:
    """Remove the mask of `base.<param_name>` if `attach_lora` derived it from zeros (a merge leaves a plain model)."""
    if param_name in getattr(base, _DERIVED, ()):
        remove_mask(base, param_name)
        getattr(base, _DERIVED).remove(param_name)


def load_lora(model: nn.Module, directory: str, masked_delta: bool = True, adapter_name: str = "default") -> PeftModel:
    """Load adapters saved by `PeftModel.save_pretrained` onto a sparse base, masks as in `attach_lora`.

    Use the `masked_delta` the adapters were trained with: it changes the forward pass.
    """
    loaded = PeftModel.from_pretrained(model, directory, adapter_name=adapter_name, is_trainable=False)
    _ensure_masks(loaded)
    if masked_delta:
        install_masked_delta(loaded, adapter_name)
    return loaded
