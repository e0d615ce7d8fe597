"""Coupled groups: the weights that must be removed together.

A `GroupSet` is one place in the model that holds `count` interchangeable units — the MLP
neurons of one block, the key/value heads of one attention layer, the filters of one convolution
— and the `Part`s of tensors each unit owns. Unit `u` owns the slice `[u·width, (u+1)·width)` of
every part along the part's storage dimension `dim`; parts whose role is "in" are the unit's
*consumers* (the columns of the down/output projection, the next layer's input channels): a unit
whose consumer entries are all zero contributes nothing and can be removed exactly.

The finders: `transformer.py` (transformers blocks), `sequential.py` (plain `nn.Sequential`
stacks) and `find.py` (`find_groups`, which of the two applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.targets import HFConv1D  # type: ignore[attr-defined]

KINDS = ("neuron", "head", "filter")


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


def layer_parts(name: str, module: nn.Module, role: str, width: int = 1) -> list[Part]:
    """The weight (and bias) entries of a Linear/Conv1D/Conv2d layer on the unit's side."""
    if role == "out":
        parts = [Part(name, module, "weight", _output_dim(module), width, role)]
        if getattr(module, "bias", None) is not None:
            parts.append(Part(name, module, "bias", 0, width, role))
        return parts
    return [Part(name, module, "weight", input_dim(module), width, role)]


def out_features(module: nn.Module) -> int:
    """The number of a layer's output features (Conv2d: output channels)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return int(weight.shape[_output_dim(module)])


@torch.no_grad()
def removed_units(group: GroupSet) -> torch.Tensor:
    """Bool (count,): units whose consumer entries are all zero (their removal changes nothing)."""
    alive = torch.zeros(group.count, dtype=torch.bool, device=group.parts[0].tensor.device)
    for part in group.consumers():
        alive |= part.per_unit((part.tensor != 0).float()) > 0
    return ~alive
