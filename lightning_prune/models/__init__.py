"""Demo LightningModules: a classifier and a Hugging Face causal LM (examples of users' model code)."""

from lightning_prune.models.causal_lm import CausalLMModule, load_causal_lm
from lightning_prune.models.classifier import ClassifierModule, build_digits_net
from lightning_prune.models.optim import make_adamw

__all__ = ["CausalLMModule", "ClassifierModule", "build_digits_net", "load_causal_lm", "make_adamw"]
