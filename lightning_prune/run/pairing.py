"""The tokenizer goes with the model: a pretrained model reads the ids of its own tokenizer only.

With `model.model_path=DIR` and no `data.tokenizer`, the data module gets the tokenizer saved in
DIR (`AutoTokenizer.from_pretrained(DIR)`); without one there it is an error naming
`data.tokenizer` — never a freshly trained tokenizer whose ids mean nothing to the model. A GGUF
model (`model.gguf_file`, or the packaged model named by `model.pretrained`, e.g. smollm2) carries
its tokenizer in the same file: `data.tokenizer` is set to that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lightning_prune.models.causal_lm import gguf_location, pretrained_causal_lm
from lightning_prune.run.checks import ConfigError

# Files one of which every `save_pretrained` tokenizer directory holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def use_model_tokenizer(cfg: DictConfig) -> None:
    """Set `data.tokenizer` to `model.model_path` when the model is pretrained and no tokenizer is given.

    Raises `ConfigError` naming `data.tokenizer` when the model directory holds no tokenizer. A
    `model_path` that is not a model directory is left for the model's own check to report.
    """
    model, data = cfg.get("model"), cfg.get("data")
    if not isinstance(model, DictConfig) or not isinstance(data, DictConfig):
        return
    model_path = model.get("model_path")
    if "tokenizer" not in data or data.get("tokenizer") is not None:
        return
    gguf = gguf_tokenizer(model)
    if gguf is not None:
        data.tokenizer = gguf
        return
    if not model_path:
        return
    directory = Path(str(model_path)).expanduser()
    if not (directory / "config.json").is_file():
        return
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"`model.model_path`={model_path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): set "
            "`data.tokenizer=DIR` to the tokenizer the model was trained with "
            "(a new tokenizer's ids mean nothing to a pretrained model)"
        )
    data.tokenizer = str(model_path)


def gguf_tokenizer(model: DictConfig) -> str | None:
    """The GGUF file a model config loads from (`gguf_file`, or `pretrained` when no other source is
    given), None when it loads from elsewhere or the file is missing (the model's own check says so)."""
    gguf_file, model_path = model.get("gguf_file"), model.get("model_path")
    if gguf_file:
        try:
            return str(gguf_location(str(gguf_file), None if model_path is None else str(model_path)))
        except ValueError:
            return None
    if model.get("pretrained") and model_path is None and model.get("config") is None:
        try:
            return pretrained_causal_lm(str(model.pretrained))
        except ValueError as error:
            raise ConfigError(str(error)) from error
    return None


def check_vocabulary(data: Any, module: Any) -> None:
    """The tokenizer's ids fit the model's input embedding; raises `ConfigError` naming both sizes."""
    tokenizer = getattr(data, "tokenizer", None)
    network = getattr(module, "model", module)
    get_embeddings = getattr(network, "get_input_embeddings", None)
    if tokenizer is None or not callable(get_embeddings):
        return
    embeddings = get_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    size = len(tokenizer)
    if size > rows:
        raise ConfigError(
            f"the tokenizer (`data.tokenizer`, or `data.vocab_size` when it is trained here) has {size} tokens "
            f"but the model's input embedding (`model`) has {rows} rows: ids >= {rows} would index past it; "
            "use the model's own tokenizer"
        )
