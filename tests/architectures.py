"""The architecture table: tiny Hugging Face models from configs (random weights, no download).

Each case builds (model, calibration batches); `slow` marks the half of the table the quick test
run skips (`-m "not slow"`), chosen so that every family keeps at least one quick case. Hidden
sizes 16–32, 2 layers (per stack), vocab 64, sequences of 16 tokens; every block weight's input
dimension divides by 4 (2:4 fits everywhere).
Shared by tests/test_architectures.py and benchmarks/architectures.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn

VOCAB, LENGTH, BATCH = 64, 16, 2
ATTENTION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)


@dataclass(frozen=True)
class Case:
    """One architecture: a config class, its arguments, the Auto class, and the kind of inputs."""

    name: str
    config: str
    kwargs: dict[str, Any]
    auto: str = "AutoModelForCausalLM"
    inputs: str = "tokens"  # "tokens", "seq2seq", "audio", "pixels"
    experts: bool = False
    slow: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        """The model in eval mode, fp32, eager attention (bitwise-comparable on CPU)."""
        torch.manual_seed(seed)
        config = getattr(transformers, self.config)(**self.kwargs)
        config._attn_implementation = "eager"
        model = getattr(transformers, self.auto).from_config(config, attn_implementation="eager")
        return model.float().eval()

    def batches(self, count: int = 2, seed: int = 1, length: int = LENGTH) -> list[dict[str, torch.Tensor]]:
        """`count` calibration batches of BATCH sequences of `length` tokens (decoders: half)."""
        generator = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(count):
            if self.inputs == "pixels":
                size = self.kwargs["image_size"]
                out.append({"pixel_values": torch.randn(BATCH, 3, size, size, generator=generator)})
                continue
            if self.inputs == "audio":
                out.append(
                    {
                        "input_features": torch.randn(
                            BATCH,
                            self.kwargs["num_mel_bins"],
                            2 * self.kwargs["max_source_positions"],
                            generator=generator,
                        ),
                        "decoder_input_ids": torch.randint(1, VOCAB, (BATCH, 8), generator=generator),
                    }
                )
                continue
            ids = torch.randint(3, VOCAB, (BATCH, length), generator=generator)
            mask = torch.ones_like(ids)
            mask[0, -3:] = 0  # padding reaches the blocks through their masks
            batch = {"input_ids": ids, "attention_mask": mask}
            if self.inputs == "seq2seq":
                batch["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, length // 2), generator=generator)
            out.append(batch)
        return out


def _moe(**extra: Any) -> dict[str, Any]:
    return {**ATTENTION, **extra}


_ENC = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
_BART = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=None,
)

CASES: list[Case] = [
    Case("llama", "LlamaConfig", ATTENTION),
    Case("mistral", "MistralConfig", {**ATTENTION, "sliding_window": 8}, slow=True),
    Case("qwen2", "Qwen2Config", ATTENTION, slow=True),
    Case("qwen3", "Qwen3Config", {**ATTENTION, "head_dim": 8}, slow=True),
    Case("gemma", "GemmaConfig", {**ATTENTION, "head_dim": 8}, slow=True),
    Case("gemma2", "Gemma2Config", {**ATTENTION, "head_dim": 8, "sliding_window": 4}),
    Case(
        "gemma3_text",
        "Gemma3TextConfig",
        {**ATTENTION, "head_dim": 8, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
    ),
    Case("phi3", "Phi3Config", {**ATTENTION, "pad_token_id": 0}, slow=True),
    Case("olmo2", "Olmo2Config", ATTENTION, slow=True),
    Case("granite", "GraniteConfig", ATTENTION, slow=True),
    Case(
        "gpt2",
        "GPT2Config",
        dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0),
    ),
    Case(
        "gpt_neox",
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
        ),
        slow=True,
    ),
    Case(
        "falcon",
        "FalconConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        slow=True,
    ),
    Case(
        "opt",
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        ),
        slow=True,
    ),
    Case("mixtral", "MixtralConfig", _moe(num_local_experts=4, num_experts_per_tok=2), experts=True),
    Case(
        "qwen2_moe",
        "Qwen2MoeConfig",
        _moe(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
        experts=True,
        slow=True,
    ),
    Case(
        "qwen3_moe",
        "Qwen3MoeConfig",
        _moe(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
        experts=True,
    ),
    Case(
        "deepseek_v3",
        "DeepseekV3Config",
        _moe(
            num_key_value_heads=4,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            v_head_dim=8,
            qk_nope_head_dim=8,
        ),
        experts=True,
        slow=True,
    ),
    Case(
        "gpt_oss",
        "GptOssConfig",
        _moe(
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
        ),
        experts=True,
    ),
    Case(
        "llama4_text",
        "Llama4TextConfig",
        _moe(
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size_mlp=64,
            head_dim=8,
            interleave_moe_layer_step=1,
            attention_chunk_size=8,
        ),
        experts=True,
    ),
    Case(
        "t5",
        "T5Config",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        auto="AutoModelForSeq2SeqLM",
        inputs="seq2seq",
    ),
    Case("bart", "BartConfig", _BART, auto="AutoModelForSeq2SeqLM", inputs="seq2seq"),
    Case(
        "whisper",
        "WhisperConfig",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=32,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        ),
        auto="AutoModelForSpeechSeq2Seq",
        inputs="audio",
    ),
    Case("bert", "BertConfig", _ENC, auto="AutoModelForSequenceClassification"),
    Case("roberta", "RobertaConfig", {**_ENC, "pad_token_id": 1}, auto="AutoModelForMaskedLM", slow=True),
    Case(
        "distilbert",
        "DistilBertConfig",
        dict(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64),
        auto="AutoModelForSequenceClassification",
        slow=True,
    ),
    Case(
        "vit",
        "ViTConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=16,
            patch_size=4,
        ),
        auto="AutoModelForImageClassification",
        inputs="pixels",
    ),
    Case(
        "modernbert",
        "ModernBertConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            local_attention=4,
            global_attn_every_n_layers=2,
            pad_token_id=0,
        ),
        auto="AutoModelForMaskedLM",
    ),
]

BY_NAME: dict[str, Case] = {case.name: case for case in CASES}


def call(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """The model's own forward on a batch (no cache)."""
    return model(**batch)


Builder = Callable[[], nn.Module]
