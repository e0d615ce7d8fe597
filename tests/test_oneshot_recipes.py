"""The one-shot recipes in-process (Hydra compose API, as tests/test_cli.py does) with tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.run import run
from tests.conftest import compose_config

TINY = [
    "plots=false",
    "dense_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "data.seq_len=16",
    "data.vocab_size=300",
    "pruning.num_samples=16",
    "pruning.progress=false",
]


def _saved_projection(output: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(output / "model")
    return model.model.layers[0].mlp.down_proj.weight


def test_wanda_2of4_recipe_saves_an_exact_2_of_4_model(tmp_path: Path) -> None:
    cfg = compose_config("wanda_2of4", tmp_path, *TINY)
    assert cfg.pruning.method == "wanda" and cfg.pruning.pattern == "2:4"
    results = run(cfg)
    assert results["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    # Better than uniform guessing over the 300 tokens after the dense phase; Wanda 2:4 followed by a
    # fine-tuning epoch as long as the dense one costs at most 5% of that perplexity.
    assert results["before"]["val/ppl"] < 300
    assert results["after"]["val/ppl"] <= 1.05 * results["before"]["val/ppl"]
    weight = _saved_projection(tmp_path)
    assert max_nonzeros_per_group(weight, 4) <= 2
    assert not torch.signbit(weight[weight == 0]).any()


def test_sparsegpt_50_recipe_prunes_one_shot_without_training(tmp_path: Path) -> None:
    cfg = compose_config("sparsegpt_50", tmp_path, *TINY)
    assert cfg.pruning.method == "sparsegpt" and cfg.trainer.max_epochs == 0
    results = run(cfg)
    assert results["global_sparsity"] == pytest.approx(0.5, abs=1e-6)
    # One-shot SparseGPT at 50% keeps the model better than uniform guessing over the 300 tokens and
    # within 25% of its dense perplexity; the model is saved with exact zeros.
    assert results["before"]["val/ppl"] < 300
    assert results["after"]["val/ppl"] <= 1.25 * results["before"]["val/ppl"]
    assert float((_saved_projection(tmp_path) == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
