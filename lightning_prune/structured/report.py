"""What a structured pruning did: parameters before/after compaction, kept widths, dropped blocks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.structured.groups import GroupSet, removed_units


@dataclass
class StructuredReport:
    """Parameters before and after `compact`, kept units per group set, dropped blocks, notes.

    `notes` lists every difference from what was asked (e.g. a head count that rounding left
    unchanged, or the automatic score falling back from FLAP); each was also warned about.
    `method_choice` is "given" for an explicit `method`, else why the automatic choice took `method`.
    """

    method: str
    parameters_before: int
    parameters_after: int
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)  # group set → (kept, total)
    dropped_blocks: list[int] = field(default_factory=list)
    block_influence: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    method_choice: str = "given"

    @property
    def parameter_ratio(self) -> float:
        """Parameters after compaction over parameters before."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def as_dict(self) -> dict[str, object]:
        """Plain values for results files."""
        return {
            "method": self.method,
            "method_choice": self.method_choice,
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "parameter_ratio": self.parameter_ratio,
            "kept": {name: list(value) for name, value in self.kept.items()},
            "dropped_blocks": list(self.dropped_blocks),
            "block_influence": list(self.block_influence),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        chosen = "" if self.method_choice == "given" else f"; {self.method_choice}"
        lines = [
            f"structured pruning ({self.method}{chosen}): "
            f"{self.parameters_before:,} → {self.parameters_after:,} parameters ({self.parameter_ratio:.3f})"
        ]
        lines += [f"  {name}: {kept}/{total}" for name, (kept, total) in self.kept.items()]
        if self.dropped_blocks:
            lines.append(f"  dropped blocks: {self.dropped_blocks}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@torch.no_grad()
def parameters_after_compaction(model: nn.Module, groups: Sequence[GroupSet], dropped: Sequence[int]) -> int:
    """Exact parameter count `compact` will leave: removed units sliced off, dropped blocks gone."""
    kept_along: dict[str, dict[int, int]] = {}
    for group in groups:
        keep = ~removed_units(group)
        for part in group.parts:
            kept_along.setdefault(part.qualified_name, {})[part.dim] = int(keep.sum()) * part.width
    dropped_prefixes: tuple[str, ...] = ()
    if dropped:
        blocks_name, _ = find_block_stack(model)
        dropped_prefixes = tuple(f"{blocks_name}.{i}." for i in dropped)
    total = 0
    for name, parameter in model.named_parameters():
        if name.startswith(dropped_prefixes):
            continue
        shape = list(parameter.shape)
        for dim, size in kept_along.get(name, {}).items():
            shape[dim] = size
        total += math.prod(shape)
    return total


def structured_report(
    model: nn.Module,
    groups: Sequence[GroupSet],
    dropped: Sequence[int],
    method: str,
    notes: Sequence[str],
    parameters_before: int | None = None,
    block_influence: Sequence[float] = (),
    method_choice: str = "given",
) -> StructuredReport:
    """Build the report of a structured pruning from the model's current masks."""
    before = parameters_before if parameters_before is not None else sum(p.numel() for p in model.parameters())
    kept = {g.name: (int((~removed_units(g)).sum()), g.count) for g in groups if g.block not in dropped}
    return StructuredReport(
        method=method,
        parameters_before=before,
        parameters_after=parameters_after_compaction(model, [g for g in groups if g.block not in dropped], dropped),
        kept=kept,
        dropped_blocks=list(dropped),
        block_influence=list(block_influence),
        notes=list(notes),
        method_choice=method_choice,
    )
