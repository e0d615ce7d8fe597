"""Text corpora and tokenizers for the causal-LM demos (plain functions, no Lightning)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightning_prune.evaluate.perplexity import encode_text
from lightning_prune.validation import check_integer

END_OF_TEXT = "<|endoftext|>"


def pydoc_topics() -> list[str]:
    """The English help texts of CPython's `pydoc_data.topics`, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


# Every EVAL_TOPIC_EVERY-th topic in sorted-name order (index % EVAL_TOPIC_EVERY == 0) is evaluation text.
EVAL_TOPIC_EVERY = 5


def pydoc_topic_split() -> tuple[list[str], list[str]]:
    """(training documents, evaluation documents) of `pydoc_data.topics`, split by topic name.

    The topics are sorted by name; every fifth one starting with the first (index % 5 == 0: 16 of
    Python 3.11's 79 topics, ~69k of ~465k characters) is evaluation text, the others are for
    training and calibration. The topics share text (`if` and `else` are the same page; the
    `compound` page repeats `for`, `while`, ...), so every paragraph (text between blank lines)
    that also occurs in an evaluation topic is removed from the training topics: no evaluation
    paragraph is ever seen in calibration or training, and the rule needs no seed.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    evaluation = [topics[name] for index, name in enumerate(names) if index % EVAL_TOPIC_EVERY == 0]
    held_out = {paragraph.strip() for document in evaluation for paragraph in document.split("\n\n")}
    train = []
    for index, name in enumerate(names):
        if index % EVAL_TOPIC_EVERY != 0:
            kept = [p for p in topics[name].split("\n\n") if p.strip() not in held_out]
            if any(p.strip() for p in kept):
                train.append("\n\n".join(kept))
    return train, evaluation


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
    """A tokenizer saved locally (`save_pretrained` directory) or the one inside a GGUF file; nothing is downloaded."""
    location = Path(path).expanduser()
    if location.is_file() and location.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(location.parent), gguf_file=location.name, local_files_only=True)
    if not location.is_dir():
        raise ValueError(
            f"`tokenizer`={path!r} is neither a local directory (a `save_pretrained` folder) nor a .gguf file"
        )
    return AutoTokenizer.from_pretrained(str(location), local_files_only=True)


def encode_documents(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> list[int]:
    """Token ids of all documents, each followed by the end-of-sequence token when there is one."""
    return encode_text(tokenizer, list(documents))
