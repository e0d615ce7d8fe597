"""evaluate_perplexity: windows, exact token counts, strided windows and padding, against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama_config
from torch import nn

from lightning_prune import PerplexityResult, evaluate_perplexity
from lightning_prune.evaluate import pad_windows, perplexity_windows, token_nll
from lightning_prune.models import CausalLMModule

IGNORE = -100


def hand_nll(model: nn.Module, ids: torch.Tensor, seq_len: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop, one window at a time, written out: windows start every `stride`
    tokens; each counts the tokens after the previous window's end (never a window's first)."""
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        window = ids[begin:end]
        with torch.no_grad():
            logits = model(input_ids=window[None]).logits[0].double()
        log_probs = torch.log_softmax(logits, dim=-1)
        for position in range(max(previous_end, begin + 1), end):
            total -= float(log_probs[position - begin - 1, ids[position]])
            count += 1
        previous_end = end
        if end == len(ids):
            break
    return total, count


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return CausalLMModule(config=tiny_llama_config()).model.eval()


def test_windows_labels_at_the_edges() -> None:
    windows = perplexity_windows(list(range(10)), seq_len=4)
    assert [w["input_ids"].tolist() for w in windows] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w["labels"].tolist() for w in windows] == [[IGNORE, 1, 2, 3], [IGNORE, 5, 6, 7], [IGNORE, 9]]
    strided = perplexity_windows(list(range(10)), seq_len=4, stride=2)
    assert [w["input_ids"].tolist() for w in strided] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert [w["labels"].tolist() for w in strided] == [
        [IGNORE, 1, 2, 3],
        [IGNORE, IGNORE, 4, 5],
        [IGNORE, IGNORE, 6, 7],
        [IGNORE, IGNORE, 8, 9],
    ]
    # A last window of one token predicts nothing and is dropped; max_windows keeps the first ones.
    assert len(perplexity_windows(list(range(9)), seq_len=4)) == 2
    assert len(perplexity_windows(list(range(10)), seq_len=4, max_windows=1)) == 1


@pytest.mark.parametrize(
    ("length", "seq_len", "stride", "tokens", "windows"),
    [
        (23, 8, None, 7 + 7 + 6, 3),  # non-overlapping: every token but each window's first
        (17, 8, None, 7 + 7, 2),  # the one-token tail predicts nothing
        (23, 8, 4, 22, 5),  # strided: every token but the very first, once
        (23, 8, 8, 20, 3),  # stride = seq_len is the non-overlapping case
        (23, 8, 1, 22, 16),
    ],
)
def test_equals_the_hand_computation(tiny: nn.Module, length: int, seq_len: int, stride, tokens, windows) -> None:
    ids = torch.randint(0, 48, (length,), generator=torch.Generator().manual_seed(length))
    result = evaluate_perplexity(tiny, [pad_windows(perplexity_windows(ids, seq_len, stride))])
    total, count = hand_nll(tiny, ids, seq_len, stride or seq_len)
    assert (result.tokens, result.windows) == (count, windows) == (tokens, windows)
    assert result.nll == pytest.approx(total / count, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-6)


def test_text_path_batches_and_padding_never_counted(tiny: nn.Module) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(ord("a") + i): i for i in range(26)} | {"<eos>": 26}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    text = ["thequickbrownfox", "jumpsoverthelazydog"]  # 16 + 1 + 19 + 1 = 37 tokens with the two eos
    ids = torch.tensor([vocab[c] for c in text[0]] + [26] + [vocab[c] for c in text[1]] + [26])
    total, count = hand_nll(tiny, ids, 10, 10)
    # Batches of 3 windows: the 7-token tail is padded in the second batch; batch size changes nothing.
    for batch_size in (1, 3, 8):
        result = evaluate_perplexity(tiny, tokenizer, text=text, seq_len=10, batch_size=batch_size)
        assert (result.tokens, result.windows) == (count, 4) == (9 + 9 + 9 + 6, 4)
        assert result.nll == pytest.approx(total / count, rel=1e-6)
    one_string = evaluate_perplexity(tiny, tokenizer, text="thequickbrownfox", seq_len=10)
    assert (one_string.tokens, one_string.windows) == (9 + 5, 2)  # a single string gets no eos
    limited = evaluate_perplexity(tiny, tokenizer, text=text, seq_len=10, max_windows=2)
    assert (limited.tokens, limited.windows) == (18, 2)


def test_padded_batch_equals_the_unpadded_rows(tiny: nn.Module) -> None:
    rows = [torch.arange(3, 13), torch.arange(20, 26)]
    padded = pad_windows([{"input_ids": rows[0]}, {"input_ids": rows[1]}], pad_id=47)
    assert padded["attention_mask"].tolist()[1] == [1] * 6 + [0] * 4
    assert padded["labels"].tolist()[1] == list(range(20, 26)) + [IGNORE] * 4
    together = evaluate_perplexity(tiny, [padded])
    apart = evaluate_perplexity(tiny, [row[None] for row in rows])
    assert (together.tokens, together.windows) == (apart.tokens, apart.windows) == (9 + 5, 2)
    assert together.nll == pytest.approx(apart.nll, rel=1e-6)
    logits = torch.zeros(1, 4, 5)  # uniform: every counted token costs log 5
    nll, count = token_nll(logits, torch.tensor([[1, 2, IGNORE, 4]]), torch.tensor([[1, 1, 1, 0]]))
    assert count == 1 and float(nll) == pytest.approx(math.log(5))


def test_lightning_module_and_training_mode_kept(tiny: nn.Module) -> None:
    module = CausalLMModule(config=tiny_llama_config())
    module.model.load_state_dict(tiny.state_dict())
    module.train()
    ids = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(1))
    on_module, on_model = evaluate_perplexity(module, [ids]), evaluate_perplexity(module.model, [ids])
    assert module.training and module.model.training
    assert isinstance(on_module, PerplexityResult) and on_module == on_model
    assert on_module.as_dict() == {"ppl": on_module.ppl, "nll": on_module.nll, "tokens": 22, "windows": 2}


def test_bad_arguments(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="`seq_len` must be an integer >= 2"):
        perplexity_windows([1, 2, 3], seq_len=1)
    with pytest.raises(ValueError, match=r"`stride` must be in \[1, seq_len=4\], got 5"):
        perplexity_windows([1, 2, 3], seq_len=4, stride=5)
    with pytest.raises(ValueError, match="`text` is only read with a tokenizer"):
        evaluate_perplexity(tiny, [torch.zeros(1, 4, dtype=torch.int64)], text="abc")
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        evaluate_perplexity(tiny, [], batch_size=0)
    with pytest.raises(ValueError, match="no token was predicted"):
        evaluate_perplexity(tiny, [torch.zeros(1, 1, dtype=torch.int64)])
    with pytest.raises(TypeError, match="a batch must be a"):
        evaluate_perplexity(tiny, [[1, 2, 3]])
