"""IterativePruning: cycles reach the target, lottery-ticket rewind, small state, errors, resume."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_prune import IterativePruning, get_mask
from lightning_prune.selection import prune_count
from tests.conftest import TinyRegressor, make_trainer

SIZES = (8 * 32, 32 * 32)


def zero_fractions(sparsity: float) -> list[float]:
    return [prune_count(n, sparsity) / n for n in SIZES]


def target_weights(module: TinyRegressor) -> dict[str, torch.Tensor]:
    return {f"net.{i}.weight": module.net[i].weight.detach().clone() for i in (0, 2)}


class AfterLastRewind(pl.Callback):
    """Copies the targets' weights and the optimizer state when epoch `epoch` starts (right after a rewind)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.weights: dict[str, torch.Tensor] = {}
        self.optimizer_state: dict | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.weights = target_weights(pl_module)
            self.optimizer_state = dict(trainer.optimizers[0].state)


def test_cycles_reach_the_target_with_a_constant_fraction_per_cycle() -> None:
    module = TinyRegressor()
    pruning = IterativePruning(0.875, cycles=3, epochs_per_cycle=1)
    make_trainer(max_epochs=4, callbacks=[pruning]).fit(module)
    # 1 − 0.125^(c/3): 0.5, 0.75, 0.875 — each cycle prunes half of what is left.
    assert [pruning.sparsity_after(c) for c in range(4)] == pytest.approx([0.0, 0.5, 0.75, 0.875])
    steps = [zero_fractions(s) for s in (0.0, 0.5, 0.75, 0.875) for _ in range(4)]
    assert module.zeros_seen == steps
    assert pruning.cycles_done == 3 and pruning.current_sparsity == 0.875
    assert module.net[0].weight.eq(0).float().mean() == 0.875  # exact after the fine-tuning epoch


def test_rewind_init_restores_survivors_and_resets_the_optimizer() -> None:
    module = TinyRegressor()
    initial = target_weights(module)
    head_before = module.net[4].weight.detach().clone()
    pruning = IterativePruning(0.75, cycles=2, epochs_per_cycle=1, rewind="init")
    probe = AfterLastRewind(epoch=2)  # the final ticket trains in epoch 2; look at it before it does
    trainer = make_trainer(max_epochs=3, callbacks=[pruning, probe])
    trainer.fit(module)
    for name, weight in probe.weights.items():
        keep = get_mask(module.get_submodule(name.rsplit(".", 1)[0]))
        assert torch.equal(weight, torch.where(keep, initial[name], 0.0)), name
        assert int((~keep).sum()) == prune_count(weight.numel(), 0.75)
    assert not torch.equal(module.net[4].weight, head_before)  # only targets are rewound
    assert probe.optimizer_state == {}


def test_optimizer_state_restarts_after_each_rewind() -> None:
    pruning = IterativePruning(0.5, cycles=1, epochs_per_cycle=1, rewind="init")
    trainer = make_trainer(max_epochs=3, callbacks=[pruning])
    trainer.fit(TinyRegressor())
    # Pruned (and reset) after epoch 1, then two more epochs of 4 steps each.
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {8}


def test_rewind_to_step_uses_the_weights_at_that_step() -> None:
    reference = TinyRegressor()
    make_trainer(max_steps=2).fit(reference)  # same data, same init: the weights at step 2
    at_step_2 = target_weights(reference)
    module = TinyRegressor()
    pruning = IterativePruning(0.5, cycles=1, epochs_per_cycle=1, rewind=2)
    probe = AfterLastRewind(epoch=1)
    make_trainer(max_epochs=2, callbacks=[pruning, probe]).fit(module)
    for name, weight in probe.weights.items():
        keep = get_mask(module.get_submodule(name.rsplit(".", 1)[0]))
        assert torch.equal(weight, torch.where(keep, at_step_2[name], 0.0)), name


def test_state_dict_holds_tensors_only_and_no_module_copies() -> None:
    module = TinyRegressor()
    pruning = IterativePruning(0.5, cycles=2, epochs_per_cycle=1, rewind="init")
    make_trainer(max_epochs=3, callbacks=[pruning]).fit(module)
    state = pruning.state_dict()

    def leaves(value: object) -> list:
        if isinstance(value, dict):
            return [leaf for item in value.values() for leaf in leaves(item)]
        return [value]

    assert not any(isinstance(leaf, nn.Module) for leaf in leaves(state))
    assert sorted(state["snapshot"]) == sorted(state["masks"]) == ["net.0.weight", "net.2.weight"]
    assert all(mask.dtype == torch.bool for mask in state["masks"].values())
    snapshot_bytes = sum(t.numel() * t.element_size() for t in state["snapshot"].values())
    assert snapshot_bytes == 4 * sum(SIZES)  # the targets' weights only, fp32


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cycles=0), r"`cycles` must be an integer >= 1, got 0"),
        (dict(epochs_per_cycle=0), r"`epochs_per_cycle` must be an integer >= 1, got 0"),
        (dict(rewind="start"), r"`rewind` must be None, 'init' or a step >= 0, got 'start'"),
        (dict(rewind=-1), r"`rewind` .*got -1"),
        (dict(rewind=True), r"`rewind` .*got True"),
        (dict(sparsity=1.2), r"`sparsity` must be a number in \[0, 1\), got 1.2"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    arguments = {**dict(sparsity=0.5, cycles=2, epochs_per_cycle=1), **kwargs}
    with pytest.raises(ValueError, match=match):
        IterativePruning(**arguments)


def test_too_few_epochs_raise_before_training() -> None:
    module = TinyRegressor()
    trainer = make_trainer(max_epochs=3, callbacks=[IterativePruning(0.5, cycles=2, epochs_per_cycle=2)])
    with pytest.raises(ValueError, match=r"needs Trainer\(max_epochs>=4\), got max_epochs=3"):
        trainer.fit(module)
    assert module.training_steps == 0


def run(ckpt_path: str | None = None, save_dir: Path | None = None) -> tuple[TinyRegressor, IterativePruning]:
    module = TinyRegressor()
    pruning = IterativePruning(0.75, cycles=2, epochs_per_cycle=1, rewind=1)
    callbacks: list = [pruning]
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
    trainer = make_trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=save_dir is not None)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, pruning


def test_resume_between_cycles_is_bitwise_equal(tmp_path: Path) -> None:
    straight, straight_cb = run(save_dir=tmp_path)  # checkpoints after each epoch (after its pruning)
    resumed, resumed_cb = run(ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed_cb.cycles_done == straight_cb.cycles_done == 2
    assert all(torch.equal(straight_cb.snapshot[k], resumed_cb.snapshot[k]) for k in straight_cb.snapshot)
    assert resumed.zeros_seen == straight.zeros_seen[4:]


def test_rewind_without_epochs_for_the_final_ticket_is_refused_before_training() -> None:
    module = TinyRegressor()
    pruning = IterativePruning(0.5, cycles=2, epochs_per_cycle=2, rewind="init")
    trainer = make_trainer(max_epochs=4, callbacks=[pruning])
    message = (
        r"`rewind`='init' .* `cycles`=2 .* `epochs_per_cycle`=2 more epochs .* "
        r"Trainer\(max_epochs>=6\), got max_epochs=4"
    )
    with pytest.raises(ValueError, match=message):
        pruning.preflight(module, trainer)  # what a pipeline calls before its dense phase
    with pytest.raises(ValueError, match=message):
        trainer.fit(module)
    assert module.training_steps == 0
    IterativePruning(0.5, cycles=2, epochs_per_cycle=2).preflight(module, trainer)  # no rewind: 4 epochs suffice


def test_early_end_warns_and_records_the_shortfall() -> None:
    class StopAfterFirstEpoch(pl.Callback):  # what EarlyStopping does when its metric stalls
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trainer.should_stop = True

    pruning = IterativePruning(0.75, cycles=2, epochs_per_cycle=1)
    with pytest.warns(UserWarning, match=r"IterativePruning ended at sparsity 0.5000, below its target 0.75"):
        make_trainer(max_epochs=3, callbacks=[pruning, StopAfterFirstEpoch()]).fit(TinyRegressor())
    assert [(w["kind"], w["target"], w["achieved"]) for w in pruning.warnings_recorded] == [
        ("sparsity_shortfall", 0.75, 0.5)
    ]
