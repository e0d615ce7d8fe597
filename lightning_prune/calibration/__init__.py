"""Calibration: run a model's block stacks one block at a time on calibration batches.

The driver (`calibrate_sequentially`) gives every block the exact arguments the model's own forward
gives it (`capture`, `recorder`, `calls`, `replay`), `collect` gathers per-weight and per-expert input
statistics (`stats`, `experts`, `gated`; a convolution's from its unfolded inputs, `unfold`),
`whole` collects them in one whole-model pass for models without a chained block list, and
`samples` takes the calibration sequences. One-shot,
structured pruning and block reconstruction build on it; it imports none of them.
"""

from lightning_prune.calibration.blocks import find_block_lists, find_block_stack, find_blocks
from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.driver import BlockRunner, calibrate_sequentially, call_model
from lightning_prune.calibration.samples import check_num_samples, take_samples
from lightning_prune.calibration.stats import FeatureNormStats, HessianStats, TokenStatistic
from lightning_prune.calibration.unfold import unfold_inputs
from lightning_prune.calibration.whole import calibrate_whole_model

__all__ = [
    "BlockRunner",
    "FeatureNormStats",
    "HessianStats",
    "TokenStatistic",
    "calibrate_sequentially",
    "calibrate_whole_model",
    "call_model",
    "check_num_samples",
    "collect_statistics",
    "find_block_lists",
    "find_block_stack",
    "find_blocks",
    "take_samples",
    "unfold_inputs",
]
