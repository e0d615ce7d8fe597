"""One-shot pruning of a model without a chained block list: one whole-model calibration pass.

Every target's statistics come from the *dense* model's forward over the calibration batches
(`calibration.whole`), then every target is pruned. For SparseGPT this is the paper's
non-sequential variant: each layer's weight update uses the inputs the unpruned model gives it,
not its pruned predecessors' outputs. Block-level features (OWL's per-block sparsities, block
reconstruction, offloading one block at a time) need a block list and are refused here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.collect import too_few_tokens
from lightning_prune.calibration.stats import TokenStatistic
from lightning_prune.calibration.whole import calibrate_whole_model
from lightning_prune.oneshot.method import MaskRefiner, OneShotMethod
from lightning_prune.oneshot.plan import OneShotPlan
from lightning_prune.oneshot.prune import prune_targets
from lightning_prune.targets import PruneTarget


def check_whole_model_arguments(plan: OneShotPlan, sparsity_profile: str, reconstruct: bool, offload: bool) -> None:
    """Refuse the options that need a block list, naming why the model has none usable."""
    refused = {
        "sparsity_profile": (sparsity_profile, sparsity_profile == "owl"),
        "reconstruct": (reconstruct, reconstruct),
        "offload": (offload, offload),
    }
    for argument, (value, bad) in refused.items():
        if bad:
            raise ValueError(
                f"`{argument}`={value!r} works block by block, but this model is calibrated in one whole-model "
                f"pass ({plan.reason}); name its list of blocks with `blocks=`, or leave `{argument}` at its default"
            )


def whole_model_note(plan: OneShotPlan, updates_weights: bool) -> str:
    """What the report says about a whole-model calibration."""
    note = (
        f"calibrated in one whole-model pass ({plan.reason}): every layer's statistics come from the dense "
        "model's inputs, not block by block"
    )
    return note + ("; weight updates use the dense inputs (non-sequential)" if updates_weights else "")


def prune_whole_model(
    model: nn.Module,
    batches: Sequence[Any],
    targets: Sequence[PruneTarget],
    method: OneShotMethod,
    refiner: MaskRefiner | None,
    kinds: Sequence[type[TokenStatistic]],
    sparsity: float,
    pattern: str | None,
    reduce_stats: Callable[[list[TokenStatistic]], None],
    min_expert_tokens: int,
    forward: Callable[[nn.Module, Any], Any],
    device: torch.device | str | None,
) -> dict[str, int]:
    """Collect every target's statistics in one pass of the dense model, then prune them all in place;
    returns {expert matrix: tokens} of the experts left dense for lack of calibration tokens."""
    stats = calibrate_whole_model(model, batches, targets, kinds, forward, device) if kinds else {}
    reduce_stats([stat for per_kind in stats.values() for stat in per_kind.values()])
    few = too_few_tokens(stats, targets, min_expert_tokens)
    prune_targets(targets, method, refiner, stats, sparsity, pattern, dense=few)
    return few
