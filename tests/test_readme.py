"""Every command and code block of README.md, extracted from the README itself so that it cannot drift.

Bash blocks: the install and test commands must be the ones `.ci/run` runs; every `lightning-prune`
line runs in-process (`cli.main()` with that argv) with small overrides appended (fewer batches,
a short text, no progress bar). Python blocks run with `exec`, each in its own directory, on tiny
stand-ins for the names the README leaves to the reader (`model`, `data`, ...). Placeholders are
explicit: PLACEHOLDERS maps each one to what the test substitutes.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_prune import cli
from lightning_prune.report import max_nonzeros_per_group

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
TEXT_RECIPES = {"gmp_finetune", "wanda_2of4", "sparsegpt_50", "wanda_2of4_lora"}
QUIET = ["trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "tensorboard=false"]
DIGITS_SMALL = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
# The smollm2_* recipes: short windows, few calibration sequences, one training step (tests/test_smollm2_recipes.py).
SMOLLM2_SMALL = ["data.seq_len=32", "data.batch_size=2", "data.val_windows=2", "pruning.num_samples=4"]
SMOLLM2_ONESHOT = ["pruning.targets=[layers.0.]"]


def commands(block: str) -> list[list[str]]:
    """Shell commands of a block: continuation lines joined, comments dropped, split at `&&`."""
    joined = block.replace("\\\n", " ")
    result = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            result.append(words[:end])
            words = words[end + 1 :]
    return result


BASH = [command for language, block in BLOCKS if language == "bash" for command in commands(block)]
CLI_COMMANDS = [command[1:] for command in BASH if command[0] == "lightning-prune"]
PYTHON = [block for language, block in BLOCKS if language == "python"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama saved with its own tokenizer, and a short UTF-8 text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_prune.data.corpus import pydoc_topics, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("readme")
    text = "\n".join(pydoc_topics())[:12_000]
    (root / "corpus.txt").write_text(text)
    tokenizer = train_bpe_tokenizer([text], 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=16,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf-model")
    tokenizer.save_pretrained(root / "hf-model")
    return {"model": root / "hf-model", "corpus": root / "corpus.txt"}


def placeholders(pretrained: dict[str, Path]) -> dict[str, str]:
    """README placeholder -> what the test puts there."""
    return {
        "/path/to/hf-model": str(pretrained["model"]),
        "/path/to/model": str(pretrained["model"]),
        "my_package.MyModule": "lightning_prune.models.ClassifierModule",
        "my_package.MyData": "lightning_prune.data.DigitsDataModule",
    }


def substitute(text: str, pretrained: dict[str, Path]) -> str:
    for placeholder, value in placeholders(pretrained).items():
        text = text.replace(placeholder, value)
    return text


def test_install_and_test_commands_are_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    first = BLOCKS[0][1]
    assert BLOCKS[0][0] == "bash" and "pip install" in first
    for command in commands(first):
        if command[0] == "lightning-prune":
            assert command == ["lightning-prune"]  # the main job: run below with the other commands
            continue
        # `pip install -e .` is covered by CI's `pip install -e ".[test]"` (a superset).
        text = shlex.join(command).replace("-e .", "-e '.[test]'").replace("'.[test]'", '".[test]"')
        assert text in ci, f"README command {text!r} is not in .ci/run"
    assert {command[0] for command in BASH} == {"pip", "python", "lightning-prune"}


def small_overrides(arguments: list[str], corpus: Path) -> list[str]:
    """Fewer epochs and batches and a short text, for the keys the command does not set itself."""
    recipe = next((a.split("=", 1)[1] for a in arguments if a.startswith("recipe=")), "quickstart")
    pruning = next((a.split("=", 1)[1] for a in arguments if a.startswith("pruning=")), None)
    small = [
        *QUIET,
        *DIGITS_SMALL,
        "dense_epochs=1",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=1.0",
        "plots=false",
    ]
    if pruning == "iterative":
        small += ["pruning.cycles=1", "pruning.epochs_per_cycle=1"]
    if recipe == "gmp_chain":  # its later stages set their own epochs
        small += [f"stages.{index}.trainer.max_epochs=1" for index in (1, 2, 3)]
    if recipe == "minilm_2of4_distill":  # the real MiniLM: one block pruned, two distillation steps
        small = [entry for entry in small if not entry.startswith("dense_epochs=")]  # its stages have no dense stage
        small += [
            "data.max_length=32",
            "data.batch_size=4",
            "pruning.num_samples=8",
            "pruning.targets=[encoder.layer.0.]",
            "pruning.reconstruct_steps=2",
            "+trainer.max_steps=2",
        ]
    if recipe.startswith("smollm2_"):  # the real SmolLM2 (its directory given by the caller): 2 blocks, 1 step
        small = [entry for entry in small if not entry.startswith(("dense_epochs=", "trainer.max_epochs="))]
        small += [*SMOLLM2_SMALL, *(SMOLLM2_ONESHOT if recipe != "smollm2_structured" else [])]
        small += ["export.targets=[layers.0.]"] if recipe in ("smollm2_2of4_lora", "smollm2_2of4_distill") else []
    if recipe in TEXT_RECIPES:
        small += ["data.seq_len=16", "data.vocab_size=300", "data.batch_size=4", f"data.files=[{corpus}]"]
        if pruning in (None, "wanda", "sparsegpt") and recipe != "gmp_finetune":
            small += ["pruning.num_samples=8", "pruning.progress=false"]
    given = {a.lstrip("+").split("=", 1)[0] for a in arguments}
    return arguments + [entry for entry in small if entry.split("=", 1)[0] not in given]


def run_cli(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", ["lightning-prune", *arguments])
    try:
        cli.main()
    except SystemExit as exit_info:
        return int(exit_info.code or 0)
    return 0


def slow_if(condition: bool, value: Any) -> Any:
    return pytest.param(value, marks=pytest.mark.slow) if condition else value


@pytest.mark.parametrize(
    "arguments", [slow_if("-m" in c, c) for c in CLI_COMMANDS], ids=[" ".join(c) or "(default)" for c in CLI_COMMANDS]
)
def test_cli_command_runs(
    arguments: list[str],
    pretrained: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(pretrained["corpus"].read_text())
    arguments = [substitute(a, pretrained) for a in arguments]
    if any(a.startswith("recipe=smollm2_") for a in arguments) and not any(a.startswith("model.") for a in arguments):
        # The session's SmolLM2 directory (loaded from GGUF once) instead of ~17 s of GGUF loading per command.
        arguments.append(f"model.model_path={request.getfixturevalue('smollm2').directory}")
    if "--help" in arguments or "--cfg" in arguments:
        assert run_cli(arguments, monkeypatch) == 0
        printed = capsys.readouterr().out
        assert ("== Config groups" in printed) if "--help" in arguments else ("_target_: lightning_prune." in printed)
        return
    if "resume=true" in arguments:  # the same run first, so that there are stage checkpoints to resume from
        assert (
            run_cli(small_overrides([a for a in arguments if a != "resume=true"], pretrained["corpus"]), monkeypatch)
            == 0
        )
    assert run_cli(small_overrides(arguments, pretrained["corpus"]), monkeypatch) == 0
    if "-m" in arguments:
        (summary,) = tmp_path.glob("multirun/*/*/sweep_summary.json")
        jobs = json.loads(summary.read_text())["jobs"]
        assert [job["status"] for job in jobs] == ["completed"] * 3
        sparsities = [
            json.loads((Path(job["output_dir"]) / "results.json").read_text())["global_sparsity"] for job in jobs
        ]
        assert sparsities == pytest.approx([0.5, 0.8, 0.95], abs=1e-3)
        return
    (results_path,) = tmp_path.glob("outputs/*/*/results.json")
    results = json.loads(results_path.read_text())
    assert results["status"] == "completed" and results["warnings"] == []


# ---- Python blocks: stand-ins for the names the README leaves to the reader ------------------------


def digits_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from lightning_prune.data import DigitsDataModule
    from lightning_prune.models import ClassifierModule

    return {"model": ClassifierModule(arch="mlp", hidden=64), "data": DigitsDataModule(batch_size=256)}


def check_one_callback(namespace: dict[str, Any], directory: Path) -> None:
    state = torch.load(directory / "pruned.pt")
    assert float((state["model.fc1.weight"] == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)


def oneshot_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    return {"calibration_ids": [torch.randint(0, 250, (2, 16), generator=generator) for _ in range(4)]}


def check_two_of_four(namespace: dict[str, Any], directory: Path) -> None:
    weight = namespace["model"].model.layers[0].mlp.up_proj.weight
    assert max_nonzeros_per_group(weight.detach(), 4) == 2


def callbacks_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from lightning_prune.data import TextDataModule
    from lightning_prune.models import CausalLMModule

    module = CausalLMModule(model_path=str(pretrained["model"]))
    short = pretrained["corpus"].with_name("short.txt")
    short.write_text(pretrained["corpus"].read_text()[:3000])  # a few batches: one epoch of LoRA recovery
    data = TextDataModule(files=[str(short)], tokenizer=str(pretrained["model"]), seq_len=16, batch_size=8)
    return {"module": module, "data": data}


def check_export(namespace: dict[str, Any], directory: Path) -> None:
    manifest = json.loads((directory / "export" / "lightning_prune_export.json").read_text())
    assert manifest["format"] == "sparse-24-bitmask"


def export_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_prune import finalize, prune_oneshot

    model = AutoModelForCausalLM.from_pretrained(pretrained["model"])
    prune_oneshot(model, [{"input_ids": torch.randint(0, 250, (2, 16))}], method="magnitude", pattern="2:4")
    finalize(model)
    return {"model": model, "tokenizer": AutoTokenizer.from_pretrained(pretrained["model"])}


def reconstruct_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from lightning_prune import prune_oneshot

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 250, (2, 16), generator=generator)} for _ in range(2)]
    return {
        "model": AutoModelForCausalLM.from_pretrained(pretrained["model"]),
        "batches": batches,
        "prune_oneshot": prune_oneshot,
    }


def check_reconstructed(namespace: dict[str, Any], directory: Path) -> None:
    check_two_of_four(namespace, directory)
    assert namespace["report"].global_sparsity == pytest.approx(0.5)


def distill_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_prune import KnowledgeDistillation, OneShotPruning

    return {
        **callbacks_standins(pretrained),
        "pl": pl,
        "OneShotPruning": OneShotPruning,
        "KnowledgeDistillation": KnowledgeDistillation,
    }


def check_distilled(namespace: dict[str, Any], directory: Path) -> None:
    distill = namespace["callbacks"][1]
    assert distill.teacher is not None and not any(p.requires_grad for p in distill.teacher.parameters())
    weight = namespace["module"].model.model.layers[0].mlp.up_proj.weight
    assert max_nonzeros_per_group(weight.detach(), 4) == 2


def structured_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    # 4 key/value heads (of 8 query heads), so 25% of the heads is one whole GQA group.
    config = LlamaConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=64,
        max_position_embeddings=32,
    )
    generator = torch.Generator().manual_seed(0)
    return {
        "model": AutoModelForCausalLM.from_config(config),
        "batches": [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(2)],
    }


def check_compacted(namespace: dict[str, Any], directory: Path) -> None:
    config = namespace["small"].config
    assert (
        config.num_hidden_layers,
        config.intermediate_size,
        config.num_attention_heads,
        config.num_key_value_heads,
    ) == (2, 48, 6, 3)


def no_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    return {}


def check_any_network(namespace: dict[str, Any], directory: Path) -> None:
    report = namespace["report"]
    assert report.global_sparsity == 0.5
    assert report.notes[0].startswith("calibrated in one whole-model pass (no block list found)")
    for layer in (namespace["cnn"][0], namespace["cnn"][2]):  # the convolutions, 2:4 along weight.flatten(1)
        groups = (layer.weight.flatten(1) != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all())
    assert bool((namespace["cnn"][5].weight != 0).all())  # the classifier head stays dense


def experts_standins(pretrained: dict[str, Path]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=64,
        max_position_embeddings=32,
    )
    generator = torch.Generator().manual_seed(0)
    return {
        "moe": AutoModelForCausalLM.from_config(config),
        "batches": [{"input_ids": torch.randint(0, 64, (2, 16), generator=generator)} for _ in range(2)],
    }


def check_experts(namespace: dict[str, Any], directory: Path) -> None:
    smaller = namespace["smaller"]
    assert smaller.config.num_experts == 2
    assert all(layer.mlp.experts.gate_up_proj.shape[0] == 2 for layer in smaller.model.layers)


def check_perplexity(namespace: dict[str, Any], directory: Path) -> None:
    result = namespace["result"]
    assert (result.windows, result.tokens) == (16, 16 * 255)
    assert result.ppl == pytest.approx(math.exp(result.nll)) and result.ppl > 1.0


def check_learned(namespace: dict[str, Any], directory: Path) -> None:
    from lightning_prune import get_masks

    masks = get_masks(namespace["module"])
    assert masks  # the argmax became ordinary bool masks at the end of the fit
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name


# A distinctive line of each Python block -> (stand-ins, check after it ran).
PYTHON_BLOCKS: dict[str, tuple[Callable[[dict[str, Path]], dict[str, Any]], Callable[[dict[str, Any], Path], None]]] = {
    "pruning = GradualPruning(": (digits_standins, check_one_callback),
    "peft_model = attach_lora(model, r=8, alpha=16)": (oneshot_standins, check_two_of_four),
    "reconstruct=True, reconstruct_steps=100": (reconstruct_standins, check_reconstructed),
    'KnowledgeDistillation(alpha=0.0, loss="cosine")': (distill_standins, check_distilled),
    "small = compact(model)": (structured_standins, check_compacted),
    "LoRARecovery(r=8, alpha=16, lr=2e-3)": (callbacks_standins, check_export),
    'model = load_sparse("export/")': (export_standins, check_two_of_four),
    'pattern="2:4")\n': (no_standins, check_any_network),
    "prune_experts(moe, batches": (experts_standins, check_experts),
    "evaluate_perplexity(model, tokenizer, text=held_out": (no_standins, check_perplexity),
    'LearnedSparsity(pattern="2:4", prior="sparsegpt", lr=1e-2)': (callbacks_standins, check_learned),
}


def test_every_python_block_is_run_below() -> None:
    assert [sum(key in block for key in PYTHON_BLOCKS) for block in PYTHON] == [1] * len(PYTHON)


@pytest.mark.parametrize("key", [slow_if("LoRA" in key or "Distillation" in key, key) for key in PYTHON_BLOCKS])
def test_python_block_runs(
    key: str,
    pretrained: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (block,) = [block for block in PYTHON if key in block]
    monkeypatch.chdir(tmp_path)
    standins, check = PYTHON_BLOCKS[key]
    namespace = {"__name__": "readme", **standins(pretrained)}
    exec(compile(substitute(block, pretrained), f"README.md[{key}]", "exec"), namespace)
    check(namespace, tmp_path)
    if "print(" in block and "report.notes" not in block:
        assert "Sparsity report" in capsys.readouterr().out  # the rich table
