"""Compaction with parameters and forward time before and after, timed as interleaved medians.

Timing the model before compaction, then the compacted one, compares two moments of a machine whose
load changes (on a busy CPU that gave "speedup 0.61"). Here both run in alternating order in every
round, the median of each is kept, and nothing is copied whole: a transformers model that `compact`
rebuilds keeps its old object for the rounds, and a plain `nn.Sequential` stack that `compact` slices
in place is copied first; each round installs one set of parts (untimed) and times one forward.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.calibration.calls import to_device
from lightning_prune.calibration.driver import call_model
from lightning_prune.structured.compact import compact, outermost_hf_models

Variant = tuple[Callable[[], object], Callable[[], object]]  # (install it, untimed; the call to time)


def interleaved_seconds(variants: Sequence[Variant], rounds: int = 7) -> list[float]:
    """Median wall time of each variant's call: after one warm-up call each, `rounds` rounds call every
    variant once, in alternating order, so load on the machine and clock changes fall on all of them alike."""
    times: list[list[float]] = [[] for _ in variants]
    for install, call in variants:
        install()
        call()
    for index in range(rounds):
        order = range(len(variants)) if index % 2 == 0 else reversed(range(len(variants)))
        for position in order:
            install, call = variants[position]
            install()
            start = time.perf_counter()
            call()
            times[position].append(time.perf_counter() - start)
    return [statistics.median(values) for values in times]


def _parts_before(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the parts `compact` changes, as they are now: transformers models (by reference:
    `compact` rebuilds them) and the outermost plain `nn.Sequential` stacks (copied: sliced in place)."""
    parts = dict(outermost_hf_models(model))
    stacks = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Sequential and not any(name.startswith(f"{h}.") for h in parts)
    ]
    for name in stacks:
        if not any(name.startswith(f"{other}.") for other in stacks if other != name):
            parts[name] = copy.deepcopy(model.get_submodule(name))
    return parts


def _install(model: nn.Module, parts: Mapping[str, nn.Module]) -> None:
    for name, part in parts.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, part)


def compact_and_measure(
    model: nn.Module, run: Callable[[nn.Module], Any] | None, rounds: int = 7
) -> tuple[nn.Module, dict[str, float]]:
    """`compact(model)` with parameters before and after and, when `run` is given, the forward times of
    `run(model)` before and after compaction: medians of `rounds` interleaved rounds (`interleaved_seconds`),
    in eval mode under `no_grad`. Returns the compacted model and the record."""
    record: dict[str, float] = {"parameters_before": float(sum(p.numel() for p in model.parameters()))}
    root_hf = "" in dict(outermost_hf_models(model))  # `compact` returns a rebuilt model: time the two objects
    whole = run is not None and (root_hf or type(model) is nn.Sequential)
    before = (model if root_hf else copy.deepcopy(model)) if whole else None
    parts = _parts_before(model) if run is not None and not whole else {}
    small = compact(model)
    record["parameters_after"] = float(sum(p.numel() for p in small.parameters()))
    if run is None:
        return small, record
    if before is not None:
        variants: list[Variant] = [(lambda: None, lambda: run(before)), (lambda: None, lambda: run(small))]
        modules = [before, small]
    else:
        after = {name: small.get_submodule(name) for name in parts}
        variants = [
            (lambda: _install(small, parts), lambda: run(small)),
            (lambda: _install(small, after), lambda: run(small)),
        ]
        modules = [small, *parts.values()]
    modes = {module: module.training for root in modules for module in root.modules()}  # e.g. a frozen teacher
    try:
        for module in modules:
            module.eval()
        with torch.no_grad():
            seconds_before, seconds_after = interleaved_seconds(variants, rounds)
    finally:
        if before is None:
            _install(small, after)
        for module, mode in modes.items():
            module.training = mode
    record.update(
        forward_seconds_before=seconds_before,
        forward_seconds_after=seconds_after,
        speedup=seconds_before / seconds_after,
        timing_rounds=float(rounds),
    )
    return small, record


def sample_forward(batch: Any) -> Callable[[nn.Module], Any]:
    """A `run(model)` that forwards one batch the way the calibration driver does (on CUDA, until the
    device has finished it: kernels run asynchronously, so the time would otherwise be the launch time)."""

    def run(model: nn.Module) -> Any:
        device = next(model.parameters()).device
        output = call_model(_forward_owner(model), to_device(batch, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return output

    return run


def _forward_owner(model: nn.Module) -> nn.Module:
    """The module to time: the model itself when it defines `forward`, else the transformers model inside it."""
    if (
        type(model).forward is not nn.Module.forward
        and getattr(type(model).forward, "__qualname__", "").split(".")[0] != "LightningModule"
    ):
        return model
    inner = outermost_hf_models(model)
    if not inner:
        raise ValueError(f"cannot time {type(model).__name__}: it defines no `forward` and holds no transformers model")
    return inner[0][1]
