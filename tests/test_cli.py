"""The `lightning-prune` pipeline in-process (Hydra compose API): every recipe with tiny settings,
the quickstart's sparsity and accuracy, its outputs, and configuration errors."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_prune import cli
from lightning_prune.cli import CONFIG_DIR
from lightning_prune.models import build_digits_net
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.run import ConfigError, run
from tests.conftest import QUIET_RUN, compose_config


def flatten(node: dict, prefix: str = "") -> dict[str, object]:
    """{dotted key: leaf value} of a nested mapping."""
    leaves: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            leaves.update(flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_every_recipe_composes_and_states_only_deltas() -> None:
    recipes = sorted(p.stem for p in (Path(CONFIG_DIR) / "recipe").glob("*.yaml"))
    assert {"quickstart", "gmp_finetune", "iterative_lottery"} <= set(recipes)
    primary = yaml.safe_load((Path(CONFIG_DIR) / "config.yaml").read_text())
    default_options = {
        key: value for entry in primary["defaults"] if isinstance(entry, dict) for key, value in entry.items()
    }
    checked = 0
    for recipe in recipes:
        text = (Path(CONFIG_DIR) / "recipe" / f"{recipe}.yaml").read_text()
        assert text.startswith("# @package _global_")
        body = yaml.safe_load(text) or {}
        groups = {}
        for entry in body.pop("defaults", []):
            ((key, option),) = entry.items()
            group = key.removeprefix("override /")
            assert option != default_options[group], f"{recipe}: `{key}: {option}` is already config.yaml's default"
            groups[group] = option
        # What the recipe's values would be without it: config.yaml with the recipe's group choices.
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            base = compose(
                "config", overrides=["~recipe", "output_dir=/unused", *(f"{g}={o}" for g, o in groups.items())]
            )
        for key, value in flatten(body).items():
            default = OmegaConf.select(base, key, default="<absent>")
            assert default != value, f"{recipe}: `{key}: {value!r}` repeats the default of config.yaml and its groups"
            checked += 1
        cfg = compose_config(recipe, Path("/unused"))
        assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_
    assert checked >= 2 * len(recipes)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quickstart")
    return out, run(compose_config("quickstart", out))


def test_quickstart_reaches_90_percent_and_keeps_accuracy(quickstart: tuple[Path, dict]) -> None:
    _, results = quickstart
    assert results["layer_sparsity"]["model.fc1.weight"] == pytest.approx(0.9, abs=1e-4)
    assert results["layer_sparsity"]["model.fc2.weight"] == pytest.approx(0.9, abs=1e-4)
    assert results["after"]["val/acc"] >= results["before"]["val/acc"] - 0.02


def test_quickstart_writes_every_output(quickstart: tuple[Path, dict]) -> None:
    out, _ = quickstart
    assert json.loads((out / "results.json").read_text())["global_sparsity"] == pytest.approx(0.9)
    assert "| model.fc2.weight | 256×256 | 65536 | 58982 | 0.9000 |" in (out / "sparsity_report.md").read_text()
    assert next(csv.reader((out / "sparsity_report.csv").open()))[0] == "layer"
    for png in ("layer_sparsity.png", "sparsity_vs_metric.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "history.csv").open()))
    prune_sparsity = [float(r["value"]) for r in rows if r["phase"] == "prune" and r["series"] == "sparsity"]
    assert prune_sparsity == sorted(prune_sparsity) and prune_sparsity[-1] == pytest.approx(0.9, abs=1e-3)
    assert any(r["series"] == "val/acc" for r in rows)
    assert "train/loss" in (out / "logs" / "prune" / "metrics.csv").read_text()
    # The saved state dict is finalized: dense keys, loads strictly into a fresh network, exact zeros.
    state = torch.load(out / "model" / "model.pt")
    net = build_digits_net("mlp", 256)
    net.load_state_dict(state, strict=True)
    assert float((net.fc2.weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-4)
    assert not torch.signbit(net.fc2.weight[net.fc2.weight == 0]).any()
    # The pattern column says what GMP enforced (unstructured), and whether the zeros happen to fit 4:8.
    patterns = {row["layer"]: row["pattern"] for row in csv.DictReader((out / "sparsity_report.csv").open())}
    for name in ("fc1", "fc2"):
        fits = max_nonzeros_per_group(getattr(net, name).weight, 8) <= 4
        assert patterns[f"model.{name}.weight"] == ("unstructured (fits 4:8)" if fits else "unstructured")


def test_gmp_finetune_tiny(tmp_path: Path) -> None:
    tiny = [
        "dense_epochs=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.val_check_interval=1.0",
        "data.seq_len=16",
        "data.vocab_size=300",
        "pruning.frequency=1",
    ]
    results = run(compose_config("gmp_finetune", tmp_path, *tiny))
    assert results["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # The dense phase beats uniform guessing over the 300 tokens, and pruning to 50% while
    # fine-tuning for as many steps again costs at most 5% of its perplexity.
    assert results["before"]["val/ppl"] < 300
    assert results["after"]["val/ppl"] <= 1.05 * results["before"]["val/ppl"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "model")) <= 300


def test_iterative_lottery_tiny(tmp_path: Path) -> None:
    tiny = [
        "pruning.cycles=2",
        "pruning.epochs_per_cycle=1",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "plots=false",
        "save_model=false",
    ]
    results = run(compose_config("iterative_lottery", tmp_path, *tiny))
    assert results["global_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert "before" not in results and "val/acc" in results["after"]
    assert not (tmp_path / "model").exists()


def test_extra_callbacks_and_dense_baseline_from_yaml_only(tmp_path: Path) -> None:
    overrides = [
        "pruning=none",
        "dense_epochs=0",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
        "plots=false",
    ]
    results = run(compose_config("quickstart", tmp_path, *overrides))
    assert results["global_sparsity"] == 0.0
    assert "lr-AdamW" in (tmp_path / "logs" / "prune" / "metrics.csv").read_text()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("pruning.sparsity=1.5", r"`pruning.sparsity`=1.5 .*must be a number in \[0, 1\)"),
        ("trainer.max_epochs=abc", r"`trainer.max_epochs`='abc' has the wrong type: .* expects Optional\[int\]"),
        ("dense_epochs=-1", r"`dense_epochs`=-1 is invalid: must be an integer >= 0"),
        (
            "+callbacks.bad._target_=torch.nn.ReLU",
            r"`callbacks.bad._target_`='torch.nn.ReLU' is not a Lightning Callback",
        ),
        ("+pruning.bogus=1", r"`pruning.bogus` is not an argument of lightning_prune.GradualPruning \(its arguments: "),
        ("+pruning.frequncy=1", r"GradualPruning \(its arguments: sparsity, .*\); did you mean `pruning.frequency`\?$"),
    ],
)
def test_bad_configuration_names_key_and_value(tmp_path: Path, override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(compose_config("quickstart", tmp_path, override))


def test_missing_model_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"required value `model.model_path` is not set"):
        run(compose_config("gmp_finetune", tmp_path, "model=causal_lm"))
    with pytest.raises(ConfigError, match=r"`model.model_path`='/no/such/dir' .*not a local model directory"):
        run(
            compose_config(
                "gmp_finetune", tmp_path, "model=causal_lm", "model.model_path=/no/such/dir", "data.vocab_size=300"
            )
        )


def test_oneshot_method_configs_differ_from_their_shared_base_only_in_method() -> None:
    base = yaml.safe_load((Path(CONFIG_DIR) / "oneshot_base.yaml").read_text())
    assert base["method"] == "???" and base["method_options"] == {}
    shared = {key: value for key, value in base.items() if key not in ("method", "method_options")}
    options = {"wanda": {}, "sparsegpt": {"blocksize": 128, "percdamp": 0.01}, "ria": {"a": 0.5, "scope": "layer"}}
    for method, method_options in options.items():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            node = OmegaConf.to_container(compose("config", overrides=["~recipe", f"pruning={method}"]).pruning)
        assert list(node) == list(base)  # every argument, in the base's order
        assert node == {**shared, "method": method, "method_options": method_options}


@pytest.mark.slow
def test_the_console_ends_with_where_the_run_went_and_its_metrics_before_and_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # Hydra's own run directory goes here
    out = tmp_path / "run"
    tiny = ["dense_epochs=1", "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]
    arguments = ["recipe=quickstart", f"output_dir={out}", *QUIET_RUN, *tiny, "plots=false"]
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments])
    cli.main()
    results = json.loads((out / "results.json").read_text())
    before, after = results["before"], results["after"]
    summary = (
        f"lightning-prune: run written to {out} (results.json, sparsity_report.md)\n"
        f"  val/acc: {before['val/acc']:.4f} → {after['val/acc']:.4f}\n"
        f"  val/loss: {before['val/loss']:.4f} → {after['val/loss']:.4f}\n"
        "  sparsity: 90.00% (target 90.00%)\n"
        f"  model: {out / 'model' / 'model.pt'}\n"
    )
    assert capsys.readouterr().out.endswith(summary)
    # Resumed after its last stage: the same metrics (carried in the checkpoint), and where it resumed.
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments, "resume=true"])
    cli.main()
    assert capsys.readouterr().out.endswith(summary + "  resumed after stage 'prune'\n")
