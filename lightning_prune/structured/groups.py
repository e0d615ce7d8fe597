"""Coupled groups: the weights that must be removed together, found from the architecture.

A `GroupSet` is one place in the model that holds `count` interchangeable units — the MLP
neurons of one block, the key/value heads of one attention layer, the filters of one convolution
— and the `Part`s of tensors each unit owns. Unit `u` owns the slice `[u·width, (u+1)·width)` of
every part along the part's storage dimension `dim`; parts whose role is "in" are the unit's
*consumers* (the columns of the down/output projection, the next layer's input channels): a unit
whose consumer entries are all zero contributes nothing and can be removed exactly.

Found (DESIGN, "Structured groups"): MLP neurons of Llama/Mistral/Qwen2/Qwen3/Gemma
(`gate_proj`/`up_proj` rows + `down_proj` columns), GPT-2 (`c_fc`/`c_proj`, transposed `Conv1D`),
OPT (`fc1`/`fc2`), BERT family and ViT (`intermediate.dense`/`output.dense`); attention heads of
Llama-style attention (`q_proj`/`k_proj`/`v_proj`/`o_proj`; with GQA a unit is one key/value head
together with all the query heads that share it); filters and neurons of plain `nn.Sequential`
stacks (Conv2d/Linear → BatchNorm → element-wise ops → next Conv2d/Linear).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.targets import HFConv1D  # type: ignore[attr-defined]

KINDS = ("neuron", "head", "filter")
# (producer names, consumer name, config key) of the MLP layouts we know; producers' rows are the neurons.
# The config key is the first of the candidates the model's config has.
MLP_LAYOUTS: tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...] = (
    (("gate_proj", "up_proj"), "down_proj", ("intermediate_size",)),  # Llama, Mistral, Qwen2/3, Gemma
    (("c_fc",), "c_proj", ("n_inner",)),  # GPT-2 (Conv1D, stored (in, out))
    (("fc1",), "fc2", ("ffn_dim", "intermediate_size")),  # OPT; ViT (transformers 5: `mlp.fc1`/`mlp.fc2`)
    (("intermediate.dense",), "output.dense", ("intermediate_size",)),  # BERT family
)
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Modules a channel passes through unchanged, one channel at a time.
CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


@dataclass(frozen=True)
class Part:
    """One tensor's share of a group set: unit u owns `[u·width, (u+1)·width)` along `dim`."""

    module_name: str
    module: nn.Module
    name: str  # parameter or buffer name ("weight", "bias", "running_mean", ...)
    dim: int
    width: int
    role: str  # "out": the unit's producer; "in": its consumer

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor itself (parameter or buffer)."""
        value: torch.Tensor = getattr(self.module, self.name)
        return value

    @property
    def qualified_name(self) -> str:
        """Name as in `model.state_dict()`."""
        return f"{self.module_name}.{self.name}" if self.module_name else self.name

    @property
    def is_parameter(self) -> bool:
        """True for parameters (maskable), False for buffers (BatchNorm statistics)."""
        return self.name in self.module._parameters

    @property
    def is_weight(self) -> bool:
        """True for the weight matrix/kernel of a Linear, Conv1D or Conv layer."""
        return self.name == "weight" and isinstance(self.module, (nn.Linear, nn.Conv2d, *_conv1d()))

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Sum `values` (shaped like the tensor) over each unit's entries: shape (count,)."""
        moved = values.movedim(self.dim, 0)
        return moved.reshape(-1, self.width * moved[0].numel()).sum(1)

    def entry_mask(self, keep_units: torch.Tensor) -> torch.Tensor:
        """Bool mask shaped like the tensor: True on the entries of the kept units."""
        along = keep_units.repeat_interleave(self.width)
        shape = [1] * self.tensor.dim()
        shape[self.dim] = -1
        return along.reshape(shape).expand_as(self.tensor).clone()

    def kept_index(self, keep_units: torch.Tensor) -> torch.Tensor:
        """Indices along `dim` of the kept units' entries."""
        return torch.nonzero(keep_units.repeat_interleave(self.width), as_tuple=False).flatten()


@dataclass
class GroupSet:
    """`count` coupled units of one kind at one place of the model (see the module docstring)."""

    name: str
    kind: str
    count: int
    parts: list[Part] = field(default_factory=list)
    block: int | None = None  # index in the model's block list (transformers), None elsewhere
    config_key: str | None = None  # the config entry that states this width

    def consumers(self) -> list[Part]:
        """The parts through which a unit reaches the rest of the model."""
        return [p for p in self.parts if p.role == "in"]


def _conv1d() -> tuple[type[nn.Module], ...]:
    return (HFConv1D,) if HFConv1D is not None else ()


def _output_dim(module: nn.Module) -> int:
    """Storage dimension of a layer's output features (Conv1D keeps its weight as (in, out))."""
    return 1 if isinstance(module, _conv1d()) else 0


def input_dim(module: nn.Module) -> int:
    """The weight dimension that holds a layer's inputs: 0 for a transposed Conv1D, else 1."""
    return 0 if isinstance(module, _conv1d()) else 1


def _layer_parts(name: str, module: nn.Module, role: str, width: int = 1) -> list[Part]:
    """The weight (and bias) entries of a Linear/Conv1D/Conv2d layer on the unit's side."""
    if role == "out":
        parts = [Part(name, module, "weight", _output_dim(module), width, role)]
        if getattr(module, "bias", None) is not None:
            parts.append(Part(name, module, "bias", 0, width, role))
        return parts
    return [Part(name, module, "weight", input_dim(module), width, role)]


def _out_features(module: nn.Module) -> int:
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[_output_dim(module)])


def _mlp_group(block_name: str, block: nn.Module, index: int, config: object) -> GroupSet | None:
    modules = dict(block.named_modules())
    for producers, consumer, keys in MLP_LAYOUTS:
        key = next((k for k in keys if hasattr(config, k)), None)
        for name in modules:
            if name != consumer and not name.endswith("." + consumer):
                continue
            prefix = name[: -len(consumer)]  # "" or "mlp." / "" for OPT
            names = [prefix + p for p in producers]
            if not all(n in modules for n in names):
                continue
            owner = f"{block_name}.{prefix[:-1]}" if prefix else block_name
            group = GroupSet(owner, "neuron", _out_features(modules[names[0]]), block=index, config_key=key)
            for n in names:
                group.parts += _layer_parts(f"{block_name}.{n}", modules[n], "out")
            group.parts += _layer_parts(f"{block_name}.{name}", modules[name], "in")
            return group
    return None


def _head_group(block_name: str, block: nn.Module, index: int, config: object) -> GroupSet | None:
    for name, module in block.named_modules():
        children = dict(module.named_children())
        if not all(isinstance(children.get(p), nn.Linear) for p in HEAD_PROJECTIONS):
            continue
        head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if not isinstance(head_dim, int) or not isinstance(kv_heads, int):
            raise ValueError(
                f"cannot determine the heads of {block_name}.{name}: no `head_dim` / `num_key_value_heads` on the module or config"
            )
        q_rows = children["q_proj"].out_features
        if children["k_proj"].out_features != kv_heads * head_dim or q_rows % (kv_heads * head_dim):
            raise ValueError(
                f"cannot couple the heads of {block_name}.{name}: k_proj has {children['k_proj'].out_features} rows, expected {kv_heads} heads × {head_dim}"
            )
        per_kv = q_rows // kv_heads  # the query rows of all query heads sharing one key/value head
        qualified = f"{block_name}.{name}" if name else block_name
        group = GroupSet(qualified, "head", kv_heads, block=index, config_key="num_key_value_heads")
        group.parts += _layer_parts(f"{qualified}.q_proj", children["q_proj"], "out", per_kv)
        group.parts += _layer_parts(f"{qualified}.k_proj", children["k_proj"], "out", head_dim)
        group.parts += _layer_parts(f"{qualified}.v_proj", children["v_proj"], "out", head_dim)
        group.parts += _layer_parts(f"{qualified}.o_proj", children["o_proj"], "in", per_kv)
        return group
    return None


def model_config(model: nn.Module) -> object | None:
    """The Hugging Face config of the model or of the first transformers model inside it (a LightningModule's)."""
    return next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)


def find_block_groups(model: nn.Module, kind: str, blocks: str | None = None) -> list[GroupSet]:
    """The neuron or head group sets of every transformer block, in block order.

    Raises a `ValueError` naming the block whose coupling cannot be determined, and for heads
    where the model's config cannot state a head count with a fixed head size (BERT, GPT-2, OPT,
    ViT derive the head size from `hidden_size`).
    """
    blocks_name, block_list = find_block_stack(model, blocks)
    config = model_config(model)
    found = []
    for index, block in enumerate(block_list):
        name = f"{blocks_name}.{index}"
        group = _mlp_group(name, block, index, config) if kind == "neuron" else _head_group(name, block, index, config)
        if group is None:
            children = ", ".join(n for n, _ in block.named_children())
            if kind == "head":
                raise ValueError(
                    f"cannot prune attention heads of {name} ({type(block).__name__}: {children}): heads are removable only "
                    "in Llama-style attention (q_proj/k_proj/v_proj/o_proj with a config `head_dim`); this model's config derives "
                    "the head size from hidden_size. Prune MLP neurons (`mlp_sparsity`) or whole blocks (`drop_layers`) instead"
                )
            raise ValueError(
                f"cannot determine the MLP neurons of {name} ({type(block).__name__}: {children}); known layouts: {[(p, c) for p, c, _ in MLP_LAYOUTS]}"
            )
        found.append(group)
    return found


def sequential_groups(seq_name: str, seq: nn.Sequential) -> list[GroupSet]:
    """Filter (Conv2d) and neuron (Linear) group sets of one plain `nn.Sequential`."""
    children = list(seq.named_children())
    found = []
    for position, (name, producer) in enumerate(children):
        if not isinstance(producer, (nn.Conv2d, nn.Linear)):
            continue
        qualified = f"{seq_name}.{name}" if seq_name else name
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            raise ValueError(
                f"cannot couple the filters of {qualified}: grouped/depthwise convolutions (groups={producer.groups}) are not supported"
            )
        count = _out_features(producer)
        kind = "filter" if isinstance(producer, nn.Conv2d) else "neuron"
        group = GroupSet(qualified, kind, count, parts=_layer_parts(qualified, producer, "out"))
        flattened = False
        for follower_name, follower in children[position + 1 :]:
            follower_qualified = f"{seq_name}.{follower_name}" if seq_name else follower_name
            if isinstance(follower, (nn.BatchNorm1d, nn.BatchNorm2d)) and follower.num_features == count:
                group.parts += [
                    Part(follower_qualified, follower, n, 0, 1, "out")
                    for n in ("weight", "bias", "running_mean", "running_var")
                    if getattr(follower, n, None) is not None
                ]
            elif isinstance(follower, CHANNELWISE):
                continue
            elif isinstance(follower, nn.Flatten) and kind == "filter":
                flattened = True
            elif isinstance(follower, (nn.Conv2d, nn.Linear)):
                if isinstance(follower, nn.Conv2d) and (follower.groups != 1 or flattened):
                    raise ValueError(
                        f"cannot couple the filters of {qualified} with {follower_qualified} (groups={follower.groups})"
                    )
                inputs = follower.in_channels if isinstance(follower, nn.Conv2d) else follower.in_features
                if inputs % count:
                    raise ValueError(
                        f"cannot couple {qualified} ({count} outputs) with {follower_qualified} ({inputs} inputs)"
                    )
                group.parts += _layer_parts(follower_qualified, follower, "in", inputs // count)
                found.append(group)
                break
            else:
                raise ValueError(
                    f"cannot determine where the {kind}s of {qualified} go: {follower_qualified} ({type(follower).__name__}) follows it"
                )
    return found


def find_sequential_groups(model: nn.Module, kind: str) -> list[GroupSet]:
    """Group sets of `kind` ("filter" or "neuron") in every plain `nn.Sequential` of the model.

    A layer whose outputs leave the `Sequential` (the last one) is not a group: its outputs are the
    model's. Raises a `ValueError` when no group of that kind exists.
    """
    found = [
        g
        for name, m in model.named_modules()
        if type(m) is nn.Sequential
        for g in sequential_groups(name, m)
        if g.kind == kind
    ]
    if not found:
        raise ValueError(
            f"found no {kind} groups in {type(model).__name__}: {kind}s are found in plain nn.Sequential stacks (Conv2d/Linear → BatchNorm → activation → Conv2d/Linear)"
        )
    return found


def find_groups(model: nn.Module, kind: str, blocks: str | None = None) -> list[GroupSet]:
    """All group sets of `kind` ("neuron", "head" or "filter"): transformer blocks first, else `nn.Sequential` stacks."""
    if kind not in KINDS:
        raise ValueError(f"`structure` must be one of {KINDS}, got {kind!r}")
    if kind == "filter":
        return find_sequential_groups(model, kind)
    try:
        find_block_stack(model, blocks)
    except ValueError:
        if kind == "head":
            raise
        return find_sequential_groups(model, kind)
    return find_block_groups(model, kind, blocks)


@torch.no_grad()
def removed_units(group: GroupSet) -> torch.Tensor:
    """Bool (count,): units whose consumer entries are all zero (their removal changes nothing)."""
    alive = torch.zeros(group.count, dtype=torch.bool, device=group.parts[0].tensor.device)
    for part in group.consumers():
        alive |= part.per_unit((part.tensor != 0).float()) > 0
    return ~alive
