"""ExpertPruning in a Trainer: removes experts at fit start, keeps them removed while distilling from the
dense MoE, compacts at fit end, resumes with masks and routing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_prune import ExpertPruning, KnowledgeDistillation
from lightning_prune.masking import get_masks
from lightning_prune.models import CausalLMModule
from lightning_prune.structured.moe import find_expert_layers
from lightning_prune.structured.routing import routing_keep

QWEN3_MOE = dict(
    model_type="qwen3_moe",
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=64,
    max_position_embeddings=16,
)


def module(seed: int = 0) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(config=QWEN3_MOE, lr=1e-2)


def loader() -> DataLoader:
    ids = torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=8)


def trainer(callbacks: list[Any], tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_removes_experts_distills_from_the_dense_moe_and_compacts_at_fit_end() -> None:
    model = module()
    callback = ExpertPruning(expert_sparsity=0.5, num_samples=16)
    distill = KnowledgeDistillation(alpha=0.0)
    seen: dict[str, Any] = {}

    class Look(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            seen["student"] = [routing_keep(layer.router) for layer in find_expert_layers(pl_module)]
            seen["teacher"] = [routing_keep(layer.router) for layer in find_expert_layers(distill.teacher)]
            seen["masks"] = {k: v.clone() for k, v in get_masks(pl_module).items()}
            seen["weights"] = {k: p.detach().clone() for k, p in pl_module.named_parameters()}

    trainer([callback, distill, Look()], max_steps=3).fit(model, loader())
    assert all(keep is not None and int(keep.sum()) == 2 for keep in seen["student"])
    assert seen["teacher"] == [None, None]  # the teacher is the dense MoE
    down = seen["masks"]["model.model.layers.0.mlp.experts.down_proj"]
    removed = ~down.reshape(4, -1).any(1)
    assert int(removed.sum()) == 2 and not seen["weights"]["model.model.layers.0.mlp.experts.down_proj"][removed].any()
    assert callback.report is not None and callback.report.kept["model.model.layers.0.mlp.experts"] == (2, 4)
    inner = model.model  # compacted at fit end: a stock Qwen3-MoE with 2 experts per layer
    assert inner.config.num_experts == 2 and inner.model.layers[1].mlp.gate.weight.shape == (2, 32)
    assert not get_masks(model) and callback.compaction["parameters_after"] == callback.report.parameters_after


def test_checkpoint_resume_restores_masks_and_routing_and_does_not_prune_again(tmp_path: Path) -> None:
    model = module()
    first = ExpertPruning(experts_per_layer=3, method="frequency", num_samples=8, compact_on_end=False)
    fit = trainer([first], tmp_path, max_steps=2)
    fit.fit(model, loader())
    fit.save_checkpoint(tmp_path / "last.ckpt")
    resumed_model = module(seed=1)
    second = ExpertPruning(experts_per_layer=3, method="frequency", num_samples=8, compact_on_end=False)
    second.prune = lambda *args: pytest.fail("a resumed run must not prune again")  # type: ignore[method-assign]
    trainer([second], tmp_path, max_steps=4).fit(resumed_model, loader(), ckpt_path=tmp_path / "last.ckpt")
    for before, after in zip(find_expert_layers(model), find_expert_layers(resumed_model), strict=True):
        assert torch.equal(routing_keep(after.router), routing_keep(before.router))  # type: ignore[arg-type]
    for name, mask in get_masks(model).items():
        assert torch.equal(get_masks(resumed_model)[name], mask), name


def test_renormalize_false_that_compact_cannot_state_is_refused_before_training() -> None:
    torch.manual_seed(0)
    model = CausalLMModule(config={**QWEN3_MOE, "norm_topk_prob": False}, lr=1e-2)
    callback = ExpertPruning(expert_sparsity=0.5, renormalize=False, num_samples=8)
    fit = trainer([callback], max_steps=2)
    with pytest.raises(ValueError, match="renormalize=False"):
        fit.fit(model, loader())
    assert fit.global_step == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of `expert_sparsity` and `experts_per_layer`"),
        ({"expert_sparsity": 0.5, "experts_per_layer": 2}, "exactly one of"),
        ({"experts_per_layer": 0}, r"`experts_per_layer` must be an integer >= 1"),
        ({"expert_sparsity": 1.5}, r"`expert_sparsity` must be a number in \[0, 1\)"),
        ({"expert_sparsity": 0.5, "method": "wanda"}, "registered expert score"),
        ({"expert_sparsity": 0.5, "renormalize": "yes"}, "`renormalize` must be True or False"),
    ],
)
def test_bad_arguments_are_refused_when_the_callback_is_made(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExpertPruning(**kwargs)
