"""The staged capture: blocks 1.. recorded after block 0 is pruned, replayed only where that is exact."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.oneshot.capture import Capture
from lightning_prune.oneshot.driver import block_output, calibrate_sequentially, find_blocks
from lightning_prune.oneshot.replay import same


class Block(nn.Module):
    """`x + scale·fc(x)`, returning (hidden, bias) like T5's blocks hand a position bias on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bias = torch.ones(4) if bias is None else bias
        return x + scale * self.fc(x) + bias, bias


class Net(nn.Module):
    """Three blocks; `scale` is fixed, or (`from_hidden`) computed from the previous block's output."""

    def __init__(self, from_hidden: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.from_hidden = from_hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        for layer in self.layers:
            scale = x.abs().mean() if self.from_hidden else torch.tensor(0.5)
            x, bias = layer(x, scale, bias=bias)
        return x


def _own_outputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [b.register_forward_hook(lambda m, a, o, k=f"layers.{i}": outputs.setdefault(k, []).append(block_output(o))) for i, b in enumerate(model.layers)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return outputs


def _driver_outputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    got: dict[str, list[torch.Tensor]] = {}
    modes: list[str] = []
    real_batch = Capture.batch

    def batch(self: Capture, index: int, mode: str, replaced: object = None) -> bool:
        modes.append(mode)
        return real_batch(self, index, mode, replaced)  # type: ignore[arg-type]

    def record(index: int, name: str, block: nn.Module, run_block: object) -> None:
        handle = block.register_forward_hook(lambda m, a, o: got.setdefault(name, []).append(block_output(o)))
        run_block()  # type: ignore[operator]
        handle.remove()

    Capture.batch = batch  # type: ignore[method-assign]
    try:
        calibrate_sequentially(model, batches, record, progress=False)
    finally:
        Capture.batch = real_batch  # type: ignore[method-assign]
    return got, modes


def test_blocks_after_the_first_are_replayed_when_their_arguments_do_not_depend_on_the_blocks() -> None:
    model, batches = Net(from_hidden=False), [torch.randn(2, 4) for _ in range(3)]
    got, modes = _driver_outputs(model, batches)
    assert got.keys() == {"layers.0", "layers.1", "layers.2"}
    for name, outputs in _own_outputs(model, batches).items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, got[name])), name
    # batch 0 for real, batches 1-2 up to block 0, then all three replayed: no second real pass.
    assert modes == ["real", "first", "first", "rest", "rest", "rest"]


def test_arguments_computed_from_the_blocks_outputs_make_every_batch_run_for_real() -> None:
    model, batches = Net(from_hidden=True), [torch.randn(2, 4) for _ in range(3)]
    got, modes = _driver_outputs(model, batches)
    for name, outputs in _own_outputs(model, batches).items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, got[name])), name
    assert modes == ["real", "first", "first", "rest", "rest", "rest", "real", "real", "real"]
    assert find_blocks(model)[0][0] == "layers"


def test_same_compares_tensors_by_value_and_unknown_objects_as_different() -> None:
    x = torch.arange(3.0)
    assert same((x, {"a": 1, "b": None}), (x.clone(), {"a": 1, "b": None}))
    assert not same(x, x.double()) and not same(x, x[:2]) and not same([x], (x,))
    assert not same(object(), object()) and not same(None, 0)
