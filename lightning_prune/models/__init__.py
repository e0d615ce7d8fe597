"""Demo LightningModules: a classifier, a Hugging Face causal LM and a sentence encoder (examples of
users' model code)."""

from lightning_prune.models.causal_lm import CausalLMModule, load_causal_lm
from lightning_prune.models.classifier import ClassifierModule, build_digits_net
from lightning_prune.models.optim import LR_SCHEDULES, make_adamw, with_lr_schedule
from lightning_prune.models.pretrained import pretrained_minilm_path, pretrained_smollm2_path
from lightning_prune.models.sentence import SentenceEncoder, load_encoder, mean_pool

__all__ = [
    "LR_SCHEDULES",
    "CausalLMModule",
    "ClassifierModule",
    "SentenceEncoder",
    "build_digits_net",
    "load_causal_lm",
    "load_encoder",
    "make_adamw",
    "mean_pool",
    "pretrained_minilm_path",
    "pretrained_smollm2_path",
    "with_lr_schedule",
]
