"""recovery.compat: layer names, block stacks, and the teacher/student checks, on plain modules."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_prune.recovery.compat import block_stacks, check_teacher_fits, resolve_layers, valid_layer_names
from tests.conftest import tiny_llama


def test_layers_resolve_block_indices_and_names_and_list_the_valid_patterns() -> None:
    model = tiny_llama(num_hidden_layers=3)
    assert block_stacks(model) == [("model.layers", 3)]
    assert resolve_layers(model, [0, -1, "model.norm"]) == ["model.layers.0", "model.layers.2", "model.norm"]
    assert resolve_layers(model, None) == []
    names = valid_layer_names(model)
    assert "model.layers.<i>.mlp.up_proj" in names and "model.layers.1.mlp.up_proj" not in names and "lm_head" in names
    with pytest.raises(ValueError, match=r"out of range for the 3 blocks of `model.layers`"):
        resolve_layers(model, [3])
    with pytest.raises(ValueError, match=r"Did you mean \['model\.norm', "):
        resolve_layers(model, ["model.nrm"])


def test_a_plain_mlp_has_no_block_stack_but_named_layers() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert block_stacks(mlp) == [] and valid_layer_names(mlp) == ["0", "1", "2"]
    assert resolve_layers(mlp, ["1"]) == ["1"]
    with pytest.raises(ValueError, match=r"no block stack"):
        resolve_layers(mlp, ["3"])


def test_teacher_checks_name_the_argument_and_both_sizes() -> None:
    student = tiny_llama()
    check_teacher_fits(student, tiny_llama(), "mse", ["model.layers.0"])  # same shapes: nothing to say
    check_teacher_fits(student, tiny_llama(hidden_size=48), "kl", [])  # logits of a wider teacher compare
    with pytest.raises(
        ValueError,
        match=r"`teacher` LlamaForCausalLM has hidden_size=48 but the student LlamaForCausalLM has hidden_size=32",
    ):
        check_teacher_fits(student, tiny_llama(hidden_size=48), "cosine", [])
    with pytest.raises(ValueError, match=r"`teacher` shares \d+ parameters"):
        check_teacher_fits(student, student, "kl", [])
    with pytest.raises(ValueError, match=r"2 blocks in `model.layers` and the `teacher` 1 blocks in `model.layers`"):
        check_teacher_fits(tiny_llama(num_hidden_layers=2), tiny_llama(), "mse", ["model.layers.0"])
    check_teacher_fits(
        tiny_llama(num_hidden_layers=2), tiny_llama(), "mse", ["model.norm"]
    )  # outside the blocks: still the same module
    with pytest.raises(
        ValueError, match=r"`layers` \['model.layers.1'\] exist in the student but not in the `teacher`"
    ):
        check_teacher_fits(tiny_llama(num_hidden_layers=2), tiny_llama(), "mse", ["model.layers.1"])
