"""LoRA on pruned convolutions: the masked delta as a convolution, and what peft cannot merge refused up front.

peft 0.21.2 adapts `nn.Conv1d/2d/3d` with `lora_A` a convolution of the base's kernel, stride and
padding into r channels and `lora_B` a 1×1 (×1) convolution back to the output channels; its
`get_delta_weight` folds them into ΔW of the base weight's shape (out, in, *kernel). `MaskedDelta`
then runs the base's own convolution with `M ⊙ ΔW` as weight, so no pruned weight reaches the forward
and the merge `W + M ⊙ ΔW` gives exactly the trained forward. Refused, naming the layers:

- grouped convolutions (`groups` > 1, depthwise included): peft builds `lora_A` over all input channels,
  so ΔW does not have the grouped weight's shape and peft refuses to merge it;
- with `masked_delta=False`, a convolution with `dilation` ≠ 1 or `padding_mode` ≠ "zeros": peft's
  `lora_A` takes neither, so the trained forward would differ from the merged model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Convolutions peft 0.21.2 adapts (`lora.Conv1d`, `lora.Conv2d`, `lora.Conv3d`).
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_delta_forward(base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The base convolution of `x` with `delta` as its weight and no bias (stride, padding and its mode,
    dilation and groups of `base`), i.e. the delta's share of the merged layer's output."""
    # `_ConvNd._conv_forward(input, weight, bias)` is a torch internal (checked on torch 2.13): the one call
    # that applies every setting of the base layer, padding modes included.
    out: torch.Tensor = base._conv_forward(x, delta, None)  # type: ignore[operator]
    return out


def unsupported_convolutions(model: nn.Module, names: Sequence[str], masked_delta: bool) -> dict[str, str]:
    """{module name: why} for each module of `names` that is a convolution LoRA cannot adapt exactly."""
    problems = {}
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, CONVOLUTIONS):
            continue
        if module.groups != 1:
            problems[name] = f"groups={module.groups}"
        elif not masked_delta and any(d != 1 for d in module.dilation):
            problems[name] = f"dilation={tuple(module.dilation)} with masked_delta=False"
        elif not masked_delta and module.padding_mode != "zeros":
            problems[name] = f"padding_mode={module.padding_mode!r} with masked_delta=False"
    return problems


def check_lora_convolutions(model: nn.Module, names: Sequence[str], masked_delta: bool) -> None:
    """Raise a ValueError naming the convolutions of `names` LoRA cannot adapt and `target_modules`."""
    problems = unsupported_convolutions(model, names, masked_delta)
    if problems:
        listed = ", ".join(f"{name} ({why})" for name, why in problems.items())
        raise ValueError(
            f"LoRA cannot adapt these convolutions exactly: {listed}. peft builds no grouped LoRA delta it can "
            "merge, and without `masked_delta` its adapter ignores dilation and padding modes. Leave them out "
            "with `target_modules` (regexes of the modules to adapt, e.g. the other pruned layers: "
            f"{[n for n in names if n not in problems][:6]}) or use masked_delta=True where that is the reason"
        )
