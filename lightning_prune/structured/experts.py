"""`prune_experts`: one-shot removal of whole routed experts from mixture-of-experts models (as masks).

Lifecycle::

    report = prune_experts(model, batches, expert_sparsity=0.5, method="reap")  # masks + routing
    small = compact(model)   # experts, router rows and the config's expert count sliced; stock-loadable
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.driver import Batch, calibrate_sequentially, call_model
from lightning_prune.masking import get_mask
from lightning_prune.structured.api import resolve_score, select_groups
from lightning_prune.structured.expert_scores import ExpertScore, RoutingStats, observe_routing
from lightning_prune.structured.groups import GroupSet
from lightning_prune.structured.moe import ExpertLayer, expert_count_keys, find_expert_layers, shared_expert_names
from lightning_prune.structured.report import StructuredReport, structured_report
from lightning_prune.structured.routing import routing_keep, set_routing
from lightning_prune.structured.select import choose_removed
from lightning_prune.structured.transformer import model_config
from lightning_prune.structured.undo import MaskUndo
from lightning_prune.validation import check_integer, check_sparsity


def _patterns(value: str | Sequence[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _check_targets(model: nn.Module, layers: list[ExpertLayer], targets: Any) -> None:
    """Refuse `targets` that name shared experts: they are not routed and are never removed."""
    shared = shared_expert_names(model)
    for pattern in _patterns(targets):
        hits = [name for name in shared if re.search(pattern, name)]
        if hits and not any(re.search(pattern, layer.experts_name) for layer in layers):
            raise ValueError(
                f"`targets`={pattern!r} names shared experts {hits[:3]}: shared experts are not routed and are "
                f"never removed; target the routed experts (e.g. {layers[0].experts_name!r}) or leave `targets`=None"
            )


def _kept_count(count: int, expert_sparsity: float | None, experts_per_layer: int | None) -> tuple[int, list[str]]:
    if (expert_sparsity is None) == (experts_per_layer is None):
        raise ValueError(
            f"give exactly one of `expert_sparsity` (a fraction removed) and `experts_per_layer` (experts kept), "
            f"got expert_sparsity={expert_sparsity!r}, experts_per_layer={experts_per_layer!r}"
        )
    if experts_per_layer is not None:
        kept = check_integer(experts_per_layer, "experts_per_layer", low=1)
        if kept > count:
            raise ValueError(f"`experts_per_layer` must be in [1, {count}] (the model's experts), got {kept}")
        return kept, []
    sparsity = check_sparsity(expert_sparsity, "expert_sparsity")
    removed = round(sparsity * count)
    notes = []
    if removed == 0 or abs(removed / count - sparsity) > 1e-9:
        notes.append(f"experts: asked {sparsity:.4f} of {count} per layer, removing {removed} ({removed / count:.4f})")
        warnings.warn(notes[-1], stacklevel=3)
    return count - removed, notes


def _check_model(model: nn.Module, layers: list[ExpertLayer], kept: int) -> None:
    counts = {layer.count for layer in layers}
    if len(counts) > 1:
        raise ValueError(f"the MoE layers hold different expert counts {sorted(counts)}; a stock config states one")
    for layer in layers:
        if layer.top_k > kept:
            raise ValueError(
                f"{layer.name} routes every token to top_k={layer.top_k} experts, more than the {kept} kept: "
                f"keep at least {layer.top_k} experts per layer"
            )
        if layer.block is None:
            raise ValueError(f"{layer.name} is not inside the model's block stack; experts are pruned block by block")
    config = model_config(model)
    n_group = getattr(config, "n_group", None) or 1
    if n_group > 1:
        raise ValueError(
            f"group-limited routing (n_group={n_group}) keeps experts in equal groups; "
            "removing experts would leave unequal groups: set n_group=1 or leave this model's experts"
        )
    if config is not None and not expert_count_keys(config, layers[0].count):
        raise ValueError(f"no config entry of {type(config).__name__} states the {layers[0].count} experts")


def prune_experts(
    model: nn.Module,
    calibration: Iterable[Batch] | None,
    *,
    expert_sparsity: float | None = None,
    experts_per_layer: int | None = None,
    method: str | Any = "reap",
    method_options: Mapping[str, Any] | None = None,
    renormalize: bool = True,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Batch], Any] = call_model,
    progress: bool = False,
) -> StructuredReport:
    """Mask the lowest-scored routed experts of every MoE layer and route tokens around them.

    Every layer keeps the same number of experts (`experts_per_layer`, or round((1 − expert_sparsity)·E)),
    so the stock config describes the compacted model. Scores ("reap", "frequency", "routing_weight",
    "random", or a registered `ExpertScore`) come from the routing statistics of `calibration`,
    collected block by block with the calibration driver on the pruned model's own activations. A
    removed expert is never routed to: its router logit is -inf before the router's top-k, so tokens
    go to the next-best surviving expert (`structured/routing.py`, also for `renormalize`); its
    expert weights (and, with `renormalize`=True, its router row) are masked. Shared experts are never
    removed. Refused before anything changes: top_k above the kept count, shared experts as targets,
    group-limited routing; a failure midway restores the model. Returns the report (parameters after
    `compact`, experts kept per layer).
    """
    if not isinstance(renormalize, bool):
        raise ValueError(f"`renormalize` must be True or False, got {renormalize!r}")
    layers = find_expert_layers(model)
    if not layers:
        raise ValueError("the model has no mixture-of-experts layers (a fused `experts` module beside a router)")
    _check_targets(model, layers, targets)
    config = model_config(model)
    key = expert_count_keys(config, layers[0].count)[0] if config is not None else "experts"
    groups = select_groups([layer.group(key) for layer in layers], targets, ignore)
    chosen = [layer for layer in layers if layer.experts_name in {g.name for g in groups}]
    if not chosen:
        raise ValueError(f"`targets`={targets!r} / `ignore`={ignore!r} leave no MoE layer to prune")
    kept, notes = _kept_count(layers[0].count, expert_sparsity, experts_per_layer)
    _check_model(model, chosen, kept)
    score: ExpertScore = resolve_score(method, method_options, unit="expert")  # type: ignore[assignment]
    batches = list(calibration) if calibration is not None else []
    if not batches and score.needs_calibration:
        raise ValueError(f"`calibration` has no batches; method {score.name!r} needs calibration data")
    before = structured_report(model, [], [], score.name, []).parameters_before
    pairs = [(layer, next(g for g in groups if g.name == layer.experts_name)) for layer in chosen]
    undo = MaskUndo()
    try:
        if batches:
            _prune_by_blocks(model, batches, pairs, score, kept, renormalize, undo, device, forward, progress)
        else:  # a score without statistics
            for layer, group in pairs:
                empty: dict[str, Any] = {group.name: RoutingStats(layer.count)}
                _remove_experts(layer, group, score.score(group, empty), kept, renormalize, undo)
    except BaseException:
        undo.restore()
        raise
    return structured_report(model, groups, [], score.name, notes, parameters_before=before)


def _prune_by_blocks(
    model: nn.Module,
    batches: list[Batch],
    pairs: list[tuple[ExpertLayer, GroupSet]],
    score: ExpertScore,
    kept: int,
    renormalize: bool,
    undo: MaskUndo,
    device: torch.device | str | None,
    forward: Callable[[nn.Module, Batch], Any],
    progress: bool,
) -> None:
    """Block by block (the calibration driver): observe the routing of the block's MoE layers on the
    already pruned model's activations, then remove their experts before the next block runs."""

    def process(index: int, name: str, block: nn.Module, run_block: Callable[[], Any]) -> None:
        here = [(layer, group) for layer, group in pairs if layer.block == index]
        if not here:
            return
        stats: dict[str, Any] = {group.name: RoutingStats(layer.count) for layer, group in here}
        removers = [observe_routing(layer, stats[group.name]) for layer, group in here]
        try:
            run_block()
        finally:
            for remove in removers:
                remove()
        for layer, group in here:
            _remove_experts(layer, group, score.score(group, stats), kept, renormalize, undo)

    calibrate_sequentially(model, batches, process, device=device, forward=forward, progress=progress)


def _remove_experts(
    layer: ExpertLayer, group: GroupSet, scores: torch.Tensor, kept: int, renormalize: bool, undo: MaskUndo
) -> torch.Tensor:
    """Choose the lowest-scored experts (earlier removals stay removed), mask them, route around them."""
    earlier = routing_keep(layer.router)
    already = ~earlier.cpu() if earlier is not None else None
    if already is not None and int(already.sum()) > layer.count - kept:
        raise ValueError(
            f"{layer.name} has {layer.count - int(already.sum())} experts left, fewer than the {kept} asked to keep"
        )
    removed = choose_removed(scores.cpu(), layer.count - kept, already)
    parts = [p for p in group.parts if renormalize or p.module is not layer.router]
    undo.mask(parts, removed)
    undo.route(layer.router)
    set_routing(layer.router, ~removed, renormalize)
    return removed


def restore_routing(model: nn.Module, renormalize: bool = True) -> list[str]:
    """Route around the experts whose masks remove them whole (masks restored from a checkpoint);
    returns the MoE layers whose routing was restored."""
    restored = []
    for layer in find_expert_layers(model):
        mask = get_mask(layer.experts, "down_proj")
        if mask is None or routing_keep(layer.router) is not None:
            continue
        keep = mask.reshape(layer.count, -1).any(1)
        if not bool(keep.all()):
            set_routing(layer.router, keep, renormalize)
            restored.append(layer.name)
    return restored
