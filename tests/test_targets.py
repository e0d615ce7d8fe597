"""targets.py: module types, name patterns, ignore lists, dense heads by default, clear errors."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_prune.targets import find_targets
from tests.conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama


def mixed() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Conv1d(8, 8, 3), nn.Conv2d(8, 8, 3), Conv1D(6, 8), nn.Linear(6, 2))


def test_default_types_cover_linear_convs_and_hf_conv1d_but_not_the_last_layer() -> None:
    targets = find_targets(mixed())
    assert [t.name for t in targets] == ["0.weight", "1.weight", "2.weight", "3.weight"]
    assert [t.transposed for t in targets] == [False, False, False, True]


def test_types_restrict_the_search() -> None:
    found = find_targets(mixed(), types=[nn.Conv1d, nn.Conv2d], ignore_output_head=False)
    assert [t.name for t in found] == ["1.weight", "2.weight"]


def test_matrix_view_is_out_by_in_for_every_layer_type() -> None:
    shapes = [t.as_matrix(t.weight).shape for t in find_targets(mixed(), ignore_output_head=False)]
    assert shapes == [(8, 4), (8, 24), (8, 72), (6, 8), (2, 6)]  # Conv1D(6, 8): weight (8, 6) stored (in, out)


def test_matrix_view_writes_reach_the_weight_and_round_trip() -> None:
    target = find_targets(nn.Sequential(Conv1D(3, 2), nn.Linear(3, 1)))[0]
    matrix = target.as_matrix(target.weight.detach())
    assert matrix.shape == (3, 2)
    matrix[2, 1] = 7.0
    assert float(target.weight.detach()[1, 2]) == 7.0
    assert torch.equal(target.from_matrix(target.as_matrix(target.weight)), target.weight)


def test_include_and_ignore_regexes() -> None:
    llama = tiny_llama()
    mlp = [t.name for t in find_targets(llama, include=r"mlp\.")]
    assert mlp == [f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    kept = [t.name for t in find_targets(llama, ignore=[r"q_proj", r"k_proj", "mlp"])]
    assert kept == ["model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"]


def test_include_may_target_the_head_by_name() -> None:
    assert [t.name for t in find_targets(tiny_llama(), include="lm_head")] == ["lm_head.weight"]


@pytest.mark.parametrize(
    ("build", "count", "dense"),
    [
        (tiny_llama, 7, ["lm_head", "embed_tokens"]),
        (tiny_gpt2, 4, ["lm_head", "wte", "wpe"]),
        (tiny_bert_classifier, 7, ["classifier", "embeddings"]),
    ],
)
def test_hf_heads_and_embeddings_stay_dense_by_default(build, count: int, dense: list[str]) -> None:
    names = [t.name for t in find_targets(build())]
    assert len(names) == count
    assert not [name for name in names if any(d in name for d in dense)]


def test_plain_sequential_leaves_its_last_layer_dense_unless_asked() -> None:
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    assert [t.name for t in find_targets(model)] == ["1.weight"]
    assert [t.name for t in find_targets(model, ignore_output_head=False)] == ["1.weight", "3.weight"]


def test_nothing_matching_is_an_error_listing_the_modules() -> None:
    with pytest.raises(ValueError, match=r"`targets`='nope'.*prunable modules are: \[0, 1\]"):
        find_targets(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), include="nope")


def test_invalid_regex_names_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`ignore` has an invalid regular expression '\['"):
        find_targets(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ignore="[")
