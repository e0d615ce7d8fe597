"""run(cfg) and the command line when things go wrong: the model's own tokenizer, checks before any
phase trains, results.json after a failure, warnings in the results, sweeps that survive a bad job,
and plain containers for library objects."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, ListConfig

import lightning_prune
from lightning_prune import cli
from lightning_prune.cli import CONFIG_DIR
from lightning_prune.run import ConfigError, run
from lightning_prune.run.record import RunRecord

QUIET = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "tensorboard=false"]
DIGITS_TINY = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.val_check_interval=1.0",
]
PROBE = "test_run_reliability"  # this module, as Hydra imports it (pytest puts tests/ on sys.path)


def compose_config(output: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output}", *QUIET, *overrides])


class RefusingCallback(Callback):
    """Refuses the model in `preflight`, as a callback whose targets match nothing does."""

    def preflight(self, pl_module: Any) -> None:
        raise ValueError("`targets`=['nomatch'] match no module of the model")


class FailingCallback(Callback):
    """Raises at the start of training step `step` of its fit."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"probe failure at step {self.step}")


class StopAtStep(Callback):
    """Ends the fit at step `step` (`trainer.should_stop`, as EarlyStopping does) and records a warning."""

    def __init__(self, step: int = 2) -> None:
        self.step = step
        self.warnings_recorded = [{"kind": "probe", "message": "the probe stopped the fit early"}]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PlainContainers(Callback):
    """Refuses OmegaConf containers: library objects get plain lists and dicts."""

    def __init__(self, items: list[int], options: dict[str, int]) -> None:
        if (
            isinstance(items, ListConfig)
            or isinstance(options, DictConfig)
            or not isinstance(items, list)
            or not isinstance(options, dict)
        ):
            raise ValueError(
                f"`items`/`options` must be plain list/dict, got {type(items).__name__}/{type(options).__name__}"
            )


# ---- item 1: the model's own tokenizer ------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A tiny Llama saved with its own BPE tokenizer, a directory with the model only, and the vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_prune.data.corpus import pydoc_topics, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    text = "\n".join(pydoc_topics())[:40_000]
    (root / "corpus.txt").write_text(text)
    tokenizer = train_bpe_tokenizer([text], 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "with_tokenizer")
    tokenizer.save_pretrained(root / "with_tokenizer")
    model.save_pretrained(root / "model_only")
    return root, root / "corpus.txt", len(tokenizer)


def test_pretrained_model_reads_its_own_tokenizer(pretrained_dir: tuple[Path, Path, int], tmp_path: Path) -> None:
    root, corpus, vocab = pretrained_dir
    model_dir = root / "with_tokenizer"
    cfg = compose_config(
        tmp_path,
        "recipe=sparsegpt_50",
        "model=causal_lm",
        f"model.model_path={model_dir}",
        "dense_epochs=0",
        f"data.files=[{corpus}]",
        "data.seq_len=16",
        "pruning.num_samples=4",
        "trainer.limit_val_batches=2",
        "plots=false",
    )
    results = run(cfg)
    assert results["status"] == "completed" and results["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert f"tokenizer: {model_dir}" in (tmp_path / "config.yaml").read_text()
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab() and len(saved) == vocab


def test_model_without_tokenizer_names_data_tokenizer(pretrained_dir: tuple[Path, Path, int], tmp_path: Path) -> None:
    root, corpus, _ = pretrained_dir
    cfg = compose_config(
        tmp_path,
        "recipe=sparsegpt_50",
        "model=causal_lm",
        f"model.model_path={root / 'model_only'}",
        "dense_epochs=0",
        f"data.files=[{corpus}]",
    )
    with pytest.raises(ConfigError, match=r"holds no tokenizer .*set `data.tokenizer=DIR`"):
        run(cfg)


def test_tokenizer_larger_than_embedding_names_both_sizes(
    pretrained_dir: tuple[Path, Path, int], tmp_path: Path
) -> None:
    _, corpus, _ = pretrained_dir
    cfg = compose_config(
        tmp_path,
        "recipe=sparsegpt_50",
        "dense_epochs=0",
        f"data.files=[{corpus}]",
        "data.vocab_size=600",
        "model.config.vocab_size=280",
    )
    with pytest.raises(ConfigError, match=r"has \d{3} tokens but the model's input embedding \(`model`\) has 280 rows"):
        run(cfg)


# ---- item 3: checks before any phase trains; results.json after a failure -------------------------


def test_preflight_runs_before_the_dense_phase(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "recipe=quickstart",
        "dense_epochs=2",
        *DIGITS_TINY,
        f"+callbacks.refuse._target_={PROBE}.RefusingCallback",
    )
    with pytest.raises(ValueError, match="match no module"):
        run(cfg)
    assert not (tmp_path / "logs" / "dense").exists()  # nothing trained
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["failed_phase"] == "preflight"
    assert "match no module" in results["error"]["message"]


def test_targets_that_match_nothing_fail_before_the_dense_phase(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "recipe=quickstart", "dense_epochs=2", *DIGITS_TINY, "pruning.targets=[nomatch]")
    with pytest.raises(ValueError, match="nomatch"):
        run(cfg)
    assert not (tmp_path / "logs" / "dense").exists()
    assert json.loads((tmp_path / "results.json").read_text())["failed_phase"] == "preflight"


def test_failed_phase_keeps_results_report_and_plots(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "recipe=quickstart",
        "dense_epochs=1",
        *DIGITS_TINY,
        "pruning.frequency=1",
        f"+callbacks.fail._target_={PROBE}.FailingCallback",
        "+callbacks.fail.step=2",
    )
    with pytest.raises(RuntimeError, match="probe failure at step 2"):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["failed_phase"] == "prune"
    assert results["error"] == {"type": "RuntimeError", "message": "probe failure at step 2"}
    assert "val/acc" in results["before"] and 0.0 < results["global_sparsity"] < 0.9
    assert "model.fc1.weight" in (tmp_path / "sparsity_report.md").read_text()
    assert "dense" in (tmp_path / "history.csv").read_text()
    for png in ("layer_sparsity.png", "sparsity_vs_metric.png"):
        assert (tmp_path / "plots" / png).read_bytes()[:4] == b"\x89PNG"


# ---- item 5: warnings and the target in results.json ----------------------------------------------


def test_missed_target_is_warned_and_recorded(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "recipe=quickstart",
        "dense_epochs=0",
        *DIGITS_TINY,
        "pruning.frequency=1",
        "plots=false",
        f"+callbacks.stop._target_={PROBE}.StopAtStep",
        "+callbacks.stop.step=2",
    )
    with pytest.warns(UserWarning, match=r"final sparsity 0\.\d+ is below the target `pruning.sparsity`=0.9"):
        results = run(cfg)
    assert results["target_sparsity"] == 0.9 and results["global_sparsity"] < 0.9
    stored = json.loads((tmp_path / "results.json").read_text())
    kinds = [entry["kind"] for entry in stored["warnings"]]
    assert kinds == ["sparsity_shortfall", "probe", "sparsity_below_target"]  # GradualPruning's, the probe's, the run's


def test_package_warnings_are_recorded_and_still_shown() -> None:
    record = RunRecord({})
    package_file = str(Path(lightning_prune.__file__))

    class Recording:
        def __init__(self) -> None:
            self.warnings_recorded = [{"kind": "sparsity_below_target", "message": "from a callback"}]

    with pytest.warns(UserWarning) as shown:
        with record.capture():
            warnings.warn_explicit("from the package", UserWarning, package_file, 1)
            warnings.warn("from the user's code", UserWarning)
    assert sorted(str(w.message) for w in shown) == ["from the package", "from the user's code"]  # re-emitted
    entries = record.collect_warnings([Recording()])
    assert [(e["kind"], e["message"]) for e in entries] == [
        ("sparsity_below_target", "from a callback"),
        ("UserWarning", "from the package"),
    ]


# ---- item 14: plain containers ---------------------------------------------------------------------


def test_library_objects_get_plain_containers(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "recipe=quickstart",
        "dense_epochs=0",
        *DIGITS_TINY,
        "pruning=none",
        "plots=false",
        "save_model=false",
        f"+callbacks.plain._target_={PROBE}.PlainContainers",
        "+callbacks.plain.items=[1,2]",
        "+callbacks.plain.options={a: 1}",
    )
    assert run(cfg)["status"] == "completed"


def test_run_uses_public_lightning_apis_only() -> None:
    source = "\n".join(path.read_text() for path in (Path(lightning_prune.__file__).parent / "run").glob("*.py"))
    assert re.search(r"trainer\._\w", source) is None and "_logger_connector" not in source
    assert "num_sanity_val_steps" not in source  # the user's setting is kept; evaluate_pruned validates a copy


# ---- item 2: a sweep with the default sweep directory survives a failing job -----------------------


def test_sweep_reports_failed_jobs_and_runs_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    arguments = [
        "-m",
        "recipe=quickstart",
        "pruning.sparsity=1.5,0.5",
        "dense_epochs=0",
        *DIGITS_TINY,
        *QUIET,
        "plots=false",
        "save_model=false",
    ]
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    (summary_path,) = (tmp_path / "multirun" / "quickstart").glob("*/sweep_summary.json")
    jobs = json.loads(summary_path.read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["failed", "completed"]
    assert "`pruning.sparsity`=1.5" in jobs[0]["error"]
    assert json.loads((summary_path.parent / "1" / "results.json").read_text())["global_sparsity"] == pytest.approx(
        0.5, abs=1e-3
    )
    assert json.loads((summary_path.parent / "0" / "results.json").read_text())["failed_phase"] == "setup"
    assert "| 0 |" in summary_path.with_suffix(".md").read_text()
