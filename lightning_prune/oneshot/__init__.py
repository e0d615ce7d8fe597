"""One-shot pruning on calibration data: sequential driver (or one whole-model pass), registered methods, OWL.

Importing this package registers the built-in methods (one file each): magnitude, wanda, sparsegpt,
ria; and the mask refinement dsnot.
"""

from lightning_prune.calibration.blocks import find_blocks
from lightning_prune.calibration.driver import calibrate_sequentially
from lightning_prune.calibration.stats import FeatureNormStats, HessianStats, TokenStatistic
from lightning_prune.oneshot.api import needs_calibration, prune_oneshot, resolve_method, resolve_refiner
from lightning_prune.oneshot.dsnot import DSnoT, dsnot_refine, expected_error
from lightning_prune.oneshot.magnitude import MagnitudeMethod, magnitude_mask
from lightning_prune.oneshot.method import LayerStats, MaskRefiner, OneShotMethod
from lightning_prune.oneshot.owl import outlier_ratio, owl_sparsities
from lightning_prune.oneshot.plan import OneShotPlan, plan_oneshot
from lightning_prune.oneshot.ria import Ria, ria_mask, ria_scores
from lightning_prune.oneshot.sparsegpt import SparseGPT, inverse_hessian_factor, sparsegpt_prune
from lightning_prune.oneshot.wanda import Wanda, wanda_mask, wanda_scores
from lightning_prune.registry import MASK_REFINERS, ONESHOT_METHODS

METHODS = ONESHOT_METHODS  # the registry of one-shot methods (names: `METHODS.names()`)

__all__ = [
    "MASK_REFINERS",
    "METHODS",
    "ONESHOT_METHODS",
    "DSnoT",
    "FeatureNormStats",
    "HessianStats",
    "LayerStats",
    "MagnitudeMethod",
    "MaskRefiner",
    "OneShotMethod",
    "OneShotPlan",
    "Ria",
    "SparseGPT",
    "TokenStatistic",
    "Wanda",
    "calibrate_sequentially",
    "dsnot_refine",
    "expected_error",
    "find_blocks",
    "inverse_hessian_factor",
    "magnitude_mask",
    "needs_calibration",
    "outlier_ratio",
    "owl_sparsities",
    "plan_oneshot",
    "prune_oneshot",
    "resolve_method",
    "resolve_refiner",
    "ria_mask",
    "ria_scores",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_scores",
]
