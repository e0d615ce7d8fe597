"""One-shot pruning on calibration data: sequential driver, Wanda, SparseGPT, magnitude, OWL."""

from lightning_prune.oneshot.api import METHODS, prune_oneshot
from lightning_prune.oneshot.driver import calibrate_sequentially, find_blocks
from lightning_prune.oneshot.magnitude import magnitude_mask
from lightning_prune.oneshot.owl import outlier_ratio, owl_sparsities
from lightning_prune.oneshot.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from lightning_prune.oneshot.stats import FeatureNormStats, HessianStats
from lightning_prune.oneshot.wanda import wanda_mask, wanda_scores

__all__ = [
    "METHODS",
    "FeatureNormStats",
    "HessianStats",
    "calibrate_sequentially",
    "find_blocks",
    "inverse_hessian_factor",
    "magnitude_mask",
    "outlier_ratio",
    "owl_sparsities",
    "prune_oneshot",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_scores",
]
