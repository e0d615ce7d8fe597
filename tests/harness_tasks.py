"""Two lm-eval tasks written into a folder, their documents cut from CPython's pydoc topics (no download):
`pydoc_choice` (multiple choice: which three words follow a topic's first six) and `pydoc_text`
(rolling log-likelihood of short passages: perplexities), each a YAML file over a local JSONL file."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lightning_prune.data.corpus import pydoc_topics

CHOICE_TASK, TEXT_TASK = "pydoc_choice", "pydoc_text"
CHOICE_DOCS, TEXT_DOCS = 6, 3
# CI (.ci/run) installs lm-eval and sets this: a missing lm-eval fails there instead of skipping.
REQUIRED = os.environ.get("LIGHTNING_PRUNE_REQUIRE_LM_EVAL") == "1"
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None and not REQUIRED,
    reason="lm-eval is not installed (pip install 'lm-eval>=0.4,<0.5', the `eval` extra): its bridge is untested",
)


def choice_docs() -> list[dict[str, Any]]:
    """Per document: the first 6 words of a topic, its next 3 words and those of the next two topics
    as the choices, the right one at position i % 3."""
    words = [topic.split() for topic in pydoc_topics()[: CHOICE_DOCS + 2]]
    docs = []
    for index in range(CHOICE_DOCS):
        options = [" ".join(words[index + shift][6:9]) for shift in range(3)]
        label = index % 3
        options.insert(label, options.pop(0))
        docs.append({"context": " ".join(words[index][:6]), "choices": options, "label": label})
    return docs


def text_docs() -> list[str]:
    """The first 10 words of topics 10, 11, 12: short enough for one window of the tiny models."""
    return [" ".join(topic.split()[:10]) for topic in pydoc_topics()[10 : 10 + TEXT_DOCS]]


def write_tasks(folder: Path) -> Path:
    """The two task YAML files and their JSONL data in `folder/tasks` (datasets' cache in `folder/cache`);
    returns the tasks folder, lm-eval's `include_path`."""
    tasks, data = folder / "tasks", folder / "data"
    tasks.mkdir(parents=True)
    data.mkdir()
    (data / "choice.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in choice_docs()))
    (data / "text.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in text_docs()))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  cache_dir: {folder / 'cache'}\n  data_files:\n"
    (tasks / f"{CHOICE_TASK}.yaml").write_text(
        f"task: {CHOICE_TASK}\n{common}    test: {data / 'choice.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
    )
    (tasks / f"{TEXT_TASK}.yaml").write_text(
        f"task: {TEXT_TASK}\n{common}    test: {data / 'text.jsonl'}\n"
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n"
    )
    return tasks
