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
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
        default_root_dir=tmp_path,
        **kwargs,
    )


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
    assert not torch.equal(
        weight[masks["model.model.layers.0.mlp.up_proj.weight"]],
        dense_weight[masks["model.model.layers.0.mlp.up_proj.weight"]],
    )
    assert callback.pruned and callback.current_sparsity == pytest.approx(0.5)
    assert callback.layer_sparsity["model.model.layers.1.self_attn.q_proj.weight"] == pytest.approx(0.5)


def test_explicit_calibration_and_max_epochs_zero_prune_without_training() -> None:
    model, expected = module(), module()
    data = list(loader())[:1]
    prune_oneshot(expected, data, method="wanda", sparsity=0.3, progress=False)
    trainer(OneShotPruning("wanda", 0.3, calibration=data, num_samples=None, progress=False), max_epochs=0).fit(
        model, loader()
    )
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


class TupleBatchModule(pl.LightningModule):
    """A module whose forward takes (ids, mask) and whose loader yields (ids, mask, labels) tuples."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(2))
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids) * mask.unsqueeze(-1)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden.mean(1))

    def training_step(self, batch, batch_idx):
        ids, mask, labels = batch
        return torch.nn.functional.cross_entropy(self(ids, mask), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def call_ids_and_mask(model: torch.nn.Module, batch) -> torch.Tensor:
    return model(batch[0], batch[1])


def tuple_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 16, (8, 5), generator=generator), torch.randint(0, 2, (8,), generator=generator)
    mask = torch.ones(8, 5)
    return DataLoader(list(zip(ids, mask, labels)), batch_size=4)


@pytest.mark.parametrize("forward", [call_ids_and_mask, "tests.test_oneshot_callback.call_ids_and_mask"])
def test_forward_option_calibrates_a_tuple_batch_loader(forward) -> None:
    model, expected = TupleBatchModule(), TupleBatchModule()
    prune_oneshot(
        expected, list(tuple_loader()), method="wanda", sparsity=0.5, forward=call_ids_and_mask, progress=False
    )
    callback = OneShotPruning("wanda", 0.5, num_samples=None, forward=forward, progress=False)
    trainer(callback, max_epochs=0).fit(model, tuple_loader())
    assert sorted(get_masks(model)) == ["blocks.0.0.weight", "blocks.1.0.weight"]
    for name, mask in get_masks(expected).items():
        assert torch.equal(get_masks(model)[name], mask), name


def test_default_forward_on_a_tuple_batch_names_the_batch() -> None:
    callback = OneShotPruning("wanda", 0.5, num_samples=None, progress=False)
    with pytest.raises(
        ValueError,
        match=r"calibration batch 0 \(\(tensor \(4, 5\), tensor \(4, 5\), tensor \(4,\)\)\) "
        r"failed in the model's forward",
    ):
        trainer(callback, max_epochs=0).fit(TupleBatchModule(), tuple_loader())


@pytest.mark.parametrize(
    ("forward", "message"),
    [
        ("call_ids_and_mask", "must be None, a callable"),
        ("tests.test_oneshot_callback.nope", "cannot be imported"),
        ("tests.test_oneshot_callback.LLAMA", "names a dict, not a callable"),
        (3, "must be None, a callable"),
    ],
)
def test_bad_forward_is_refused_when_the_callback_is_made(forward, message) -> None:
    with pytest.raises(ValueError, match=message):
        OneShotPruning("wanda", 0.5, forward=forward)


def test_callbacks_use_no_private_lightning_attributes() -> None:
    import re

    folder = Path(__file__).parents[1] / "lightning_prune" / "callbacks"
    for path in folder.glob("*.py"):
        found = re.findall(r"(?:trainer|fit_loop|strategy)\.(?:\w+\.)*_\w+", path.read_text())
        assert not found, f"{path.name} uses private Lightning attributes {found}"


def test_preflight_refuses_targets_and_patterns_that_cannot_work() -> None:
    with pytest.raises(ValueError, match=r"no prunable weights matched `targets`='nomatch'"):
        OneShotPruning("wanda", 0.5, targets="nomatch").preflight(module())
    with pytest.raises(
        ValueError,
        match=r"`pattern`='2:16' needs every target's input dimension to divide by 16, got 8 for 'blocks.0.0.weight'",
    ):
        OneShotPruning("wanda", 0.875, pattern="2:16").preflight(TupleBatchModule())
    OneShotPruning("wanda", 0.5, pattern="2:4").preflight(module())
