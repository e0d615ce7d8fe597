"""`evaluate_lm_harness`: lm-eval's scores of a model in memory (masks applied) equal the model's own
log-likelihoods computed here by hand; the model, tokenizer and random state are left as they were;
bad arguments and a missing lm-eval are clear errors. Local tasks over pydoc text, nothing downloaded."""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lightning_prune.data.corpus import pydoc_topics, train_bpe_tokenizer
from lightning_prune.evaluate import check_tasks, evaluate_lm_harness
from lightning_prune.evaluate.harness import flat_metrics
from lightning_prune.masking import finalize, set_mask
from lightning_prune.models.causal_lm import load_causal_lm
from tests.conftest import tiny_llama_config
from tests.harness_tasks import CHOICE_DOCS, CHOICE_TASK, TEXT_TASK, choice_docs, needs_lm_eval, text_docs, write_tasks


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No hub access: datasets and huggingface_hub offline (the tasks read local JSONL files)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def include_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm_eval"))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(pydoc_topics()[:40], 300)


def tiny_lm(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    torch.manual_seed(0)
    # Weights drawn wider than transformers' 0.02: next-token distributions far from uniform, so that
    # choices and pruning change the scores.
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=128, initializer_range=0.3)
    return load_causal_lm(config=config)


def log_likelihood(model: PreTrainedModel, ids: list[int], start: int) -> float:
    """Σ log p(ids[i] | ids[:i]) for i >= start, from the model's logits."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(start, len(ids)))


def choice_scores(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them: the choice (after a space) with the highest
    log-likelihood given the context, plain and per character of the choice."""
    hits = hits_norm = 0
    for doc in choice_docs():
        context = tokenizer.encode(doc["context"])
        lls = [
            log_likelihood(model, tokenizer.encode(f"{doc['context']} {choice}"), len(context))
            for choice in doc["choices"]
        ]
        hits += int(np.argmax(lls)) == doc["label"]
        hits_norm += int(np.argmax(np.array(lls) / [len(choice) for choice in doc["choices"]])) == doc["label"]
    return hits / CHOICE_DOCS, hits_norm / CHOICE_DOCS


def byte_perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> float:
    """exp(-Σ log-likelihood / Σ UTF-8 bytes), every token predicted after the end-of-text prefix token."""
    total = 0.0
    for text in docs:
        ids = [tokenizer.eos_token_id, *tokenizer.encode(text)]
        assert len(ids) <= 128  # one window: lm-eval's rolling windows would split longer texts
        total += log_likelihood(model, ids, 1)
    return math.exp(-total / sum(len(text.encode("utf-8")) for text in docs))


@needs_lm_eval
def test_scores_equal_the_models_own_log_likelihoods(tokenizer: PreTrainedTokenizerBase, include_path: Path) -> None:
    model = tiny_lm(tokenizer).train()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    evaluation = evaluate_lm_harness(
        model, tokenizer, [CHOICE_TASK, TEXT_TASK], include_path=include_path, bootstrap_iters=0
    )
    # lm-eval seeds every generator inside; the caller's draws continue as if it had not run.
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    assert draws == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    results = evaluation["results"]
    acc, acc_norm = choice_scores(model, tokenizer)
    assert results[CHOICE_TASK] == {"acc": acc, "acc_norm": acc_norm}
    expected = byte_perplexity(model, tokenizer, text_docs())
    assert results[TEXT_TASK]["byte_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert results[TEXT_TASK]["bits_per_byte"] == pytest.approx(math.log2(expected), rel=1e-5)
    assert evaluation["samples"] == {
        CHOICE_TASK: {"original": CHOICE_DOCS, "effective": CHOICE_DOCS},
        TEXT_TASK: {"original": len(text_docs()), "effective": len(text_docs())},
    }
    assert evaluation["tasks"] == [CHOICE_TASK, TEXT_TASK]
    assert evaluation["num_fewshot"] == {CHOICE_TASK: 0, TEXT_TASK: 0}
    assert evaluation["higher_is_better"][TEXT_TASK] == {"byte_perplexity": False, "bits_per_byte": False}
    # The model is as it was (weights, training mode), and the tokenizer got no pad token.
    assert model.training and tokenizer.pad_token is None
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


@needs_lm_eval
def test_a_pruned_model_is_scored_with_its_masks_and_settings_reach_lm_eval(
    tokenizer: PreTrainedTokenizerBase, include_path: Path
) -> None:
    model = tiny_lm(tokenizer)
    dense = byte_perplexity(model, tokenizer, text_docs()[:2])
    for layer in model.model.layers:
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            scores = linear.weight.abs()
            set_mask(linear, scores >= scores.median())
    evaluation = evaluate_lm_harness(
        model, tokenizer, [TEXT_TASK, CHOICE_TASK], include_path=include_path, limit=2, num_fewshot=1, device="cpu"
    )
    pruned = byte_perplexity(finalize(model), tokenizer, text_docs()[:2])
    assert evaluation["results"][TEXT_TASK]["byte_perplexity"] == pytest.approx(pruned, rel=1e-5)
    assert abs(pruned - dense) > 1e-3 * dense
    assert evaluation["samples"][TEXT_TASK] == {"original": len(text_docs()), "effective": 2}
    assert evaluation["num_fewshot"][CHOICE_TASK] == 1 and evaluation["limit"] == 2
    # acc's stderr is lm-eval's closed form for a mean over the 2 documents (no bootstrap).
    choice = evaluation["results"][CHOICE_TASK]
    assert choice["acc_stderr"] == pytest.approx(math.sqrt(choice["acc"] * (1 - choice["acc"]) / (2 - 1)))


def test_a_table_row_shows_the_requested_tasks_and_groups_without_stderrs() -> None:
    results = {"group": {"acc": 0.5, "acc_stderr": 0.1}, "sub_a": {"acc": 0.4}, "sub_b": {"acc": 0.6}}
    assert flat_metrics({"tasks": ["group"], "results": results}) == {"group/acc": 0.5}
    # A tag has no entry of its own: its tasks are shown.
    assert flat_metrics({"tasks": ["tag"], "results": {"sub_a": {"acc": 0.4, "acc_stderr": 0.2}}}) == {"sub_a/acc": 0.4}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tasks": []}, "`tasks` must be a non-empty list"),
        ({"tasks": [""]}, "`tasks` must list task names"),
        ({"tasks": ["a", "a"]}, "names a task twice"),
        ({"limit": 0}, "`limit` must be None, an integer >= 1"),
        ({"limit": 1.5}, "`limit` must be None, an integer >= 1"),
        ({"num_fewshot": -1}, "`num_fewshot` must be None or an integer >= 0"),
        ({"batch_size": 0}, "`batch_size` must be an integer >= 1"),
        ({"include_path": "/nonexistent/tasks"}, "`include_path` names '/nonexistent/tasks', which is not a directory"),
    ],
)
def test_bad_arguments_are_refused_naming_them(
    tokenizer: PreTrainedTokenizerBase, changes: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {"tasks": [TEXT_TASK], **changes}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        evaluate_lm_harness(tiny_lm(tokenizer), tokenizer, **arguments)  # type: ignore[arg-type]


def test_a_model_lm_eval_cannot_wrap_is_a_type_error(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(TypeError, match=r"`model` must be a transformers PreTrainedModel .* got Linear"):
        evaluate_lm_harness(torch.nn.Linear(2, 2), tokenizer, [TEXT_TASK])


def test_without_lm_eval_the_error_says_how_to_install_it(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    with pytest.raises(ImportError, match=r"needs the optional `lm-eval` package.*pip install 'lm-eval>=0.4,<0.5'"):
        evaluate_lm_harness(tiny_lm(tokenizer), tokenizer, [TEXT_TASK])
    with pytest.raises(ImportError, match="not installed"):
        check_tasks([TEXT_TASK])


@needs_lm_eval
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_scores_match_and_the_model_comes_back_to_the_cpu(
    tokenizer: PreTrainedTokenizerBase, include_path: Path
) -> None:
    model = tiny_lm(tokenizer)
    evaluation = evaluate_lm_harness(
        model, tokenizer, [TEXT_TASK], include_path=include_path, device="cuda", bootstrap_iters=0
    )
    assert next(model.parameters()).device.type == "cpu"
    expected = byte_perplexity(model, tokenizer, text_docs())
    assert evaluation["results"][TEXT_TASK]["byte_perplexity"] == pytest.approx(expected, rel=1e-4)
