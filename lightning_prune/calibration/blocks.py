"""Where a model's blocks are: its stacks of blocks, found or named.

A stack is an `nn.ModuleList` or `nn.Sequential` of composite modules (Llama's `model.layers`, T5's
`encoder.block` and `decoder.block`, a timm ViT's `blocks`, a CNN's `features`); the driver runs
every stack the model's forward reaches, in that order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

BlockList = nn.ModuleList | nn.Sequential
Stack = tuple[str, BlockList]
BlocksArgument = str | BlockList | Sequence[str | BlockList] | None


def block_name(stack: str, index: int) -> str:
    """The qualified name of block `index` of the stack named `stack` ("" when the model itself is the stack)."""
    return f"{stack}.{index}" if stack else str(index)


def _is_block_list(module: nn.Module, kind: type[nn.Module] = nn.ModuleList) -> bool:
    """A non-empty `kind` of composite modules (blocks have layers of their own)."""
    if not isinstance(module, kind) or not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    return len(module) > 0 and all(len(list(c.children())) > 0 for c in module.children())


def _named_stack(model: nn.Module, blocks: str | BlockList) -> Stack:
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        name = next((n for n, m in model.named_modules() if m is blocks), None)
        if name is None:
            raise ValueError(f"`blocks` is an {type(blocks).__name__} that is not part of the model")
        return name, blocks
    if isinstance(blocks, str):
        found = dict(model.named_modules()).get(blocks)
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(
                f"`blocks`={blocks!r} must name a non-empty nn.ModuleList or nn.Sequential of the model, "
                f"got {type(found).__name__}"
            )
        return blocks, found
    raise ValueError(
        f"`blocks` must be None, a module name, an nn.ModuleList or nn.Sequential, or a list of them, got {blocks!r}"
    )


def _outermost(model: nn.Module, kind: type[nn.Module]) -> list[Stack]:
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        inside = any(not outer or name.startswith(outer + ".") for outer, _ in stacks)
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and _is_block_list(module, kind) and not inside:
            stacks.append((name, module))
    return stacks


def find_block_lists(model: nn.Module, sequential: bool = True) -> list[Stack]:
    """The block stacks `find_blocks` finds by default, or [] when the model has none.

    Every `nn.ModuleList` of composite modules that is not inside another (the transformers
    idiom); with `sequential`, for a model without one: every outermost `nn.Sequential` of
    composite modules (a timm ViT's `blocks`, a ResNet's stages, a MobileNet's `features`), the
    model itself included.
    """
    return _outermost(model, nn.ModuleList) or (_outermost(model, nn.Sequential) if sequential else [])


def find_blocks(model: nn.Module, blocks: BlocksArgument = None, sequential: bool = True) -> list[Stack]:
    """Every stack of blocks of `model`, as (qualified name, ModuleList or Sequential), in module order.

    `blocks` names them explicitly (a name such as "model.layers", a ModuleList or Sequential, or
    a list of them); by default `find_block_lists` (Llama `model.layers`; T5 `encoder.block` and
    `decoder.block`; Whisper's `encoder.layers` and `decoder.layers`; a vision tower's layers and
    the language model's; a timm ViT's `blocks`, unless `sequential` is False). The driver runs
    them in the order the model's forward reaches them.
    """
    if blocks is not None:
        names = [blocks] if isinstance(blocks, (str, nn.ModuleList, nn.Sequential)) else list(blocks)
        if not names:
            raise ValueError("`blocks` must name at least one ModuleList or Sequential, got an empty list")
        named = [_named_stack(model, b) for b in names]
        if len({name for name, _ in named}) != len(named):
            raise ValueError(f"`blocks` names the same block list twice: {[name for name, _ in named]}")
        return named
    stacks = find_block_lists(model, sequential)
    if not stacks:
        raise ValueError(
            f"found no nn.ModuleList{' or nn.Sequential' if sequential else ''} of blocks in {type(model).__name__}; "
            "name the list of blocks with `blocks=` (e.g. blocks='model.layers'), "
            "or wrap your blocks in an nn.ModuleList"
        )
    return stacks


def find_block_stack(model: nn.Module, blocks: str | BlockList | None = None) -> Stack:
    """The one block stack of `model` (structured pruning and layer indices need exactly one).

    A model with several stacks (an encoder and a decoder) is an error naming them: pass `blocks=`.
    Only ModuleLists are found (an nn.Sequential when named): structured pruning takes a model
    without one, such as a CNN, through its `nn.Sequential` groups instead.
    """
    stacks = find_blocks(model, blocks, sequential=False)
    if len(stacks) != 1:
        raise ValueError(
            f"{type(model).__name__} has {len(stacks)} block stacks {[name for name, _ in stacks]}; "
            "name the one to use with `blocks=`"
        )
    return stacks[0]
