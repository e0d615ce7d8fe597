"""lightning_prune: training-time, iterative and one-shot pruning for PyTorch Lightning."""

from lightning_prune.callbacks import GradualPruning, IterativePruning, LoRARecovery, OneShotPruning, SparseExport
from lightning_prune.criteria import make_criterion
from lightning_prune.export import load_sparse, load_sparse_state_dict, save_sparse
from lightning_prune.lora import attach_lora, load_lora, merge_lora
from lightning_prune.masking import (
    apply_masks_,
    finalize,
    get_mask,
    get_masks,
    keep_masks_applied,
    load_masks,
    pruned_parameters,
    remove_masks,
    set_mask,
    update_masks,
)
from lightning_prune.oneshot import (
    FeatureNormStats,
    HessianStats,
    MaskRefiner,
    OneShotMethod,
    calibrate_sequentially,
    find_blocks,
    magnitude_mask,
    prune_oneshot,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_prune.registry import (
    CRITERIA,
    MASK_REFINERS,
    ONESHOT_METHODS,
    STRUCTURED_SCORES,
    Registry,
    register_criterion,
    register_method,
    register_refiner,
    register_structured_score,
)
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.schedules import make_schedule
from lightning_prune.selection import select_masks
from lightning_prune.targets import PruneTarget, find_targets

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "MASK_REFINERS",
    "ONESHOT_METHODS",
    "STRUCTURED_SCORES",
    "FeatureNormStats",
    "HessianStats",
    "MaskRefiner",
    "OneShotMethod",
    "Registry",
    "register_criterion",
    "register_method",
    "register_refiner",
    "register_structured_score",
    "GradualPruning",
    "IterativePruning",
    "LoRARecovery",
    "OneShotPruning",
    "PruneTarget",
    "SparseExport",
    "SparsityReport",
    "apply_masks_",
    "attach_lora",
    "calibrate_sequentially",
    "finalize",
    "find_blocks",
    "find_targets",
    "get_mask",
    "get_masks",
    "keep_masks_applied",
    "load_lora",
    "load_masks",
    "load_sparse",
    "load_sparse_state_dict",
    "magnitude_mask",
    "make_criterion",
    "make_schedule",
    "merge_lora",
    "prune_oneshot",
    "pruned_parameters",
    "remove_masks",
    "save_sparse",
    "select_masks",
    "set_mask",
    "sparsegpt_prune",
    "sparsity_report",
    "update_masks",
    "wanda_mask",
]
