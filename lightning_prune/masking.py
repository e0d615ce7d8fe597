"""Masks kept applied in the forward pass, mask updates from scores, and `finalize`.

Mechanism (settled by `benchmarks/mask_overhead.py`): a pruned weight is held at exact `+0.0`.
Its keep-mask is a non-persistent bool buffer `<param>_mask` on the owning module (1 byte per
element, outside `state_dict`, so checkpoints keep the dense model's keys); a gradient hook
zeroes the pruned entries' gradients, and `apply_masks_` re-zeroes the pruned weights after every
optimizer step (`keep_masks_applied` registers it as an optimizer step hook), so no optimizer
state — momentum, weight decay — can move a pruned value into the forward pass. Loading a state
dict into a masked module re-applies its masks too.

Lifecycle::

    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, sparsity=0.5)
    handle = keep_masks_applied(optimizer, model)   # plain loops; the callbacks do this for you
    ...train...
    finalize(model)                                 # exact zeros, no hooks, dense state_dict keys
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.selection import select_masks
from lightning_prune.targets import PruneTarget

_HANDLES = "_lightning_prune_handles"  # module attribute: {param_name: [RemovableHandle, ...]}


def _mask_name(param_name: str) -> str:
    return f"{param_name}_mask"


def get_mask(module: nn.Module, param_name: str = "weight") -> torch.Tensor | None:
    """The keep-mask attached to `module.<param_name>`, or None."""
    if param_name not in getattr(module, _HANDLES, {}):
        return None
    return getattr(module, _mask_name(param_name))


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def _keep_only_(tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """Set `tensor` to exact +0.0 where `mask` is False, in place, in one vectorised pass.

    Used when a mask is set or loaded and after every optimizer step. On CPU, masked_fill_ and
    where run a branchy scalar loop (~7x a fused AdamW step at 50% random sparsity,
    benchmarks/mask_overhead.py); a float multiply by the mask is
    vectorised but writes -0.0 for negative weights (and keeps NaN). Multiplying the bit pattern
    as an integer of the same width by the 0/1 mask bytes writes all-zero bits, +0.0, and keeps
    every other value's bits: one pass, no temporaries, ~25% faster than multiply-then-add-0.0.
    """
    bits = tensor.view(_SAME_WIDTH_INT[tensor.element_size()])
    bits.mul_(mask.view(torch.uint8))


def _zero_pruned(module: nn.Module, param_name: str) -> None:
    _keep_only_(getattr(module, param_name), getattr(module, _mask_name(param_name)))


def set_mask(module: nn.Module, mask: torch.Tensor, param_name: str = "weight") -> None:
    """Attach (or replace) the keep-mask of `module.<param_name>` and zero its pruned entries now."""
    weight = getattr(module, param_name)
    if mask.shape != weight.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit `{param_name}` of shape {tuple(weight.shape)}")
    mask = mask.to(device=weight.device, dtype=torch.bool)
    handles = getattr(module, _HANDLES, None)
    if handles is None:
        handles = {}
        object.__setattr__(module, _HANDLES, handles)
    if param_name in handles:
        getattr(module, _mask_name(param_name)).copy_(mask)
    else:
        module.register_buffer(_mask_name(param_name), mask.clone(), persistent=False)

        def mask_grad_(param: torch.Tensor) -> None:
            # After accumulation and in place: a hook returning `grad * mask` allocates a new
            # gradient every backward, and on CPU that allocation (fresh pages) cost ~10x the
            # multiply itself (benchmarks/mask_overhead.py). It runs inside the accumulation node,
            # before DDP's reducer reads the gradient, so every rank reduces masked gradients.
            if param.grad is not None:
                _keep_only_(param.grad, getattr(module, _mask_name(param_name)))

        def reapply_after_load(mod: nn.Module, incompatible: object) -> None:
            _zero_pruned(mod, param_name)

        handles[param_name] = [
            weight.register_post_accumulate_grad_hook(mask_grad_),
            module.register_load_state_dict_post_hook(reapply_after_load),
        ]
    _zero_pruned(module, param_name)


def masked_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified parameter name, owning module, parameter name) of every masked parameter."""
    for module_name, module in model.named_modules():
        for param_name in getattr(module, _HANDLES, {}):
            yield (f"{module_name}.{param_name}" if module_name else param_name), module, param_name


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """All keep-masks of `model` by qualified parameter name (the tensors themselves, not copies)."""
    return {name: getattr(module, _mask_name(p)) for name, module, p in masked_parameters(model)}


def load_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Attach masks saved by `get_masks` (e.g. from a checkpoint) to the same-named parameters."""
    for name, mask in masks.items():
        module_name, _, param_name = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError as error:
            raise ValueError(f"saved mask {name!r} names no module of this model") from error
        set_mask(module, mask, param_name)


@torch.no_grad()
def apply_masks_(model: nn.Module) -> None:
    """Re-zero every pruned weight of `model` (call after each optimizer step in a plain loop)."""
    for _, module, param_name in masked_parameters(model):
        _zero_pruned(module, param_name)


def keep_masks_applied(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Re-apply `model`'s masks after every `optimizer.step()`; returns the hook's handle."""
    return optimizer.register_step_post_hook(lambda *_: apply_masks_(model))


def remove_mask(module: nn.Module, param_name: str = "weight") -> None:
    """Detach the mask of `module.<param_name>` and its hooks without touching the weight."""
    for handle in getattr(module, _HANDLES).pop(param_name):
        handle.remove()
    delattr(module, _mask_name(param_name))
    if not getattr(module, _HANDLES):
        object.__delattr__(module, _HANDLES)


def remove_masks(model: nn.Module) -> None:
    """Detach every mask and hook without touching the weights."""
    for _, module, param_name in list(masked_parameters(model)):
        remove_mask(module, param_name)


# Module attribute written by `finalize`: the names of the module's parameters that were pruned.
PRUNED_ATTRIBUTE = "_lightning_prune_pruned"


def pruned_parameters(model: nn.Module) -> list[str]:
    """Qualified names of the parameters `finalize` baked masks into (exports default to them)."""
    return [f"{name}.{p}" if name else p for name, module in model.named_modules() for p in getattr(module, PRUNED_ATTRIBUTE, ())]


@torch.no_grad()
def finalize(model: nn.Module) -> nn.Module:
    """Bake the masks in as exact +0.0, remove every mask and hook, and return the plain model.

    Afterwards `model.state_dict()` has exactly the dense model's keys. Each module that owned a
    mask keeps the names of its pruned parameters in the plain attribute `_lightning_prune_pruned`
    (outside the state dict; see `pruned_parameters`), so that an export knows what was pruned.
    """
    for _, module, param_name in masked_parameters(model):
        weight = getattr(module, param_name)
        keep = getattr(module, _mask_name(param_name)) & (weight != 0)  # also turns -0.0 into +0.0
        weight.masked_fill_(~keep, 0.0)
        recorded = getattr(module, PRUNED_ATTRIBUTE, ())
        object.__setattr__(module, PRUNED_ATTRIBUTE, tuple(dict.fromkeys((*recorded, param_name))))
    remove_masks(model)
    return model


def update_masks(
    targets: Sequence[PruneTarget],
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    pattern: str | None = None,
    monotone: bool = True,
) -> dict[str, torch.Tensor]:
    """Select keep-masks from per-target scores (in weight shape) and attach them.

    Each expert of a fused experts weight is selected as one matrix (`PruneTarget.matrices`).
    Entries already pruned stay pruned when `monotone` (they are scored lowest and kept out).
    Returns the new masks by target name.
    """
    matrices, pruned = {}, {}
    for target in targets:
        current = get_mask(target.module, target.param_name)
        names = target.matrix_names()
        matrices.update(zip(names, target.matrices(scores[target.name])))
        if monotone and current is not None:
            pruned.update(zip(names, (~m for m in target.matrices(current))))
    selected = select_masks(matrices, sparsity, scope=scope, pattern=pattern, pruned=pruned)
    masks = {}
    for target in targets:
        names = target.matrix_names()
        mask = target.from_matrices([selected[n] & ~pruned[n] if n in pruned else selected[n] for n in names])
        set_mask(target.module, mask, target.param_name)
        masks[target.name] = mask
    return masks
