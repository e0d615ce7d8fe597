"""Whole-model calibration: every target's statistics from one forward of the whole model per batch.

For models without a chained block list (a ResNet whose stem sits outside its stages, a plain
MLP): the statistics of every target are collected at once from the *dense* model's forward on
the calibration batches (`collect.collect_statistics`), in eval mode (BatchNorm's running
statistics and dropout are left alone), with no key/value caches. Every target sees the inputs the
unpruned model gives it, unlike the sequential driver, where each block sees its pruned
predecessors' outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.calls import caches_off, describe_batch, to_device
from lightning_prune.calibration.collect import BlockStats, Statistic, collect_statistics
from lightning_prune.targets import PruneTarget

Forward = Callable[[nn.Module, Any], Any]


@torch.no_grad()
def calibrate_whole_model(
    model: nn.Module,
    batches: Sequence[Any],
    targets: Sequence[PruneTarget],
    kinds: Sequence[type[Statistic]],
    forward: Forward,
    device: torch.device | str | None = None,
) -> BlockStats:
    """The statistics of `kinds` for every target, from `forward(model, batch)` over all `batches`.

    The model computes on `device` (default: where its first parameter is) and is left there, as the
    sequential driver leaves it; each module's own train/eval mode is given back afterwards. A batch
    the model cannot run is named in the error.
    """
    if not batches:
        raise ValueError("`calibration` yielded no batches; give at least one calibration batch")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    model.to(device)

    def run() -> None:
        for index, batch in enumerate(batches):
            try:
                forward(model, to_device(batch, device))
            except (RuntimeError, TypeError) as error:
                raise ValueError(
                    f"calibration batch {index} ({describe_batch(batch)}) failed in the model's forward: {error}"
                ) from error

    try:
        with caches_off(model):
            return collect_statistics(targets, kinds, run)
    finally:
        for module, training in modes:
            module.train(training)
