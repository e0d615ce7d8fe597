"""What a structured pruning did: parameters before/after compaction (per layer too), units kept and removed
per group set and per kind (filters, neurons, heads, layers), dropped blocks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.structured.groups import GroupSet, removed_units


@dataclass
class StructuredReport:
    """Parameters before and after `compact` (in all and per layer), kept units per group set, dropped blocks,
    notes.

    `kinds` gives each group set's unit kind ("filter", "neuron", "head"); `layer_parameters` the parameters
    of every layer (module) that compaction changes, (before, after); `blocks` the model's block count (0
    where it has no block list); `added_parameters` what the method added (FLAP's compensation biases) and
    `added_for_config` those of them only the config flag stating the bias needs (`only_for_config`).
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
    kinds: dict[str, str] = field(default_factory=dict)  # group set → unit kind
    layer_parameters: dict[str, tuple[int, int]] = field(default_factory=dict)  # module → (before, after)
    blocks: int = 0
    added_parameters: dict[str, int] = field(default_factory=dict)  # name → elements the method added
    added_for_config: list[str] = field(default_factory=list)  # of those, the ones only the config flag needs

    @property
    def parameter_ratio(self) -> float:
        """Parameters after compaction over parameters before."""
        return self.parameters_after / self.parameters_before if self.parameters_before else 1.0

    def removed(self) -> dict[str, int]:
        """Units removed per group set."""
        return {name: total - kept for name, (kept, total) in self.kept.items()}

    def added_line(self) -> str:
        """What the method added, in words (empty when nothing)."""
        if not self.added_parameters:
            return ""
        added, extra = self.added_parameters, self.added_for_config
        line = f"{self.method} added {len(added)} bias parameters ({sum(added.values()):,} elements)"
        if extra:
            line += (
                f"; {len(extra)} of them ({sum(added[n] for n in extra):,} elements, e.g. {extra[0]}) only because "
                "the config flag that states a bias covers every projection of the block (they start at zero)"
            )
        return line

    def units(self) -> dict[str, dict[str, int]]:
        """Units removed and in all, per kind ("filters", "neurons", "heads", and "layers" for dropped blocks)."""
        totals: dict[str, dict[str, int]] = {}
        for name, (kept, total) in self.kept.items():
            entry = totals.setdefault(f"{self.kinds.get(name, 'unit')}s", {"removed": 0, "total": 0})
            entry["removed"] += total - kept
            entry["total"] += total
        if self.dropped_blocks:
            totals["layers"] = {"removed": len(self.dropped_blocks), "total": self.blocks}
        return totals

    def as_dict(self) -> dict[str, object]:
        """Plain values for results files."""
        return {
            "units": self.units(),
            "removed": self.removed(),
            "kinds": dict(self.kinds),
            "layer_parameters": {name: list(value) for name, value in self.layer_parameters.items()},
            "added_parameters": dict(self.added_parameters),
            "added_for_config": list(self.added_for_config),
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
        lines += [f"  {kind} removed: {n['removed']}/{n['total']}" for kind, n in self.units().items()]
        lines += [
            f"  {name}: {total - kept} of {total} {self.kinds.get(name, 'unit')}s removed, {kept} kept"
            for name, (kept, total) in self.kept.items()
        ]
        if self.dropped_blocks:
            lines.append(f"  dropped blocks: {self.dropped_blocks} of {self.blocks}")
        if self.added_parameters:
            lines.append(f"  {self.added_line()}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@torch.no_grad()
def parameter_counts(
    model: nn.Module, groups: Sequence[GroupSet], dropped: Sequence[int]
) -> dict[str, tuple[int, int]]:
    """{parameter name: (elements now, elements `compact` will leave)}: removed units sliced off, dropped
    blocks gone."""
    kept_along: dict[str, dict[int, int]] = {}
    for group in groups:
        keep = ~removed_units(group)
        for part in group.parts:
            kept_along.setdefault(part.qualified_name, {})[part.dim] = int(keep.sum()) * part.width
    dropped_prefixes: tuple[str, ...] = ()
    if dropped:
        blocks_name, _ = find_block_stack(model)
        dropped_prefixes = tuple(f"{blocks_name}.{i}." for i in dropped)
    counts = {}
    for name, parameter in model.named_parameters():
        shape = list(parameter.shape)
        for dim, size in kept_along.get(name, {}).items():
            shape[dim] = size
        counts[name] = (parameter.numel(), 0 if name.startswith(dropped_prefixes) else math.prod(shape))
    return counts


def parameters_after_compaction(model: nn.Module, groups: Sequence[GroupSet], dropped: Sequence[int]) -> int:
    """Exact parameter count `compact` will leave: removed units sliced off, dropped blocks gone."""
    return sum(after for _, after in parameter_counts(model, groups, dropped).values())


def changed_layers(counts: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """{module name: (parameters before, after)} of the modules whose parameter count changes, in model order."""
    layers: dict[str, list[int]] = {}
    for name, (before, after) in counts.items():
        entry = layers.setdefault(name.rpartition(".")[0], [0, 0])
        entry[0] += before
        entry[1] += after
    return {name: (before, after) for name, (before, after) in layers.items() if before != after}


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
    alive = [g for g in groups if g.block not in dropped]
    counts = parameter_counts(model, alive, dropped)
    return StructuredReport(
        method=method,
        parameters_before=before,
        parameters_after=sum(after for _, after in counts.values()),
        kept={g.name: (int((~removed_units(g)).sum()), g.count) for g in alive},
        kinds={g.name: g.kind for g in alive},
        layer_parameters=changed_layers(counts),
        blocks=_block_count(model) if dropped else 0,
        dropped_blocks=list(dropped),
        block_influence=list(block_influence),
        notes=list(notes),
        method_choice=method_choice,
    )


def added_parameters(model: nn.Module, present: set[str]) -> dict[str, int]:
    """{name: elements} of the parameters of `model` not in `present` (what a score's `prepare` added)."""
    return {name: p.numel() for name, p in model.named_parameters() if name not in present}


def only_for_config(added: Mapping[str, int], groups: Sequence[GroupSet]) -> list[str]:
    """The `added` biases that no group's consumer needs: the config flag that states a bias covers every
    projection of the block (Llama's one `mlp_bias` gives gate_proj, up_proj and down_proj a bias,
    `attention_bias` q, k, v and o), so they are added too, at zero."""
    needed = {f"{part.module_name}.bias" for group in groups for part in group.consumers()}
    return [name for name in added if name not in needed]


def _block_count(model: nn.Module) -> int:
    return len(find_block_stack(model)[1])
