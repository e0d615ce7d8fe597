"""Checks of later stages run before the first stage trains (issue 26): a 2:4 export after pruning that
is not 2:4 (in its own stage or an earlier one), and a GMP ramp without end under an endless Trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_prune.run import run
from tests.conftest import compose_config

PROBE = "test_stage_preflight"  # this module, as Hydra imports it (pytest puts tests/ on sys.path)
CHAIN_TINY = [
    "dense_epochs=1",
    *(f"stages.{index}.trainer.max_epochs=1" for index in (1, 2, 3)),
    "stages.1.callbacks.gmp.frequency=2",
    "stages.3.callbacks.gmp.frequency=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "plots=false",
    "evaluate_before=false",
    f"+stages.0.callbacks.count._target_={PROBE}.CountSteps",
]


class CountSteps(Callback):
    """Counts the training batches of every Trainer it is given to (class-wide: Hydra builds the instance)."""

    batches = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        type(self).batches += 1


def export_at(stage: int, pattern: str | None = None) -> list[str]:
    """A sparse-24-bitmask SparseExport in `stages.<stage>` (and `pattern` for both GMP stages)."""
    overrides = [
        f"+stages.{stage}.callbacks.export._target_=lightning_prune.SparseExport",
        f"+stages.{stage}.callbacks.export.dirpath=${{output_dir}}/export",
        f"+stages.{stage}.callbacks.export.format=sparse-24-bitmask",
    ]
    if pattern is not None:
        for index in (1, 3):  # N:M fixes the sparsity at 1 - N/M
            overrides += [
                f"+stages.{index}.callbacks.gmp.pattern='{pattern}'",
                f"stages.{index}.callbacks.gmp.sparsity=0.5",
            ]
    return overrides


def refused_before_training(out: Path) -> None:
    """Nothing trained: no step counted, no checkpoint, no stage row; results.json says preflight."""
    assert CountSteps.batches == 0
    assert not (out / "checkpoints").exists() and not (out / "stages.md").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["failed_phase"] == "preflight" and results["stages"] == []


@pytest.mark.parametrize(
    ("stage", "pattern"),
    [
        (3, None),  # unstructured pruning in the export's own stage
        (2, None),  # the fine-tune stage prunes nothing: stage 1's masks carry over into its export
        (3, "4:8"),  # N:M, but not 2:4
    ],
)
def test_two_four_export_after_other_pruning_fails_before_the_dense_stage(
    tmp_path: Path, stage: int, pattern: str | None
) -> None:
    CountSteps.batches = 0
    cfg = compose_config("gmp_chain", tmp_path, *CHAIN_TINY, *export_at(stage, pattern))
    shown = "`pattern`=None" if pattern is None else f"`pattern`={pattern!r}"
    with pytest.raises(
        ValueError,
        match=rf"SparseExport\(format='sparse-24-bitmask'\) .* GradualPruning prunes '[\w.]+' with {shown}",
    ):
        run(cfg)
    refused_before_training(tmp_path)


def test_two_four_export_after_two_four_pruning_runs(tmp_path: Path) -> None:
    CountSteps.batches = 0
    results = run(compose_config("gmp_chain", tmp_path, *CHAIN_TINY, *export_at(3, "2:4")))
    assert [entry["status"] for entry in results["stages"]] == ["completed"] * 4
    assert (tmp_path / "export").is_dir() and CountSteps.batches == 4  # the probe counts the dense stage's steps


def test_endless_trainer_with_gmp_ramp_fails_before_the_dense_stage(tmp_path: Path) -> None:
    CountSteps.batches = 0
    cfg = compose_config("gmp_chain", tmp_path, *CHAIN_TINY, "stages.3.trainer.max_epochs=-1")
    with pytest.raises(ValueError, match=r"`end_step`=None .* `trainer.max_epochs`=-1 with `trainer.max_steps`=-1"):
        run(cfg)
    refused_before_training(tmp_path)
