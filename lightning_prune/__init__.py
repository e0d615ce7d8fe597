"""lightning_prune: training-time, iterative and one-shot pruning for PyTorch Lightning."""

from lightning_prune.calibration import calibrate_whole_model, unfold_inputs
from lightning_prune.callbacks import (
    GradualPruning,
    IterativePruning,
    KeepMasks,
    KnowledgeDistillation,
    LearnedSparsity,
    LoRARecovery,
    OneShotPruning,
    SparseExport,
)
from lightning_prune.callbacks.experts import ExpertPruning
from lightning_prune.callbacks.structured import StructuredPruning
from lightning_prune.criteria import make_criterion
from lightning_prune.evaluate import PerplexityResult, evaluate_lm_harness, evaluate_perplexity
from lightning_prune.export import load_sparse, load_sparse_state_dict, save_sparse
from lightning_prune.learned import LearnedMasks
from lightning_prune.lora import attach_lora, load_lora, merge_lora
from lightning_prune.lora.sharded import merge_lora_sharded
from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import (
    apply_masks_,
    ensure_gradient_masking,
    finalize,
    finalized_parameters,
    get_mask,
    get_masks,
    keep_masks_applied,
    load_masks,
    mask_sharded_gradients_,
    remove_masks,
    set_mask,
)
from lightning_prune.oneshot import (
    DSnoT,
    FeatureNormStats,
    HessianStats,
    MaskRefiner,
    OneShotMethod,
    Ria,
    calibrate_sequentially,
    find_blocks,
    magnitude_mask,
    prune_oneshot,
    sparsegpt_prune,
    wanda_mask,
)
from lightning_prune.parallel.sharded import select_masks_sharded, sharded_lowest_k
from lightning_prune.recovery import distill_loss, reconstruct_block
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
from lightning_prune.structured import (
    ExpertScore,
    StructuredReport,
    StructuredScore,
    compact,
    prune_experts,
    prune_structured,
)
from lightning_prune.targets import PruneTarget, find_targets

__version__ = "0.1.0"

__all__ = [
    "CRITERIA",
    "MASK_REFINERS",
    "ONESHOT_METHODS",
    "STRUCTURED_SCORES",
    "DSnoT",
    "ExpertPruning",
    "ExpertScore",
    "FeatureNormStats",
    "GradualPruning",
    "HessianStats",
    "IterativePruning",
    "KeepMasks",
    "KnowledgeDistillation",
    "LearnedMasks",
    "LearnedSparsity",
    "LoRARecovery",
    "MaskRefiner",
    "OneShotMethod",
    "OneShotPruning",
    "PerplexityResult",
    "PruneTarget",
    "Registry",
    "Ria",
    "SparseExport",
    "SparsityReport",
    "StructuredPruning",
    "StructuredReport",
    "StructuredScore",
    "apply_masks_",
    "attach_lora",
    "calibrate_sequentially",
    "calibrate_whole_model",
    "compact",
    "distill_loss",
    "ensure_gradient_masking",
    "evaluate_lm_harness",
    "evaluate_perplexity",
    "finalize",
    "finalized_parameters",
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
    "mask_sharded_gradients_",
    "merge_lora",
    "merge_lora_sharded",
    "prune_experts",
    "prune_oneshot",
    "prune_structured",
    "reconstruct_block",
    "register_criterion",
    "register_method",
    "register_refiner",
    "register_structured_score",
    "remove_masks",
    "save_sparse",
    "select_masks",
    "select_masks_sharded",
    "set_mask",
    "sharded_lowest_k",
    "sparsegpt_prune",
    "sparsity_report",
    "unfold_inputs",
    "update_masks",
    "wanda_mask",
]
