"""The scripts in examples/ run (in-process, small sizes) and reach what they print."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *argv: str) -> dict[str, Any]:
    """Load examples/<name>.py as a module (not as __main__) and call its `main(argv)`."""
    namespace = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=f"example_{name}")
    return namespace["main"](list(argv))


def test_plain_pytorch_loop_reaches_the_sparsity_and_still_classifies(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_example("plain_pytorch_loop", "--sparsity", "0.8", "--epochs", "3", "--hidden", "64")
    # round(0.8·n) per layer: 3277 of 4096 and 3277 of 4096.
    assert result["sparsity"] == pytest.approx(6554 / 8192)
    assert result["accuracy"] > 0.8
    assert f"sparsity {result['sparsity']:.4f}" in capsys.readouterr().out


def test_lightning_callback_reaches_the_sparsity_and_finalizes(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_example("lightning_callback", "--sparsity", "0.75", "--epochs", "3", "--hidden", "64")
    # fc1 64×64 and fc2 64×64: round(0.75·4096) = 3072 each; the classifier stays dense.
    assert result["sparsity"] == pytest.approx(0.75)
    assert result["masks_left"] == 0  # finalize_on_end removed every mask
    assert result["accuracy"] > 0.8
    assert "validation accuracy" in capsys.readouterr().out


def test_huggingface_oneshot_lora_keeps_2_of_4_through_the_merge(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_example("huggingface_oneshot_lora", "--samples", "16", "--steps", "6", "--batch", "8", "--lr", "2e-3")
    # MiniLM: 6 blocks × (query, key, value, attention output, intermediate, output) Linear layers.
    assert result["layers"] == 36 and result["two_four_layers"] == 36
    assert result["sparsity"] == pytest.approx(0.5)
    assert 0.0 < result["pruned_cosine"] < 1.0
    assert result["recovered_cosine"] > result["pruned_cosine"]  # LoRA moved the embeddings back towards the dense ones
    assert f"exactly 2:4 after merging {result['two_four_layers']:.0f}" in capsys.readouterr().out
