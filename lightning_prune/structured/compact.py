"""`compact(model)`: physically remove masked groups and blocks; rewrite the Hugging Face config.

A unit whose consumer entries are all zero (its down/output-projection columns, the next layer's
input channels) contributes nothing, so removing it leaves every output as it was; a block whose
linear layers are all zero is the identity of its residual stream and is dropped. Transformers
models are rebuilt from the rewritten config (`intermediate_size`/`n_inner`/`ffn_dim`,
`num_attention_heads`, `num_key_value_heads` with an explicit `head_dim`, `num_hidden_layers`, and
per-layer lists like `layer_types`) and load the sliced weights with `strict=True`: the result is
exactly what a stock `from_pretrained` of its `save_pretrained` directory builds. Plain
`nn.Sequential` stacks are sliced in place. The compacted model carries no masks.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.masking import finalize
from lightning_prune.structured.compact_experts import slice_experts
from lightning_prune.structured.groups import GroupSet, removed_units
from lightning_prune.structured.moe import find_expert_layers
from lightning_prune.structured.select import block_is_dropped
from lightning_prune.structured.sequential import sequential_groups
from lightning_prune.structured.transformer import find_block_groups

try:
    from transformers import PreTrainedModel
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    PreTrainedModel = None  # type: ignore[misc,assignment]


def _is_hf(module: nn.Module) -> bool:
    return PreTrainedModel is not None and isinstance(module, PreTrainedModel)


def outermost_hf_models(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the Hugging Face models inside `model` that no other one contains."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _is_hf(module) and not any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            found.append((name, module))
    return found


@torch.no_grad()
def compact(model: nn.Module) -> nn.Module:
    """The smaller model: masked groups and dropped blocks removed, configs rewritten, no masks.

    Transformers models (the model itself or ones inside it, e.g. a LightningModule's `model`) are
    replaced by rebuilt ones; the given model object is returned unless it is itself a transformers
    model, whose rebuilt copy is returned. Raises a `ValueError` when the kept widths differ between
    layers (a stock config states one width for all layers).
    """
    if _is_hf(model):
        return _compact_transformers(model)
    for name, inner in outermost_hf_models(model):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _compact_transformers(inner))
    _compact_sequentials(model)
    return model


def _groups_of(model: nn.Module, kind: str) -> list[GroupSet]:
    """The model's groups of `kind`; a family without them (heads of GPT-2, BERT, ...) has none to remove.

    The MLPs inside MoE layers (shared experts) are not the config's `intermediate_size`: left alone."""
    try:
        groups = find_block_groups(model, kind)
    except ValueError:
        return []
    moe = tuple(f"{layer.name}." for layer in find_expert_layers(model))
    return [g for g in groups if not any(p.module_name.startswith(moe) for p in g.parts)]


def _uniform(widths: dict[int, int], what: str) -> int | None:
    values = set(widths.values())
    if len(values) > 1:
        raise ValueError(
            f"cannot compact: the kept {what} differ between layers {widths}; "
            "a stock config states one width for every layer (prune uniformly)"
        )
    return values.pop() if values else None


def _rewrite_config(
    config: Any,
    neurons: int | None,
    neuron_key: str | None,
    heads: tuple[int, int, int] | None,
    kept_blocks: list[int],
    total: int,
) -> Any:
    config = copy.deepcopy(config)
    if neurons is not None and neuron_key is not None:
        setattr(config, neuron_key, neurons)
    if heads is not None:
        kv_heads, per_kv, head_dim = heads
        config.head_dim = head_dim  # explicit: the head size no longer follows hidden_size / heads
        config.num_attention_heads = kv_heads * per_kv
        config.num_key_value_heads = kv_heads
    if len(kept_blocks) != total:
        for key, value in list(vars(config).items()):  # per-layer lists such as `layer_types`
            if isinstance(value, list) and len(value) == total and key != "architectures":
                setattr(config, key, [value[i] for i in kept_blocks])
        config.num_hidden_layers = len(kept_blocks)
    return config


def _compact_transformers(model: nn.Module) -> nn.Module:
    blocks_name, blocks = find_block_stack(model)
    dropped = {i for i, block in enumerate(blocks) if block_is_dropped(block)}
    kept_blocks = [i for i in range(len(blocks)) if i not in dropped]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    neurons = _groups_of(model, "neuron")
    heads = _groups_of(model, "head")
    widths: dict[str, dict[int, int]] = {"neuron": {}, "head": {}}
    for group in [*neurons, *heads]:
        if group.block in dropped:
            continue
        keep = ~removed_units(group)
        widths[group.kind][int(group.block or 0)] = int(keep.sum())
        for part in group.parts:
            state[part.qualified_name] = state[part.qualified_name].index_select(
                part.dim, part.kept_index(keep).to(state[part.qualified_name].device)
            )
    neuron_width = _uniform(widths["neuron"], "MLP neurons")
    kv_width = _uniform(widths["head"], "key/value heads")
    head_shape = None
    if heads and kv_width is not None:
        widths_of = {p.module_name.rpartition(".")[2]: p.width for p in heads[0].parts if p.name == "weight"}
        head_dim = widths_of["k_proj"]  # k_proj rows per key/value head
        head_shape = (kv_width, widths_of["q_proj"] // head_dim, head_dim)
    neuron_key = neurons[0].config_key if neurons else None
    expert_counts = slice_experts(model, state)
    config = _rewrite_config(model.config, neuron_width, neuron_key, head_shape, kept_blocks, len(blocks))
    for key, count in expert_counts.items():
        setattr(config, key, count)
    state = _renumber_blocks(state, blocks_name, kept_blocks, len(blocks))
    parameter = next(model.parameters())
    rebuilt = type(model)(config).to(device=parameter.device, dtype=parameter.dtype)
    rebuilt.load_state_dict(state, strict=True)
    if getattr(model, "generation_config", None) is not None:
        rebuilt.generation_config = copy.deepcopy(model.generation_config)
    return rebuilt.train(model.training)


def _renumber_blocks(
    state: dict[str, torch.Tensor], blocks_name: str, kept: list[int], total: int
) -> dict[str, torch.Tensor]:
    """Drop the removed blocks' keys and renumber the rest 0, 1, ... in order."""
    if len(kept) == total:
        return state
    new_index = {old: new for new, old in enumerate(kept)}
    prefix = f"{blocks_name}."
    renamed = {}
    for key, value in state.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if int(index) not in new_index:
                continue
            key = f"{prefix}{new_index[int(index)]}.{rest}"
        renamed[key] = value
    return renamed


def _sync_widths(module: nn.Module) -> None:
    """Set a sliced layer's width attributes from its tensors (what `repr` and `forward` read)."""
    if isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = (
            int(module.weight.shape[0]),
            int(module.weight.shape[1]) * module.groups,
        )
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(module.weight.shape[0]), int(module.weight.shape[1])
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        module.num_features = int(
            module.running_mean.shape[0] if module.running_mean is not None else module.weight.shape[0]
        )


def _compact_sequentials(model: nn.Module) -> None:
    """Slice every plain `nn.Sequential` stack's removed filters/neurons in place."""
    inside_hf = [name for name, _ in outermost_hf_models(model)]
    stacks = [
        (n, m)
        for n, m in model.named_modules()
        if type(m) is nn.Sequential and not any(n.startswith(f"{h}.") for h in inside_hf)
    ]
    groups = [g for name, m in stacks for g in sequential_groups(name, m)]
    keeps = [(group, ~removed_units(group)) for group in groups]
    finalize(model)  # the masks' zeros are baked in; the sliced tensors no longer fit them
    for group, keep in keeps:
        if bool(keep.all()):
            continue
        for part in group.parts:
            sliced = part.tensor.detach().index_select(part.dim, part.kept_index(keep).to(part.tensor.device))
            if part.is_parameter:
                setattr(part.module, part.name, nn.Parameter(sliced, requires_grad=part.tensor.requires_grad))
            else:
                setattr(part.module, part.name, sliced)
            _sync_widths(part.module)
