"""Gradual magnitude pruning as one Lightning callback: `GradualPruning` on the digits demo classifier.

`ClassifierModule` and `DigitsDataModule` stand in for your own LightningModule and DataModule;
the callback finds the layers, follows the cubic schedule from `start_step` to `end_step`, keeps
pruned weights at +0.0 through every optimizer step and, with `finalize_on_end=True`, leaves a
plain module at the end of `fit`.

    python examples/lightning_callback.py                  # 90% sparsity, seconds on a CPU
    python examples/lightning_callback.py --sparsity 0.75 --epochs 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_prune import GradualPruning, get_masks, sparsity_report
from lightning_prune.data import DigitsDataModule
from lightning_prune.models import ClassifierModule


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fit with GradualPruning; print and return the pruned layers' sparsity and validation accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="final fraction of zeros in every pruned layer")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = ClassifierModule(arch="mlp", hidden=args.hidden, lr=3e-3)
    steps_per_epoch = len(data.train_dataloader())
    pruning = GradualPruning(
        sparsity=args.sparsity,
        start_step=0,
        end_step=max(1, 3 * args.epochs * steps_per_epoch // 4),  # then a quarter of training to recover
        frequency=10,
        schedule="cubic",
        finalize_on_end=True,
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[pruning],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=data)
    (metrics,) = trainer.validate(model, datamodule=data, verbose=False)
    report = sparsity_report(model, pruning.targets, patterns={t.name: pruning.pattern for t in pruning.targets})
    print(report)
    print(f"sparsity {report.global_sparsity:.4f}")
    print(f"validation accuracy {metrics['val/acc']:.4f}")
    print(f"masks left after finalize: {len(get_masks(model))}")
    return {
        "sparsity": report.global_sparsity,
        "accuracy": float(metrics["val/acc"]),
        "masks_left": float(len(get_masks(model))),
    }


if __name__ == "__main__":
    main()
