"""Shared fixtures: tiny Hugging Face models built from configs, a quiet CPU Trainer factory."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

TINY_LLAMA_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    num_key_value_heads=2, vocab_size=48, max_position_embeddings=32,
)


def make_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary (override by keyword)."""
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kwargs})


def tiny_llama() -> nn.Module:
    """A 1-layer Llama causal LM (hidden 32) from a config: no download."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA_CONFIG))


def tiny_gpt2() -> nn.Module:
    """A 1-layer GPT-2 LM (its attention and MLP are transformers' transposed `Conv1D`)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=48, n_positions=32, bos_token_id=0, eos_token_id=0))


def tiny_bert_classifier() -> nn.Module:
    """A 1-layer BERT sequence classifier (pooler + `classifier` head)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=48, max_position_embeddings=32, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    return tiny_gpt2()
