"""Where a model's blocks are: its stacks of transformer blocks, found or named.

A stack is an `nn.ModuleList` of composite modules (Llama's `model.layers`, T5's `encoder.block`
and `decoder.block`); the driver runs every stack the model's forward reaches, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

Stack = tuple[str, nn.ModuleList]


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of composite modules (blocks have layers of their own)."""
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(len(list(c.children())) > 0 for c in module)


def _named_stack(model: nn.Module, blocks: str | nn.ModuleList) -> Stack:
    if isinstance(blocks, nn.ModuleList):
        name = next((n for n, m in model.named_modules() if m is blocks), None)
        if name is None:
            raise ValueError("`blocks` is a ModuleList that is not part of the model")
        return name, blocks
    if isinstance(blocks, str):
        found = dict(model.named_modules()).get(blocks)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(
                f"`blocks`={blocks!r} must name a non-empty nn.ModuleList of the model, got {type(found).__name__}"
            )
        return blocks, found
    raise ValueError(f"`blocks` must be None, a module name, an nn.ModuleList or a list of them, got {blocks!r}")


def find_blocks(
    model: nn.Module, blocks: str | nn.ModuleList | Sequence[str | nn.ModuleList] | None = None
) -> list[Stack]:
    """Every stack of transformer blocks of `model`, as (qualified name, ModuleList), in module order.

    `blocks` names them explicitly (a name such as "model.layers", a ModuleList, or a list of
    them); by default every `ModuleList` of composite modules that is not inside another such list
    (Llama `model.layers`; T5 `encoder.block` and `decoder.block`; Whisper's `encoder.layers` and
    `decoder.layers`; a vision tower's layers and the language model's). The driver runs them in
    the order the model's forward reaches them.
    """
    if blocks is not None:
        names = [blocks] if isinstance(blocks, (str, nn.ModuleList)) else list(blocks)
        if not names:
            raise ValueError("`blocks` must name at least one ModuleList, got an empty list")
        named = [_named_stack(model, b) for b in names]
        if len({name for name, _ in named}) != len(named):
            raise ValueError(f"`blocks` names the same ModuleList twice: {[name for name, _ in named]}")
        return named
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        if _is_block_list(module) and not any(name.startswith(outer + ".") for outer, _ in stacks):
            stacks.append((name, module))
    if not stacks:
        raise ValueError(
            f"found no nn.ModuleList of transformer blocks in {type(model).__name__}; "
            "name the list of blocks with `blocks=` (e.g. blocks='model.layers'), "
            "or wrap your blocks in an nn.ModuleList"
        )
    return stacks


def find_block_stack(model: nn.Module, blocks: str | nn.ModuleList | None = None) -> Stack:
    """The one block stack of `model` (structured pruning and layer indices need exactly one).

    A model with several stacks (an encoder and a decoder) is an error naming them: pass `blocks=`.
    """
    stacks = find_blocks(model, blocks)
    if len(stacks) != 1:
        raise ValueError(
            f"{type(model).__name__} has {len(stacks)} block stacks {[name for name, _ in stacks]}; "
            "name the one to use with `blocks=`"
        )
    return stacks[0]
