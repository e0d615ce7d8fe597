"""A LightningModule around any Hugging Face causal LM: loss and torchmetrics Perplexity."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.text import Perplexity
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lightning_prune.evaluate.perplexity import IGNORE_INDEX
from lightning_prune.models.optim import make_adamw
from lightning_prune.models.pretrained import pretrained_smollm2_path
from lightning_prune.validation import check_number

# Packaged pretrained causal LMs by name: name -> the GGUF file (raises naming what to install when absent).
PRETRAINED_CAUSAL_LMS: dict[str, Callable[[], str]] = {"smollm2": pretrained_smollm2_path}


def pretrained_causal_lm(name: str) -> str:
    """The GGUF file of the packaged causal LM `name` (a key of `PRETRAINED_CAUSAL_LMS`)."""
    if name not in PRETRAINED_CAUSAL_LMS:
        raise ValueError(f"`pretrained` must be one of {sorted(PRETRAINED_CAUSAL_LMS)} or null, got {name!r}")
    return PRETRAINED_CAUSAL_LMS[name]()


def load_causal_lm(
    model_path: str | None = None,
    config: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    gguf_file: str | None = None,
) -> PreTrainedModel:
    """A causal LM from a local `save_pretrained` directory, a GGUF file, or built (random init) from a config.

    `gguf_file` is a GGUF file, or a file name inside the directory `model_path`; transformers
    de-quantises it (`from_pretrained(dir, gguf_file=name)`) and the model is rebuilt as a plain one
    (see `without_gguf`), so every save path works. `config` needs `model_type` (e.g. "llama") plus
    that config class's fields. Nothing is downloaded.
    """
    if gguf_file is not None:
        if config is not None:
            raise ValueError(f"give `gguf_file` or `config`, not both: got gguf_file={gguf_file!r}, config={config!r}")
        return load_gguf_causal_lm(gguf_file, model_path, dtype)
    if (model_path is None) == (config is None):
        raise ValueError(
            f"give exactly one of `model_path`, `gguf_file` or `config`, got model_path={model_path!r}, "
            f"config={config!r}"
        )
    torch_dtype = torch_dtype_of(dtype)
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


def torch_dtype_of(dtype: str | None) -> torch.dtype | None:
    """The torch dtype named `dtype` ("float32", "bfloat16", ...), None for None."""
    torch_dtype = getattr(torch, dtype, None) if dtype else None
    if dtype and not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"`dtype` must name a torch dtype such as 'float32' or 'bfloat16', got {dtype!r}")
    return torch_dtype


def gguf_location(gguf_file: str, model_path: str | None = None) -> Path:
    """The GGUF file `gguf_file`, or `model_path/gguf_file` when a directory is given; ValueError when absent."""
    path = Path(model_path).expanduser() / gguf_file if model_path is not None else Path(gguf_file).expanduser()
    if not path.is_file():
        where = f" in `model_path`={model_path!r}" if model_path is not None else ""
        raise ValueError(f"`gguf_file`={gguf_file!r}{where} is not a file: give a local GGUF file (e.g. model.gguf)")
    return path


def load_gguf_causal_lm(gguf_file: str, model_path: str | None = None, dtype: str | None = None) -> PreTrainedModel:
    """A causal LM de-quantised from a local GGUF file (`gguf_location`), as a plain, saveable model."""
    path = gguf_location(gguf_file, model_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch_dtype_of(dtype), local_files_only=True
    )
    return without_gguf(model)


def without_gguf(model: PreTrainedModel) -> PreTrainedModel:
    """The same model (same weights, same logits) rebuilt from its config without the GGUF quantizer.

    transformers 5.25 refuses `save_pretrained` on a GGUF-loaded model ("quantized with gguf and not
    serializable") although its weights are plain de-quantised tensors, and the GGUF quantizer has
    no `dequantize`; a model built from the config minus `quantization_config`, with the loaded
    state dict, saves, compacts and exports as any other. Other models are returned as they are.
    """
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return model
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    if str(getattr(method, "value", method)) != "gguf":
        return model
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):  # no random init of weights that are overwritten next (7 s for 135M on 2 cores)
        plain = type(model)(config)
    # assign=True takes the loaded tensors themselves: no copy; tied weights are tied again below.
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, attribute = name.rpartition(".")
        setattr(plain.get_submodule(owner), attribute, buffer.clone())
    plain.tie_weights()
    left = [name for name, tensor in [*plain.named_parameters(), *plain.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"rebuilding the GGUF-loaded {type(model).__name__} left {left} unloaded")
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.train(model.training)


class CausalLMModule(pl.LightningModule):
    """Next-token training of a Hugging Face `AutoModelForCausalLM`; `self.model` is the HF model.

    Batches are `{"input_ids": (B, T)}` (optionally `attention_mask`, `labels`); labels default to
    the inputs (the model shifts them); labels of -100 and padding (`attention_mask` 0) are not
    targets. Logs `train/loss`, `val/loss` and `val/ppl` (torchmetrics `Perplexity` over every
    predicted token: on the same windows, the tokens and value of `evaluate_perplexity`). The model
    comes from `model_path` (a local HF directory), `gguf_file` (a GGUF file, or a file name inside
    `model_path`), `config` (random init), or else `pretrained`: the name of a packaged model
    (`PRETRAINED_CAUSAL_LMS`, e.g. smollm2).

    Example YAML (`lightning_prune/conf/model/tiny_llama.yaml`)::

        _target_: lightning_prune.models.CausalLMModule
        model_path: null    # local HF directory; null = build from `config`
        gguf_file: null     # a GGUF file (or a file name in model_path); null = not GGUF
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
        gguf_file: str | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if check_number(lr, "lr") <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if pretrained is not None and model_path is None and gguf_file is None and config is None:
            gguf_file = pretrained_causal_lm(pretrained)
        self.model = load_causal_lm(model_path, config, dtype, gguf_file)
        self.lr = lr
        self.weight_decay = weight_decay
        self.val_perplexity = Perplexity(ignore_index=-100)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits `(B, T, vocab)`."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _loss_and_logits(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = batch.get("labels", batch["input_ids"])
        mask = batch.get("attention_mask")
        if mask is not None:  # padding is never a target: the tokens evaluate_perplexity counts, no others
            labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
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
