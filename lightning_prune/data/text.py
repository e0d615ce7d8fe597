"""A causal-LM LightningDataModule: documents → tokens → fixed-length blocks."""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_prune.data.corpus import encode_documents, load_tokenizer, read_documents, train_bpe_tokenizer
from lightning_prune.validation import check_fraction, check_integer


class BlockDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of a `(blocks, seq_len)` id tensor as `{"input_ids": row}` (labels are the inputs)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


def to_blocks(ids: Sequence[int], seq_len: int) -> torch.Tensor:
    """Cut a token stream into `(n, seq_len)` blocks, dropping the incomplete tail."""
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).reshape(n, seq_len)


class TextDataModule(pl.LightningDataModule):
    """Text for causal language modelling, split by position into train/validation token streams.

    By default the corpus is the English text of CPython's `pydoc_data.topics` (~465k characters,
    no download); `files=[...]` reads your own UTF-8 files instead. `tokenizer` is a local
    `save_pretrained` directory; without one, a byte-level BPE tokenizer of `vocab_size` tokens is
    trained on the training documents. The last `val_fraction` of the token stream is validation,
    so no validation text is seen in training. Batches are `{"input_ids": (B, seq_len)}`.

    Example YAML (`lightning_prune/conf/data/text.yaml`)::

        _target_: lightning_prune.data.TextDataModule
        files: null        # list of text files; null = pydoc_data.topics
        tokenizer: null    # local tokenizer directory; null = train a BPE tokenizer
        seq_len: 64        # tokens per block
    """

    def __init__(
        self,
        files: Sequence[str] | None = None,
        tokenizer: str | None = None,
        seq_len: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        vocab_size: int = 2048,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_integer(seq_len, "seq_len", low=2)
        check_integer(batch_size, "batch_size", low=1)
        check_fraction(val_fraction, "val_fraction")
        self.files = list(files) if files else None
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.documents = read_documents(self.files)
        self.tokenizer: PreTrainedTokenizerBase = (
            load_tokenizer(tokenizer) if tokenizer else train_bpe_tokenizer(self.documents, vocab_size)
        )
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Tokenise once and cut the train and validation streams into blocks."""
        if self.train_set is not None:
            return
        ids = encode_documents(self.tokenizer, self.documents)
        split = round(len(ids) * (1.0 - self.val_fraction))
        train, val = to_blocks(ids[:split], self.seq_len), to_blocks(ids[split:], self.seq_len)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(
                f"the corpus has {len(ids)} tokens: too few for `seq_len`={self.seq_len} blocks in both splits "
                f"(`val_fraction`={self.val_fraction}); give more text in `files` or a smaller `seq_len`"
            )
        self.train_set, self.val_set = BlockDataset(train), BlockDataset(val)

    def splits(self) -> tuple[BlockDataset, BlockDataset]:
        """The (train, validation) block datasets, set up on first use."""
        self.setup()
        assert self.train_set is not None and self.val_set is not None  # setup() sets both
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Shuffled training blocks."""
        return DataLoader(self.splits()[0], batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Validation blocks in order."""
        return DataLoader(self.splits()[1], batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """The validation blocks."""
        return self.val_dataloader()
