"""Group sets of plain `nn.Sequential` stacks: filters (Conv2d) and neurons (Linear).

A producer's units pass through BatchNorm (whose entries they own) and channel-wise modules to
the next Conv2d/Linear, whose input channels are their consumers.
"""

from __future__ import annotations

from torch import nn

from lightning_prune.structured.groups import GroupSet, Part, layer_parts, out_features

# Modules a channel passes through unchanged, one channel at a time.
CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Hardswish,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


def sequential_groups(seq_name: str, seq: nn.Sequential) -> list[GroupSet]:
    """Filter (Conv2d) and neuron (Linear) group sets of one plain `nn.Sequential`."""
    children = list(seq.named_children())
    found = []
    for position, (name, producer) in enumerate(children):
        if not isinstance(producer, (nn.Conv2d, nn.Linear)):
            continue
        qualified = f"{seq_name}.{name}" if seq_name else name
        if isinstance(producer, nn.Conv2d) and producer.groups != 1:
            raise ValueError(
                f"cannot couple the filters of {qualified}: "
                f"grouped/depthwise convolutions (groups={producer.groups}) are not supported"
            )
        count = out_features(producer)
        kind = "filter" if isinstance(producer, nn.Conv2d) else "neuron"
        group = GroupSet(qualified, kind, count, parts=layer_parts(qualified, producer, "out"))
        flattened = False
        for follower_name, follower in children[position + 1 :]:
            follower_qualified = f"{seq_name}.{follower_name}" if seq_name else follower_name
            if isinstance(follower, (nn.BatchNorm1d, nn.BatchNorm2d)) and follower.num_features == count:
                group.parts += [
                    Part(follower_qualified, follower, n, 0, 1, "out")
                    for n in ("weight", "bias", "running_mean", "running_var")
                    if getattr(follower, n, None) is not None
                ]
            elif isinstance(follower, CHANNELWISE):
                continue
            elif isinstance(follower, nn.Flatten) and kind == "filter":
                flattened = True
            elif isinstance(follower, (nn.Conv2d, nn.Linear)):
                if isinstance(follower, nn.Conv2d) and (follower.groups != 1 or flattened):
                    raise ValueError(
                        f"cannot couple the filters of {qualified} with {follower_qualified} (groups={follower.groups})"
                    )
                inputs = follower.in_channels if isinstance(follower, nn.Conv2d) else follower.in_features
                if inputs % count:
                    raise ValueError(
                        f"cannot couple {qualified} ({count} outputs) with {follower_qualified} ({inputs} inputs)"
                    )
                group.parts += layer_parts(follower_qualified, follower, "in", inputs // count)
                found.append(group)
                break
            else:
                raise ValueError(
                    f"cannot determine where the {kind}s of {qualified} go: "
                    f"{follower_qualified} ({type(follower).__name__}) follows it"
                )
    return found


def find_sequential_groups(model: nn.Module, kind: str) -> list[GroupSet]:
    """Group sets of `kind` ("filter" or "neuron") in every plain `nn.Sequential` of the model.

    A layer whose outputs leave the `Sequential` (the last one) is not a group: its outputs are the
    model's. Raises a `ValueError` when no group of that kind exists.
    """
    found = [
        g
        for name, m in model.named_modules()
        if type(m) is nn.Sequential
        for g in sequential_groups(name, m)
        if g.kind == kind
    ]
    if not found:
        raise ValueError(
            f"found no {kind} groups in {type(model).__name__}: {kind}s are found in plain nn.Sequential stacks "
            "(Conv2d/Linear → BatchNorm → activation → Conv2d/Linear)"
        )
    return found
