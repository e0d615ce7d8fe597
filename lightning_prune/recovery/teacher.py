"""The teacher side of distillation in plain PyTorch: a frozen copy, and hooks that capture a
module's inputs, outputs and named layers' outputs so that the teacher can be run on the same inputs."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.calibration.calls import block_output, to_device
from lightning_prune.masking import remove_masks


def freeze(module: nn.Module) -> nn.Module:
    """`module` in eval mode with every parameter's `requires_grad` off (returned for chaining)."""
    module.requires_grad_(False)
    return module.eval()


def frozen_copy(module: nn.Module, share: Iterable[object] = ()) -> nn.Module:
    """A frozen deep copy of `module` without masks; objects in `share` (e.g. a Trainer) are not
    copied but set to None."""
    teacher = copy.deepcopy(module, {id(obj): None for obj in share})
    remove_masks(teacher)  # a deep copy has its own hooks: the student keeps its masks
    return freeze(teacher)


TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_teacher_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """`teacher_dtype` as a torch dtype: None, a name from Hydra ("bfloat16") or the dtype itself."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in TEACHER_DTYPES.values():
        return value
    if isinstance(value, str) and value in TEACHER_DTYPES:
        return TEACHER_DTYPES[value]
    raise ValueError(f"`teacher_dtype` must be None, one of {list(TEACHER_DTYPES)} or that torch dtype, got {value!r}")


def resolve_teacher_device(value: str | torch.device | None) -> torch.device | None:
    """`teacher_device` as a torch device (None: the student's device, known at train start)."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"`teacher_device` must be None or a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        ) from error


def place_teacher(teacher: nn.Module, device: torch.device | None, dtype: torch.dtype | None) -> nn.Module:
    """`teacher` cast to `dtype` and moved to `device` (each when given); a device that cannot be used is a
    ValueError naming `teacher_device`."""
    if dtype is not None:
        teacher.to(dtype)
    if device is not None:
        try:
            teacher.to(device)
        except (RuntimeError, AssertionError) as error:  # torch raises AssertionError for CUDA in a CPU-only build
            raise ValueError(f"`teacher_device`={str(device)!r} cannot hold the teacher: {error}") from error
    return teacher


def main_output(output: Any, prefer: Sequence[str]) -> torch.Tensor:
    """The first of the attributes `prefer` (e.g. "logits") that `output` has, else its first tensor."""
    for name in prefer:
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return block_output(output)


@dataclass
class Call:
    """One captured forward call: inputs, output, and the named layers' outputs."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None
    layers: dict[str, torch.Tensor] = field(default_factory=dict)


class OutputCapture:
    """Hooks on `module` (and its submodules `layer_names`) that record each outermost call while `active`."""

    def __init__(self, module: nn.Module, layer_names: Sequence[str]) -> None:
        self.module = module
        self.layer_names = list(layer_names)
        self.calls: list[Call] = []
        self.active = False
        self._depth = 0
        self._handles: list[RemovableHandle] = []

    def attach(self) -> OutputCapture:
        """Register the hooks (returns self)."""
        self._handles.append(self.module.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(self._leave))
        for name in self.layer_names:
            self._handles.append(self.module.get_submodule(name).register_forward_hook(self._layer_hook(name)))
        return self

    def remove(self) -> None:
        """Remove every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def start(self) -> None:
        """Forget earlier calls and record from now on."""
        self.calls, self.active, self._depth = [], True, 0

    def stop(self) -> list[Call]:
        """Stop recording; returns the calls recorded since `start`."""
        self.active = False
        return self.calls

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.active:
            if self._depth == 0:
                self.calls.append(Call(tuple(args), dict(kwargs)))
            self._depth += 1

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.active and self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                self.calls[-1].output = output

    def _layer_hook(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self.active and self._depth > 0:
                self.calls[-1].layers[name] = block_output(output)

        return record


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


@torch.no_grad()
def run_teacher(
    teacher: nn.Module, call: Call, layer_names: Sequence[str], device: torch.device, dtype: torch.dtype | None = None
) -> Call:
    """Run `teacher` on the inputs of a captured student call, moved to `device` with float inputs cast to
    `dtype` (default: the teacher's parameter dtype, so a bf16 teacher takes an fp32 student's inputs)."""
    args, kwargs = to_device((call.args, call.kwargs), device)
    dtype = dtype or next((p.dtype for p in teacher.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        args, kwargs = _cast_floats((args, kwargs), dtype)
    capture = OutputCapture(teacher, layer_names).attach()
    capture.start()
    try:
        teacher(*args, **kwargs)
    finally:
        capture.remove()
    return capture.stop()[0]
