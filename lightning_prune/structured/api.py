"""`prune_structured`: one-shot removal of MLP neurons, attention heads and whole blocks (as masks).

Lifecycle::

    report = prune_structured(model, batches, mlp_sparsity=0.5, head_sparsity=0.25, drop_layers=2)  # FLAP (batches)
    small = compact(model)                      # physically smaller; save_pretrained loads anywhere
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.blocks import find_block_stack
from lightning_prune.calibration.calls import block_output
from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.driver import Batch, calibrate_sequentially, call_model
from lightning_prune.registry import STRUCTURED_SCORES
from lightning_prune.structured.checks import check_config_accepts_heads, check_droppable
from lightning_prune.structured.default import GIVEN, check_automatic_options, choose_score
from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.report import StructuredReport, added_parameters, only_for_config, structured_report
from lightning_prune.structured.scores import BlockInfluence, StructuredScore
from lightning_prune.structured.select import mask_block, prune_group, units_to_remove
from lightning_prune.structured.transformer import find_block_groups, model_config
from lightning_prune.targets import PruneTarget
from lightning_prune.validation import check_integer, check_materialized, check_sparsity


def resolve_score(
    method: str | StructuredScore, options: Mapping[str, Any] | None = None, unit: str = "group"
) -> StructuredScore:
    """A registered structured score by name with its options, or the given instance."""
    score: StructuredScore = STRUCTURED_SCORES.create(method, **dict(options or {}))
    if not isinstance(score, StructuredScore) or score.unit != unit:
        names = [n for n in STRUCTURED_SCORES if getattr(STRUCTURED_SCORES.get(n), "unit", "group") == unit]
        raise ValueError(f"`method` must be a registered {unit} score {names} or a StructuredScore, got {method!r}")
    return score


def select_groups(groups: list[GroupSet], targets: Any, ignore: Any) -> list[GroupSet]:
    """The groups whose name matches a `targets` regex (all when None) and no `ignore` regex; transformers
    blocks are all or none (a stock config states one width for every layer)."""

    def matches(patterns: Any, name: str) -> bool:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return any(re.search(p, name) for p in patterns)

    chosen = [
        g
        for g in groups
        if (targets is None or matches(targets, g.name)) and (ignore is None or not matches(ignore, g.name))
    ]
    if len(chosen) != len(groups) and getattr(groups[0] if groups else None, "config_key", None):
        left = sorted({g.name for g in groups} - {g.name for g in chosen})
        raise ValueError(
            f"`targets`={targets!r} / `ignore`={ignore!r} leave {left} at full width: "
            "a stock config states one width for every layer, "
            "so structured pruning of transformers blocks covers all of them "
            "(prune fewer with a smaller sparsity instead)"
        )
    return chosen


def _find(
    model: nn.Module, blocks: str | None, mlp_sparsity: float, head_sparsity: float, targets: Any, ignore: Any
) -> list[GroupSet]:
    return [
        *(select_groups(find_block_groups(model, "neuron", blocks), targets, ignore) if mlp_sparsity > 0 else []),
        *(select_groups(find_block_groups(model, "head", blocks), targets, ignore) if head_sparsity > 0 else []),
    ]


def prune_structured(
    model: nn.Module,
    calibration: Iterable[Batch] | None,
    *,
    mlp_sparsity: float = 0.0,
    head_sparsity: float = 0.0,
    drop_layers: int = 0,
    method: str | StructuredScore | None = None,
    method_options: Mapping[str, Any] | None = None,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    blocks: str | None = None,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Batch], Any] = call_model,
    progress: bool = False,
    new_parameters: bool = True,
) -> StructuredReport:
    """Mask the lowest-scored MLP neurons and attention heads of every block, and the least influential blocks.

    Every block keeps the same number of neurons (round((1 − mlp_sparsity)·width)) and key/value
    heads, so the stock config describes the compacted model. Blocks are ranked by ShortGPT's block
    influence on `calibration` and the `drop_layers` lowest are masked whole (`compact` removes
    them). Activation-aware scores ("wanda", "flap") collect their statistics block by block with
    the one-shot driver, on the pruned model's own activations; "taylor" backpropagates the
    calibration batches' loss. `method`=None chooses (structured/default.py): "flap" when
    calibration batches are given and FLAP applies to the groups, else "wanda" (a bias FLAP would
    need cannot be added) or "magnitude" (Conv2d parts), warned and noted; "magnitude" without
    calibration. The report's `method` and `method_choice` say which and why. With
    `new_parameters`=False (inside a fit: the optimizer is built) the automatic choice takes FLAP
    only where it adds no bias. Everything is checked before the first weight changes.

    Returns the report: parameters before and after compaction, kept widths, dropped blocks.
    """
    mlp_sparsity = check_sparsity(mlp_sparsity, "mlp_sparsity")
    head_sparsity = check_sparsity(head_sparsity, "head_sparsity")
    check_integer(drop_layers, "drop_layers", low=0)
    check_materialized(model)
    _, block_list = find_block_stack(model, blocks)
    check_droppable(model, drop_layers, len(block_list))
    check_automatic_options(method, method_options)
    score = resolve_score(method, method_options) if method is not None else None
    groups = _find(model, blocks, mlp_sparsity, head_sparsity, targets, ignore)
    if not groups and not drop_layers:
        raise ValueError("nothing to prune: give `mlp_sparsity` > 0, `head_sparsity` > 0 or `drop_layers` > 0")
    check_config_accepts_heads(model, groups, head_sparsity)
    batches = list(calibration) if calibration is not None else []
    choice, notes = GIVEN, []
    if score is None:
        automatic = choose_score(groups, model_config(model), bool(batches), new_parameters)
        score, choice = automatic.score, automatic.reason
        if automatic.fallback:
            notes.append(automatic.fallback)
            warnings.warn(automatic.fallback, stacklevel=2)
    for group in groups:
        score.check(group)
    score.check_model(groups, model_config(model))
    if (score.statistics or score.needs_gradients or drop_layers) and not batches:
        raise ValueError(
            f"`calibration` has no batches; method {score.name!r}{' and drop_layers' if drop_layers else ''} "
            "need calibration data"
        )
    notes += _rounding_notes(groups, {"neuron": mlp_sparsity, "head": head_sparsity})
    before = structured_report(model, [], [], score.name, [])
    present = {name for name, _ in model.named_parameters()}
    if score.prepare(model, groups):
        groups = _find(model, blocks, mlp_sparsity, head_sparsity, targets, ignore)  # with the new bias parts
    added = added_parameters(model, present)
    if score.needs_gradients:
        _accumulate_gradients(model, batches, groups, score, forward)
    sparsity = {"neuron": mlp_sparsity, "head": head_sparsity}
    per_block: list[list[GroupSet]] = [[g for g in groups if g.block == i] for i in range(len(block_list))]
    influence = torch.zeros(len(block_list), 2)
    if score.statistics or drop_layers:

        def process(index: int, name: str, block: nn.Module, run_block: Callable[[], Any]) -> None:
            stats = _collect(per_block[index], score, block, influence[index] if drop_layers else None, run_block)
            for group in per_block[index]:
                prune_group(group, score, sparsity[group.kind], stats)

        calibrate_sequentially(
            model, batches, process, blocks=block_list, device=device, forward=forward, progress=progress
        )
    else:
        for group in groups:
            prune_group(group, score, sparsity[group.kind])
    block_scores = (influence[:, 0] / influence[:, 1].clamp_min(1)).tolist()
    dropped = (
        sorted(torch.sort(torch.tensor(block_scores), stable=True).indices[:drop_layers].tolist())
        if drop_layers
        else []
    )
    for index in dropped:
        mask_block(block_list[index])
    report = structured_report(
        model,
        groups,
        dropped,
        score.name,
        notes,
        parameters_before=before.parameters_before,
        block_influence=block_scores if drop_layers else [],
        method_choice=choice,
    )
    report.added_parameters, report.added_for_config = added, only_for_config(added, groups)
    return report


def add_structured_parameters(
    model: nn.Module,
    *,
    method: str | StructuredScore | None,
    mlp_sparsity: float = 0.0,
    head_sparsity: float = 0.0,
    method_options: Mapping[str, Any] | None = None,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    blocks: str | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Add now the parameters that `prune_structured` with this `method` would add (FLAP's compensation
    biases and the config flag that states them, `StructuredScore.prepare`), checked as it checks them.

    Call it before an optimizer is built or a checkpoint is loaded (`StructuredPruning.setup`): the new
    parameters then train, and a checkpoint that holds them loads into a freshly built model. The later
    `prune_structured` finds them in place. Returns what was added and which of it only the config needs
    (`StructuredReport.added_parameters`, `added_for_config`). `method`=None: what the automatic choice
    with calibration batches adds (FLAP's biases where FLAP applies; the later automatic choice, whose
    optimizer is built, then finds them and takes FLAP).
    """
    check_automatic_options(method, method_options)
    check_sparsity(mlp_sparsity, "mlp_sparsity")
    check_sparsity(head_sparsity, "head_sparsity")
    groups = _find(model, blocks, mlp_sparsity, head_sparsity, targets, ignore)
    score = (
        choose_score(groups, model_config(model), True).score
        if method is None
        else resolve_score(method, method_options)
    )
    for group in groups:
        score.check(group)
    score.check_model(groups, model_config(model))
    present = {name for name, _ in model.named_parameters()}
    if not score.prepare(model, groups):
        return {}, []
    added = added_parameters(model, present)
    return added, only_for_config(added, _find(model, blocks, mlp_sparsity, head_sparsity, targets, ignore))


def _rounding_notes(groups: Sequence[GroupSet], sparsity: Mapping[str, float]) -> list[str]:
    """Warn (and record) where round(s·count) units differ from the asked fraction by more than one unit's share."""
    notes = []
    for kind in ("neuron", "head"):
        sized = [g for g in groups if g.kind == kind]
        if sized and sparsity[kind] > 0:
            count = sized[0].count
            removed = units_to_remove(count, sparsity[kind])
            if removed == 0 or abs(removed / count - sparsity[kind]) > 1e-9:
                note = (
                    f"{kind}s: asked {sparsity[kind]:.4f} of {count} per layer, "
                    f"removing {removed} ({removed / count:.4f})"
                )
                notes.append(note)
                warnings.warn(note, stacklevel=3)
    return notes


def _collect(
    groups: Sequence[GroupSet],
    score: StructuredScore,
    block: nn.Module,
    influence: torch.Tensor | None,
    run_block: Callable[[], None],
) -> dict[str, Any]:
    """Run the block once: the score's statistics on its groups' layers, and (optionally) its influence."""
    handle = None
    if influence is not None:

        def measure(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            out = block_output(output)
            influence.add_(BlockInfluence.token_influence(hidden, out).cpu())

        handle = block.register_forward_hook(measure, with_kwargs=True)
    layers = {p.module_name: p.module for g in groups for p in g.parts if p.is_weight}
    try:
        if score.statistics and layers:
            targets = [PruneTarget(name, module) for name, module in layers.items()]
            found = collect_statistics(targets, score.statistics, run_block)
            return {t.module_name: found[t.name][score.statistics[0]] for t in targets}
        run_block()
        return {}
    finally:
        if handle is not None:
            handle.remove()


def _accumulate_gradients(
    model: nn.Module,
    batches: Sequence[Batch],
    groups: Sequence[GroupSet],
    score: StructuredScore,
    forward: Callable[[nn.Module, Batch], Any],
) -> None:
    """Backpropagate each calibration batch's loss and feed the gradients to a gradient-based score."""
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            if isinstance(batch, dict) and "input_ids" in batch and "labels" not in batch:
                batch = {**batch, "labels": batch["input_ids"]}  # a causal LM's own next-token loss
            with torch.enable_grad():
                loss = getattr(forward(model, batch), "loss", None)
                if loss is None:
                    raise ValueError(
                        f"`method`={score.name!r} needs a loss from the calibration batches: "
                        "give batches with labels (e.g. input_ids and labels)"
                    )
                loss.backward()
            score.accumulate(groups)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
