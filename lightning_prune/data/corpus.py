"""Text corpora and tokenizers for the causal-LM demos (plain functions, no Lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_prune.validation import check_integer

END_OF_TEXT = "<|endoftext|>"


def pydoc_topics() -> list[str]:
    """The English help texts of CPython's `pydoc_data.topics`, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def read_documents(files: Sequence[str] | None) -> list[str]:
    """One document per file (UTF-8), or the bundled `pydoc_topics` when `files` is None or empty."""
    if not files:
        return pydoc_topics()
    documents = []
    for file in files:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ValueError(f"`files` entry {str(file)!r} is not a readable file")
        documents.append(path.read_text(encoding="utf-8"))
    if not any(doc.strip() for doc in documents):
        raise ValueError(f"`files`={list(files)!r} contain no text")
    return documents


def train_bpe_tokenizer(documents: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens trained on `documents`.

    Byte-level pre-tokenization (as GPT-2) means every input is encodable: no unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if check_integer(vocab_size, "vocab_size") < 257:
        raise ValueError(f"`vocab_size` must be >= 257 (256 bytes + end-of-text), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """A tokenizer saved locally (`save_pretrained` directory); nothing is downloaded."""
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"`tokenizer`={path!r} is not a local directory (a `save_pretrained` folder)")
    return AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)


def encode_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> list[int]:
    """Token ids of all documents, each followed by the end-of-sequence token when there is one."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return ids
