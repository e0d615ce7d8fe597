"""A LightningModule for classification: cross-entropy, torchmetrics Accuracy, fused AdamW."""

from __future__ import annotations

from collections import OrderedDict

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.models.optim import make_adamw
from lightning_prune.validation import check_integer, check_number

ARCHITECTURES = ("mlp", "cnn")


def build_digits_net(arch: str = "mlp", hidden: int = 256, num_classes: int = 10) -> nn.Module:
    """A small MLP or CNN for flat 8×8 digit images (64 features); the last layer is `classifier`."""
    if arch == "mlp":
        layers = [
            ("fc1", nn.Linear(64, hidden)),
            ("act1", nn.ReLU()),
            ("fc2", nn.Linear(hidden, hidden)),
            ("act2", nn.ReLU()),
        ]
    elif arch == "cnn":
        layers = [
            ("unflatten", nn.Unflatten(1, (1, 8, 8))),
            ("conv1", nn.Conv2d(1, 32, 3, padding=1)),
            ("act1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 64, 3, padding=1)),
            ("act2", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 4 * 4, hidden)),
            ("act3", nn.ReLU()),
        ]
    else:
        raise ValueError(f"`arch` must be one of {ARCHITECTURES}, got {arch!r}")
    return nn.Sequential(OrderedDict([*layers, ("classifier", nn.Linear(hidden, num_classes))]))


class ClassifierModule(pl.LightningModule):
    """Train any classifier `nn.Module` (or a built-in digits MLP/CNN) with cross-entropy.

    Batches are `(inputs, labels)`. Logs `train/loss`, `val/loss` and `val/acc` (torchmetrics
    `MulticlassAccuracy`, micro-averaged). `self.model` is the wrapped network: the pruning
    callbacks find its layers through the module, and the run saves its state dict.

    Example YAML (`lightning_prune/conf/model/digits_mlp.yaml`)::

        _target_: lightning_prune.models.ClassifierModule
        arch: mlp          # mlp | cnn (ignored when `model` is given)
        hidden: 256        # hidden width
        lr: 0.003          # AdamW learning rate
    """

    val_metric = "val/acc"  # what the run plots against sparsity
    val_metric_mode = "max"

    def __init__(
        self,
        model: nn.Module | None = None,
        arch: str = "mlp",
        hidden: int = 256,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_integer(num_classes, "num_classes", low=2)
        check_integer(hidden, "hidden", low=1)
        if check_number(lr, "lr") <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model if model is not None else build_digits_net(arch, hidden, num_classes)
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.model(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        loss = nn.functional.cross_entropy(self(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.val_accuracy.update(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels), prog_bar=True)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_adamw(self.parameters(), self.lr, self.weight_decay)
