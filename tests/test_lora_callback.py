"""LoRARecovery: recovery on a small trained LM, after OneShotPruning in one Trainer, exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.callbacks.oneshot import OneShotPruning
from lightning_prune.data import TextDataModule
from lightning_prune.lora import merge_lora
from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import get_masks
from lightning_prune.models import CausalLMModule
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.targets import find_targets
from tests.conftest import tiny_llama_config

QUIET = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "accelerator": "cpu",
}
LLAMA = tiny_llama_config(num_hidden_layers=2, num_attention_heads=4, vocab_size=300)


@pytest.fixture(scope="module")
def trained() -> tuple[CausalLMModule, TextDataModule]:
    """A tiny Llama trained 120 steps on the pydoc text (perplexity ~20 on 300 BPE tokens)."""
    pl.seed_everything(0, verbose=False)
    data = TextDataModule(seq_len=32, batch_size=8, vocab_size=300)
    module = CausalLMModule(config=LLAMA, lr=5e-3)
    pl.Trainer(max_steps=120, limit_val_batches=0, **QUIET).fit(module, datamodule=data)
    return module, data


def perplexity(module: pl.LightningModule, data: TextDataModule) -> float:
    (metrics,) = pl.Trainer(limit_val_batches=6, **QUIET).validate(module, datamodule=data, verbose=False)
    return float(metrics["val/ppl"])


def zero_sets(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {t.name: (t.weight == 0).clone() for t in find_targets(module)}


def wanda_2of4() -> OneShotPruning:
    return OneShotPruning(method="wanda", sparsity=0.5, pattern="2:4", num_samples=32, progress=False)


def test_recovery_lowers_perplexity_and_keeps_the_2of4_zero_set(trained):
    module, data = copy.deepcopy(trained[0]), trained[1]
    pl.seed_everything(0, verbose=False)
    pl.Trainer(max_epochs=0, callbacks=[wanda_2of4()], **QUIET).fit(module, datamodule=data)
    pruned_ppl, zeros = perplexity(module, data), zero_sets(module)
    recovery = LoRARecovery(r=8, lr=5e-3)  # masked delta (the default), merged at fit end
    pl.Trainer(max_steps=30, limit_val_batches=0, callbacks=[recovery], **QUIET).fit(module, datamodule=data)
    assert recovery.merged and recovery.peft_model is None
    assert perplexity(module, data) < pruned_ppl  # 32.0 → 30.4 with these seeds
    assert zero_sets(module).keys() == zeros.keys()
    for target in find_targets(module):
        assert torch.equal(target.weight == 0, zeros[target.name]), target.name
        assert max_nonzeros_per_group(target.as_matrix(target.weight.detach()), 4) == 2
        assert not torch.signbit(target.weight[zeros[target.name]]).any()
    assert all(p.requires_grad for p in module.parameters())  # flags restored after the merge


class Snapshot(pl.Callback):
    """Every parameter's value when training starts (after all `on_fit_start` hooks acted)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.values = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


def test_after_oneshot_in_one_trainer_only_adapters_change(trained):
    module, data = copy.deepcopy(trained[0]), trained[1]
    snapshot, recovery = Snapshot(), LoRARecovery(r=4, lr=5e-3, merge=False)
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, callbacks=[wanda_2of4(), snapshot, recovery], **QUIET)
    trainer.fit(module, datamodule=data)
    changed = {name for name, p in module.named_parameters() if not torch.equal(p, snapshot.values[name])}
    assert changed and all(".lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero: the adapters did learn
    assert {name for name, p in module.named_parameters() if p.requires_grad} == {
        n for n in snapshot.values if ".lora_" in n
    }
    assert len(get_masks(module)) == 14  # OneShotPruning's masks on the wrapped base layers
    with torch.no_grad():
        batch = torch.arange(64).reshape(2, 32) % 300
        adapter_logits = module(batch)
        merged = merge_lora(recovery.peft_model)
        torch.testing.assert_close(merged(input_ids=batch).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    for name, value in snapshot.values.items():
        if ".base_layer.weight" in name:
            unwrapped = module.get_parameter(name.replace(".base_layer", ""))
            assert torch.equal(unwrapped == 0, value == 0), name


def tiny_pruned() -> CausalLMModule:
    torch.manual_seed(0)
    module = CausalLMModule(config={**LLAMA, "num_hidden_layers": 1}, lr=1e-2)
    targets = find_targets(module)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return module


def fit(module: CausalLMModule, epochs: int, checkpoint: Path | None = None, save: Path | None = None) -> LoRARecovery:
    torch.manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 300, (4, 16))} for _ in range(4)]
    recovery = LoRARecovery(r=2, merge=False)
    trainer = pl.Trainer(max_epochs=epochs, limit_val_batches=0, callbacks=[recovery], **QUIET)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=checkpoint)
    if save is not None:
        trainer.save_checkpoint(save)
    return recovery


def test_resume_restores_adapters_and_optimizer_exactly(tmp_path):
    path = tmp_path / "lora.ckpt"
    fit(tiny_pruned(), 1, save=path)  # at an epoch boundary, so the data order resumes too
    saved = torch.load(path, weights_only=False)
    assert not any(".lora_" in key or "base_layer" in key for key in saved["state_dict"])
    assert any("lora_A" in key for state in saved["callbacks"].values() for key in state.get("adapters", {}))
    resumed, straight = tiny_pruned(), tiny_pruned()
    fit(resumed, 2, checkpoint=path)
    fit(straight, 2)
    adapters = {name: p for name, p in straight.named_parameters() if ".lora_" in name}
    assert adapters
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, straight.get_parameter(name)), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r": 0}, "`r`"), ({"alpha": -1.0}, "`alpha`"), ({"dropout": 1.5}, "`dropout`"), ({"lr": 0.0}, "`lr`")],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRARecovery(**kwargs)


class OptimizerProbe(pl.Callback):
    """Records, at each batch, whether the pruning callback's mask hooks sit on the Trainer's optimizers."""

    def __init__(self, pruning: OneShotPruning) -> None:
        self.pruning = pruning
        self.hooked_current: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        hooked = self.pruning._hooked_optimizers
        self.hooked_current.append(len(hooked) == 1 and hooked[0] is trainer.optimizers[0])


def test_mask_hooks_follow_the_adapter_optimizer_and_targets_are_checked_first():
    module = tiny_pruned()
    pruning = OneShotPruning(method="magnitude", sparsity=0.5, pattern="2:4", progress=False)
    probe = OptimizerProbe(pruning)
    batches = [{"input_ids": torch.randint(0, 300, (4, 16))} for _ in range(2)]
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=0, callbacks=[pruning, LoRARecovery(r=2, merge=False), probe], **QUIET
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert probe.hooked_current == [True, True]  # not the optimizer LoRARecovery replaced
    with pytest.raises(ValueError, match=r"no prunable weights matched `targets`='nomatch'"):
        LoRARecovery(target_modules="nomatch").preflight(tiny_pruned())


def test_state_key_tells_apart_callbacks_on_different_expert_parameters() -> None:
    """Two LoRARecovery callbacks that differ only in `target_parameters` keep separate checkpoint states."""
    from lightning_prune import LoRARecovery

    gate, down = LoRARecovery(target_parameters="gate_up_proj"), LoRARecovery(target_parameters="down_proj")
    assert gate.state_key != down.state_key
    assert LoRARecovery(r=4).state_key == LoRARecovery(r=4, target_parameters=None).state_key
