"""Demo data modules: digits split/standardisation, text blocks, tokenizers and files."""

import pytest
import torch

from lightning_prune.data import DigitsDataModule, TextDataModule
from lightning_prune.data.corpus import pydoc_topics
from lightning_prune.data.text import to_blocks


def test_digits_split_is_seeded_and_standardised() -> None:
    first, second, other = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for module in (first, second, other):
        module.setup()
    assert len(first.train_set) + len(first.val_set) == 1797
    assert len(first.val_set) == round(0.2 * 1797)
    assert torch.equal(first.val_set.tensors[1], second.val_set.tensors[1])
    assert not torch.equal(first.val_set.tensors[1], other.val_set.tensors[1])
    features = first.train_set.tensors[0]
    assert features.mean(0).abs().max() < 1e-5
    std = features.std(0)
    assert torch.all(((std - 1).abs() < 1e-4) | (std < 1e-6))  # constant border pixels stay constant
    assert first.val_set.tensors[0].abs().max() < 100


def test_to_blocks_drops_the_tail() -> None:
    assert to_blocks(list(range(7)), 3).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.fixture(scope="module")
def text() -> TextDataModule:
    module = TextDataModule(seq_len=32, vocab_size=512)
    module.setup()
    return module


def test_text_defaults_to_pydoc_topics_with_trained_bpe(text: TextDataModule) -> None:
    assert text.documents == pydoc_topics()
    assert len(text.tokenizer) <= 512
    batch = next(iter(text.train_dataloader()))
    assert batch["input_ids"].shape == (16, 32)
    assert int(batch["input_ids"].max()) < len(text.tokenizer)
    # Byte-level BPE round-trips any text exactly.
    sample = "def f(x):\n    return x ** 2  # ünïcode"
    assert text.tokenizer.decode(text.tokenizer(sample)["input_ids"]) == sample


def test_text_split_by_position(text: TextDataModule) -> None:
    total = len(text.train_set) + len(text.val_set)
    assert abs(len(text.val_set) / total - 0.1) < 0.01


def test_text_files_and_saved_tokenizer(tmp_path, text: TextDataModule) -> None:
    file = tmp_path / "mine.txt"
    file.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    text.tokenizer.save_pretrained(tmp_path / "tok")
    module = TextDataModule(files=[str(file)], tokenizer=str(tmp_path / "tok"), seq_len=8, batch_size=2)
    module.setup()
    assert module.documents == [file.read_text(encoding="utf-8")]
    assert len(module.tokenizer) == len(text.tokenizer)
    assert len(module.train_set) > len(module.val_set) > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"files": ["/no/such/file.txt"]}, "`files` entry '/no/such/file.txt'"),
        ({"tokenizer": "/no/such/dir"}, "`tokenizer`='/no/such/dir'"),
        ({"seq_len": 1}, "`seq_len` must be"),
        ({"val_fraction": 1.5}, "`val_fraction` must be in"),
        ({"vocab_size": 100}, "`vocab_size` must be >= 257"),
    ],
)
def test_text_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_digits_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`batch_size` must be"):
        DigitsDataModule(batch_size=0)
