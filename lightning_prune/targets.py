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
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "head", "cls", "output_layer")
# Last name components of input embeddings made of layers (a ViT's patch-embedding conv, a CNN stem):
# every layer inside them stays dense by default, like token embeddings.
EMBEDDING_NAMES = ("patch_embed", "patch_embeds", "patch_embedding", "patch_embeddings", "stem")


@dataclass(frozen=True)
class PruneTarget:
    """One prunable weight: the module that owns it and how to view it as (out, in).

    A fused mixture-of-experts tensor (`experts` > 0) holds E matrices, stored (E, out, in) or,
    with `expert_transposed` (gpt-oss, Llama 4), (E, in, out); `as_matrix` views it as
    (E, out, in) and `matrices` gives each expert's (out, in) slice, which selection, N:M,
    statistics, reports and export treat as one weight named `<parameter>[e]`.
    """

    module_name: str
    module: nn.Module
    param_name: str = "weight"
    experts: int = 0
    expert_transposed: bool = False

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
        """True for weights stored as (in, out), like transformers' `Conv1D` (per expert for experts)."""
        if self.experts:
            return self.expert_transposed
        return isinstance(self.module, HFConv1D)

    def as_matrix(self, tensor: torch.Tensor) -> torch.Tensor:
        """View a tensor of the weight's shape as (out, in) — (E, out, in) for experts; a view, so
        writes reach `tensor`. The input dimension is always the last one."""
        if self.experts:
            return tensor.transpose(1, 2) if self.expert_transposed else tensor
        if self.transposed:
            return tensor.t()
        return tensor.reshape(tensor.shape[0], -1)

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of `as_matrix`: bring an (out, in) (or (E, out, in)) tensor back to the weight's shape."""
        if self.experts:
            return matrix.transpose(1, 2) if self.expert_transposed else matrix
        if self.transposed:
            return matrix.t()
        return matrix.reshape(matrix.shape[0], *self.weight.shape[1:])  # rows: FSDP2 holds a block of them

    def matrix_names(self) -> list[str]:
        """The names of the matrices this weight holds: its own, or `<name>[e]` per expert."""
        return [f"{self.name}[{e}]" for e in range(self.experts)] if self.experts else [self.name]

    def matrices(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The (out, in) views of a tensor of the weight's shape, one per name in `matrix_names`."""
        matrix = self.as_matrix(tensor)
        return list(matrix.unbind(0)) if self.experts else [matrix]

    def from_matrices(self, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of `matrices`: one tensor of the weight's shape."""
        return self.from_matrix(torch.stack(list(matrices))) if self.experts else self.from_matrix(matrices[0])


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


def embedding_names(model: nn.Module, types: tuple[type[nn.Module], ...] = DEFAULT_TYPES) -> set[str]:
    """Names of the prunable layers inside input embeddings made of layers: left dense unless targeted by name.

    A module whose last name component is in EMBEDDING_NAMES (timm's `patch_embed`, transformers'
    `patch_embeddings` / `patch_embedding`, a CNN's `stem`) holding a convolution is an embedding,
    as a token embedding is: every `types` layer inside it (its conv, a projection) is one.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in EMBEDDING_NAMES:
            continue
        inside = [(n, m) for n, m in module.named_modules(prefix=name) if isinstance(m, types)]
        if any(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for _, m in inside):
            names.update(n for n, _ in inside)
    return names


def adapter_module_names(model: nn.Module) -> set[str]:
    """Modules inside peft tuner layers other than their `base_layer` (LoRA's `lora_A`, `lora_B`, ...).

    They are adapters, never pruning targets; peft's layers carry `base_layer` and `adapter_layer_names`.
    """
    names: set[str] = set()
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and hasattr(module, "adapter_layer_names"):
            inside_base = {id(m) for m in base.modules()}
            names.update(
                child for child, m in module.named_modules(prefix=name) if m is not module and id(m) not in inside_base
            )
    return names


def expert_parameters(module: nn.Module) -> list[tuple[str, bool]]:
    """(name, stored transposed) of the fused (E, out, in) expert weights held by `module`.

    transformers 5's experts modules (Mixtral, Qwen-MoE, DeepSeek, gpt-oss, Llama 4, ...) carry
    `num_experts` and 3-D parameters such as `gate_up_proj` and `down_proj`; biases are not
    targets. The orientation is transformers' `is_transposed` flag (set by
    `use_experts_implementation`, checked on 5.24); modules without it (Llama 4) are read from
    which dimension holds `hidden_size`.
    """
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        return []
    found = []
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 3 and param.shape[0] == count and not name.endswith("bias"):
            found.append((name, _expert_transposed(module, name, param)))
    return found


def _expert_transposed(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    marked = getattr(module, "is_transposed", None)
    if isinstance(marked, bool):
        return marked
    hidden = getattr(module, "hidden_size", getattr(module, "hidden_dim", None))
    if not isinstance(hidden, int):
        return False
    rows, cols = int(param.shape[1]), int(param.shape[2])
    if "down" in name:  # (E, hidden, inter) as stored by default, (E, inter, hidden) transposed
        return cols == hidden and rows != hidden
    return rows == hidden and cols != hidden


def router_names(model: nn.Module) -> set[str]:
    """Modules that route tokens to experts (`gate`, `router`, `shared_expert_gate` beside an
    `experts` module): left dense unless targeted by name."""
    names: set[str] = set()
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        for child in children:
            if child in ROUTER_NAMES or child.endswith("_gate") or "router" in child:
                names.update(n for n, _ in children[child].named_modules(prefix=f"{name}.{child}" if name else child))
    return names


def find_targets(
    model: nn.Module,
    types: Iterable[type[nn.Module]] | None = None,
    include: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    ignore_output_head: bool = True,
    experts: bool = True,
) -> list[PruneTarget]:
    """The weights to prune in `model`, in module order.

    Args:
        model: the model to search.
        types: module classes whose `weight` is prunable (default: Linear, Conv1d/2d, HF Conv1D).
        include: regular expressions (`re.search`) over qualified module names (for experts, the
            module or the parameter name); when given, only matching modules are targeted, output
            heads and routers included if they match.
        ignore: regular expressions of module (or expert parameter) names to leave dense.
        ignore_output_head: leave the output head / classifier, the routers and the patch embeddings /
            stems dense (see `output_head_names`, `router_names`, `embedding_names`).
        experts: also target fused mixture-of-experts weights (see `expert_parameters`).

    Raises:
        ValueError: when nothing matches; the message lists the model's prunable modules.
    """
    types = tuple(types) if types is not None else DEFAULT_TYPES
    includes = _compile(include, "targets")
    ignores = _compile(ignore, "ignore")
    dense = (
        output_head_names(model, types) | router_names(model) | embedding_names(model, types)
        if ignore_output_head and not includes
        else set()
    )
    found = []
    candidates = []
    adapters = adapter_module_names(model)
    for name, module in model.named_modules():
        if name in adapters:
            continue
        fused = expert_parameters(module) if experts else []
        if fused:
            for param_name, transposed in fused:
                qualified = f"{name}.{param_name}" if name else param_name
                candidates.append(qualified)
                if _chosen([name, qualified], includes, ignores):
                    found.append(PruneTarget(name, module, param_name, len(getattr(module, param_name)), transposed))
            continue
        if not isinstance(module, types) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        candidates.append(name)
        if _chosen([name], includes, ignores) and name not in dense:
            found.append(PruneTarget(name, module))
    if not found:
        shown = ", ".join(candidates[:30]) + (" ..." if len(candidates) > 30 else "")
        raise ValueError(
            f"no prunable weights matched `targets`={include!r} with `ignore`={ignore!r} "
            f"(types {[t.__name__ for t in types]}); the model's prunable modules are: [{shown}]"
        )
    return found


def _chosen(names: Sequence[str], includes: Sequence[re.Pattern[str]], ignores: Sequence[re.Pattern[str]]) -> bool:
    if includes and not any(p.search(n) for p in includes for n in names):
        return False
    return not any(p.search(n) for p in ignores for n in names)
