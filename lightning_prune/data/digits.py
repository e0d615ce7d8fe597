"""scikit-learn's 8×8 handwritten digits as a LightningDataModule (the quickstart's data)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.validation import check_fraction, check_integer

NUM_FEATURES = 64
NUM_CLASSES = 10


class DigitsDataModule(pl.LightningDataModule):
    """The 1797 digits of `sklearn.datasets.load_digits`, standardised, split train/validation.

    Features are standardised with the training split's per-pixel mean and standard deviation;
    the split is a seeded random permutation, so a given `seed` always gives the same split.
    Batches are `(features, labels)`: float32 `(B, 64)` and int64 `(B,)`.

    Example YAML (`lightning_prune/conf/data/digits.yaml`)::

        _target_: lightning_prune.data.DigitsDataModule
        batch_size: 64      # samples per batch
        val_fraction: 0.2   # share of the samples held out for validation
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        check_integer(batch_size, "batch_size", low=1)
        check_fraction(val_fraction, "val_fraction")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardise once (later calls keep the same tensors)."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        features = torch.as_tensor(features, dtype=torch.float32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        n_val = max(1, round(self.val_fraction * len(labels)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        mean = features[train_idx].mean(0)
        std = features[train_idx].std(0)
        # Border pixels are constant in training: divide those by 1, not by ~0 (a rare non-zero
        # border pixel in validation would otherwise become a huge outlier).
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        features = (features - mean) / std
        self.train_set = TensorDataset(features[train_idx], labels[train_idx])
        self.val_set = TensorDataset(features[val_idx], labels[val_idx])

    def splits(self) -> tuple[TensorDataset, TensorDataset]:
        """The (train, validation) datasets, set up on first use."""
        self.setup()
        assert self.train_set is not None and self.val_set is not None  # setup() sets both
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Shuffled training batches (seeded through Lightning's `seed_everything`)."""
        return DataLoader(self.splits()[0], batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """Validation batches in a fixed order."""
        return DataLoader(self.splits()[1], batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        """The validation split (digits has no separate test split here)."""
        return self.val_dataloader()
