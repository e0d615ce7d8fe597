"""Sparsity statistics: per layer and global, measured from the weights' exact zeros."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_prune.masking import masked_parameters
from lightning_prune.targets import PruneTarget, find_targets


def max_nonzeros_per_group(matrix: torch.Tensor, m: int) -> int:
    """Most non-zeros in any group of `m` consecutive inputs of a row: 2 for an exact 2:4 matrix."""
    rows, cols = matrix.shape
    if cols % m:
        return m
    return int((matrix != 0).reshape(rows, cols // m, m).sum(-1).max())


@dataclass(frozen=True)
class LayerSparsity:
    """One row of the report: a weight's name, shape, size and exact zero count."""

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
        rows = [[l.name, "×".join(map(str, l.shape)), str(l.numel), str(l.zeros), f"{l.sparsity:.4f}", l.pattern] for l in self.layers]
        rows.append(["global", "", str(self.numel), str(sum(l.zeros for l in self.layers)), f"{self.global_sparsity:.4f}", ""])
        return rows

    _HEADER = ["layer", "shape", "params", "zeros", "sparsity", "pattern"]

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
        rows = [self._HEADER, *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self._HEADER))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _pattern_of(matrix: torch.Tensor) -> str:
    for n, m in ((2, 4), (4, 8)):
        if matrix.shape[1] % m == 0 and max_nonzeros_per_group(matrix, m) <= n:
            return f"{n}:{m}"
    return "unstructured"


@torch.no_grad()
def sparsity_report(model: nn.Module, targets: Sequence[PruneTarget] | None = None, skipped: Mapping[str, str] | None = None) -> SparsityReport:
    """Measure exact zeros of the masked weights (or of `targets`, or of every prunable layer);
    one row per matrix (per expert for fused experts weights). `skipped` is recorded as given."""
    if targets is None:
        masked = {name for name, _, _ in masked_parameters(model)}
        every = find_targets(model, ignore_output_head=False)
        targets = [t for t in every if t.name in masked] or every
    layers = []
    for target in targets:
        for name, matrix in zip(target.matrix_names(), target.matrices(target.weight.detach())):
            shape = tuple(matrix.shape) if target.experts else tuple(target.weight.shape)
            zeros = int((matrix == 0).sum())
            layers.append(LayerSparsity(name, shape, matrix.numel(), zeros, _pattern_of(matrix)))
    return SparsityReport(layers, dict(skipped or {}))
