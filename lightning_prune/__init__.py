"""lightning_prune: training-time, iterative and one-shot pruning for PyTorch Lightning."""

from lightning_prune.callbacks import GradualPruning, IterativePruning, SparseExport
from lightning_prune.criteria import make_criterion
from lightning_prune.export import load_sparse, load_sparse_state_dict, save_sparse
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
    "SparseExport",
    "SparsityReport",
    "apply_masks_",
    "finalize",
    "find_targets",
    "get_mask",
    "get_masks",
    "keep_masks_applied",
    "load_masks",
    "load_sparse",
    "load_sparse_state_dict",
    "make_criterion",
    "make_schedule",
    "remove_masks",
    "save_sparse",
    "select_masks",
    "set_mask",
    "sparsity_report",
    "update_masks",
]
