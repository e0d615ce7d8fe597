"""One block's statistics (per weight, per expert), one weight's pruning, and the all-or-nothing undo.

Statistics are keyed by matrix name (`PruneTarget.matrix_names`): a Linear's own name, or
`<parameter>[e]` for expert e of a fused experts weight, whose statistics come from the tokens
routed to that expert (`experts.routed_tokens`; the second layer's from its inputs in the model's
own forward where `gated.capture_for` knows their rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.masking import get_mask, remove_mask, set_mask
from lightning_prune.oneshot.experts import expert_inputs, routed_tokens, routing
from lightning_prune.oneshot.gated import BmmCapture, GateCapture, capture_for
from lightning_prune.oneshot.method import LayerStats, MaskRefiner, OneShotMethod
from lightning_prune.targets import PruneTarget

Statistic = Any  # a TokenStatistic subclass with `add(inputs)`
BlockStats = dict[str, dict[type[Statistic], Statistic]]


def _new_stats(target: PruneTarget, kinds: Sequence[type[Statistic]]) -> list[dict[type[Statistic], Statistic]]:
    columns = target.as_matrix(target.weight).shape[-1]
    return [{kind: kind(name, columns, target.weight.device) for kind in kinds} for name in target.matrix_names()]


class _SharedInputs:
    """The increments of the last input tensor seen, per shareable statistic kind: layers called
    one after the other on the same, unmodified tensor (q/k/v, gate/up) compute them once."""

    def __init__(self) -> None:
        self.inputs: torch.Tensor | None = None
        self.version = -1
        self.increments: dict[type[Statistic], Any] = {}

    def add(self, per_kind: dict[type[Statistic], Statistic], inputs: torch.Tensor) -> None:
        """Add `inputs` to every statistic in `per_kind`, reusing the increments of the same tensor."""
        tracked = not inputs.is_inference()  # an inference tensor has no version counter to show in-place changes
        if not tracked or inputs is not self.inputs or inputs._version != self.version:
            self.inputs, self.version, self.increments = (inputs if tracked else None), (inputs._version if tracked else -1), {}
        for kind, stat in per_kind.items():
            if not kind.shareable:
                stat.add(inputs)
                continue
            if kind not in self.increments:
                self.increments[kind] = stat.increments(inputs)
            stat.accumulate(self.increments[kind])


def _add_linear(per_kind: dict[type[Statistic], Statistic], shared: _SharedInputs) -> Callable[..., None]:
    def add(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        shared.add(per_kind, args[0])

    return add


Capture = GateCapture | BmmCapture
ExpertPairs = list[tuple[PruneTarget, list[dict[type[Statistic], Statistic]]]]


def _add_expert_call(pairs: ExpertPairs, capture: Capture | None, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Add one experts call's routed rows to each expert's statistics (`down_proj`: the call's own
    inputs when `capture` vouches for their rows, else recomputed)."""
    hidden, masks = routing(module, args, kwargs)
    tokens = routed_tokens(hidden, masks)
    gated = capture.take(args, kwargs, masks) if capture is not None else None
    for target, per_expert in pairs:
        for rows, per_kind in zip(expert_inputs(target, tokens, gated), per_expert):
            if rows.shape[0]:
                for stat in per_kind.values():
                    stat.add(rows)


def _add_experts(pairs: ExpertPairs, capture: Capture | None) -> Callable[..., None]:
    def add(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        _add_expert_call(pairs, capture, module, args, kwargs)

    return add


def collect_statistics(targets: Sequence[PruneTarget], kinds: Sequence[type[Statistic]], run_block: Callable[[], object]) -> BlockStats:
    """Run the block once with forward hooks that add each weight's (each expert's) fp32 input statistics."""
    stats: BlockStats = {}
    handles = []
    by_experts: dict[int, tuple[nn.Module, ExpertPairs]] = {}
    shared = _SharedInputs()
    for target in targets:
        per_matrix = _new_stats(target, kinds)
        stats.update(zip(target.matrix_names(), per_matrix))
        if target.experts:
            by_experts.setdefault(id(target.module), (target.module, []))[1].append((target, per_matrix))
        else:
            handles.append(target.module.register_forward_hook(_add_linear(per_matrix[0], shared)))
    captures: list[Capture] = []
    try:
        for module, pairs in by_experts.values():
            capture = capture_for(module) if any("down" in target.param_name for target, _ in pairs) else None
            captures += [capture] if capture is not None else []
            handles.append(module.register_forward_hook(_add_experts(pairs, capture), with_kwargs=True))
        run_block()
    finally:
        for handle in handles:
            handle.remove()
        for capture in captures:
            capture.remove()
    return stats


def too_few_tokens(stats: BlockStats, targets: Sequence[PruneTarget], min_tokens: int) -> dict[str, int]:
    """{expert matrix name: tokens} of the experts that saw fewer than `min_tokens` calibration tokens."""
    few = {}
    for target in targets:
        for name in target.matrix_names() if target.experts else []:
            counts = [int(stat.count) for stat in stats.get(name, {}).values()]
            if counts and counts[0] < min_tokens:
                few[name] = counts[0]
    return few


STACKED_ELEMENTS = 2**24  # matrices pruned together hold at most this many weights (64 MiB of fp32 scores)
Entry = tuple[int, int, str, torch.Tensor]  # (target, matrix within it, matrix name, the (out, in) view)


def _groups(entries: list[Entry], together: bool) -> list[list[Entry]]:
    """`entries` one by one, or (`together`) grouped by input width, dtype and device, in order,
    each group of at most STACKED_ELEMENTS weights (at least one matrix)."""
    if not together:
        return [[entry] for entry in entries]
    by_kind: dict[tuple[int, torch.dtype, torch.device], list[list[Entry]]] = {}
    for entry in entries:
        matrix = entry[3]
        groups = by_kind.setdefault((matrix.shape[-1], matrix.dtype, matrix.device), [[]])
        if groups[-1] and sum(e[3].numel() for e in groups[-1]) + matrix.numel() > STACKED_ELEMENTS:
            groups.append([])
        groups[-1].append(entry)
    return [group for groups in by_kind.values() for group in groups]


@torch.no_grad()
def prune_targets(
    targets: Sequence[PruneTarget], method: OneShotMethod, refiner: MaskRefiner | None, stats: Mapping[str, LayerStats], sparsity: float, pattern: str | None, dense: Collection[str] = ()
) -> None:
    """Prune the weights of one block (each expert of a fused weight) in place with `method` (then
    `refiner`) and attach their keep-masks; the matrices named in `dense` keep every weight.

    For a method that only selects, without a refiner, the matrices of one input width go to
    `method.prune_many` together (Wanda selects over their stacked rows at once); otherwise one by one.
    """
    keeps: list[list[torch.Tensor | None]] = []
    entries: list[Entry] = []
    for t, target in enumerate(targets):
        names, matrices = target.matrix_names(), target.matrices(target.weight.data)
        keeps.append([torch.ones_like(matrix, dtype=torch.bool) if name in dense else None for name, matrix in zip(names, matrices)])
        entries += [(t, i, name, matrix) for i, (name, matrix) in enumerate(zip(names, matrices)) if name not in dense]
    for group in _groups(entries, refiner is None and not method.updates_weights):
        label = ", ".join(repr(name) for _, _, name, _ in group)
        originals = [matrix.clone() if refiner is not None else matrix for _, _, _, matrix in group]
        try:
            results = method.prune_many([matrix for *_, matrix in group], [stats.get(name, {}) for _, _, name, _ in group], sparsity, pattern)
            if refiner is not None:
                results = [refiner.refine(original, new_weight, keep, stats.get(entry[2], {}), pattern) for entry, original, (new_weight, keep) in zip(group, originals, results, strict=True)]
        except ValueError as error:
            raise ValueError(f"one-shot pruning of {label} failed: {error}. Nothing was changed; leave it dense with `ignore=`") from error
        for (t, i, _, matrix), (new_weight, keep) in zip(group, results, strict=True):
            if new_weight is not matrix:
                matrix.copy_(new_weight.to(matrix.dtype))
            keeps[t][i] = keep
    for target, target_keeps in zip(targets, keeps, strict=True):
        set_mask(target.module, target.from_matrices([keep for keep in target_keeps if keep is not None]), target.param_name)


def prune_target(target: PruneTarget, method: OneShotMethod, refiner: MaskRefiner | None, stats: Mapping[str, LayerStats], sparsity: float, pattern: str | None, dense: Collection[str] = ()) -> None:
    """`prune_targets` of one weight."""
    prune_targets([target], method, refiner, stats, sparsity, pattern, dense)


def warn_dense_experts(few: dict[str, int], min_tokens: int) -> None:
    """Say which experts stay dense for lack of calibration tokens."""
    if few:
        listed = ", ".join(f"{name} ({count} tokens)" for name, count in few.items())
        warnings.warn(f"left dense: experts that received fewer than `min_expert_tokens`={min_tokens} calibration tokens: {listed}", stacklevel=3)


class Snapshot:
    """The targets' weights and masks before a one-shot call, to put back if the call fails.

    Only the targets are copied (to CPU), so the cost is one copy of the pruned weights.
    """

    def __init__(self, targets: Sequence[PruneTarget]) -> None:
        self.saved = []
        for target in targets:
            mask = get_mask(target.module, target.param_name)
            self.saved.append((target, target.weight.detach().to("cpu", copy=True), None if mask is None else mask.to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every saved weight and mask back, bit for bit; remove masks that did not exist."""
        for target, weight, mask in self.saved:
            if mask is None:
                if get_mask(target.module, target.param_name) is not None:
                    remove_mask(target.module, target.param_name)
            else:
                set_mask(target.module, mask, target.param_name)
            target.weight.data.copy_(weight)
