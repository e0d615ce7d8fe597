"""The wanda_2of4_lora recipe in-process (Hydra compose API, as tests/test_cli.py does) with tiny settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_prune.export import load_sparse_state_dict
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.run import ConfigError, run
from tests.conftest import compose_config

TINY = [
    "dense_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "data.seq_len=16",
    "data.vocab_size=300",
    "pruning.num_samples=16",
    "pruning.progress=false",
]


def test_wanda_2of4_lora_reports_every_stage_and_exports_2of4(tmp_path: Path) -> None:
    cfg = compose_config("wanda_2of4_lora", tmp_path, *TINY)
    assert cfg.lora._target_.endswith("LoRARecovery") and cfg.pruning.pattern == "2:4"
    results = run(cfg)
    stages = results["stages"]
    assert [(e["name"], e["callbacks"]) for e in stages] == [
        ("dense", []),
        ("wanda", ["OneShotPruning"]),
        ("recover", ["LoRARecovery", "SparseExport"]),
    ]
    assert (
        stages[1]["steps"] == 0 and stages[1]["metrics"]["val/ppl"] != stages[0]["metrics"]["val/ppl"]
    )  # measured after Wanda acted
    assert results["before"] == stages[0]["metrics"] and results["after"] == stages[2]["metrics"]
    assert results["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["stages"] == stages
    table = (tmp_path / "stages.md").read_text().splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == ["dense", "wanda", "recover"]
    assert f"{stages[1]['metrics']['val/ppl']:.4f}" in table[3]
    assert (tmp_path / "plots" / "stage_metrics.png").read_bytes()[:4] == b"\x89PNG"
    exported, manifest = load_sparse_state_dict(tmp_path / "export")
    assert manifest["format"] == "sparse-24-bitmask"
    projections = [name for name in exported if ("mlp" in name or "self_attn" in name) and name.endswith("weight")]
    # 7 projections (q, k, v, o, gate, up, down) in each of the tiny Llama's blocks.
    assert len(projections) == 7 * cfg.model.config.num_hidden_layers
    for name in projections:
        weight = exported[name]
        assert max_nonzeros_per_group(weight, 4) <= 2, name
        assert not torch.signbit(weight[weight == 0]).any(), name


def test_evaluate_pruned_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="evaluate_pruned"):
        run(compose_config("wanda_2of4_lora", tmp_path, "evaluate_pruned=maybe"))
