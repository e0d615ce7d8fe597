"""The structured recipes in-process (Hydra compose API) with tiny settings: compacted models saved and measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lightning_prune.cli import CONFIG_DIR
from lightning_prune.run import run

QUIET = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "tensorboard=false", "plots=false"]


def compose_config(recipe: str, output: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"recipe={recipe}", f"output_dir={output}", *QUIET, *overrides])


def test_structured_llama_recipe_saves_a_smaller_model_that_loads_stock(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = compose_config(
        "structured_llama",
        tmp_path,
        "dense_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "data.seq_len=16",
        "data.vocab_size=300",
        "pruning.num_samples=16",
    )
    results = run(cfg)
    compaction = results["compaction"]
    assert compaction["parameters_after"] < compaction["parameters_before"]
    assert compaction["forward_seconds_before"] > 0 and compaction["forward_seconds_after"] > 0
    assert results["structured"]["parameters_after"] == compaction["parameters_after"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert (model.config.intermediate_size, model.config.num_attention_heads, model.config.num_key_value_heads) == (
        88,
        2,
        2,
    )
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 88)
    # The automatic choice is FLAP: its compensation biases were added before the optimizer, trained, saved
    assert results["structured"]["method"] == "flap" and model.config.mlp_bias and model.config.attention_bias
    assert model.model.layers[0].mlp.down_proj.bias is not None
    assert 1.0 < results["after"]["val/ppl"] < float("inf")
    # Units, not zeros: a compacted model holds no zeros, and that is no missed target.
    assert not [w for w in results["warnings"] if "sparsity" in w["kind"]] and results["target_sparsity"] is None


@pytest.mark.slow
def test_filters_cnn_recipe_compacts_the_convolutions(tmp_path: Path) -> None:
    cfg = compose_config(
        "filters_cnn",
        tmp_path,
        "dense_epochs=1",
        "trainer.max_epochs=2",
        "pruning.epochs_per_cycle=1",
        "trainer.limit_train_batches=4",
    )
    results = run(cfg)
    assert results["compaction"]["parameters_after"] < results["compaction"]["parameters_before"]
    assert not [w for w in results["warnings"] if "sparsity" in w["kind"]] and results["target_sparsity"] is None
    state = torch.load(tmp_path / "model" / "model.pt")
    assert state["conv1.weight"].shape[0] == 16 and state["conv2.weight"].shape[0] == 32


def test_structured_run_reports_units_and_parameters_in_results_report_and_plot(tmp_path: Path) -> None:
    cfg = compose_config(
        "quickstart",
        tmp_path,
        "dense_epochs=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1",
        "pruning.sparsity=0.5",
        "pruning.frequency=1",
        "pruning.structure=neuron",
        "pruning.compact_on_end=true",
        "plots=true",
    )
    results = run(cfg)
    # The digits MLP 64 → 256 → 256 → 10 loses half of both hidden layers' neurons.
    layers = {
        "model.fc1": [64 * 256 + 256, 64 * 128 + 128],
        "model.fc2": [256 * 256 + 256, 128 * 128 + 128],
        "model.classifier": [256 * 10 + 10, 128 * 10 + 10],
    }
    before, after = sum(b for b, _ in layers.values()), sum(a for _, a in layers.values())
    recorded = json.loads((tmp_path / "results.json").read_text())
    structured = recorded["structured"]
    assert results["structured"] == structured
    assert structured["units"] == {"neurons": {"removed": 256, "total": 512}}
    assert structured["removed"] == {"model.fc1": 128, "model.fc2": 128}
    assert structured["layer_parameters"] == layers
    assert (structured["parameters_before"], structured["parameters_after"]) == (before, after) == (85_002, 26_122)
    assert structured["parameter_ratio"] == after / before
    compaction = recorded["compaction"]
    assert (compaction["parameters_before"], compaction["parameters_after"]) == (before, after)
    assert compaction["timing_rounds"] == 7 and compaction["speedup"] == pytest.approx(
        compaction["forward_seconds_before"] / compaction["forward_seconds_after"]
    )
    report = (tmp_path / "sparsity_report.md").read_text()
    assert f"{before:,} → {after:,} parameters (ratio {after / before:.4f}, {before - after:,} removed)" in report
    assert "| neurons | 256 | 512 |" in report and "| model.fc2 | neuron | 128 | 128 | 256 |" in report
    assert f"| model.fc2 | {256 * 256 + 256} | {128 * 128 + 128} |" in report
    assert "median of 7 interleaved rounds" in report
    plots = tmp_path / "plots"
    assert (plots / "structured_parameters.png").read_bytes()[:4] == b"\x89PNG"
    assert not (plots / "layer_sparsity.png").exists()  # a compacted model has no zeros to plot


@pytest.mark.slow
def test_moe_experts_recipe_removes_experts_distills_and_saves_a_stock_moe(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = compose_config(
        "moe_experts",
        tmp_path,
        "dense_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "data.seq_len=16",
        "data.vocab_size=300",
        "model.config.hidden_size=32",
        "model.config.num_hidden_layers=2",
        "pruning.num_samples=16",
    )
    results = run(cfg)
    assert results["experts"]["kept"] == {f"model.model.layers.{i}.mlp.experts": [4, 8] for i in range(2)}
    compaction = results["compaction"]
    assert compaction["parameters_after"] == results["experts"]["parameters_after"] < compaction["parameters_before"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.num_experts == 4 and model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
    assert 1.0 < results["after"]["val/ppl"] < float("inf")
    assert not [w for w in results["warnings"] if "sparsity" in w["kind"]] and results["target_sparsity"] is None


@pytest.mark.slow  # three short staged runs each (~10 s); run by default
@pytest.mark.parametrize(
    ("recipe", "compacted"), [("structured_llama", False), ("structured_llama", True), ("moe_experts", True)]
)
def test_resume_after_a_stage_that_changed_the_models_shape_equals_the_uninterrupted_run(
    tmp_path: Path, recipe: str, compacted: bool
) -> None:
    """A stage checkpoint after StructuredPruning (FLAP) holds the biases its `setup` added and, compacted,
    the smaller model (ExpertPruning: fewer experts): the resumed run gives the freshly built model both
    (replaying the compaction from the saved unit masks and routing) before loading it (it was refused), and
    the later stage distills from a dense teacher built anew (the dense model had neither)."""

    def overrides(out: Path) -> list[str]:
        fail = f"fail:{{_target_:test_stages.FailOnce,marker:'{out}/interrupted',step:1}}"
        kd = "kd:{_target_:lightning_prune.KnowledgeDistillation,alpha:0.5}"
        stages = (
            "stages=[{name:dense,trainer:{max_epochs:'${dense_epochs}'}},{name:prune,use:[pruning],trainer:{max_epochs:1}},"
            f"{{name:tune,callbacks:{{{kd},{fail}}},trainer:{{max_epochs:1}}}}]"
        )
        tiny = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.seq_len=16", "callbacks={}"]
        settings = [f"pruning.compact_on_end={str(compacted).lower()}", "pruning.num_samples=8", "data.vocab_size=300"]
        return [stages, "dense_epochs=1", *settings, *tiny]

    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir()
    (whole / "interrupted").touch()  # the probe never fires here
    expected = run(compose_config(recipe, whole, *overrides(whole)))
    with pytest.raises(RuntimeError, match="interrupted"):
        run(compose_config(recipe, interrupted, *overrides(interrupted)))
    resumed = run(compose_config(recipe, interrupted, *overrides(interrupted), "resume=true"))
    assert resumed["resumed_after"] == "prune" and resumed["after"] == expected["after"]
    from safetensors.torch import load_file

    model, reference = (load_file(out / "model" / "model.safetensors") for out in (interrupted, whole))
    assert model.keys() == reference.keys() and all(torch.equal(model[key], reference[key]) for key in model)
    if recipe == "moe_experts":  # half of tiny_qwen3_moe's 8 experts removed: the router scores 4
        assert model["model.layers.0.mlp.gate.weight"].shape == (4, 64)
    else:  # FLAP's bias; half of tiny_llama's 176 MLP neurons removed when compacted
        assert resumed["structured"]["method"] == "flap" and "model.layers.0.mlp.down_proj.bias" in model
        assert model["model.layers.0.mlp.down_proj.weight"].shape[1] == (88 if compacted else 176)
