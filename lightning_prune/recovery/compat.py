"""Which layers distillation compares, and whether a teacher can be compared with a student at all.

Checked before training (pure PyTorch): layer names exist, the teacher is not the student, the
sizes a loss compares agree, and block indices mean the same block in both models.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from lightning_prune.calibration.blocks import find_block_stack, find_blocks


def block_stacks(model: nn.Module) -> list[tuple[str, int]]:
    """(name, number of blocks) of every block stack of `model`; empty when it has none (a plain MLP)."""
    try:
        # ModuleList stacks only: integer `layers` index them through `find_block_stack`, which finds no other
        return [(name, len(blocks)) for name, blocks in find_blocks(model, sequential=False)]
    except ValueError:
        return []


def valid_layer_names(model: nn.Module) -> list[str]:
    """The module names `layers` may use, with block indices written `<i>` (one entry per pattern)."""
    patterns = [(re.compile(rf"^{re.escape(name)}\.\d+(?=\.|$)"), f"{name}.<i>") for name, _ in block_stacks(model)]
    names: list[str] = []
    for name, _ in model.named_modules():
        for pattern, replacement in patterns:
            name = pattern.sub(replacement, name)
        if name and name not in names:
            names.append(name)
    return names


def _unknown_layer(model: nn.Module, layer: object) -> ValueError:
    valid = valid_layer_names(model)
    close = difflib.get_close_matches(str(layer), [name for name, _ in model.named_modules() if name], n=3, cutoff=0.6)
    stacks = ", ".join(f"0..{count - 1} (or negative) of `{name}`" for name, count in block_stacks(model))
    indices = f"block indices {stacks} (`<i>` below), or " if stacks else "(no block stack, so no block indices) "
    hint = f" Did you mean {close}?" if close else ""
    return ValueError(
        f"`layers` entry {layer!r} is not a module of {type(model).__name__}.{hint} "
        f"Valid: {indices}module names {valid}"
    )


def resolve_layers(model: nn.Module, layers: Sequence[int | str] | None) -> list[str]:
    """Module names of the layers to distill: integers index the model's blocks (`find_block_stack`; -1 is the last)."""
    if layers is None:
        return []
    modules = dict(model.named_modules())
    names = []
    for layer in layers:
        if isinstance(layer, int) and not isinstance(layer, bool):
            blocks_name, blocks = find_block_stack(model)
            if not -len(blocks) <= layer < len(blocks):
                raise ValueError(
                    f"`layers` entry {layer} is out of range for the {len(blocks)} blocks of `{blocks_name}`"
                )
            names.append(f"{blocks_name}.{layer % len(blocks)}")
        elif isinstance(layer, str) and layer in modules:
            names.append(layer)
        else:
            raise _unknown_layer(model, layer)
    return names


def check_sizes(student: nn.Module, teacher_config: object, teacher_name: str, loss: str) -> None:
    """Raise when the teacher's config has another `vocab_size` (or, for "mse"/"cosine", `hidden_size`)
    than the student's config; sizes either config lacks are not compared."""
    keys = ("vocab_size", "hidden_size") if loss in ("mse", "cosine") else ("vocab_size",)
    for key in keys:
        ours, theirs = getattr(getattr(student, "config", None), key, None), getattr(teacher_config, key, None)
        if isinstance(ours, int) and isinstance(theirs, int) and ours != theirs:
            raise ValueError(
                f"`teacher` {teacher_name} has {key}={theirs} "
                f"but the student {type(student).__name__} has {key}={ours}; `loss`={loss!r} needs them equal"
            )


def check_teacher_fits(student: nn.Module, teacher: nn.Module, loss: str, layer_names: Sequence[str]) -> None:
    """Raise a ValueError naming `teacher` (or `layers`) when the teacher cannot be compared with the student.

    The teacher must not share parameters with the student (it would be pruned and trained with
    it); it reads the student's token ids, so `vocab_size` must agree, and hidden-state losses
    ("mse", "cosine") compare `hidden_size` features; `layers` must exist in the teacher, and when
    the block counts differ (blocks removed by structured pruning) a block index or name no longer
    means the same block, so `layers` inside the blocks are refused (outside them, e.g. the final
    norm, they still compare). Widths of other named layers are compared on the
    first step (only the outputs show them).
    """
    shared = {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}
    if shared:
        raise ValueError(
            f"`teacher` shares {len(shared)} parameters with the student {type(student).__name__}: "
            "it would be pruned and trained with it; pass a separate copy"
        )
    check_sizes(student, getattr(teacher, "config", None), type(teacher).__name__, loss)
    if not layer_names:
        return
    missing = [name for name in layer_names if name not in dict(teacher.named_modules())]
    if missing:
        raise ValueError(f"`layers` {missing} exist in the student but not in the `teacher` {type(teacher).__name__}")
    ours, theirs = block_stacks(student), block_stacks(teacher)
    in_blocks = [name for name in layer_names if any(name.startswith(stack + ".") for stack, _ in ours + theirs)]
    if ours != theirs and in_blocks:
        described = [", ".join(f"{count} blocks in `{name}`" for name, count in stacks) for stacks in (ours, theirs)]
        raise ValueError(
            f"`layers`={in_blocks} compare the student's and the teacher's blocks by position, but the student has "
            f"{described[0]} and the `teacher` {described[1]} (blocks removed, e.g. by "
            "StructuredPruning(drop_layers=...)): the same index is no longer the same block; "
            "use loss='kl', layers=None (the model's output) or layers outside the blocks"
        )
