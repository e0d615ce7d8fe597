"""One block's calibration statistics, per weight and per expert.

Statistics are keyed by matrix name (`PruneTarget.matrix_names`): a Linear's or convolution's own
name (a convolution's statistics are those of its unfolded inputs, `unfold.py`), or `<parameter>[e]`
for expert e of a fused experts weight, whose statistics come from the tokens routed to that expert
(`experts.routed_tokens`; the second layer's from its inputs in the model's own forward where
`gated.capture_for` knows their rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.experts import expert_inputs, routed_tokens, routing
from lightning_prune.calibration.gated import BmmCapture, GateCapture, capture_for
from lightning_prune.calibration.unfold import layer_inputs
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
            self.inputs, self.version, self.increments = (
                (inputs if tracked else None),
                (inputs._version if tracked else -1),
                {},
            )
        for kind, stat in per_kind.items():
            if not kind.shareable:
                stat.add(inputs)
                continue
            if kind not in self.increments:
                self.increments[kind] = stat.increments(inputs)
            stat.accumulate(self.increments[kind])


def _add_linear(per_kind: dict[type[Statistic], Statistic], shared: _SharedInputs) -> Callable[..., None]:
    def add(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        shared.add(per_kind, layer_inputs(module, args[0]))  # a convolution's unfolded inputs (`unfold.py`)

    return add


Capture = GateCapture | BmmCapture
ExpertPairs = list[tuple[PruneTarget, list[dict[type[Statistic], Statistic]]]]


def _add_expert_call(
    pairs: ExpertPairs, capture: Capture | None, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
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


def collect_statistics(
    targets: Sequence[PruneTarget], kinds: Sequence[type[Statistic]], run_block: Callable[[], object]
) -> BlockStats:
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
