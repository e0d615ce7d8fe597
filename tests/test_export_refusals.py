"""Exports say what they are: a sparse format with nothing pruned and an unmerged peft model are refused
before anything is written."""

import copy
import json

import pytest
import torch
from torch import nn

from lightning_prune import attach_lora, finalize, find_targets, merge_lora, update_masks
from lightning_prune.export import load_sparse, save_sparse
from lightning_prune.masking import set_mask
from tests.conftest import tiny_llama

FORMATS = ["dense", "sparse-24-bitmask", "sparse-bitmask"]
SPARSE_FORMATS = ["sparse-24-bitmask", "sparse-bitmask"]


def pruned_2_4(model: nn.Module) -> nn.Module:
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("format", SPARSE_FORMATS)
def test_a_sparse_format_with_nothing_pruned_is_refused_before_writing(tmp_path, format):
    dense = tiny_llama(max_position_embeddings=16)
    with pytest.raises(
        ValueError,
        match=rf"^`format`='{format}' writes the pruned layers in a sparse layout, but no layer of LlamaForCausalLM "
        r"is pruned: .*; prune the model first \(.*\), or use format='dense'$",
    ):
        save_sparse(dense, tmp_path / "out", format=format)
    assert listing(tmp_path) == []  # no destination, no temporary directory
    # The weights `targets` selects, all dense: named, and nothing written either.
    with pytest.raises(
        ValueError,
        match=r"none of the 1 weight\(s\) `targets`='o_proj' selects \(\['model.layers.0.self_attn.o_proj.weight'\]\) "
        r"holds a pruned \(exact zero\) entry; .*select pruned layers with `targets`, or use format='dense'$",
    ):
        save_sparse(dense, tmp_path / "out", format=format, targets="o_proj")
    assert listing(tmp_path) == []
    manifest = json.loads((save_sparse(dense, tmp_path / "out") / "lightning_prune_export.json").read_text())
    assert manifest["format"] == "dense" and manifest["target_params"] == []  # dense stays allowed


@pytest.mark.parametrize("format", SPARSE_FORMATS)
def test_masks_that_prune_nothing_are_refused_and_the_old_export_is_kept(tmp_path, format):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    path = save_sparse(model, tmp_path / "m")
    before = {name: (path / name).read_bytes() for name in listing(path)}
    set_mask(model[0], torch.ones(8, 8, dtype=torch.bool))  # masked, but no entry pruned
    with pytest.raises(
        ValueError,
        match=rf"`format`='{format}' .* none of the 1 weight\(s\) it would write sparse \(\['0.weight'\]\) "
        r"holds a pruned \(exact zero\) entry",
    ):
        save_sparse(model, path, format=format)
    assert listing(tmp_path) == ["m", *(f"m/{name}" for name in before)]
    assert {name: (path / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("format", FORMATS)
def test_an_unmerged_peft_model_is_refused_and_the_merged_one_loads_without_a_model(tmp_path, format):
    torch.manual_seed(0)
    model = pruned_2_4(tiny_llama(max_position_embeddings=16))
    peft_model = attach_lora(model, r=2)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a non-zero delta, so the merge changes the weights
    with pytest.raises(
        ValueError,
        match=r"^`model` \(PeftModel\) still has 7 unmerged adapter layer\(s\) "
        r"\['base_model.model.model.layers.0.self_attn.q_proj', .*\] ...: .*; merge the adapters first: "
        r"`model = merge_lora\(peft_model\)`",
    ):
        save_sparse(peft_model, tmp_path / "out", format=format)
    with pytest.raises(ValueError, match=r"^`model` \(LlamaForCausalLM\) still has 7 unmerged adapter layer"):
        save_sparse(model, tmp_path / "out", format=format)  # peft injected the layers in place
    assert listing(tmp_path) == []
    merged = merge_lora(peft_model)
    with pytest.raises(ValueError, match="is a peft PeftModel wrapper with no adapter layer left: export the model"):
        save_sparse(peft_model, tmp_path / "out", format=format)
    expected = finalize(copy.deepcopy(merged)).state_dict()
    loaded = load_sparse(save_sparse(merged, tmp_path / "out", format=format))  # a Hugging Face export
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
