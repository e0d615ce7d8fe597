"""Block reconstruction: lower output error per block, masks fixed, zeros +0.0, N:M groups exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_LLAMA_CONFIG
from torch import nn

from lightning_prune.calibration.driver import BlockRunner
from lightning_prune.masking import get_mask, get_masks, set_mask
from lightning_prune.oneshot import calibrate_sequentially, prune_oneshot, wanda_mask
from lightning_prune.recovery import block_error, reconstruct_block
from lightning_prune.report import max_nonzeros_per_group


def _llama(layers: int = 2) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LLAMA_CONFIG, "num_hidden_layers": layers})).eval()


def _batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 48, (2, 16), generator=generator)} for _ in range(count)]


def _check_zeros(model: nn.Module, pattern_m: int | None = None) -> None:
    for name, mask in get_masks(model).items():
        weight = model.get_parameter(name)
        assert (weight[~mask] == 0).all() and not torch.signbit(weight[~mask]).any(), name
        if pattern_m is not None:
            assert max_nonzeros_per_group(weight.detach(), pattern_m) <= pattern_m // 2, name


def test_reconstruct_block_lowers_the_error_and_keeps_mask_and_positive_zeros() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    inputs = [((torch.randn(8, 16),), {}) for _ in range(4)]
    with torch.no_grad():
        dense = [block(*args) for args, _ in inputs]
    for layer in (block[0], block[2]):
        keep = wanda_mask(layer.weight, torch.ones(layer.weight.shape[1]), 0.5, "2:4")
        with torch.no_grad():
            layer.weight.mul_(-1.0)  # negative weights: a float multiply by the mask would give -0.0
        set_mask(layer, keep)
    masks = {name: mask.clone() for name, mask in get_masks(block).items()}
    before = block_error(block, inputs, dense)
    result = reconstruct_block(block, inputs, dense, steps=60, lr=1e-2)
    assert result.kept and result.error_before == pytest.approx(before)
    assert result.error_after < 0.5 * result.error_before
    assert block_error(block, inputs, dense) == pytest.approx(result.error_after)
    assert all(torch.equal(get_masks(block)[name], mask) for name, mask in masks.items())
    _check_zeros(block, pattern_m=4)
    assert all(not p.requires_grad or p.grad is None for p in block.parameters())


def test_reconstruct_restores_the_block_when_tuning_does_not_help() -> None:
    block = nn.Linear(4, 4)
    inputs = [((torch.randn(3, 4),), {})]
    with torch.no_grad():
        dense = [block(inputs[0][0][0])]
    saved = copy.deepcopy(block.state_dict())
    result = reconstruct_block(block, inputs, dense, steps=3, lr=1.0)  # already exact: any step can only add error
    assert not result.kept and result.error_before == result.error_after == 0.0
    assert all(torch.equal(saved[k], v) for k, v in block.state_dict().items())


def test_reconstruct_rejects_bad_arguments() -> None:
    block = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="reconstruct_steps"):
        reconstruct_block(block, [((torch.ones(1, 2),), {})], [torch.ones(1, 2)], steps=0)
    with pytest.raises(ValueError, match="reconstruct_lr"):
        prune_oneshot(_llama(1), _batches(1), "wanda", 0.5, reconstruct=True, reconstruct_lr=0.0)
    with pytest.raises(ValueError, match="equally many"):
        reconstruct_block(block, [((torch.ones(1, 2),), {})], [], steps=1)


def test_every_block_of_a_llama_gets_closer_to_its_dense_outputs() -> None:
    model = _llama()
    results = []

    def prune_and_reconstruct(index: int, name: str, block: nn.Module, run_block: BlockRunner) -> None:
        dense = run_block(keep_outputs=True)
        for module in block.modules():
            if isinstance(module, nn.Linear):
                set_mask(module, wanda_mask(module.weight, torch.ones(module.weight.shape[1]), 0.5, "2:4"))
        results.append(reconstruct_block(block, run_block.inputs, dense, steps=30, lr=1e-3))

    calibrate_sequentially(model, _batches(), prune_and_reconstruct, progress=False)
    assert len(results) == 2
    assert all(r.kept and r.error_after < r.error_before for r in results), results
    _check_zeros(model, pattern_m=4)


def _logit_error(model: nn.Module, dense: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(float(nn.functional.mse_loss(model(**b).logits, dense(**b).logits)) for b in batches)


@pytest.mark.parametrize(
    ("method", "sparsity", "pattern", "offload"),
    [
        ("wanda", 0.5, "2:4", False),
        ("sparsegpt", 0.5, None, False),
        ("magnitude", 0.5, "2:4", True),
        ("sparsegpt", 0.5, "2:4", True),
    ],
)
def test_prune_oneshot_with_reconstruction_keeps_masks_exact_and_gets_closer_to_dense(
    method: str, sparsity: float, pattern: str | None, offload: bool
) -> None:
    dense, plain, tuned = _llama(), _llama(), _llama()
    batches = _batches()
    prune_oneshot(plain, batches, method, sparsity, pattern, offload=offload, progress=False)
    report = prune_oneshot(
        tuned,
        batches,
        method,
        sparsity,
        pattern,
        offload=offload,
        progress=False,
        reconstruct=True,
        reconstruct_steps=40,
        reconstruct_lr=1e-3,
    )
    assert report.notes == ()
    assert report.global_sparsity == pytest.approx(sparsity)
    first = [name for name in get_masks(plain) if ".layers.0." in name]
    assert first and all(
        torch.equal(get_masks(plain)[n], get_masks(tuned)[n]) for n in first
    )  # same inputs, same masks
    _check_zeros(tuned, pattern_m=4 if pattern else None)
    assert _logit_error(tuned, dense, batches) < _logit_error(plain, dense, batches)
    assert get_mask(tuned.model.layers[1].mlp.up_proj) is not None


def test_oneshot_callback_reconstructs_before_fine_tuning() -> None:
    from lightning_prune import OneShotPruning
    from lightning_prune.models import CausalLMModule
    from tests.conftest import make_trainer

    with pytest.raises(ValueError, match="reconstruct_steps"):
        OneShotPruning("wanda", 0.5, reconstruct=True, reconstruct_steps=0)
    torch.manual_seed(0)
    module = CausalLMModule(config={"model_type": "llama", **TINY_LLAMA_CONFIG, "num_hidden_layers": 2}, lr=1e-3)
    pruning = OneShotPruning(
        "wanda", 0.5, "2:4", reconstruct=True, reconstruct_steps=10, reconstruct_lr=1e-3, progress=False
    )
    loader = torch.utils.data.DataLoader([{"input_ids": b["input_ids"][0]} for b in _batches()], batch_size=2)
    make_trainer(max_steps=2, callbacks=[pruning]).fit(module, loader)
    assert (
        pruning.report is not None
        and pruning.report.global_sparsity == pytest.approx(0.5)
        and pruning.report.notes == ()
    )
    _check_zeros(module.model, pattern_m=4)
