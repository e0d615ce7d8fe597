"""Exports say what they are: a sparse format with nothing pruned and an unmerged peft model are refused
before anything is written; SparseExport checks at fit start that no adapter is left unmerged."""

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune import attach_lora, finalize, find_targets, merge_lora, update_masks
from lightning_prune.callbacks.export import SparseExport
from lightning_prune.callbacks.lora import LoRARecovery
from lightning_prune.export import load_sparse, save_sparse
from lightning_prune.masking import set_mask
from lightning_prune.models import CausalLMModule
from tests.conftest import make_trainer, tiny_llama, tiny_llama_config

FORMATS = ["dense", "sparse-24-bitmask", "sparse-bitmask"]
SPARSE_FORMATS = ["sparse-24-bitmask", "sparse-bitmask"]
TINY_LLAMA = tiny_llama_config(max_position_embeddings=16)


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


def test_sparse_export_errors_name_dirpath(tmp_path):
    module = CausalLMModule(config=TINY_LLAMA)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"^`dirpath`='.*mine' is a non-empty directory that save_sparse did not"):
        SparseExport(tmp_path / "mine").preflight(module)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^`dirpath`='.*file' is an existing file, not a directory$"):
        SparseExport(tmp_path / "file").export(module)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_sparse_export_preflight_refuses_adapters_left_unmerged(tmp_path):
    module = CausalLMModule(config=TINY_LLAMA)
    pruned_2_4(module.model)
    export = SparseExport(tmp_path / "e", format="sparse-24-bitmask")
    export.check_adapters_merged([LoRARecovery(), export], module)  # merged before the export writes
    with pytest.raises(ValueError, match=r"LoRARecovery has `merge`=False and leaves its adapters unmerged"):
        export.check_adapters_merged([LoRARecovery(merge=False), export], module)
    with pytest.raises(ValueError, match=r"SparseExport comes before LoRARecovery .*; put SparseExport after"):
        export.check_adapters_merged([export, LoRARecovery()], module)
    attach_lora(module.model, r=2)  # attached by the user: nothing in the Trainer merges them
    with pytest.raises(
        ValueError,
        match=r"^the model SparseExport writes \(`attribute`=None\) \(LlamaForCausalLM\) still has 7 unmerged "
        r"adapter layer\(s\) .*; attach the adapters with a LoRARecovery\(merge=True\) placed before SparseExport",
    ):
        export.preflight(module)


def test_lora_recovery_without_merge_and_an_export_fail_at_fit_start(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY_LLAMA)
    pruned_2_4(module.model)
    data = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 48, (8,))} for _ in range(4)], batch_size=2)
    seen = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen.append(1)

    export = SparseExport(tmp_path / "export", format="sparse-24-bitmask")
    trainer = make_trainer(max_steps=2, callbacks=[LoRARecovery(r=2, merge=False), export, CountSteps()])
    with pytest.raises(ValueError, match=r"LoRARecovery has `merge`=False"):
        trainer.fit(module, train_dataloaders=data)
    assert seen == [] and listing(tmp_path) == []
