"""The registry: a method registered in a test works from prune_oneshot, OneShotPruning in a Trainer
and a Hydra override, without touching the package; clear errors for unknown names and options."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from lightning_prune import OneShotMethod, OneShotPruning, Registry, prune_oneshot, register_method
from lightning_prune.cli import CONFIG_DIR
from lightning_prune.masking import get_masks
from lightning_prune.models import CausalLMModule
from lightning_prune.oneshot import FeatureNormStats
from lightning_prune.oneshot.method import LayerStats
from lightning_prune.registry import MASK_REFINERS, ONESHOT_METHODS
from lightning_prune.run import run

LLAMA = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=16,
)
NAME = "test_even_columns"


class EvenColumns(OneShotMethod):
    """Prunes every even input column, whatever the sparsity (easy to recognise in a mask)."""

    statistics = (FeatureNormStats,)  # collected, to exercise the calibration path

    shapes: ClassVar[list[tuple[int, int, int]]] = []  # (offset, out, in) of every weight pruned, over all instances

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def prune(
        self, weight: torch.Tensor, stats: LayerStats, sparsity: float, pattern: str | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert int(stats[FeatureNormStats].count) > 0
        keep = torch.ones_like(weight, dtype=torch.bool)
        keep[:, self.offset :: 2] = False
        EvenColumns.shapes.append((self.offset, *weight.shape))
        return weight, keep


def expected_mask(shape: torch.Size, offset: int = 0) -> torch.Tensor:
    keep = torch.ones(shape, dtype=torch.bool)
    keep[:, offset::2] = False
    return keep


@pytest.fixture
def registered() -> Iterator[type[EvenColumns]]:
    EvenColumns.shapes.clear()
    register_method(NAME)(EvenColumns)
    try:
        yield EvenColumns
    finally:
        ONESHOT_METHODS.unregister(NAME)
    assert NAME not in ONESHOT_METHODS


def batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": chunk} for chunk in ids.split(8)]


def test_prune_oneshot_uses_a_registered_method_with_options(registered: type[EvenColumns]) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(config=LLAMA, lr=1e-2)
    prune_oneshot(module, batches(), method=NAME, method_options={"offset": 1}, progress=False)
    masks = get_masks(module)
    assert len(masks) == 7
    for mask in masks.values():
        assert torch.equal(mask, expected_mask(mask.shape, offset=1))


def test_one_shot_pruning_callback_in_a_trainer_uses_it(registered: type[EvenColumns]) -> None:
    torch.manual_seed(0)
    module = CausalLMModule(config=LLAMA, lr=1e-2)
    callback = OneShotPruning(NAME, 0.5, num_samples=8, progress=False)
    assert isinstance(callback.solver, EvenColumns)
    trainer = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
        max_steps=2,
    )
    loader = DataLoader([{"input_ids": row} for row in torch.cat([b["input_ids"] for b in batches()])], batch_size=8)
    trainer.fit(module, loader)
    for name, mask in get_masks(module).items():
        assert torch.equal(mask, expected_mask(mask.shape)), name
        assert (dict(module.named_parameters())[name][:, ::2] == 0).all()


def test_hydra_override_selects_it_in_a_run(registered: type[EvenColumns], tmp_path: Path) -> None:
    tiny = [
        "dense_epochs=0",
        "trainer.max_epochs=0",
        "trainer.limit_val_batches=1",
        "data.seq_len=16",
        "data.vocab_size=300",
        "pruning.num_samples=8",
        "pruning.progress=false",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "tensorboard=false",
        "plots=false",
        "save_model=false",
        "evaluate_before=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "recipe=wanda_2of4",
                f"output_dir={tmp_path}",
                "pruning=wanda",
                f"pruning.method={NAME}",
                "pruning.pattern=null",
                "+pruning.method_options.offset=1",
                *tiny,
            ],
        )
    assert cfg.pruning.method == NAME
    results = run(cfg)
    projections = [name for name in results["layer_sparsity"] if ".layers." in name]
    assert len(EvenColumns.shapes) == len(projections) > 0 and all(offset == 1 for offset, *_ in EvenColumns.shapes)
    # Odd columns (offset 1) of every projection pruned: half of each layer.
    assert all(results["layer_sparsity"][name] == pytest.approx(0.5) for name in projections)


def test_unknown_names_and_bad_options_raise_naming_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`method` must be one of .*'wanda'.*got 'nope'"):
        prune_oneshot(torch.nn.Linear(2, 2), None, method="nope")
    with pytest.raises(ValueError, match=r"`refine` must be one of .*'dsnot'.*got 'nope'"):
        prune_oneshot(torch.nn.Linear(2, 2), None, method="magnitude", refine="nope")
    with pytest.raises(ValueError, match="`method`"):
        OneShotPruning("nope")
    with pytest.raises(ValueError, match="does not take the options \\['blocksize'\\]"):
        ONESHOT_METHODS.create("wanda", blocksize=64)
    with pytest.raises(ValueError, match="`blocksize`"):
        ONESHOT_METHODS.create("sparsegpt", blocksize=0)
    with pytest.raises(ValueError, match="`refine_options`"):
        prune_oneshot(torch.nn.Linear(2, 2), None, method="magnitude", refine_options={"max_cycle_time": 3})
    assert {"wanda", "sparsegpt", "magnitude", "ria"} <= set(ONESHOT_METHODS.names()) and "dsnot" in MASK_REFINERS


def test_duplicate_registration_raises_unless_overwrite() -> None:
    table: Registry[object] = Registry("thing", "thing")

    class First:
        pass

    class Second:
        pass

    table.register("x")(First)
    table.register("x")(First)  # the same class again is harmless
    with pytest.raises(ValueError, match=r"'x' is already registered .*overwrite=True"):
        table.register("x")(Second)
    assert table.get("x") is First
    table.register("x", overwrite=True)(Second)
    assert table.get("x") is Second and isinstance(table.create("x"), Second)
    table.unregister("x")
    with pytest.raises(ValueError, match="`thing` must be one of \\(\\)"):
        table.get("x")
    with pytest.raises(ValueError, match="non-empty string"):
        table.register("")
