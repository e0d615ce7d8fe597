"""StructuredPruning with an explicit FLAP on a Llama: its compensation biases train, resume and reload stock."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_prune import StructuredPruning
from lightning_prune.masking import get_masks
from lightning_prune.models import CausalLMModule
from tests.conftest import make_trainer, tiny_llama_config

CONFIG = tiny_llama_config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)  # hidden 32, MLP 64


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader([{"input_ids": torch.randint(0, 48, (16,), generator=generator)} for _ in range(16)], 4)


def flap(compact_on_end: bool = False) -> StructuredPruning:
    return StructuredPruning(
        mlp_sparsity=0.5, head_sparsity=0.5, method="flap", num_samples=8, compact_on_end=compact_on_end
    )


def module() -> CausalLMModule:
    pl.seed_everything(0, verbose=False)
    return CausalLMModule(config=CONFIG, lr=1e-2)


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> tuple[CausalLMModule, StructuredPruning, pl.Trainer, Path]:
    """A fit of 3 steps with FLAP pruning at its start, checkpointed at its end."""
    directory = tmp_path_factory.mktemp("flap")
    model, pruning = module(), flap()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True)
    trainer = make_trainer(max_steps=3, callbacks=[pruning, checkpoint], enable_checkpointing=True)
    trainer.fit(model, loader())
    return model, pruning, trainer, directory / "last.ckpt"


def test_flap_biases_are_added_before_the_optimizer_is_built_and_train(checkpointed) -> None:
    model, pruning, trainer, _ = checkpointed
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {name for name, p in model.named_parameters() if id(p) not in optimized} == set()
    layer = model.model.model.layers[0]
    assert model.model.config.mlp_bias and model.model.config.attention_bias
    gate_bias, keep = layer.mlp.gate_proj.bias.detach(), get_masks(model)["model.model.layers.0.mlp.gate_proj.bias"]
    assert bool((gate_bias[keep] != 0).all()) and bool((gate_bias[~keep] == 0).all())  # trained; removed stay 0
    # Per layer: q, k, v, o (32 each), gate, up (64 each), down (32); q, k, v, gate and up only because
    # `attention_bias` / `mlp_bias` cover every projection of the block.
    report = pruning.report
    assert report is not None and sum(report.added_parameters.values()) == 2 * (4 * 32 + 64 + 64 + 32)
    assert set(report.added_for_config) == {
        f"model.model.layers.{i}.{name}.bias"
        for i in (0, 1)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    }
    assert report.added_line() == (
        "flap added 14 bias parameters (576 elements); 10 of them (448 elements, e.g. "
        "model.model.layers.0.self_attn.q_proj.bias) only because the config flag that states a bias covers "
        "every projection of the block (they start at zero)"
    )
    assert report.as_dict()["added_for_config"] == report.added_for_config


def test_flap_checkpoint_resumes_into_a_fresh_module(checkpointed) -> None:
    trained, _, _, path = checkpointed
    resumed, pruning = module(), flap()
    trainer = make_trainer(max_steps=5, callbacks=[pruning])
    trainer.fit(resumed, loader(), ckpt_path=path)
    assert trainer.global_step == 5 and pruning.report is None  # restored, not pruned again
    masks, expected = get_masks(resumed), get_masks(trained)
    assert masks.keys() == expected.keys() and all(torch.equal(masks[k], expected[k]) for k in masks)
    assert all(bool((resumed.get_parameter(k)[~m] == 0).all()) for k, m in masks.items())


def test_flap_compacted_model_loads_with_stock_from_pretrained_and_equal_outputs(tmp_path: Path) -> None:
    model = module()
    make_trainer(max_steps=2, callbacks=[flap(compact_on_end=True)]).fit(model, loader())
    network = model.model.eval()
    config = network.config
    assert (config.intermediate_size, config.num_attention_heads, config.mlp_bias, config.attention_bias) == (
        32,
        2,
        True,
        True,
    )
    network.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.model.layers[1].mlp.up_proj.bias.shape == (32,)
    inputs = torch.arange(20).reshape(2, 10) % 48
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=inputs).logits, network(input_ids=inputs).logits)
