"""OneShotPruning in a Trainer: prunes once at fit start, masks fixed while fine-tuning, resumes."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.masking import get_masks
from lightning_prune.models import CausalLMModule
from lightning_prune.oneshot import prune_oneshot
from tests.conftest import tiny_llama_config

LLAMA = tiny_llama_config(num_hidden_layers=2, num_attention_heads=4, vocab_size=64, max_position_embeddings=16)


def module(seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config=LLAMA, lr=1e-2)


def loader() -> DataLoader:
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=8)


def trainer(callback: OneShotPruning, tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", callbacks=[callback], default_root_dir=tmp_path, **kwargs)


def test_prunes_at_fit_start_on_training_batches_and_keeps_masks_fixed() -> None:
    model = module()
    expected = copy.deepcopy(model)
    prune_oneshot(expected, list(loader())[:2], method="sparsegpt", pattern="2:4", progress=False)  # 16 sequences
    callback = OneShotPruning("sparsegpt", 0.5, "2:4", num_samples=16, progress=False)
    dense_weight = model.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    trainer(callback, max_steps=6).fit(model, loader())
    masks, expected_masks = get_masks(model), get_masks(expected)
    assert masks.keys() == expected_masks.keys() and len(masks) == 14
    weight = model.model.model.layers[0].mlp.up_proj.weight
    for name, mask in masks.items():
        assert torch.equal(mask, expected_masks[name]), name
        assert (dict(model.named_parameters())[name][~mask] == 0).all(), name
    assert not torch.equal(weight[masks["model.model.layers.0.mlp.up_proj.weight"]], dense_weight[masks["model.model.layers.0.mlp.up_proj.weight"]])
    assert callback.pruned and callback.current_sparsity == pytest.approx(0.5)
    assert callback.layer_sparsity["model.model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.5)


def test_explicit_calibration_and_max_epochs_zero_prune_without_training() -> None:
    model, expected = module(), module()
    data = list(loader())[:1]
    prune_oneshot(expected, data, method="wanda", sparsity=0.3, progress=False)
    trainer(OneShotPruning("wanda", 0.3, calibration=data, num_samples=None, progress=False), max_epochs=0).fit(model, loader())
    for (name, a), b in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(a, b), name


def test_checkpoint_resume_restores_masks_and_does_not_prune_again(tmp_path: Path) -> None:
    model = module()
    first = OneShotPruning("wanda", 0.5, "2:4", num_samples=8, progress=False)
    fit = trainer(first, tmp_path, max_steps=2)
    fit.fit(model, loader())
    fit.save_checkpoint(tmp_path / "last.ckpt")
    state = first.state_dict()
    assert state["pruned"] is True and len(state["masks"]) == 14

    resumed_model = module(seed=1)  # different init: the checkpoint must bring weights and masks back
    second = OneShotPruning("wanda", 0.5, "2:4", num_samples=8, progress=False)
    second.prune = lambda *args: pytest.fail("a resumed run must not prune again")
    trainer(second, tmp_path, max_steps=4).fit(resumed_model, loader(), ckpt_path=tmp_path / "last.ckpt")
    assert second.pruned
    for name, mask in get_masks(model).items():
        assert torch.equal(get_masks(resumed_model)[name], mask), name
        assert (dict(resumed_model.named_parameters())[name][~mask] == 0).all()
