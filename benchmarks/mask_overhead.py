"""Cost of keeping masks applied during training: step time vs dense, and extra bytes of state.

    python benchmarks/mask_overhead.py                    # ~30M-param Llama (8 × 128 tokens) and an MLP
    python benchmarks/mask_overhead.py --quick            # tiny sizes, a few rounds (seconds)
    python benchmarks/mask_overhead.py --rounds 30 --threads 2

Variants, all trained with AdamW(fused=True) at 50% magnitude sparsity on every target:
- dense: no masks;
- ours: `update_masks` + `keep_masks_applied` (bool buffer, gradient hook, re-zero after the step);
- torch.nn.utils.prune: `l1_unstructured` (a `weight_orig` parameter, a float mask and a
  forward pre-hook that recomputes `weight = weight_orig * mask`);
- parametrize (multiply): `torch.nn.utils.parametrize` with `weight * mask` (torch.ao's FakeSparsity);
- Lightning ModelPruning: the callback's own `setup` + `apply_pruning` (defaults: l1_unstructured,
  lottery-ticket copies); between pruning events its training step is torch.nn.utils.prune's.

Every round runs each variant for `--steps` steps in a rotating order (interleaved, one process);
the table gives the median step time over rounds, relative to dense, and the optimizer step's
share (`optimizer.step()` including step hooks). Extra bytes count every tensor a variant keeps
beyond the dense model (parameters, buffers, tensor attributes of modules, callback copies),
per prunable element; optimizer state is the same size for all and left out.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from lightning_prune import find_targets, keep_masks_applied, set_mask, update_masks
from lightning_prune.masking import keep_only_

SPARSITY = 0.5


class MultiplyMask(nn.Module):
    """A parametrization that multiplies by a bool mask in every forward (like torch.ao's FakeSparsity)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@dataclass
class Variant:
    """One model + optimizer prepared with one masking mechanism, and its timings."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    keep_alive: list = field(default_factory=list)  # callback objects and their copies
    step_times: list[float] = field(default_factory=list)
    optimizer_times: list[float] = field(default_factory=list)


def magnitude_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks at SPARSITY by |w| per layer (computed with our selection for every variant)."""
    probe = copy.deepcopy(model)
    targets = find_targets(probe)
    return {
        t.name: m.clone()
        for t, m in zip(targets, update_masks(targets, {t.name: t.weight.abs() for t in targets}, SPARSITY).values())
    }


def prepare(name: str, base: nn.Module, masks: dict[str, torch.Tensor]) -> Variant:
    """Copy `base` and apply the variant's masking mechanism."""
    model = copy.deepcopy(base)
    modules = {t.name: t.module for t in find_targets(model)}
    keep_alive: list = []
    if name == "ours":
        for key, module in modules.items():
            set_mask(module, masks[key])
    elif name == "torch.nn.utils.prune":
        for module in modules.values():
            torch_prune.l1_unstructured(module, "weight", amount=SPARSITY)
    elif name == "parametrize (multiply)":
        for key, module in modules.items():
            keep_only_(module.weight, masks[key])
            parametrize.register_parametrization(module, "weight", MultiplyMask(masks[key].clone()))
    elif name == "Lightning ModelPruning":
        callback = ModelPruning(
            "l1_unstructured", parameters_to_prune=[(m, "weight") for m in modules.values()], amount=SPARSITY, verbose=0
        )
        callback.setup(None, model, "fit")  # type: ignore[arg-type]  # only reads the module list
        callback.apply_pruning(SPARSITY)
        keep_alive.append(callback)
    elif name != "dense":
        raise ValueError(f"unknown variant {name!r}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    if name == "ours":
        keep_alive.append(keep_masks_applied(optimizer, model))
    return Variant(name, model, optimizer, keep_alive)


def tensors_of(variant: Variant) -> dict[int, torch.Tensor]:
    """Every tensor the variant keeps (by storage), beyond optimizer state."""
    found: list[torch.Tensor] = [*variant.model.parameters(), *variant.model.buffers()]
    for module in variant.model.modules():
        found += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
    for kept in variant.keep_alive:
        for layer in (getattr(kept, "_original_layers", None) or {}).values():
            found += [*layer["data"].parameters(), *layer["data"].buffers()]
    return {t.untyped_storage().data_ptr(): t for t in found}


def extra_bytes_per_element(variant: Variant, dense: Variant, prunable: int) -> float:
    """(bytes kept by the variant − bytes of the dense model) / prunable elements."""
    size = lambda v: sum(t.untyped_storage().nbytes() for t in tensors_of(v).values())  # noqa: E731
    return (size(variant) - size(dense)) / prunable


def run_steps(variant: Variant, loss_fn: Callable[[nn.Module], torch.Tensor], steps: int, record: bool) -> None:
    """Train `steps` steps; record per-step wall time and optimizer time."""
    for _ in range(steps):
        start = time.perf_counter()
        variant.optimizer.zero_grad(set_to_none=True)
        loss_fn(variant.model).backward()
        before_optimizer = time.perf_counter()
        variant.optimizer.step()
        end = time.perf_counter()
        if record:
            variant.step_times.append(end - start)
            variant.optimizer_times.append(end - before_optimizer)


def benchmark(
    title: str, base: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], rounds: int, steps: int, warmup: int
) -> str:
    """Interleave every variant for `rounds` rounds; return a Markdown table."""
    names = ["dense", "ours", "torch.nn.utils.prune", "parametrize (multiply)", "Lightning ModelPruning"]
    masks = magnitude_masks(base)
    variants = [prepare(name, base, masks) for name in names]
    for variant in variants:
        run_steps(variant, loss_fn, warmup, record=False)
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            run_steps(variant, loss_fn, steps, record=True)
    prunable = sum(m.numel() for m in masks.values())
    dense = variants[0]
    dense_step = statistics.median(dense.step_times)
    lines = [
        f"### {title}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
        f"{prunable / 1e6:.1f}M prunable, {rounds} rounds × {steps} steps, {torch.get_num_threads()} threads",
        "",
        "| variant | step (ms, median) | × dense | optimizer step (ms) | optimizer share "
        "| extra bytes / prunable element |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        step, optimizer = statistics.median(variant.step_times), statistics.median(variant.optimizer_times)
        extra = extra_bytes_per_element(variant, dense, prunable)
        lines.append(
            f"| {variant.name} | {step * 1e3:.1f} | {step / dense_step:.3f} | {optimizer * 1e3:.1f} "
            f"| {optimizer / step:.0%} | {extra:.2f} |"
        )
    return "\n".join(lines) + "\n"


def llama_case(hidden: int, layers: int, vocab: int, batch: int, tokens: int) -> tuple[nn.Module, Callable]:
    """A Llama-style causal LM from a config (no download) and a fixed random token batch."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.6875) // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=vocab,
        max_position_embeddings=tokens,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, vocab, (batch, tokens))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def mlp_case(width: int, depth: int, batch: int) -> tuple[nn.Module, Callable]:
    """A ReLU MLP (`depth` hidden layers of `width`) regressing random targets."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 16))
    inputs, labels = torch.randn(batch, width), torch.randn(batch, 16)
    return model, lambda m: nn.functional.mse_loss(m(inputs), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and 3 rounds, for a smoke run")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (median over rounds × steps)")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument(
        "--hidden", type=int, default=512, help="Llama hidden size (512 with 8 layers ≈ 30M parameters)"
    )
    parser.add_argument("--layers", type=int, default=8, help="Llama decoder layers")
    parser.add_argument("--vocab", type=int, default=4096, help="Llama vocabulary")
    parser.add_argument("--batch", type=int, default=8, help="Llama sequences per batch")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--mlp-width", type=int, default=2048, help="MLP hidden width")
    parser.add_argument("--mlp-depth", type=int, default=4, help="MLP hidden layers")
    parser.add_argument("--mlp-batch", type=int, default=256, help="MLP batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--only", choices=("llama", "mlp"), default=None, help="run one case")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.hidden, args.layers, args.vocab, args.tokens = 3, 128, 2, 512, 64
        args.mlp_width, args.mlp_depth, args.mlp_batch = 512, 2, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, AdamW(fused=True), sparsity {SPARSITY}\n")
    if args.only in (None, "llama"):
        model, loss = llama_case(args.hidden, args.layers, args.vocab, args.batch, args.tokens)
        print(
            benchmark(
                f"Llama-style, batch {args.batch} × {args.tokens}", model, loss, args.rounds, args.steps, args.warmup
            )
        )
    if args.only in (None, "mlp"):
        model, loss = mlp_case(args.mlp_width, args.mlp_depth, args.mlp_batch)
        print(
            benchmark(
                f"MLP {args.mlp_depth} × {args.mlp_width}, batch {args.mlp_batch}",
                model,
                loss,
                args.rounds,
                args.steps,
                args.warmup,
            )
        )


if __name__ == "__main__":
    main()
