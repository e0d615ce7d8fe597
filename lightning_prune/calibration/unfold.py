"""A convolution's inputs as rows of its weight matrix's input features (im2col), for statistics.

Wanda, SparseGPT and RIA were published with CNN results computed this way: a convolution is a
matrix product of its (out, in·k) weight matrix (`weight.flatten(1)`, the order `PruneTarget`
views it in) with its unfolded inputs, each output position one "token" of in·k features. So
‖X_j‖₂ and X Xᵀ of a convolution are those of its unfolded columns (`torch.nn.functional.unfold`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONVOLUTIONS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


def is_grouped_convolution(module: nn.Module) -> bool:
    """A Conv1d/Conv2d with `groups` > 1 (depthwise): each group of rows sees other input channels."""
    return isinstance(module, CONVOLUTIONS) and getattr(module, "groups", 1) != 1


def _padding(conv: nn.Conv1d | nn.Conv2d) -> list[int]:
    """The convolution's padding as `F.pad` amounts (last dimension first; "same" puts the odd one last)."""
    pads: list[int] = []
    for axis in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            before = after = 0
        elif conv.padding == "same":
            total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
            before, after = total // 2, total - total // 2
        else:
            before = after = int(conv.padding[axis])
        pads += [before, after]
    return pads


def unfold_inputs(conv: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The (positions, in·k) unfolded inputs of a Conv1d/Conv2d call: row p times `weight.flatten(1)ᵀ`
    is the convolution's output (without bias) at position p; batched or unbatched inputs."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        raise TypeError(f"`conv` must be an nn.Conv1d or nn.Conv2d, got {type(conv).__name__}")
    if is_grouped_convolution(conv):
        raise ValueError(
            f"a convolution with groups={conv.groups} has per-group input statistics, which one-shot pruning "
            "does not collect; leave it dense with `ignore=`"
        )
    spatial = len(conv.kernel_size)
    x = inputs.detach()
    if x.dim() == spatial + 1:  # unbatched
        x = x.unsqueeze(0)
    pads = _padding(conv)
    if any(pads):
        x = F.pad(x, pads, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    if spatial == 1:  # a Conv1d is a Conv2d of height 1
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *conv.kernel_size), (1, *conv.dilation), (1, *conv.stride)
    else:
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
    columns = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, in·k, positions), channel-major
    return columns.transpose(1, 2).reshape(-1, columns.shape[1])


def layer_inputs(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A target layer's inputs as (..., in_features) rows of its weight matrix's inputs: a
    convolution's unfolded, a Linear's (or Conv1D's) as they are."""
    return unfold_inputs(module, inputs) if isinstance(module, CONVOLUTIONS) else inputs
