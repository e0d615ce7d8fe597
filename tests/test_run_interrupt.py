"""An interrupted run (Ctrl-C, SIGTERM): `results.json` says "interrupted", in which phase and how to
resume, with the report and history of what was built; `resume=true` then finishes it as an
uninterrupted run would."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_prune.run import run
from tests.conftest import compose_config

PROBE = "test_run_interrupt"  # this module, as Hydra imports it (pytest puts tests/ on sys.path)
TINY = [
    "dense_epochs=1",
    "trainer.max_epochs=1",
    "pruning.frequency=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "plots=false",
]


class InterruptOnce(Callback):
    """Raises KeyboardInterrupt (as Ctrl-C does), or SIGTERMException with `sigterm`, at the end of
    training step `step` unless `marker` exists, and creates it: the same config is interrupted on the
    first attempt and runs through on the next."""

    def __init__(self, marker: str, step: int = 2, sigterm: bool = False) -> None:
        self.marker, self.step, self.sigterm = Path(marker), step, sigterm

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.touch()
            raise SIGTERMException() if self.sigterm else KeyboardInterrupt()


@pytest.fixture(autouse=True)
def keep_sigint_handler() -> Iterator[None]:
    """Lightning ignores SIGINT from its graceful shutdown on (the process then exits); restore it."""
    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


def probe(*extra: str) -> list[str]:
    """The `InterruptOnce` callback in the prune stage, with `extra` overrides."""
    marker = "+callbacks.stop.marker=${output_dir}/interrupted"
    return [f"+callbacks.stop._target_={PROBE}.InterruptOnce", marker, *extra]


@pytest.mark.slow  # three short runs (~8 s); run by default
def test_ctrl_c_writes_interrupted_results_and_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir()
    (whole / "interrupted").touch()  # the probe never fires here
    expected = run(compose_config("quickstart", whole, *TINY, *probe()))
    # Lightning turns the KeyboardInterrupt into SystemExit(1) after its graceful shutdown.
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run(compose_config("quickstart", interrupted, *TINY, *probe()))
    results = json.loads((interrupted / "results.json").read_text())
    assert results["status"] == "interrupted" and results["interrupted_phase"] == "prune"
    assert results["interrupted_by"] == "KeyboardInterrupt" and "failed_phase" not in results
    assert [(e["name"], e["status"]) for e in results["stages"]] == [("dense", "completed")]
    assert results["resume"] == f"resume=true output_dir={interrupted}"
    assert 0.0 < results["global_sparsity"] < 0.9
    assert "model.fc1.weight" in (interrupted / "sparsity_report.md").read_text()
    history = (interrupted / "history.csv").read_text()
    assert "dense" in history and "prune" in history
    assert "dense" in (interrupted / "stages.md").read_text()
    resumed = run(compose_config("quickstart", interrupted, *TINY, *probe(), "resume=true"))
    assert resumed.pop("resumed_after") == "dense" and resumed["status"] == "completed"
    for finished in (expected, resumed):
        finished.pop("output_dir"), finished.pop("model_path")
    assert resumed == expected
    for name in ("stages.md", "history.csv", "sparsity_report.md"):
        assert (interrupted / name).read_text() == (whole / name).read_text(), name


def test_sigterm_in_the_first_stage_is_interrupted_without_a_resume_line(tmp_path: Path) -> None:
    cfg = compose_config("quickstart", tmp_path, *TINY, "dense_epochs=0", *probe("+callbacks.stop.sigterm=true"))
    with pytest.raises(SIGTERMException):
        run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "interrupted" and results["interrupted_phase"] == "prune"
    assert results["interrupted_by"] == "SIGTERM" and "resume" not in results  # no stage left a checkpoint
    assert "model.fc1.weight" in (tmp_path / "sparsity_report.md").read_text()


class InterruptInPreflight(Callback):
    """Ctrl-C while the run checks its callbacks, before the first stage."""

    def preflight(self, pl_module: Any) -> None:
        raise KeyboardInterrupt


def test_ctrl_c_before_the_first_stage_leaves_an_earlier_run_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text('{"status": "completed"}\n')
    before = sorted(path.name for path in tmp_path.iterdir())
    cfg = compose_config("quickstart", tmp_path, *TINY, f"+callbacks.stop._target_={PROBE}.InterruptInPreflight")
    with pytest.raises(KeyboardInterrupt) as caught:
        run(cfg)
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert (tmp_path / "results.json").read_text() == '{"status": "completed"}\n'
    assert any("nothing was written into" in note for note in caught.value.__notes__)
