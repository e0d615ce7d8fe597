"""The run's `lm_eval` group: lm-eval scores of the pruned model in memory before and after the stages,
in results.json and stages.md, equal to lm-eval on the saved model; errors name the key, and a missing
lm-eval or an unknown task stops the run at start-up, before anything is built or written."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_prune.evaluate import evaluate_lm_harness
from lightning_prune.run import run
from lightning_prune.run.checks import ConfigError
from tests.conftest import compose_config
from tests.harness_tasks import CHOICE_TASK, TEXT_TASK, needs_lm_eval, write_tasks

# One-shot Wanda 2:4 (no training step) of a Llama trained for 4 batches.
TINY = [
    "plots=false",
    "dense_epochs=1",
    "trainer.max_epochs=0",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "data.seq_len=32",
    "data.vocab_size=300",
    "pruning.num_samples=8",
    "pruning.progress=false",
]


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


def harness(include_path: Path, *overrides: str) -> list[str]:
    return [
        "lm_eval=harness",
        f"lm_eval.tasks=[{CHOICE_TASK},{TEXT_TASK}]",
        f"lm_eval.include_path={include_path}",
        "lm_eval.bootstrap_iters=0",
        *overrides,
    ]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory: pytest.TempPathFactory, include_path: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config("wanda_2of4", out, *TINY, *harness(include_path, "lm_eval.before=true"))
    return out, run(cfg)


@needs_lm_eval
@pytest.mark.slow  # the run (dense training, one-shot 2:4, two lm-eval scorings): about 10 s
def test_the_pruned_model_in_memory_scores_as_the_saved_model(
    pruned_run: tuple[Path, dict[str, Any]], include_path: Path
) -> None:
    out, results = pruned_run
    assert results["status"] == "completed" and results["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    scores = results["lm_eval"]
    assert scores["before_stage"] == "prune"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    saved = evaluate_lm_harness(
        model,
        AutoTokenizer.from_pretrained(out / "model"),
        [CHOICE_TASK, TEXT_TASK],
        include_path=include_path,
        bootstrap_iters=0,
    )
    for task, metrics in saved["results"].items():
        assert scores["after"]["results"][task] == pytest.approx(metrics, rel=1e-5)
    # 2:4 pruning moved the perplexity: "before" scored the dense model.
    before, after = (scores[when]["results"][TEXT_TASK]["byte_perplexity"] for when in ("before", "after"))
    assert abs(after - before) > 1e-3 * before
    assert scores["after"]["samples"][CHOICE_TASK]["effective"] == 6
    assert json.loads((out / "results.json").read_text())["lm_eval"] == json.loads(json.dumps(scores))


@needs_lm_eval
@pytest.mark.slow  # shares the run above
def test_the_stage_table_has_a_row_per_lm_eval_scoring(pruned_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = pruned_run
    lines = (out / "stages.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert {"val/ppl", f"{TEXT_TASK}/byte_perplexity", f"{CHOICE_TASK}/acc", f"{CHOICE_TASK}/acc_norm"} <= set(header)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]}
    # The dense stage's row is the dense baseline; lm-eval scored right before the prune stage and after it.
    assert list(rows) == ["dense", "lm-eval before", "prune", "lm-eval after"]
    column = header.index(f"{TEXT_TASK}/byte_perplexity")
    for label, when in (("lm-eval before", "before"), ("lm-eval after", "after")):
        assert float(rows[label][column]) == pytest.approx(
            results["lm_eval"][when]["results"][TEXT_TASK]["byte_perplexity"], abs=1e-4
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lm_eval.limit=0"], "`lm_eval.limit` must be None, an integer >= 1"),
        (["lm_eval.num_fewshot=-1"], "`lm_eval.num_fewshot` must be None or an integer >= 0"),
        (["lm_eval.batch_size=0"], "`lm_eval.batch_size` must be an integer >= 1"),
        (["lm_eval.tasks=[]"], "`lm_eval.tasks` must be a non-empty list"),
        (["lm_eval.device=gpu"], "`lm_eval.device` must be null or a torch device name"),
        (["lm_eval.before=1"], "`lm_eval.before` must be true or false"),
        (["lm_eval.include_path=/nonexistent"], "`lm_eval.include_path` names '/nonexistent', which is not a dir"),
        (["+lm_eval.shots=1"], r"`lm_eval.shots` is not an lm_eval setting: valid keys are \['tasks'"),
    ],
)
def test_bad_settings_are_refused_at_start_up_naming_the_key(
    tmp_path: Path, include_path: Path, overrides: list[str], message: str
) -> None:
    cfg = compose_config("wanda_2of4", tmp_path, *TINY, *harness(include_path, *overrides))
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert list(tmp_path.iterdir()) == []  # refused before the output directory was touched


def test_before_without_a_stage_with_callbacks_is_refused(tmp_path: Path, include_path: Path) -> None:
    cfg = compose_config("quickstart", tmp_path, "pruning=none", *harness(include_path, "lm_eval.before=true"))
    with pytest.raises(ConfigError, match=r"`lm_eval.before`=True has no effect: no stage of `stages` has callbacks"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_tasks_are_required(tmp_path: Path) -> None:
    cfg = compose_config("wanda_2of4", tmp_path, *TINY, "lm_eval=harness")
    with pytest.raises(ConfigError, match=r"required value `lm_eval.tasks` is not set"):
        run(cfg)


def test_without_lm_eval_asking_for_it_stops_the_run_at_start_up(
    tmp_path: Path, include_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as if it were not installed
    cfg = compose_config("wanda_2of4", tmp_path, *TINY, *harness(include_path))
    with pytest.raises(ConfigError, match=r"`lm_eval.tasks`=.* asks for .* not installed: pip install 'lm-eval"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


@needs_lm_eval
def test_a_model_lm_eval_cannot_wrap_fails_in_the_preflight(tmp_path: Path, include_path: Path) -> None:
    cfg = compose_config("quickstart", tmp_path, "plots=false", *harness(include_path))
    with pytest.raises(ConfigError, match=r"`lm_eval` scores a Hugging Face causal LM, but `model` \(Classifier"):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed_phase"] == "preflight" and results["stages"] == []
    assert not (tmp_path / "checkpoints").exists()


@needs_lm_eval
@pytest.mark.slow  # an unknown name makes lm-eval index its ~15,000 built-in task files (about 10 s)
def test_an_unknown_task_stops_the_run_at_start_up(tmp_path: Path, include_path: Path) -> None:
    cfg = compose_config("wanda_2of4", tmp_path, *TINY, *harness(include_path, f"lm_eval.tasks=[{TEXT_TASK},nope]"))
    with pytest.raises(ConfigError, match=r"`lm_eval.tasks` names \['nope'\], not found among lm-eval's tasks or"):
        run(cfg)
    assert list(tmp_path.iterdir()) == []


@needs_lm_eval
@pytest.mark.slow  # a one-shot run: about 5 s
def test_a_task_that_fails_while_scoring_is_recorded_with_its_phase(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "lm_eval")
    (tmp_path / "lm_eval" / "data" / "text.jsonl").unlink()  # indexed at start-up, unreadable when scored
    out = tmp_path / "run"
    cfg = compose_config("wanda_2of4", out, *TINY, "dense_epochs=0", *harness(tasks, f"lm_eval.tasks=[{TEXT_TASK}]"))
    with pytest.raises(Exception, match=r"text\.jsonl"):
        run(cfg)
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "failed" and results["failed_phase"] == "lm_eval_after"
    assert [entry["status"] for entry in results["stages"]] == ["skipped", "completed"]
    assert (out / results["stages"][1]["checkpoint"]).is_file()  # the pruned model's stage checkpoint is kept
