"""Perplexity of a causal LM on held-out text: exp of the mean next-token negative log-likelihood.

The text is one token stream cut into windows of `seq_len` tokens. Non-overlapping windows (the
default, `stride` = `seq_len`) predict every token of a window but its first, which has no context;
strided windows (`stride` < `seq_len`, the Hugging Face perplexity guide's sliding window) give
every token up to `seq_len - stride` tokens of context and count each predicted token once: a window
counts only the tokens after the previous window's end. Padding (the shorter last window in a batch)
is never counted. The counts are exact and returned, so two results on the same windows compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from lightning_prune.validation import check_integer, check_optional_integer

IGNORE_INDEX = -100  # labels that are not predicted (the Hugging Face loss convention)


@dataclass(frozen=True)
class PerplexityResult:
    """`ppl` = exp(`nll`); `nll` = mean negative log-likelihood (nats) of the `tokens` predicted tokens
    over `windows` sequences."""

    ppl: float
    nll: float
    tokens: int
    windows: int

    def as_dict(self) -> dict[str, float | int]:
        """The four numbers as a dict (for results.json and tables)."""
        return asdict(self)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str | Sequence[str]) -> list[int]:
    """Token ids of `text` (no special tokens); a sequence of documents is joined, each followed by
    the end-of-sequence token when the tokenizer has one."""
    documents = [text] if isinstance(text, str) else list(text)
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        if eos is not None and not isinstance(text, str):
            ids.append(eos)
    return ids


def perplexity_windows(
    ids: Sequence[int] | torch.Tensor, seq_len: int, stride: int | None = None, max_windows: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The token stream `ids` as windows `{"input_ids": (n,), "labels": (n,)}` with n <= `seq_len`.

    Windows start every `stride` tokens (default `seq_len`: non-overlapping). A window's labels are
    its ids where the token is predicted here and -100 elsewhere: its first token, and with a stride
    the tokens an earlier window already predicted. The last window may be shorter; a window that
    predicts nothing is dropped. `max_windows` keeps the first ones.
    """
    check_integer(seq_len, "seq_len", low=2)
    step = seq_len if stride is None else check_integer(stride, "stride", low=1)
    if step > seq_len:
        raise ValueError(f"`stride` must be in [1, seq_len={seq_len}], got {stride}")
    limit = check_optional_integer(max_windows, "max_windows", low=1)
    stream = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    total, windows, previous_end = stream.numel(), [], 0
    for begin in range(0, total, step):
        end = min(begin + seq_len, total)
        first = max(previous_end, begin + 1)  # the first position this window predicts
        if end > first:
            labels = stream[begin:end].clone()
            labels[: first - begin] = IGNORE_INDEX
            windows.append({"input_ids": stream[begin:end].clone(), "labels": labels})
        previous_end = end
        if end == total or (limit is not None and len(windows) == limit):
            break
    return windows


def pad_windows(windows: Sequence[Mapping[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """A batch of windows padded on the right: `input_ids`, `attention_mask` (0 on padding) and
    `labels` (-100 on padding), each `(B, longest)`. A DataLoader `collate_fn`."""
    longest = max(int(window["input_ids"].numel()) for window in windows)
    batch = {
        "input_ids": torch.full((len(windows), longest), pad_id, dtype=torch.int64),
        "attention_mask": torch.zeros((len(windows), longest), dtype=torch.int64),
        "labels": torch.full((len(windows), longest), IGNORE_INDEX, dtype=torch.int64),
    }
    for row, window in enumerate(windows):
        n = int(window["input_ids"].numel())
        batch["input_ids"][row, :n] = window["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = window.get("labels", window["input_ids"])
    return batch


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """(summed next-token negative log-likelihood in float64, tokens counted) of `(B, T, V)` logits.

    Position t predicts label t+1 (the Hugging Face shift); labels of -100 and positions whose
    `attention_mask` is 0 are not counted. Computed row by row in float32 to bound the memory.
    """
    targets = labels[:, 1:].clone()
    if attention_mask is not None:
        targets[attention_mask[:, 1:] == 0] = IGNORE_INDEX
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(logits.shape[0]):
        nll = F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=IGNORE_INDEX, reduction="sum")
        total += nll.double()
    return total, int((targets != IGNORE_INDEX).sum())


def _logits(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a Hugging Face model (`.logits`) or of a module whose forward returns them."""
    output = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    return output if isinstance(output, torch.Tensor) else output.logits


def _batched(windows: list[dict[str, torch.Tensor]], batch_size: int, pad_id: int) -> Iterable[dict[str, torch.Tensor]]:
    for start in range(0, len(windows), batch_size):
        yield pad_windows(windows[start : start + batch_size], pad_id)


def _as_batch(batch: Any) -> dict[str, torch.Tensor]:
    """A batch given by the caller: a `(B, T)` id tensor, or a mapping with `input_ids` (+ `attention_mask`,
    `labels`; labels default to the ids)."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "labels": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(f"a batch must be a (B, T) id tensor or a mapping with `input_ids`, got {type(batch).__name__}")
    return {**batch, "labels": batch.get("labels", batch["input_ids"])}


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer_or_batches: PreTrainedTokenizerBase | Iterable[Any],
    *,
    text: str | Sequence[str] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 4,
    max_windows: int | None = None,
) -> PerplexityResult:
    """Perplexity of `model` (a Hugging Face causal LM, or a module whose forward returns logits) on held-out text.

    With a tokenizer, `text` (a string, or documents each followed by the end-of-sequence token) is
    cut into `perplexity_windows(seq_len, stride, max_windows)` and run `batch_size` at a time. With
    batches instead (`(B, T)` id tensors or mappings with `input_ids`, optional `attention_mask` and
    `labels`), each is one set of windows as given (`max_windows` still bounds the rows). The model
    runs in eval mode without gradients and gets its training mode back.
    """
    check_integer(batch_size, "batch_size", low=1)
    limit = check_optional_integer(max_windows, "max_windows", low=1)
    if isinstance(tokenizer_or_batches, PreTrainedTokenizerBase):
        if text is None or (not isinstance(text, str) and not all(isinstance(d, str) for d in text)):
            raise ValueError(f"`text` must be a string or a list of strings when a tokenizer is given, got {text!r}")
        windows = perplexity_windows(encode_text(tokenizer_or_batches, text), seq_len, stride, max_windows)
        if not windows:
            raise ValueError(f"`text` gives no window to predict: fewer than 2 tokens ({text!r:.80})")
        pad_id = tokenizer_or_batches.pad_token_id or 0
        batches: Iterable[Any] = _batched(windows, batch_size, pad_id)
    elif text is not None:
        raise ValueError("`text` is only read with a tokenizer; with batches, the batches are the text")
    else:
        batches = tokenizer_or_batches
    device = next(model.parameters()).device
    total, tokens, rows = torch.zeros((), dtype=torch.float64), 0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for given in batches:
                batch = {
                    key: value[: None if limit is None else limit - rows] for key, value in _as_batch(given).items()
                }
                batch = {key: value.to(device) for key, value in batch.items()}
                nll, count = token_nll(_logits(model, batch), batch["labels"], batch.get("attention_mask"))
                total, tokens, rows = total + nll.cpu(), tokens + count, rows + batch["input_ids"].shape[0]
                if limit is not None and rows >= limit:
                    break
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no token was predicted: give text or batches with at least 2 tokens per window")
    mean = float(total) / tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=tokens, windows=rows)
