"""`prune_oneshot`: Wanda, SparseGPT or magnitude on calibration batches, block by block (or in one
whole-model pass for a model without a chained block list, `plan.py`), in place."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.blocks import BlocksArgument, block_name
from lightning_prune.calibration.calls import hidden_of, with_hidden
from lightning_prune.calibration.collect import collect_statistics, too_few_tokens
from lightning_prune.calibration.driver import Batch, BlockRunner, calibrate_sequentially, call_model
from lightning_prune.calibration.recorder import NotChained
from lightning_prune.calibration.samples import check_num_samples, take_samples
from lightning_prune.calibration.stats import TokenStatistic
from lightning_prune.oneshot.method import MaskRefiner, OneShotMethod
from lightning_prune.oneshot.owl import owl_block_sparsities
from lightning_prune.oneshot.plan import ONESHOT_TYPES as ONESHOT_TYPES  # re-exported: tests and callers import it here
from lightning_prune.oneshot.plan import block_targets as block_targets
from lightning_prune.oneshot.plan import plan_oneshot
from lightning_prune.oneshot.prune import Snapshot, prune_targets, warn_dense_experts
from lightning_prune.oneshot.whole import check_whole_model_arguments, prune_whole_model, whole_model_note
from lightning_prune.recovery.reconstruct import check_reconstruct_arguments, reconstruct_block
from lightning_prune.registry import MASK_REFINERS, ONESHOT_METHODS
from lightning_prune.report import SparsityReport, sparsity_report
from lightning_prune.selection import check_pattern_fits, check_pattern_sparsity
from lightning_prune.validation import (
    check_bool,
    check_choice,
    check_integer,
    check_materialized,
    check_number,
    check_sparsity,
)

PROFILES = ("uniform", "owl")
RECONSTRUCT_TARGETS = ("block", "model")
Statistic = TokenStatistic


def resolve_method(method: str | OneShotMethod, options: Mapping[str, Any] | None = None) -> OneShotMethod:
    """A registered one-shot method by name with its `options`, or the given instance."""
    resolved: OneShotMethod = ONESHOT_METHODS.create(method, **dict(options or {}))
    if not isinstance(resolved, OneShotMethod):
        raise ValueError(f"`method` must be a registered name {ONESHOT_METHODS} or a OneShotMethod, got {method!r}")
    return resolved


def resolve_refiner(refine: str | MaskRefiner | None, options: Mapping[str, Any] | None = None) -> MaskRefiner | None:
    """A registered mask refinement by name with its `options`, the given instance, or None."""
    if refine is None:
        if options:
            raise ValueError(f"`refine_options`={dict(options)!r} given without `refine`")
        return None
    resolved: MaskRefiner = MASK_REFINERS.create(refine, **dict(options or {}))
    if not isinstance(resolved, MaskRefiner):
        raise ValueError(f"`refine` must be None, a registered name {MASK_REFINERS} or a MaskRefiner, got {refine!r}")
    return resolved


def needs_calibration(method: OneShotMethod, refiner: MaskRefiner | None, sparsity_profile: str) -> bool:
    """Whether the call needs calibration batches (statistics to collect, or OWL's dense pass)."""
    return bool(method.statistics) or bool(refiner and refiner.statistics) or sparsity_profile == "owl"


def check_oneshot_arguments(
    sparsity: float,
    pattern: str | None,
    sparsity_profile: str,
    reconstruct: bool = False,
    reconstruct_steps: int = 100,
    reconstruct_lr: float = 1e-4,
    reconstruct_target: str = "block",
) -> float:
    """Validate the arguments shared by `prune_oneshot` and `OneShotPruning`; returns the sparsity.

    The reconstruction's steps and learning rate are checked only with `reconstruct`.
    """
    sparsity = check_sparsity(sparsity)
    check_pattern_sparsity(sparsity, pattern)
    check_choice(sparsity_profile, "sparsity_profile", PROFILES)
    if sparsity_profile == "owl" and pattern is not None:
        raise ValueError(
            f"`sparsity_profile`='owl' sets per-layer sparsities, which an N:M `pattern` fixes; got pattern={pattern!r}"
        )
    if check_bool(reconstruct, "reconstruct"):
        check_reconstruct_arguments(reconstruct_steps, reconstruct_lr)
    check_choice(reconstruct_target, "reconstruct_target", RECONSTRUCT_TARGETS)
    return sparsity


def _identity(stats: list[Statistic]) -> None:
    """Default `reduce_stats`: one process, nothing to combine."""


def prune_oneshot(
    model: nn.Module,
    calibration: Iterable[Batch] | None,
    method: str | OneShotMethod = "wanda",
    sparsity: float = 0.5,
    pattern: str | None = None,
    *,
    method_options: Mapping[str, Any] | None = None,
    refine: str | MaskRefiner | None = None,
    refine_options: Mapping[str, Any] | None = None,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    offload: bool = False,
    device: torch.device | str | None = None,
    blocks: BlocksArgument = None,
    num_samples: int | None = None,
    min_expert_tokens: int = 8,
    sparsity_profile: str = "uniform",
    owl_threshold: float = 5.0,
    owl_lambda: float = 0.08,
    reduce_stats: Callable[[list[Statistic]], None] | None = None,
    forward: Callable[[nn.Module, Batch], Any] = call_model,
    progress: bool = True,
    reconstruct: bool = False,
    reconstruct_steps: int = 100,
    reconstruct_lr: float = 1e-4,
    reconstruct_target: str = "block",
) -> SparsityReport:
    """Prune the Linear/Conv layers of `model` one-shot, in place; masks attached.

    Args:
        model: any model. With block lists (nn.ModuleLists of blocks, or, without those,
            nn.Sequentials of blocks holding every target; `blocks` names them) the layers inside
            the blocks are pruned block by block, every stack the forward runs (an encoder, then its
            decoder) in execution order. A model without (a ResNet whose stem sits outside its
            stages, a plain MLP) is calibrated in one whole-model pass: every layer's statistics
            from the dense model's forward, SparseGPT's updates from the dense inputs (the paper's
            non-sequential variant); said in a warning and in the report's `notes`. Convolutions
            (groups=1) get their statistics from their unfolded (im2col) inputs.
        calibration: batches (dicts of tensors, tensors, or (inputs, targets) tuples) that
            `forward(model, batch)` runs; magnitude needs none unless `sparsity_profile="owl"`.
        method: a registered method name (`ONESHOT_METHODS`: "wanda" (Sun et al., 2023),
            "sparsegpt" (Frantar & Alistarh, 2023), "ria", "magnitude", or your own) or an instance.
        sparsity / pattern: fraction of zeros per layer, or N:M such as "2:4" (sparsity (M−N)/M).
        method_options: the method's own options, e.g. {"blocksize": 128, "percdamp": 0.01} for SparseGPT.
        refine / refine_options: a registered mask refinement run after the method (e.g. "dsnot").
        targets / ignore: regexes of module names (see `find_targets`); the output head, routers and
            patch embeddings / stems stay dense unless named; grouped convolutions are not targets.
        offload: keep the blocks where they are and bring one at a time to `device`.
        num_samples: use only the first `num_samples` sequences of `calibration`.
        min_expert_tokens: an expert of a fused experts weight that received fewer calibration
            tokens is left dense, named in a warning and in the report's `skipped`.
        sparsity_profile: "uniform", or "owl" (Yin et al., 2023) per-block sparsities with mean `sparsity`.
        reduce_stats: called with each block's statistics (`.sum`, `.count`, `.tensors()`) before
            pruning, e.g. to all-reduce them across ranks; default: nothing.
        reconstruct: after pruning each block, tune its surviving weights (masks fixed) with
            `reconstruct_steps` Adam steps at `reconstruct_lr` so that it reproduces the dense
            block's outputs on the calibration inputs (`recovery.reconstruct_block`); the
            reconstructed block's outputs feed the next block. Needs calibration batches. Under
            DDP each rank tunes on its own batches: reconstruct on one process.
        reconstruct_target: what the pruned block learns to reproduce: "block", the dense block's
            outputs on the inputs the pruned model gives it (Wanda++); or "model", the unpruned
            model's own hidden states after that block (from a dense pass run alongside), so that
            each block also corrects the error its pruned predecessors left.
    Returns:
        the per-layer (per-expert) sparsity report of the pruned layers; `notes` lists blocks whose
        reconstruction did not lower the output error (their pruned weights were kept), and says
        when the model was calibrated in one whole-model pass.
    Raises:
        ValueError: on bad arguments, or when pruning cannot finish (statistics that never arrive,
            a failed factorisation, NaN activations); the error names the layer, and the model's
            weights and masks are then exactly as before the call.
    """
    reconstruction = (reconstruct, reconstruct_steps, reconstruct_lr, reconstruct_target)
    sparsity = check_oneshot_arguments(sparsity, pattern, sparsity_profile, *reconstruction)
    check_num_samples(num_samples)
    check_integer(min_expert_tokens, "min_expert_tokens", low=1)
    check_number(owl_threshold, "owl_threshold", low=0.0, low_open=True)
    check_number(owl_lambda, "owl_lambda", low=0.0)
    check_materialized(model)
    solver = resolve_method(method, method_options)
    refiner = resolve_refiner(refine, refine_options)
    plan = plan_oneshot(model, blocks, targets, ignore)
    stacks, per_block, every = plan.stacks, plan.per_block, plan.targets
    check_pattern_fits(every, pattern)
    if plan.whole_model:
        check_whole_model_arguments(plan, sparsity_profile, reconstruct, offload)
    reduce_stats = reduce_stats or _identity
    driver: dict[str, Any] = dict(
        blocks=[b for _, b in stacks], device=device, offload=offload, forward=forward, progress=progress
    )
    needs_data = needs_calibration(solver, refiner, sparsity_profile) or reconstruct
    batches = take_samples(calibration, num_samples) if calibration is not None else []
    if needs_data and not batches:
        raise ValueError(f"`calibration` has no batches; method {solver.name!r} needs calibration data")
    kinds = tuple(dict.fromkeys(solver.statistics + (refiner.statistics if refiner else ())))
    few_tokens: dict[str, int] = {}
    first_blocks = {block_name(n, 0) for n, _ in stacks}
    dense_stream = DenseStream() if reconstruct and reconstruct_target == "model" else None
    snapshot = Snapshot(every)
    notes: list[str] = []
    try:

        def prune_block(index: int, name: str, block: nn.Module, run_block: BlockRunner) -> None:
            dense_outputs: list[torch.Tensor] = []

            def run_dense() -> None:  # the statistics pass also keeps the dense block's outputs when reconstructing
                dense_outputs.extend(run_block(keep_outputs=reconstruct))

            stats = collect_statistics(per_block[name], kinds, run_dense) if kinds and per_block[name] else {}
            if reconstruct and per_block[name] and not dense_outputs:
                run_dense()
            if dense_stream is not None:  # before pruning: the block is still dense here
                model_outputs = dense_stream.advance(run_block, restart=name in first_blocks)
                dense_outputs[:] = model_outputs if per_block[name] else []
            reduce_stats([stat for per_kind in stats.values() for stat in per_kind.values()])
            few = too_few_tokens(stats, per_block[name], min_expert_tokens)
            few_tokens.update(few)
            prune_targets(per_block[name], solver, refiner, stats, block_sparsity[name], pattern, dense=few)
            if dense_outputs:
                notes.extend(_reconstruct(name, block, run_block, dense_outputs, reconstruct_steps, reconstruct_lr))

        block_sparsity = dict.fromkeys(per_block, sparsity)
        try:
            if sparsity_profile == "owl" and not plan.whole_model:
                block_sparsity = owl_block_sparsities(
                    model, batches, per_block, sparsity, reduce_stats, owl_threshold, owl_lambda, **driver
                )
            if needs_data and not plan.whole_model:
                calibrate_sequentially(model, batches, prune_block, **driver)
            elif not plan.whole_model:
                for index, (name, block) in enumerate(
                    (block_name(n, i), b) for n, blocks_ in stacks for i, b in enumerate(blocks_)
                ):
                    prune_block(index, name, block, BlockRunner(block, [], name))
        except NotChained as error:
            if not plan.fallback:
                raise
            snapshot.restore()  # found Sequentials whose blocks the forward does not chain: prune the whole model
            why = str(error).split(";")[0]  # the chain error without its advice to name other blocks
            plan = plan.as_whole_model(f"the blocks of {[n for n, _ in stacks]} are not chained: {why}")
            check_whole_model_arguments(plan, sparsity_profile, reconstruct, offload)
            few_tokens.clear()
            notes.clear()
        if plan.whole_model:
            whole = (solver, refiner, kinds, sparsity, pattern, reduce_stats, min_expert_tokens, forward, device)
            few_tokens = prune_whole_model(model, batches, plan.targets, *whole)
            notes += [whole_model_note(plan, solver.updates_weights)] if kinds else []
    except BaseException:
        snapshot.restore()
        raise
    warn_dense_experts(few_tokens, min_expert_tokens)
    if plan.whole_model and notes:  # how it was calibrated: recorded in the run's results with the warnings
        warnings.warn(notes[0], stacklevel=2)
    skipped = {
        n: f"left dense: {count} calibration tokens < min_expert_tokens={min_expert_tokens}"
        for n, count in few_tokens.items()
    }
    report = sparsity_report(model, every, skipped=skipped, patterns={t.name: pattern for t in every})
    return dataclasses.replace(report, notes=tuple(notes)) if notes else report


class DenseStream:
    """The unpruned model's hidden states between blocks, carried alongside the pruned ones
    (`reconstruct_target="model"`). A stack's first block starts it from its own inputs."""

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []

    def advance(self, run_block: BlockRunner, restart: bool) -> list[torch.Tensor]:
        """Run the (still dense) block on the dense hidden states; its outputs are the next inputs."""
        if restart or not self.hidden:
            self.hidden = [hidden_of(args, kwargs) for args, kwargs in run_block.inputs]
        calls = [with_hidden(args, kwargs, h) for (args, kwargs), h in zip(run_block.inputs, self.hidden)]
        self.hidden = BlockRunner(run_block.block, calls, run_block.name)(keep_outputs=True)
        return self.hidden


def _reconstruct(
    name: str, block: nn.Module, run_block: BlockRunner, dense_outputs: list[torch.Tensor], steps: int, lr: float
) -> list[str]:
    """Reconstruct one pruned block; a note (and a warning) when tuning did not lower its error."""
    result = reconstruct_block(block, run_block.inputs, dense_outputs, steps, lr)
    if result.kept:
        return []
    note = (
        f"reconstruction of block {name} did not lower its output error ({result.error_before:.3g}) "
        f"with reconstruct_lr={lr}; its pruned weights were kept"
    )
    warnings.warn(note, stacklevel=3)
    return [note]
