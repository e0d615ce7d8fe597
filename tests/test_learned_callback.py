"""LearnedSparsity in a Trainer: the prior, N:M at the end, eval on the hard mask, the usual mask path, resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader

from lightning_prune import LearnedSparsity, finalize, get_masks, load_sparse, save_sparse, set_mask, sparsity_report
from lightning_prune.models import CausalLMModule
from lightning_prune.oneshot import prune_oneshot
from lightning_prune.selection import group_counts
from tests.conftest import ResumableLoader, make_trainer, tiny_llama_config

LLAMA = tiny_llama_config(num_hidden_layers=1, num_attention_heads=4, vocab_size=64, max_position_embeddings=16)


def llama(seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config=LLAMA, lr=1e-3)


def tokens() -> DataLoader:
    ids = torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=4)


class MLP(pl.LightningModule):
    """A regression MLP whose validation outputs are kept (to compare with the final model's)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 1))
        self.validated: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validated.append(self.net(batch[0]).detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def regression() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(48, 16, generator=generator)
    return DataLoader(list(zip(x, x[:, :1] * 2.0)), batch_size=8)


def assert_exactly_n_of_m(masks: dict[str, torch.Tensor], n: int = 2, m: int = 4) -> None:
    for name, mask in masks.items():
        assert torch.equal(group_counts(mask, m), torch.full_like(group_counts(mask, m), n)), name


def test_a_huge_prior_gives_the_one_shot_mask_on_unchanged_dense_weights(tmp_path: Path) -> None:
    module = llama()
    expected, dense = copy.deepcopy(module), copy.deepcopy(module)
    prune_oneshot(expected, list(tokens())[:4], method="sparsegpt", pattern="2:4", progress=False)  # 16 sequences
    callback = LearnedSparsity(prior="sparsegpt", prior_strength=1e6, num_samples=16, lr=1e-3)
    make_trainer(max_steps=3, callbacks=[callback]).fit(module, tokens())
    masks, wanted = get_masks(module), get_masks(expected)
    assert masks.keys() == wanted.keys() and len(masks) == 7 and callback.converted and callback.learner is None
    assert_exactly_n_of_m(masks)
    dense_weights = dict(dense.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(mask, wanted[name]), name
        weight = module.get_parameter(name)  # frozen: the dense weight where kept, +0.0 where pruned
        assert torch.equal(weight[mask], dense_weights[name][mask]) and not weight[~mask].signbit().any(), name
        assert weight.requires_grad, name  # unfrozen again
    assert callback.current_sparsity == 0.5 and callback.warnings_recorded == []
    # the usual path from here: report, finalize, the 2:4 export and its loading
    assert sparsity_report(module).global_sparsity == pytest.approx(0.5, abs=0.01)
    finalize(module)
    assert module.state_dict().keys() == dense.state_dict().keys()
    path = save_sparse(module.model, tmp_path / "export", format="sparse-24-bitmask")
    loaded = load_sparse(path)
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_learning_changes_the_mask_and_every_final_mask_is_n_of_m() -> None:
    module = MLP()
    callback = LearnedSparsity(pattern="2:4", prior=None, lr=0.5, targets=["net.0", "net.2"], freeze_others=True)
    before = copy.deepcopy(module)
    make_trainer(max_epochs=3, callbacks=[callback]).fit(module, regression())
    masks = get_masks(module)
    assert sorted(masks) == ["net.0.weight", "net.2.weight"] and callback.step == 18
    assert_exactly_n_of_m(masks)
    head = module.net[4].weight
    assert torch.equal(head, before.net[4].weight)  # freeze_others: only the logits trained
    assert all(p.requires_grad for p in module.parameters())


def test_validation_uses_the_hard_mask_the_final_model_keeps() -> None:
    module = MLP()
    callback = LearnedSparsity(pattern="2:4", prior=None, lr=0.5, targets=["net.0", "net.2"], train_weights=True)
    make_trainer(max_epochs=2, callbacks=[callback]).fit(module, regression(), regression())
    last = torch.cat(module.validated[-6:])  # the last validation: 6 batches, after the last step
    module.eval()
    with torch.no_grad():
        final = torch.cat([module.net(x) for x, _ in regression()])
    assert torch.equal(last, final)


def test_gradient_accumulation_steps_the_logits_once_per_optimizer_step() -> None:
    module = MLP()
    callback = LearnedSparsity(pattern="2:4", prior=None, targets=["net.0"], end_step=100)
    make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[callback]).fit(module, regression())
    assert callback.step == 3  # 6 batches, 2 per optimizer step


def test_memory_per_weight_and_bf16_logits() -> None:
    module = MLP()
    fp32, bf16 = (
        LearnedSparsity(prior=None, targets=["net.0"], logits_dtype=dtype) for dtype in ("float32", "bfloat16")
    )
    for callback in (fp32, bf16):
        make_trainer(max_steps=2, callbacks=[callback]).fit(MLP(), regression())
    # 6 logits per group of 4 weights, AdamW's two moments each: 18 bytes per weight in fp32, 9 in bf16
    assert fp32.memory == {"logits": 6.0, "optimizer": 12.0, "total": 18.0}
    assert bf16.memory == {"logits": 3.0, "optimizer": 6.0, "total": 9.0}
    assert module.net[0].weight.dtype == torch.float32


class LogitsProbe(pl.Callback):
    """Keeps a copy of the learned logits at the last training batch (before `on_train_end` turns them into masks)."""

    def __init__(self, callback: LearnedSparsity) -> None:
        self.callback, self.logits, self.batches = callback, {}, []

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self.callback.learner is not None
        self.logits = {k: v.detach().clone() for k, v in self.callback.learner.logits.items()}
        self.batches.append(batch[0].clone())


def test_resume_mid_run_is_bitwise(tmp_path: Path) -> None:
    def fit(ckpt: str | None, root: Path) -> tuple[MLP, LearnedSparsity, LogitsProbe]:
        module = MLP()
        callback = LearnedSparsity(prior=None, lr=0.2, targets=["net.0", "net.2"], train_weights=True, regularizer=1e-3)
        probe = LogitsProbe(callback)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{step}")  # every epoch: 6 steps
        trainer = make_trainer(max_epochs=3, callbacks=[callback, probe, saver], enable_checkpointing=True)
        trainer.fit(module, regression(), ckpt_path=ckpt)
        return module, callback, probe

    straight, straight_callback, straight_probe = fit(None, tmp_path / "a")
    resumed, resumed_callback, resumed_probe = fit(str(tmp_path / "a" / "step=6.ckpt"), tmp_path / "b")
    assert straight_callback.step == resumed_callback.step == 18
    for name, logits in straight_probe.logits.items():
        assert torch.equal(resumed_probe.logits[name], logits), name
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    state = torch.load(tmp_path / "a" / "step=6.ckpt", weights_only=False)["callbacks"]
    (saved,) = [s for key, s in state.items() if key.startswith("LearnedSparsity")]
    assert saved["step"] == 6 and not saved["converted"] and set(saved["learning"]) == {"learner", "optimizer"}


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("end_step", [18, None])  # None: the length from `estimated_stepping_batches` (#20550)
def test_resume_mid_epoch_is_bitwise(tmp_path: Path, accumulate: int, end_step: int | None) -> None:
    def fit(ckpt: str | None, root: Path) -> tuple[MLP, LearnedSparsity, LogitsProbe]:
        module = MLP()
        callback = LearnedSparsity(
            prior=None, lr=0.2, targets=["net.0", "net.2"], train_weights=True, regularizer=1e-3,
            end_step=end_step and end_step // accumulate,
        )  # fmt: skip
        probe = LogitsProbe(callback)
        every = 4 // accumulate  # checkpoints after batches 4, 8, 12, 16 (6 batches per epoch)
        saver = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{step}", every_n_train_steps=every)
        trainer = make_trainer(
            max_epochs=3, accumulate_grad_batches=accumulate, callbacks=[callback, probe, saver],
            enable_checkpointing=True,
        )  # fmt: skip
        trainer.fit(module, ResumableLoader(regression()), ckpt_path=ckpt)
        return module, callback, probe

    straight, straight_callback, straight_probe = fit(None, tmp_path / "a")
    checkpoint = tmp_path / "a" / f"step={8 // accumulate}.ckpt"  # after 8 of 18 batches: 2 into epoch 1
    loop = torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]  # Lightning 2.6's checkpoint layout
    assert loop["epoch_progress"]["current"]["completed"] == 1
    assert loop["state_dict"]["combined_loader"] == [{"served": 2}]
    resumed, resumed_callback, resumed_probe = fit(str(checkpoint), tmp_path / "b")
    for ours, theirs in zip(resumed_probe.batches, straight_probe.batches[8:], strict=True):
        assert torch.equal(ours, theirs)  # the straight run's last 10 batches, not epoch 1 from its start
    assert straight_callback.step == resumed_callback.step == 18 // accumulate
    for name, logits in straight_probe.logits.items():  # after the last batch
        assert torch.equal(resumed_probe.logits[name], logits), name
    masks = get_masks(resumed)
    assert len(masks) == 2
    for name, mask in get_masks(straight).items():
        assert torch.equal(masks[name], mask), name
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"'8:16' has C\(M, N\)=12870 candidate patterns"):
        LearnedSparsity(pattern="8:16")
    with pytest.raises(ValueError, match="`tau_end`"):
        LearnedSparsity(tau_end=0.0)
    with pytest.raises(ValueError, match="`logits_dtype`"):
        LearnedSparsity(logits_dtype="float16")
    with pytest.raises(ValueError, match="`method`"):
        LearnedSparsity(prior="nope")
    module = MLP()

    class Sharded:
        strategy = ModelParallelStrategy()
        max_steps, max_epochs = 5, 1

    with pytest.raises(ValueError, match=r"`prior`='wanda' calibrates on whole weights.*prior=None or 'magnitude'"):
        LearnedSparsity(prior="wanda").preflight(module, Sharded())  # type: ignore[arg-type]

    class TwoRanks:
        strategy, world_size, max_steps, max_epochs = None, 2, 5, 1

    with pytest.raises(ValueError, match=r"`freeze_others`=True freezes parameters after DDP registered them"):
        LearnedSparsity(prior=None, freeze_others=True).preflight(module, TwoRanks())  # type: ignore[arg-type]
    set_mask(module.net[0], torch.ones_like(module.net[0].weight, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\['net.0.weight'\] .* already have masks"):
        make_trainer(max_steps=1, callbacks=[LearnedSparsity(prior=None, targets=["net.0"])]).fit(module, regression())
    assert module.net[0].weight.requires_grad  # nothing was frozen


def test_lora_recovery_after_the_learned_mask_keeps_its_2of4_zero_set() -> None:
    from lightning_prune import LoRARecovery

    module = llama()
    learned = LearnedSparsity(prior="magnitude", lr=1e-2)
    make_trainer(max_steps=3, callbacks=[learned]).fit(module, tokens())
    masks = {name: mask.clone() for name, mask in get_masks(module).items()}
    recovery = LoRARecovery(r=2, lr=5e-3)  # masked delta, merged at fit end
    make_trainer(max_steps=3, callbacks=[recovery]).fit(module, tokens())
    assert recovery.merged and len(masks) == 7
    for name, mask in masks.items():
        weight = module.get_parameter(name).detach()
        assert torch.equal(weight != 0, mask), name  # merged with the zero set kept: exactly the learned 2:4
        assert not weight[~mask].signbit().any(), name
