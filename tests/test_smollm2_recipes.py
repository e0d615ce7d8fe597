"""The smollm2_* recipes on the real pretrained SmolLM2-135M-Instruct, at a shortened length: 2 evaluation
windows of 32 tokens, 4 calibration sequences, the first and last blocks pruned (`targets`), 1 training
step. Each checks its stage table, the sparsity and pattern of what it saved, and that stock
transformers loads it. The model comes from the session's `smollm2` fixture (loaded from GGUF once,
saved as a directory: `model.model_path=` then loads in ~1 s instead of ~17 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SmolLM2Reference, compose_config
from transformers import AutoModelForCausalLM

from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.run import run

pytestmark = pytest.mark.slow

PRUNED = ["layers.0.", "layers.29."]  # regexes (re.search): block 0 and block 29 only
SHORT = [
    "plots=false",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.val_windows=2",
    "pruning.num_samples=4",
    "trainer.limit_train_batches=1",
]
TARGETS = [f"pruning.targets=[{','.join(PRUNED)}]"]
EXPORT_TARGETS = [f"export.targets=[{','.join(PRUNED)}]"]


def short_run(recipe: str, smollm2: SmolLM2Reference, output: Path, *overrides: str) -> dict:
    cfg = compose_config(recipe, output, f"model.model_path={smollm2.directory}", *SHORT, *overrides)
    assert cfg.model.pretrained == "smollm2" and cfg.data.split == "topics"
    return run(cfg)


def stage_rows(output: Path) -> list[str]:
    """The first cell of every row of stages.md."""
    lines = (output / "stages.md").read_text().splitlines()[2:]
    return [line.split("|")[1].strip() for line in lines]


def projections(model: torch.nn.Module, block: int) -> list[torch.Tensor]:
    layer = model.model.layers[block]
    attention, mlp = layer.self_attn, layer.mlp
    modules = [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj]
    return [module.weight for module in [*modules, mlp.down_proj]]


def check_2of4_saved(directory: Path) -> None:
    """Blocks 0 and 29 exactly 2:4 with +0.0 zeros, block 1 dense, in a directory stock transformers loads."""
    model = AutoModelForCausalLM.from_pretrained(directory)
    for block in (0, 29):
        for weight in projections(model, block):
            assert max_nonzeros_per_group(weight, 4) <= 2
            # The de-quantised Q4_1 weights hold a few exact zeros of their own: a group may have 3.
            assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-4)
            assert not torch.signbit(weight[weight == 0]).any()
    assert all(float((w == 0).float().mean()) < 0.01 for w in projections(model, 1))


@pytest.mark.parametrize(("recipe", "method"), [("smollm2_wanda_2of4", "wanda"), ("smollm2_sparsegpt_50", "sparsegpt")])
def test_one_shot_recipe_reports_perplexity_before_and_after(
    recipe: str, method: str, smollm2: SmolLM2Reference, tmp_path: Path
) -> None:
    results = short_run(recipe, smollm2, tmp_path, *TARGETS)
    assert stage_rows(tmp_path) == ["dense", "before", "prune"]
    before, after = results["before"]["val/ppl"], results["stages"][-1]["metrics"]["val/ppl"]
    # Two 32-token windows of held-out text: the real LM predicts them far better than chance (49152 tokens).
    assert 1.0 < before < 100.0 and after > before
    assert results["stages"][-1]["steps"] == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    zeros = [float((w == 0).float().mean()) for block in (0, 29) for w in projections(model, block)]
    assert zeros == pytest.approx([0.5] * 14, abs=1e-4)  # and the few zeros the Q4_1 weights had
    if method == "wanda":
        check_2of4_saved(tmp_path / "model")


@pytest.mark.parametrize(
    ("recipe", "recovery"), [("smollm2_2of4_lora", "recover"), ("smollm2_2of4_distill", "distill")]
)
def test_2of4_recovery_recipe_keeps_the_pattern_and_exports_it(
    recipe: str, recovery: str, smollm2: SmolLM2Reference, tmp_path: Path
) -> None:
    results = short_run(recipe, smollm2, tmp_path, *TARGETS, *EXPORT_TARGETS)
    assert stage_rows(tmp_path) == ["before", "oneshot", recovery]
    assert [stage["steps"] for stage in results["stages"]] == [0, 1]
    assert all("val/ppl" in stage["metrics"] for stage in results["stages"])
    check_2of4_saved(tmp_path / "model")
    check_2of4_saved(tmp_path / "export")
    sparsity_config = json.loads((tmp_path / "export" / "config.json").read_text())["sparsity_config"]
    assert sparsity_config["sparsity_structure"] == "2:4" and len(sparsity_config["targets"]) == 14
    if recovery == "recover":  # LoRA changed the surviving weights of the pruned layers only
        oneshot = torch.load(tmp_path / results["stages"][0]["checkpoint"], weights_only=False)["state_dict"]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
        assert not torch.equal(
            oneshot["model.model.layers.0.mlp.up_proj.weight"], merged["model.layers.0.mlp.up_proj.weight"]
        )
        assert torch.equal(
            oneshot["model.model.layers.1.mlp.up_proj.weight"], merged["model.layers.1.mlp.up_proj.weight"]
        )


def test_structured_recipe_saves_a_smaller_stock_model(smollm2: SmolLM2Reference, tmp_path: Path) -> None:
    results = short_run("smollm2_structured", smollm2, tmp_path, "pruning.drop_layers=1")  # and one block dropped
    assert stage_rows(tmp_path) == ["before", "prune", "distill"]
    assert [stage["steps"] for stage in results["stages"]] == [0, 1]
    compaction = results["compaction"]
    assert compaction["parameters_after"] < compaction["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.intermediate_size == 1152 and model.config.num_hidden_layers == 29
    assert model.model.layers[3].mlp.down_proj.weight.shape == (576, 1152)
    assert sum(p.numel() for p in model.parameters()) == compaction["parameters_after"]
    with torch.no_grad():
        assert model(input_ids=smollm2.input_ids).logits.shape == smollm2.logits.shape


def test_learned_recipe_learns_a_2of4_mask_distills_and_exports_it(smollm2: SmolLM2Reference, tmp_path: Path) -> None:
    results = short_run("smollm2_learned_2of4", smollm2, tmp_path, *TARGETS, *EXPORT_TARGETS)
    assert stage_rows(tmp_path) == ["before", "learn", "distill"]
    assert [stage["steps"] for stage in results["stages"]] == [1, 1]
    assert all("val/ppl" in stage["metrics"] for stage in results["stages"])
    check_2of4_saved(tmp_path / "model")
    check_2of4_saved(tmp_path / "export")
    sparsity_config = json.loads((tmp_path / "export" / "config.json").read_text())["sparsity_config"]
    assert sparsity_config["sparsity_structure"] == "2:4" and len(sparsity_config["targets"]) == 14
