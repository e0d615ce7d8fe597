"""A causal-LM LightningDataModule: documents → tokens → fixed-length blocks."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lightning_prune.data.corpus import (
    encode_documents,
    load_tokenizer,
    pydoc_topic_split,
    read_documents,
    train_bpe_tokenizer,
)
from lightning_prune.evaluate.perplexity import pad_windows, perplexity_windows
from lightning_prune.validation import check_choice, check_fraction, check_integer, check_optional_integer

SPLITS = ("tail", "topics")


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


class WindowDataset(Dataset[dict[str, torch.Tensor]]):
    """Perplexity windows (`perplexity_windows`): `{"input_ids", "labels"}` rows, batched by `pad_windows`."""

    def __init__(self, windows: list[dict[str, torch.Tensor]]) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.windows[index]


class TextDataModule(pl.LightningDataModule):
    """Text for causal language modelling, split into train/validation token streams.

    By default the corpus is the English text of CPython's `pydoc_data.topics` (~465k characters,
    no download); `files=[...]` reads your own UTF-8 files instead. `tokenizer` is a local
    `save_pretrained` directory or a .gguf file; without one, a byte-level BPE tokenizer of
    `vocab_size` tokens is trained on the training documents. Training batches are
    `{"input_ids": (B, seq_len)}`. How validation text is held out (`split`):

    - `tail`: the last `val_fraction` of the token stream, in blocks of `seq_len`.
    - `topics` (pydoc only): whole topics held out by name (`pydoc_topic_split`: every fifth topic in
      sorted order), so calibration and training text never overlap it. Validation is then the
      windows of `evaluate_perplexity` (non-overlapping, `seq_len` tokens, the short last one
      padded), so `val/ppl` counts exactly the tokens `evaluate_perplexity(..., seq_len=seq_len)`
      counts on the same text. `val_fraction` is not used.

    `val_windows` keeps the first validation blocks or windows only (a cheaper evaluation).

    Example YAML (`lightning_prune/conf/data/text.yaml`)::

        _target_: lightning_prune.data.TextDataModule
        files: null        # list of text files; null = pydoc_data.topics
        tokenizer: null    # local tokenizer directory or .gguf file; null = train a BPE tokenizer
        seq_len: 64        # tokens per block
        split: tail        # tail | topics (pydoc topics held out by name)
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
        split: str = "tail",
        val_windows: int | None = None,
    ) -> None:
        super().__init__()
        check_integer(seq_len, "seq_len", low=2)
        check_integer(batch_size, "batch_size", low=1)
        check_fraction(val_fraction, "val_fraction")
        self.split = check_choice(split, "split", SPLITS)
        self.val_windows = check_optional_integer(val_windows, "val_windows", low=1)
        if split == "topics" and files:
            raise ValueError(
                f"`split`='topics' holds out pydoc topics by name and reads no `files`, got files={list(files)!r}; "
                "use split='tail' with your files"
            )
        self.files = list(files) if files else None
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.vocab_size = vocab_size
        self.num_workers = num_workers
        self.documents, self.eval_documents = (
            pydoc_topic_split() if split == "topics" else (read_documents(self.files), [])
        )
        self.tokenizer: PreTrainedTokenizerBase = (
            load_tokenizer(tokenizer) if tokenizer else train_bpe_tokenizer(self.documents, vocab_size)
        )
        self.train_set: BlockDataset | None = None
        self.val_set: BlockDataset | WindowDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Tokenise once and cut the train and validation streams into blocks."""
        if self.train_set is not None:
            return
        ids = encode_documents(self.tokenizer, self.documents)
        if self.split == "topics":
            train = to_blocks(ids, self.seq_len)
            windows = perplexity_windows(encode_documents(self.tokenizer, self.eval_documents), self.seq_len)
            val: BlockDataset | WindowDataset = WindowDataset(windows[: self.val_windows])
        else:
            cut = round(len(ids) * (1.0 - self.val_fraction))
            train, val = to_blocks(ids[:cut], self.seq_len), BlockDataset(to_blocks(ids[cut:], self.seq_len))
        if len(train) == 0 or len(val) == 0:
            raise ValueError(
                f"the corpus has {len(ids)} tokens: too few for `seq_len`={self.seq_len} blocks in both splits "
                f"(`val_fraction`={self.val_fraction}); give more text in `files` or a smaller `seq_len`"
            )
        if isinstance(val, BlockDataset):
            val = BlockDataset(val.blocks[: self.val_windows])
        self.train_set, self.val_set = BlockDataset(train), val

    def splits(self) -> tuple[BlockDataset, BlockDataset | WindowDataset]:
        """The (train, validation) block datasets, set up on first use."""
        self.setup()
        assert self.train_set is not None and self.val_set is not None  # setup() sets both
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Shuffled training blocks."""
        return DataLoader(self.splits()[0], batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """Validation blocks (or `topics` windows, padded) in order."""
        val = self.splits()[1]
        if isinstance(val, BlockDataset):
            return DataLoader(val, batch_size=self.batch_size, num_workers=self.num_workers)
        pad_id = self.tokenizer.pad_token_id or 0
        return DataLoader(
            val,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=functools.partial(pad_windows, pad_id=pad_id),
        )

    def test_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        """The validation blocks."""
        return self.val_dataloader()
