"""lightning_prune: training-time, iterative and one-shot pruning for PyTorch Lightning."""

from lightning_prune.callbacks import GradualPruning, IterativePruning
from lightning_prune.criteria import make_criterion
from lightning_prune.masking import (
    apply_masks_,
    finalize,
    get_mask,
    get_masks,
    keep_masks_applied,
    load_masks,
    remove_masks,
    set_mask,
    update_masks,
)
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.schedules import make_schedule
from lightning_prune.selection import select_masks
from lightning_prune.targets import PruneTarget, find_targets

__version__ = "0.1.0"

__all__ = [
    "GradualPruning",
    "IterativePruning",
    "PruneTarget",
    "SparsityReport",
    "apply_masks_",
    "finalize",
    "find_targets",
    "get_mask",
    "get_masks",
    "keep_masks_applied",
    "load_masks",
    "make_criterion",
    "make_schedule",
    "remove_masks",
    "select_masks",
    "set_mask",
    "sparsity_report",
    "update_masks",
]
