"""A LightningModule around any Hugging Face causal LM: loss and torchmetrics Perplexity."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.text import Perplexity
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lightning_prune.models.optim import make_adamw
from lightning_prune.validation import check_number


def load_causal_lm(
    model_path: str | None = None, config: Mapping[str, Any] | None = None, dtype: str | None = None
) -> PreTrainedModel:
    """A causal LM from a local `save_pretrained` directory, or built (random init) from a config dict.

    `config` needs `model_type` (e.g. "llama") plus that config class's fields. Nothing is downloaded.
    """
    if (model_path is None) == (config is None):
        raise ValueError(
            f"give exactly one of `model_path` or `config`, got model_path={model_path!r}, config={config!r}"
        )
    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"`dtype` must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"`model_path`={model_path!r} is not a local model directory (no config.json there)")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, local_files_only=True)
    settings = dict(config or {})  # not None here: exactly one of model_path and config was given
    if "model_type" not in settings:
        raise ValueError(f"`config` needs a `model_type` (e.g. 'llama'), got keys {sorted(settings)}")
    model_config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModelForCausalLM.from_config(model_config)
    return model.to(torch_dtype) if torch_dtype else model


class CausalLMModule(pl.LightningModule):
    """Next-token training of a Hugging Face `AutoModelForCausalLM`; `self.model` is the HF model.

    Batches are `{"input_ids": (B, T)}` (optionally `attention_mask`, `labels`); labels default to
    the inputs (the model shifts them). Logs `train/loss`, `val/loss` and `val/ppl` (torchmetrics
    `Perplexity` over every predicted token).

    Example YAML (`lightning_prune/conf/model/tiny_llama.yaml`)::

        _target_: lightning_prune.models.CausalLMModule
        model_path: null    # local HF directory; null = build from `config`
        config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}
        lr: 0.001           # AdamW learning rate
    """

    val_metric = "val/ppl"  # what the run plots against sparsity
    val_metric_mode = "min"

    def __init__(
        self,
        model_path: str | None = None,
        config: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if check_number(lr, "lr") <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        self.model = load_causal_lm(model_path, config, dtype)
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_perplexity = Perplexity(ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `(B, T, vocab)`."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss_and_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch.get("labels", batch["input_ids"])
        output = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels)
        return output.loss, output.logits, labels

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, _ = self._loss_and_logits(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._loss_and_logits(batch)
        # Position t predicts token t+1 (as the HF loss): drop the last logit and the first label.
        self.val_perplexity.update(logits[:, :-1].float(), labels[:, 1:])
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", self.val_perplexity, prog_bar=True)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_adamw(self.parameters(), self.lr, self.weight_decay)
