"""A distillation teacher sharded by FSDP2 like its student: each rank holds 1/world of its parameters.

FSDP2 (`fully_shard`) refuses `copy.deepcopy`, and a copy taken before the student is sharded holds
the whole model on every rank (or nothing, when the model is built on the meta device and
materialized after sharding). `sharded_frozen_copy` instead builds an unsharded skeleton of the
sharded student on the meta device (no memory), `fully_shard`s the same module classes as the
student on the student's mesh, allocates only the rank's blocks and copies the student's blocks
into them. `shard_teacher` does the same to a dense teacher module. The teacher's forward then
all-gathers one module at a time, as the student's does. Pure torch.distributed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_prune.masking import MASK_ATTRIBUTES, get_masks, mask_buffer_names
from lightning_prune.parallel.sharded import local_tensor, shard_group
from lightning_prune.recovery.teacher import freeze

_MODULE_INTERNALS = (
    frozenset(nn.Module().__dict__) | {"_is_fsdp_managed_module", "_fsdp_use_orig_params"} | MASK_ATTRIBUTES
)
_COMPOSABLE_PREFIX = "__composable_api"  # keys fully_shard's `contract` puts into a module's __dict__ (torch 2.13)


def student_mesh(student: nn.Module) -> DeviceMesh | None:
    """The one device mesh of the student's FSDP2 parameters (None: nothing is sharded).

    Raises a ValueError when parameters are not row-sharded (tensor parallelism) or lie on different meshes.
    """
    meshes = []
    for name, param in student.named_parameters():
        if isinstance(param, DTensor):
            shard_group(param, name)  # refuses placements other than FSDP2's Shard(0) (optionally replicated)
            meshes.append(param.device_mesh)
    if any(mesh != meshes[0] for mesh in meshes):
        raise ValueError(
            "the student's FSDP2 parameters lie on different device meshes; "
            "the teacher is sharded on one mesh (shard every module on the same mesh)"
        )
    return meshes[0] if meshes else None


def plain_class(module: nn.Module) -> type[nn.Module]:
    """The module's own class, without the `FSDP<Class>` wrapper `fully_shard` swaps in."""
    return next(cls for cls in type(module).__mro__ if issubclass(cls, nn.Module) and not issubclass(cls, FSDPModule))


def _skeleton(module: nn.Module, dtype: torch.dtype | None, memo: dict[int, Any]) -> nn.Module:
    """`module` copied without FSDP2 state, hooks or masks; its parameters and buffers on the meta
    device (full shape)."""
    if id(module) in memo:
        return memo[id(module)]
    cls = plain_class(module)
    copied = cls.__new__(cls)
    nn.Module.__init__(copied)
    memo[id(module)] = copied
    masks = mask_buffer_names(module)
    for name, param in module._parameters.items():
        if param is not None and id(param) not in memo:
            floating = dtype if dtype is not None and param.is_floating_point() else param.dtype
            memo[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=floating, device="meta"), requires_grad=False)
        copied._parameters[name] = None if param is None else memo[id(param)]
    for name, buffer in module._buffers.items():
        if name not in masks:
            copied._buffers[name] = (
                None if buffer is None else torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
            )
    copied._non_persistent_buffers_set = set(module._non_persistent_buffers_set) - masks
    for name, child in module._modules.items():
        copied._modules[name] = None if child is None else _skeleton(child, dtype, memo)
    rest = {
        key: value
        for key, value in module.__dict__.items()
        if key not in _MODULE_INTERNALS and not key.startswith(_COMPOSABLE_PREFIX)
    }
    copied.__dict__.update(copy.deepcopy(rest, memo))
    return copied


def meta_skeleton(module: nn.Module, dtype: torch.dtype | None = None, share: Iterable[object] = ()) -> nn.Module:
    """An unsharded copy of `module` (sharded by FSDP2 or not) with its parameters and buffers on the meta
    device (full shapes; floating parameters in `dtype` when given), without FSDP2 state, hooks or masks.
    Other attributes are deep-copied; objects in `share` are set to None instead. Ties are kept."""
    return _skeleton(module, dtype, {id(obj): None for obj in share})


def _mp_policy(module: nn.Module) -> MixedPrecisionPolicy:
    """The mixed-precision policy `fully_shard` was given for `module` (private state, checked with torch 2.13)."""
    return fully_shard.state(module)._mp_policy  # type: ignore[attr-defined]


def shard_like(teacher: nn.Module, student: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """`fully_shard` every submodule of `teacher` whose class the student shards (with the student's
    mixed-precision policy), deepest first, then the teacher itself; resharded after every forward."""
    policies = {plain_class(m): _mp_policy(m) for m in student.modules() if isinstance(m, FSDPModule)}
    root_policy = _mp_policy(student) if isinstance(student, FSDPModule) else MixedPrecisionPolicy()
    for module in reversed([m for _, m in teacher.named_modules()][1:]):  # pre-order reversed: children first
        if type(module) in policies and not isinstance(module, FSDPModule):
            fully_shard(module, mesh=mesh, reshard_after_forward=True, mp_policy=policies[type(module)])
    if not isinstance(teacher, FSDPModule):
        fully_shard(teacher, mesh=mesh, reshard_after_forward=True, mp_policy=policies.get(type(teacher), root_policy))
    return teacher


def rank_block(source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's block of `source` (a whole tensor or a DTensor), laid out like `like` (a DTensor or
    a plain tensor)."""
    if isinstance(source, DTensor):
        if (
            isinstance(like, DTensor)
            and source.device_mesh == like.device_mesh
            and source.placements == like.placements
        ):
            return source.to_local()
        source = source.full_tensor()
    if not isinstance(like, DTensor):
        return source
    block = distribute_tensor(
        source.detach().to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )  # each rank cuts its own block
    return block.to_local()


@torch.no_grad()
def copy_into_sharded(teacher: nn.Module, state: dict[str, torch.Tensor], every: bool = True) -> None:
    """Copy whole tensors or DTensors of `state` into the teacher's (sharded) parameters and buffers of
    the same names: all of the teacher's (`every`), else those in `state`, which must all exist."""
    targets = dict(teacher.named_parameters()) | dict(teacher.named_buffers())
    missing = sorted(set(targets) - set(state)) if every else sorted(set(state) - set(targets))
    if missing:
        raise ValueError(
            f"the teacher's weights and the saved ones differ in {missing[:5]}; "
            "the saved teacher does not match this model"
        )
    for name in targets if every else state:
        local_tensor(targets[name]).copy_(rank_block(state[name], targets[name]))


def sharded_frozen_copy(
    student: nn.Module, mesh: DeviceMesh, dtype: torch.dtype | None = None, share: Iterable[object] = ()
) -> nn.Module:
    """A frozen copy of the FSDP2-sharded `student` (without masks), sharded like it: each rank allocates
    only its blocks. Buffers are replicated, as FSDP2 leaves them. Objects in `share` (e.g. a Trainer)
    are not copied but set to None; the mesh is shared."""
    device = next(local_tensor(p).device for p in student.parameters())
    memo: dict[int, Any] = {id(obj): None for obj in share} | {id(mesh): mesh}
    teacher = freeze(_skeleton(student, dtype, memo))  # memo: the mesh and `share` are not copied
    shard_like(teacher, student, mesh)
    teacher.to_empty(device=device)
    copy_into_sharded(teacher, dict(student.named_parameters()) | dict(student.named_buffers()))
    return teacher


def shard_teacher(
    teacher: nn.Module, student: nn.Module, mesh: DeviceMesh, dtype: torch.dtype | None = None
) -> nn.Module:
    """A dense (or already sharded) teacher module frozen and sharded in place like the student, on its mesh."""
    if get_masks(teacher):
        raise ValueError("`teacher` has pruning masks: it would be a pruned teacher; pass the dense model")
    sharded = student_mesh(teacher)
    if sharded is not None and (
        sharded != mesh
        or (dtype is not None and any(p.dtype != dtype for p in teacher.parameters() if p.is_floating_point()))
    ):
        raise ValueError(
            "`teacher` is already sharded, on another device mesh than the student "
            "or in another dtype than `teacher_dtype`; pass it unsharded"
        )
    if dtype is not None and sharded is None:
        teacher.to(dtype)
    return shard_like(freeze(teacher), student, mesh)


def local_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its blocks of sharded ones)."""
    return sum(local_tensor(p).numel() * p.element_size() for p in module.parameters())
