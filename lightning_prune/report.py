"""Sparsity statistics: per layer and global, measured from the weights' exact zeros."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_prune.masking import finalized_parameters, masked_parameters
from lightning_prune.parallel.sharded import all_gather_floats, is_sharded, local_tensor, shard_group, sum_over_shards
from lightning_prune.selection import group_counts, parse_pattern
from lightning_prune.targets import PruneTarget, find_targets


def max_nonzeros_per_group(matrix: torch.Tensor, m: int) -> int:
    """Most non-zeros in any group of `m` consecutive inputs of a row: 2 for an exact 2:4 matrix."""
    if matrix.shape[1] % m:
        return m
    return int(group_counts(matrix != 0, m).max())


@dataclass(frozen=True)
class LayerSparsity:
    """One row of the report: a weight's name, shape, size, exact zero count and pattern label.

    `pattern` is "dense" without zeros; else the N:M pattern enforced on the weight ("2:4"), or
    "unstructured (2:4 not held)" when its zeros no longer keep it; "unstructured" for unstructured
    pruning, "unstructured (fits 4:8)" when its zeros happen to fit an N:M pattern; for a weight the
    report was not told about, what its zeros fit ("fits 2:4"), else "unstructured" (`layer_pattern`).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    pattern: str

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros."""
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and global sparsity; prints as a table, exports Markdown and CSV."""

    layers: list[LayerSparsity] = field(default_factory=list)
    notes: tuple[str, ...] = ()  # results that differ from what was asked (e.g. a block left unreconstructed)
    # Weights (or experts) asked for but left as they were, with the reason (e.g. an expert that
    # received too few calibration tokens).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        """Total elements over the reported layers."""
        return sum(layer.numel for layer in self.layers)

    @property
    def global_sparsity(self) -> float:
        """Zeros over all reported layers divided by their total size."""
        return sum(layer.zeros for layer in self.layers) / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, float]:
        """{layer name: sparsity}, plus "global"."""
        return {**{layer.name: layer.sparsity for layer in self.layers}, "global": self.global_sparsity}

    def _rows(self) -> list[list[str]]:
        rows = [
            [
                layer.name,
                "×".join(map(str, layer.shape)),
                str(layer.numel),
                str(layer.zeros),
                f"{layer.sparsity:.4f}",
                layer.pattern,
            ]
            for layer in self.layers
        ]
        rows.append(
            [
                "global",
                "",
                str(self.numel),
                str(sum(layer.zeros for layer in self.layers)),
                f"{self.global_sparsity:.4f}",
                "",
            ]
        )
        return rows

    _HEADER: ClassVar[list[str]] = ["layer", "shape", "params", "zeros", "sparsity", "pattern"]

    def to_markdown(self) -> str:
        """The table in GitHub Markdown."""
        lines = ["| " + " | ".join(self._HEADER) + " |", "|" + "---|" * len(self._HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The table as CSV text."""
        import csv

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self._HEADER)
        writer.writerows(self._rows())
        return buffer.getvalue()

    def __rich__(self) -> object:
        from rich.table import Table

        table = Table(title=f"Sparsity report (global {self.global_sparsity:.2%})")
        for column in self._HEADER:
            table.add_column(column, justify="left" if column in ("layer", "shape", "pattern") else "right")
        for row in self._rows():
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        """The rich table as plain text (box drawing, no colour codes): what `print(report)` shows."""
        from rich.console import Console

        # Wide enough that no layer name is wrapped; the table itself takes only the width it needs.
        console = Console(file=io.StringIO(), width=400, record=True, color_system=None)
        console.print(self)
        return console.export_text(styles=False).rstrip("\n")


def _measure(target: PruneTarget, weight: torch.Tensor) -> list[tuple[int, str]]:
    """(zeros, pattern: the first of 2:4, 4:8 it holds, else unstructured) of each matrix of
    `target` (its `weight`, or a row block of it), all experts at once with one host sync; counts
    per group of 8 are pairs of groups of 4."""
    matrices = target.as_matrix(weight)
    nonzero = (matrices if target.experts else matrices.unsqueeze(0)) != 0
    count, rows, cols = nonzero.shape
    if cols % 4:
        values = nonzero.reshape(count, -1).sum(1, dtype=torch.int64).unsqueeze(1).tolist()
    else:
        fours = group_counts(nonzero.reshape(count * rows, cols), 4).reshape(count, rows, cols // 4)
        measured = [fours.reshape(count, -1).sum(1, dtype=torch.int64), fours.amax((1, 2)).long()]
        if cols % 8 == 0:
            measured.append((fours[..., ::2] + fours[..., 1::2]).amax((1, 2)).long())
        values = torch.stack(measured, 1).tolist()
    out = []
    for nonzeros, *most in values:
        pattern = next((f"{n}:{m}" for (n, m), worst in zip(((2, 4), (4, 8)), most) if worst <= n), "unstructured")
        out.append((rows * cols - nonzeros, pattern))
    return out


_PATTERNS = ("2:4", "4:8", "unstructured")  # `_measure`'s patterns, each implied by the one before


def _holds(target: PruneTarget, weight: torch.Tensor, pattern: str) -> list[bool]:
    """Whether each matrix of `target` (its `weight`, or a row block of it) keeps at most N of every
    M consecutive inputs of a row (False where M does not divide the inputs)."""
    n, m = parse_pattern(pattern)
    matrices = target.as_matrix(weight)
    nonzero = (matrices if target.experts else matrices.unsqueeze(0)) != 0
    count, rows, cols = nonzero.shape
    if cols % m:
        return [False] * count
    if not rows:
        return [True] * count
    most = group_counts(nonzero.reshape(count * rows, cols), m).reshape(count, -1).amax(1)
    return (most <= n).tolist()


def layer_pattern(zeros: int, fits: str, enforced: str | None, said: bool, held: bool) -> str:
    """A row's pattern label from its `zeros`, the first N:M its zeros `fits` ("unstructured" if
    none), whether the caller `said` what was `enforced` (an N:M pattern, or None for unstructured
    pruning) and whether the zeros `held` it."""
    if zeros == 0:
        return "dense"
    if said and enforced is not None:
        return enforced if held else f"unstructured ({enforced} not held)"
    if fits == "unstructured":
        return fits
    return f"unstructured (fits {fits})" if said else f"fits {fits}"


def check_patterns(patterns: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """`patterns` as a dict, each value an N:M pattern or None (a ValueError naming the weight otherwise)."""
    checked = dict(patterns or {})
    for name, pattern in checked.items():
        if pattern is None:
            continue
        try:
            parse_pattern(pattern)
        except ValueError as error:
            raise ValueError(
                f"`patterns`[{name!r}] must be an N:M pattern such as '2:4' or None (unstructured), got {pattern!r}"
            ) from error
    return checked


def _sharded_layer(target: PruneTarget, patterns: dict[str, str | None]) -> LayerSparsity:
    """The row of an FSDP2 row-sharded (out, in) weight: each rank counts its block's zeros (summed
    over the shard group) and its pattern (rows stay whole, so N:M holds when it holds on every
    block). Every rank of the group must call it, in the same order."""
    block = local_tensor(target.weight.detach())
    group = shard_group(target.weight, target.name)  # type: ignore[arg-type]  # a DTensor (is_sharded)
    local_zeros, local_pattern = _measure(target, block)[0] if block.shape[0] else (0, _PATTERNS[0])
    enforced = patterns.get(target.name)
    local_broken = float(enforced is not None and not _holds(target, block, enforced)[0])
    zeros = sum_over_shards([local_zeros], group)[0]
    gathered = all_gather_floats([_PATTERNS.index(local_pattern), local_broken], group)
    fits = _PATTERNS[int(max(values[0] for values in gathered))]
    held = not any(values[1] for values in gathered)
    pattern = layer_pattern(zeros, fits, enforced, target.name in patterns, held)
    return LayerSparsity(target.name, tuple(target.weight.shape), target.weight.numel(), zeros, pattern)


def pruned_targets(model: nn.Module) -> list[PruneTarget]:
    """The layers a report counts: the pruned ones, by one rule whether masks are attached or not.

    The masked weights and those `finalize` baked in; for a model without either (e.g. loaded from
    a checkpoint into a fresh instance) the prunable layers holding exact zeros, which a trained
    dense layer does not; for a model without zeros, every prunable layer.
    """
    every = find_targets(model, ignore_output_head=False)
    pruned = {name for name, _, _ in masked_parameters(model)} | set(finalized_parameters(model))
    chosen = [t for t in every if t.name in pruned]
    if not chosen:
        chosen = [t for t in every if bool((t.weight == 0).any())]
    return chosen or every


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    targets: Sequence[PruneTarget] | None = None,
    skipped: Mapping[str, str] | None = None,
    patterns: Mapping[str, str | None] | None = None,
) -> SparsityReport:
    """Measure exact zeros of `targets`, by default of the pruned layers (see `pruned_targets`);
    one row per matrix (per expert for fused experts weights). `skipped` is recorded as given.

    `patterns` says what pruning enforced on each weight (by weight name, e.g. "0.weight"): an N:M
    pattern such as "2:4" (the row says "2:4" while the zeros keep it), or None for unstructured
    pruning (the row says "unstructured", or "unstructured (fits 4:8)" when its zeros happen to fit
    one). A weight it does not name is labelled by what its zeros fit ("fits 2:4"); a weight without
    zeros is "dense". Names of weights not reported are ignored.
    """
    checked = check_patterns(patterns)
    if targets is None:
        targets = pruned_targets(model)
    layers = []
    for target in targets:
        if is_sharded(target.weight) and not (target.experts or target.transposed):
            layers.append(_sharded_layer(target, checked))
            continue
        weight = target.weight.detach()
        weight = (
            weight.full_tensor() if isinstance(weight, DTensor) else weight
        )  # a fused or transposed weight: gathered, one at a time
        shape = tuple(weight.shape)
        enforced = checked.get(target.name)
        measured = _measure(target, weight)
        held = _holds(target, weight, enforced) if enforced is not None else [True] * len(measured)
        for name, (zeros, fits), holds in zip(target.matrix_names(), measured, held):
            matrix_shape = tuple(target.as_matrix(weight).shape[1:]) if target.experts else shape
            pattern = layer_pattern(zeros, fits, enforced, target.name in checked, holds)
            layers.append(LayerSparsity(name, matrix_shape, math.prod(matrix_shape), zeros, pattern))
    return SparsityReport(layers, skipped=dict(skipped or {}))
