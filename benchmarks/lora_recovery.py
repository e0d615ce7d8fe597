"""LoRA recovery after one-shot Wanda: perplexity dense → pruned → recovered, and the cost of each mode.

    python benchmarks/lora_recovery.py            # the full run (Llama hidden 128, 4 blocks)
    python benchmarks/lora_recovery.py --quick    # a small, fast run

A small Llama (built from a config, random init) is trained dense on the bundled pydoc text
(`lightning_prune.data.TextDataModule`, nothing downloaded), pruned one-shot with Wanda (2:4 and
unstructured 50%), then recovered for the same number of steps on the same batches by
- LoRA, merge-time masking (`masked_delta=False`): plain LoRA forward, `M ⊙ ΔW` only at merge;
- LoRA, masked delta (`masked_delta=True`): the forward already adds `M ⊙ ΔW`;
- full fine-tuning of every weight with the masks kept (the reference).
Perplexities are on the held-out validation blocks; for LoRA both before and after the merge
(only the merged model keeps the sparsity). Step times are medians over interleaved rounds, as
ratios to the full fine-tuning step of the same model. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_prune.data import TextDataModule
from lightning_prune.lora import adapter_parameters, attach_lora, merge_lora
from lightning_prune.masking import keep_masks_applied
from lightning_prune.models.causal_lm import load_causal_lm
from lightning_prune.models.optim import make_adamw
from lightning_prune.oneshot.api import prune_oneshot
from lightning_prune.report import max_nonzeros_per_group, sparsity_report
from lightning_prune.targets import find_targets

Batch = dict[str, torch.Tensor]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, few steps")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dense-steps", type=int, default=800)
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-lr", type=float, default=2e-3)
    parser.add_argument("--full-lr", type=float, default=5e-4)
    parser.add_argument("--val-batches", type=int, default=20)
    parser.add_argument("--timing-rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.dense_steps, args.recovery_steps = 64, 2, 200, 60
        args.val_batches, args.timing_rounds = 8, 7
    return args


def training_batches(data: TextDataModule, steps: int, seed: int) -> list[Batch]:
    """`steps` training batches in a fixed shuffled order (cycling over epochs)."""
    torch.manual_seed(seed)
    batches: list[Batch] = []
    while len(batches) < steps:
        batches.extend(data.train_dataloader())
    return batches[:steps]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], decay: bool = False) -> None:
    """One optimizer step per batch; `decay`: learning rate falling linearly to 0 (a converged dense model)."""
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / len(batches)) if decay else None
    model.train()
    for batch in batches:
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
    model.eval()


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[Batch]) -> float:
    """exp(mean next-token cross-entropy) over every predicted token of `batches`."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        total += float(
            nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        )
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def lora_model(pruned: nn.Module, rank: int, masked_delta: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same adapter initialisation for both modes
    return attach_lora(copy.deepcopy(pruned), r=rank, alpha=2 * rank, masked_delta=masked_delta)


def check_pattern(model: nn.Module, zeros: dict[str, torch.Tensor], pattern: str | None) -> None:
    """The merge guarantee: the zero set is unchanged (and 2:4 still 2:4), else raise."""
    for target in find_targets(model):
        if not torch.equal(target.weight == 0, zeros[target.name]):
            raise RuntimeError(f"zero set of {target.name} changed by recovery")
        if pattern and max_nonzeros_per_group(target.as_matrix(target.weight.detach()), 4) > 2:
            raise RuntimeError(f"{target.name} is no longer 2:4")


def recover(
    pruned: nn.Module, pattern: str | None, train_batches: list[Batch], val: list[Batch], args: argparse.Namespace
) -> dict[str, dict]:
    """Every recovery mode from the same pruned model and batches: perplexities and trainable counts."""
    zeros = {t.name: (t.weight == 0).clone() for t in find_targets(pruned)}
    rows: dict[str, dict] = {}
    for name, masked in (("LoRA, merge-time masking", False), ("LoRA, masked delta", True)):
        model = lora_model(pruned, args.rank, masked, args.seed)
        trainable = sum(p.numel() for p in adapter_parameters(model))
        train(model, make_adamw(model.parameters(), args.lora_lr), train_batches)
        unmerged = perplexity(model, val)
        merged = merge_lora(model)
        check_pattern(merged, zeros, pattern)
        rows[name] = {"unmerged": unmerged, "merged": perplexity(merged, val), "trainable": trainable}
    full = copy.deepcopy(pruned)
    optimizer = make_adamw(full.parameters(), args.full_lr)
    handle = keep_masks_applied(optimizer, full)
    train(full, optimizer, train_batches)
    handle.remove()
    check_pattern(full, zeros, pattern)
    trainable = sum(p.numel() for p in full.parameters() if p.requires_grad)
    rows["full fine-tuning (masks kept)"] = {"unmerged": None, "merged": perplexity(full, val), "trainable": trainable}
    return rows


def step_times(pruned: nn.Module, batches: list[Batch], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one training step per mode, over interleaved rounds (after one warm-up step)."""
    setups: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    full = copy.deepcopy(pruned)
    full_optimizer = make_adamw(full.parameters(), args.full_lr)
    keep_masks_applied(full_optimizer, full)
    setups["full fine-tuning (masks kept)"] = (full, full_optimizer)
    for name, masked in (("LoRA, merge-time masking", False), ("LoRA, masked delta", True)):
        model = lora_model(pruned, args.rank, masked, args.seed)
        setups[name] = (model, make_adamw(model.parameters(), args.lora_lr))
    steps: dict[str, Callable[[Batch], None]] = {name: make_step(*setup) for name, setup in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.timing_rounds + 1):
        batch = batches[round_index % len(batches)]
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            if round_index:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Batch], None]:
    model.train()

    def step(batch: Batch) -> None:
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = arguments()
    torch.manual_seed(args.seed)
    data = TextDataModule(seq_len=64, batch_size=16, vocab_size=1024 if args.quick else 2048)
    data.setup("fit")
    val = list(data.val_dataloader())[: args.val_batches]
    config = {
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": len(data.tokenizer),
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(args.seed)
    dense = load_causal_lm(config=config)
    train(dense, make_adamw(dense.parameters(), 2e-3), training_batches(data, args.dense_steps, args.seed), decay=True)
    dense_ppl = perplexity(dense, val)
    calibration = training_batches(data, 8, args.seed + 1)  # 128 sequences
    recovery_batches = training_batches(data, args.recovery_steps, args.seed + 2)
    print(
        f"Llama hidden {args.hidden} × {args.layers} blocks, {sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M "
        f"parameters, {args.dense_steps} dense steps (lr 2e-3 decayed linearly to 0); "
        f"recovery {args.recovery_steps} steps (batch 16 × 64 tokens), "
        f"LoRA r={args.rank} alpha={2 * args.rank} lr={args.lora_lr}, full lr={args.full_lr}; "
        f"perplexity on {len(val)} validation batches; torch threads {torch.get_num_threads()}\n"
    )
    print(
        "| pruning | recovery | trainable params | ppl dense | ppl pruned "
        "| ppl recovered, unmerged | ppl recovered, merged | sparsity |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    timed = None
    for label, pattern in (("Wanda 2:4", "2:4"), ("Wanda 50%", None)):
        pruned = copy.deepcopy(dense)
        prune_oneshot(pruned, calibration, method="wanda", sparsity=0.5, pattern=pattern, progress=False)
        pruned_ppl = perplexity(pruned, val)
        total = sum(p.numel() for p in pruned.parameters())
        for name, row in recover(pruned, pattern, recovery_batches, val, args).items():
            unmerged = f"{row['unmerged']:.2f}" if row["unmerged"] is not None else "—"
            print(
                f"| {label} | {name} | {row['trainable']:,} ({row['trainable'] / total:.1%}) "
                f"| {dense_ppl:.2f} | {pruned_ppl:.2f} | {unmerged} | "
                f"{row['merged']:.2f} | {sparsity_report(pruned).global_sparsity:.1%} |"
            )
        timed = timed or pruned
    times = step_times(timed, recovery_batches, args)
    reference = times["full fine-tuning (masks kept)"]
    print("\n| recovery (Wanda 2:4 model) | step time (ms, median) | relative to full fine-tuning |")
    print("|---|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / reference:.2f}× |")


if __name__ == "__main__":
    main()
