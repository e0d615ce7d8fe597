"""Which parameters are pruned: module types, name patterns, ignore lists, Hugging Face-aware defaults.

A target is one weight tensor. Every part of the library sees it through the "matrix view"
(output rows × input columns), so that `nn.Linear`, convolutions and GPT-2's transposed
`Conv1D` share one set of selection rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D as HFConv1D  # GPT-2 style: the weight stored transposed, (in, out)

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, HFConv1D)
# Last name components of output heads that stay dense by default.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "cls", "output_layer")


@dataclass(frozen=True)
class PruneTarget:
    """One prunable weight: the module that owns it and how to view it as (out, in)."""

    module_name: str
    module: nn.Module
    param_name: str = "weight"

    @property
    def name(self) -> str:
        """Qualified parameter name, as in `model.named_parameters()`."""
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def weight(self) -> nn.Parameter:
        """The pruned parameter itself."""
        return self.module.get_parameter(self.param_name)

    @property
    def transposed(self) -> bool:
        """True for layers that store the weight as (in, out), like transformers' `Conv1D`."""
        return isinstance(self.module, HFConv1D)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor of the weight's shape as (out, in); a view, so writes reach `tensor`."""
        if self.transposed:
            return tensor.t()
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_matrix`: bring an (out, in) tensor back to the weight's shape."""
        if self.transposed:
            return matrix.t()
        return matrix.reshape(self.weight.shape)


def _compile(patterns: str | Sequence[str] | None, argument: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"`{argument}` has an invalid regular expression {pattern!r}: {error}") from error
    return compiled


def output_head_names(model: nn.Module, types: tuple[type[nn.Module], ...] = DEFAULT_TYPES) -> set[str]:
    """Names of the modules treated as output heads: left dense unless targeted by name.

    Hugging Face models name theirs through `get_output_embeddings()`; otherwise a module whose
    last name component is a usual head name (`lm_head`, `classifier`, ...) counts; a plain model
    with neither has its last prunable layer (in registration order) as the head.
    """
    heads: set[str] = set()
    getters = [getattr(m, "get_output_embeddings", None) for m in model.modules()]
    hf_models = [getter for getter in getters if callable(getter)]
    outputs = [getter() for getter in hf_models]
    named = [(name, module) for name, module in model.named_modules() if isinstance(module, types)]
    for name, module in named:
        if any(module is output for output in outputs) or name.rsplit(".", 1)[-1] in HEAD_NAMES:
            heads.add(name)
    if not heads and not hf_models and named:
        heads.add(named[-1][0])
    return heads


def adapter_module_names(model: nn.Module) -> set[str]:
    """Modules inside peft tuner layers other than their `base_layer` (LoRA's `lora_A`, `lora_B`, ...).

    They are adapters, never pruning targets; peft's layers carry `base_layer` and `adapter_layer_names`.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and hasattr(module, "adapter_layer_names"):
            inside_base = {id(m) for m in base.modules()}
            names.update(child for child, m in module.named_modules(prefix=name) if m is not module and id(m) not in inside_base)
    return names


def find_targets(
    model: nn.Module,
    types: Iterable[type[nn.Module]] | None = None,
    include: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    ignore_output_head: bool = True,
) -> list[PruneTarget]:
    """The weights to prune in `model`, in module order.

    Args:
        model: the model to search.
        types: module classes whose `weight` is prunable (default: Linear, Conv1d/2d, HF Conv1D).
        include: regular expressions (`re.search`) over qualified module names; when given, only
            matching modules are targeted, output heads included if they match.
        ignore: regular expressions of module names to leave dense.
        ignore_output_head: leave the output head / classifier dense (see `output_head_names`).

    Raises:
        ValueError: when nothing matches; the message lists the model's prunable modules.
    """
    types = tuple(types) if types is not None else DEFAULT_TYPES
    includes = _compile(include, "targets")
    ignores = _compile(ignore, "ignore")
    heads = output_head_names(model, types) if ignore_output_head and not includes else set()
    found = []
    candidates = []
    adapters = adapter_module_names(model)
    for name, module in model.named_modules():
        if not isinstance(module, types) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        if name in adapters:
            continue
        candidates.append(name)
        if includes and not any(p.search(name) for p in includes):
            continue
        if any(p.search(name) for p in ignores) or name in heads:
            continue
        found.append(PruneTarget(name, module))
    if not found:
        shown = ", ".join(candidates[:30]) + (" ..." if len(candidates) > 30 else "")
        raise ValueError(
            f"no prunable weights matched `targets`={include!r} with `ignore`={ignore!r} "
            f"(types {[t.__name__ for t in types]}); the model's prunable modules are: [{shown}]"
        )
    return found
