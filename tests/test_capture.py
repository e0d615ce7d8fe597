"""The staged capture: blocks 1.. recorded after block 0 is pruned, replayed only where that is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from architectures import CASES
from torch import nn
from transformers import cache_utils

from lightning_prune import get_masks, prune_oneshot
from lightning_prune.calibration.blocks import find_blocks
from lightning_prune.calibration.capture import Capture
from lightning_prune.calibration.driver import block_output, calibrate_sequentially
from lightning_prune.calibration.replay import same


class Block(nn.Module):
    """`x + scale·fc(x)`, returning (hidden, bias) like T5's blocks hand a position bias on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
    handles = [
        b.register_forward_hook(lambda m, a, o, k=f"layers.{i}": outputs.setdefault(k, []).append(block_output(o)))
        for i, b in enumerate(model.layers)
    ]
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

    def batch(self: Capture, index: int, mode: str, replaced: object = None, earlier: object = ()) -> bool:
        modes.append(mode + ("*" if earlier else ""))  # *: the earlier stacks hand on outputs, computing nothing
        return real_batch(self, index, mode, replaced, earlier)  # type: ignore[arg-type]

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


class EncoderDecoder(nn.Module):
    """Two stacks; the decoder's blocks get the encoder's output as `bias` (like cross-attention
    states). With `from_middle`, the bias also sums the first encoder block's output, which a
    replayed encoder does not give."""

    def __init__(self, from_middle: bool, decoder_blocks: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.ModuleList(Block() for _ in range(2))
        self.decoder = nn.ModuleList(Block() for _ in range(decoder_blocks))
        self.from_middle = from_middle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, bias, first = x, None, None
        for layer in self.encoder:
            hidden, bias = layer(hidden, torch.tensor(0.5), bias=bias)
            first = hidden if first is None else first
        assert first is not None
        memory = (hidden + first if self.from_middle else hidden).mean(0)
        y = x.flip(0)
        for layer in self.decoder:
            y, _ = layer(y, torch.tensor(0.25), bias=memory)
        return y


def test_a_later_stack_is_staged_with_the_earlier_stacks_handing_on_their_outputs() -> None:
    # The decoder's capture is staged too; its replayed pass takes the pruned encoder's outputs
    # from the capture instead of running the encoder again. Block outputs equal the model's own.
    model, batches = EncoderDecoder(from_middle=False), [torch.randn(2, 4) for _ in range(3)]
    own = _own_outputs_of(model, batches)
    got, modes = _driver_outputs(model, batches)
    assert got.keys() == own.keys() == {"encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"}
    for name, outputs in own.items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, got[name], strict=True)), name
    # The decoder's batch 0 runs for real, then once more with the encoder handing on the driver's
    # outputs (the check), and so do batches 1-2: the encoder computes on batch 0 only.
    assert modes == [
        "real",
        "first",
        "first",
        "rest",
        "rest",
        "rest",
        "real",
        "first*",
        "first*",
        "first*",
        "rest*",
        "rest*",
        "rest*",
    ]


def test_a_one_block_decoder_runs_every_batch_for_real_with_the_encoder_replayed() -> None:
    model, batches = EncoderDecoder(from_middle=False, decoder_blocks=1), [torch.randn(2, 4) for _ in range(3)]
    own = _own_outputs_of(model, batches)
    got, modes = _driver_outputs(model, batches)
    assert modes[6:] == [
        "real",
        "first*",
        "real*",
        "real*",
    ]  # not staged (one block): whole passes, the encoder computing nothing
    for name, outputs in own.items():
        assert all(torch.equal(a, b) for a, b in zip(outputs, got[name], strict=True)), name


def _own_outputs_of(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    own: dict[str, list[torch.Tensor]] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, k=f"{n}.{i}": own.setdefault(k, []).append(block_output(o)))
        for n, bl in find_blocks(model)
        for i, b in enumerate(bl)
    ]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    return own


def test_a_later_stack_runs_for_real_when_the_earlier_stacks_cannot_be_replayed() -> None:
    model, batches = EncoderDecoder(from_middle=True), [torch.randn(2, 4) for _ in range(3)]
    got, modes = _driver_outputs(model, batches)
    # The check on batch 0 fails (the bias needs the first encoder block's output): the encoder computes.
    assert modes[6:] == ["real", "first*", "first", "first", "rest*", "rest*", "rest*", "real", "real", "real"]
    with torch.no_grad():
        expected = [
            model.decoder[2](*args, **kwargs)[0] for args, kwargs in _decoder_inputs(model.decoder[2], model, batches)
        ]
    assert all(torch.equal(a, b) for a, b in zip(expected, got["decoder.2"], strict=True))


def _decoder_inputs(
    block: nn.Module, model: nn.Module, batches: list[torch.Tensor]
) -> list[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]]:
    calls: list[tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = []
    handle = block.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return calls


def test_the_calibration_passes_build_no_cache_and_every_config_is_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache is dropped before any block sees it, so building one per calibration pass (two per
    # call in an encoder-decoder, each deep-copying the config) is pure cost.
    case = next(c for c in CASES if c.name == "t5")
    model = case.build()
    built: list[int] = []
    original = cache_utils.DynamicCache.__init__

    def counting(self: cache_utils.DynamicCache, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", counting)
    with torch.no_grad():
        model(**case.batches(count=1)[0])
    assert built, "the model's own forward builds caches (the premise of this test)"
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    assert len(configs) == 3 and all(
        c.use_cache for c in configs.values() if c is not model.encoder.config
    )  # T5's encoder has its own config, cache off
    before = {key: config.use_cache for key, config in configs.items()}
    built.clear()
    prune_oneshot(model, case.batches(count=3), method="wanda", pattern="2:4", progress=False)
    assert not built
    assert {key: config.use_cache for key, config in configs.items()} == before

    def fail(index: int, name: str, block: nn.Module, run_block: object) -> None:
        raise ValueError("stop")

    with pytest.raises(ValueError, match="stop"):
        calibrate_sequentially(model, case.batches(count=2), fail, progress=False)
    assert {key: config.use_cache for key, config in configs.items()} == before


def test_offload_gives_an_encoder_decoder_the_masks_it_gets_without() -> None:
    case = next(c for c in CASES if c.name == "t5")
    on, off, data = case.build(), case.build(), case.batches(count=3)
    prune_oneshot(on, data, method="sparsegpt", pattern="2:4", offload=True, progress=False)
    prune_oneshot(off, data, method="sparsegpt", pattern="2:4", progress=False)
    masks = get_masks(off)
    assert masks.keys() == get_masks(on).keys() and any(name.startswith("decoder.") for name in masks)
    for name, mask in masks.items():
        assert torch.equal(get_masks(on)[name], mask), name
