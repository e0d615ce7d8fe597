"""`prune_oneshot(reconstruct_target=...)`: what each pruned block learns to reproduce."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from lightning_prune.oneshot import api
from lightning_prune.oneshot.api import prune_oneshot
from tests.conftest import tiny_llama


def _batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}]


def _dense_block_outputs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Each block's outputs per batch inside the unpruned model's own forward."""
    outputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    handles = [
        layer.register_forward_hook(lambda m, a, o, i=i: outputs[i].append(o[0] if isinstance(o, tuple) else o))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    return outputs


def _targets_seen(monkeypatch: pytest.MonkeyPatch, target: str) -> tuple[torch.nn.Module, list[list[torch.Tensor]]]:
    """Prune a 2-block Llama with reconstruction; returns it and the targets each block was tuned towards."""
    seen: list[list[torch.Tensor]] = []
    real = api.reconstruct_block

    def record(block: Any, inputs: Any, dense_outputs: Any, steps: int, lr: float) -> Any:
        seen.append([t.clone() for t in dense_outputs])
        return real(block, inputs, dense_outputs, steps, lr)

    monkeypatch.setattr(api, "reconstruct_block", record)
    model = tiny_llama(num_hidden_layers=2)
    prune_oneshot(
        model,
        _batches(),
        method="wanda",
        pattern="2:4",
        progress=False,
        reconstruct=True,
        reconstruct_steps=3,
        reconstruct_lr=1e-3,
        reconstruct_target=target,
    )
    return model, seen


def test_model_target_is_the_dense_models_own_hidden_states(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _dense_block_outputs(tiny_llama(num_hidden_layers=2), _batches())
    _, seen = _targets_seen(monkeypatch, "model")
    assert len(seen) == 2
    for block in range(2):
        for got, expected in zip(seen[block], dense[block]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_block_target_follows_the_pruned_inputs_after_the_first_block(monkeypatch: pytest.MonkeyPatch) -> None:
    dense = _dense_block_outputs(tiny_llama(num_hidden_layers=2), _batches())
    _, seen = _targets_seen(monkeypatch, "block")
    for got, expected in zip(seen[0], dense[0]):  # block 0: the pruned model's inputs are still the dense ones
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert max(float((got - expected).abs().max()) for got, expected in zip(seen[1], dense[1])) > 1e-3


def test_both_targets_tune_the_first_block_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    by_model, _ = _targets_seen(monkeypatch, "model")
    by_block, _ = _targets_seen(monkeypatch, "block")
    first = copy.deepcopy(by_model.model.layers[0].state_dict())
    for name, value in by_block.model.layers[0].state_dict().items():
        torch.testing.assert_close(first[name], value)


def test_bad_target() -> None:
    with pytest.raises(ValueError, match=r"reconstruct_target.*'layer'"):
        prune_oneshot(tiny_llama(), _batches(), reconstruct=True, reconstruct_target="layer", progress=False)
    from lightning_prune import OneShotPruning

    with pytest.raises(ValueError, match="reconstruct_target"):
        OneShotPruning(reconstruct=True, reconstruct_target="layer")
