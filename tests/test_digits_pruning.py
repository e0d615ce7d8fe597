"""Integration on real data: a digits MLP trained dense, then pruned to 90% during fine-tuning."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_prune import GradualPruning, IterativePruning, sparsity_report
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ClassifierModule
from lightning_prune.selection import prune_count
from tests.conftest import make_trainer

DENSE_EPOCHS = 8


def accuracy(module: ClassifierModule, data: DigitsDataModule) -> float:
    return float(make_trainer().validate(module, datamodule=data, verbose=False)[0]["val/acc"])


@pytest.fixture(scope="module")
def dense() -> tuple[dict[str, torch.Tensor], float]:
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    module = ClassifierModule(arch="mlp", hidden=256, lr=3e-3)
    make_trainer(max_epochs=DENSE_EPOCHS).fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.state_dict().items()}, accuracy(module, data)


def fine_tune(
    dense_state: dict[str, torch.Tensor], callback: pl.Callback, epochs: int
) -> tuple[ClassifierModule, float]:
    pl.seed_everything(1, verbose=False)
    data = DigitsDataModule(batch_size=64)
    module = ClassifierModule(arch="mlp", hidden=256, lr=1e-3)
    module.load_state_dict(dense_state)
    make_trainer(max_epochs=epochs, callbacks=[callback]).fit(module, datamodule=data)
    return module, accuracy(module, data)


def test_dense_baseline_learns(dense: tuple[dict, float]) -> None:
    assert dense[1] > 0.95


def test_gradual_pruning_to_90_percent_keeps_accuracy(dense: tuple[dict, float]) -> None:
    state, dense_accuracy = dense
    pruning = GradualPruning(0.9, start_step=0, end_step=23 * 4, frequency=10)  # 23 batches per epoch
    module, pruned_accuracy = fine_tune(state, pruning, epochs=6)
    report = sparsity_report(module)
    assert [layer.name for layer in report.layers] == ["model.fc1.weight", "model.fc2.weight"]
    assert all(layer.zeros == prune_count(layer.numel, 0.9) for layer in report.layers)
    assert pruned_accuracy >= dense_accuracy - 0.02, (pruned_accuracy, dense_accuracy)


def test_iterative_pruning_with_rewind_to_90_percent_keeps_accuracy(dense: tuple[dict, float]) -> None:
    state, dense_accuracy = dense
    # Rewind to the start of fine-tuning (the dense weights), Frankle & Carbin's recipe on a trained net.
    pruning = IterativePruning(0.9, cycles=3, epochs_per_cycle=1, rewind="init")
    module, pruned_accuracy = fine_tune(state, pruning, epochs=5)  # 2 epochs after the last rewind
    report = sparsity_report(module)
    assert all(layer.zeros == prune_count(layer.numel, 0.9) for layer in report.layers)
    assert pruned_accuracy >= dense_accuracy - 0.02, (pruned_accuracy, dense_accuracy)
