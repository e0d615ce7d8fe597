"""Demo data modules: digits split/standardisation, text blocks, tokenizers and files."""

import pytest
import torch
from conftest import make_trainer, tiny_llama_config

from lightning_prune import evaluate_perplexity
from lightning_prune.data import DigitsDataModule, TextDataModule
from lightning_prune.data.corpus import encode_documents, pydoc_topic_split, pydoc_topics
from lightning_prune.data.text import to_blocks
from lightning_prune.evaluate import perplexity_windows
from lightning_prune.models import CausalLMModule


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


def test_pydoc_topic_split_holds_out_every_fifth_topic_by_name() -> None:
    from pydoc_data.topics import topics

    train, evaluation = pydoc_topic_split()
    names = sorted(topics)
    assert evaluation == [topics[name] for name in names[::5]]
    # Topics share text: every shared paragraph stays on the evaluation side only.
    held_out = {p.strip() for document in evaluation for p in document.split("\n\n")}
    kept = [p.strip() for document in train for p in document.split("\n\n")]
    assert not held_out & set(kept) and topics["if"] == topics["else"] and topics["else"] in evaluation
    assert 0.1 < sum(map(len, evaluation)) / sum(map(len, train + evaluation)) < 0.25
    raw = sum(len(topics[name]) for index, name in enumerate(names) if index % 5)
    assert 0.85 < sum(map(len, train)) / raw < 0.95  # what is removed is the shared text, ~9%


def test_text_topics_split_validates_on_the_perplexity_windows(tmp_path, text: TextDataModule) -> None:
    text.tokenizer.save_pretrained(tmp_path / "tok")
    module = TextDataModule(tokenizer=str(tmp_path / "tok"), seq_len=32, batch_size=4, split="topics")
    train_docs, eval_docs = pydoc_topic_split()
    assert module.documents == train_docs
    train_set, val_set = module.splits()
    eval_ids = encode_documents(module.tokenizer, eval_docs)
    assert len(train_set) == len(encode_documents(module.tokenizer, train_docs)) // 32
    windows = perplexity_windows(eval_ids, 32)
    assert len(val_set) == len(windows) and torch.equal(val_set[3]["labels"], windows[3]["labels"])
    batch = next(iter(module.val_dataloader()))
    assert batch["labels"][:, 0].tolist() == [-100] * 4 and batch["attention_mask"].all()
    # val/ppl of the LightningModule counts exactly the tokens evaluate_perplexity counts on the same text.
    torch.manual_seed(0)
    model = CausalLMModule(config=tiny_llama_config(vocab_size=512, max_position_embeddings=32))
    short = TextDataModule(tokenizer=str(tmp_path / "tok"), seq_len=32, batch_size=4, split="topics", val_windows=6)
    logged = make_trainer().validate(model, datamodule=short, verbose=False)[0]["val/ppl"]
    expected = evaluate_perplexity(model.model, module.tokenizer, text=eval_docs, seq_len=32, max_windows=6)
    assert expected.windows == 6 and expected.tokens == 6 * 31
    assert logged == pytest.approx(expected.ppl, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split": "middle"}, "`split` must be one of"),
        (
            {"split": "topics", "files": ["a.txt"]},
            "`split`='topics' holds out pydoc topics by name and reads no `files`",
        ),
        ({"files": ["/no/such/file.txt"]}, "`files` entry '/no/such/file.txt'"),
        ({"tokenizer": "/no/such/dir"}, "`tokenizer`='/no/such/dir' is neither a local directory"),
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
