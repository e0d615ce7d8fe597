"""Architectures benchmark: what one-shot pruning reaches, how exactly, and at what cost, per family.

For every case of the architecture table (tests/architectures.py, widened by `--width`), prints one
Markdown row: the block stacks found (in execution order), the share of block weight matrices
(parameters) that Wanda 2:4 pruned — experts separately —, the largest difference between a
block's output in the driver and inside the model's own forward (unpruned, CPU fp32), and the time
of `prune_oneshot(method="wanda")` relative to one plain forward pass over the same batches.

    python benchmarks/architectures.py --width 1          # the test table's sizes, seconds
    python benchmarks/architectures.py                    # hidden 256, 16 batches of 2 sequences of 64
    python benchmarks/architectures.py --width 4 --batches 4   # the earlier, smaller default

Sequential calibration runs every block twice per batch (statistics, then the pruned block's
outputs) and the first batch once more through the whole stack; what is left (selection, the
report, per-layer bookkeeping) does not grow with the model or the calibration data, so the
ratio is only meaningful at sizes where the forward pass is not dominated by fixed costs.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from architectures import CASES, Case

from lightning_prune import get_masks, prune_oneshot
from lightning_prune.calibration.blocks import find_blocks
from lightning_prune.calibration.driver import block_output, calibrate_sequentially
from lightning_prune.targets import router_names

WIDTHS = (
    "hidden_size",
    "intermediate_size",
    "d_model",
    "d_ff",
    "n_embd",
    "dim",
    "hidden_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "ffn_dim",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "intermediate_size_mlp",
    "word_embed_proj_dim",
    "max_position_embeddings",  # room for --length (RoBERTa's positions start after its padding index)
)


def widened(case: Case, width: int) -> Case:
    """The case with every width in WIDTHS (and the position table) multiplied by `width`
    (heads and head sizes unchanged)."""
    kwargs = {k: v * width if k in WIDTHS else v for k, v in case.kwargs.items()}
    return Case(case.name, case.config, kwargs, case.auto, case.inputs, case.experts)


def block_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weight matrices inside the blocks, routers and embeddings aside (as in the contract test)."""
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    skip = embeddings | {f"{n}.weight" for n in router_names(model)}
    prefixes = tuple(f"{name}." for name, _ in find_blocks(model))
    return {
        n: p
        for n, p in model.named_parameters()
        if n.startswith(prefixes) and p.dim() >= 2 and not n.endswith("bias") and n not in skip
    }


def driver_difference(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    """Largest |driver − model| over every block output of the unpruned model."""
    own: dict[str, list[torch.Tensor]] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, k=f"{n}.{i}": own.setdefault(k, []).append(block_output(o)))
        for n, blocks in find_blocks(model)
        for i, b in enumerate(blocks)
    ]
    with torch.no_grad():
        for batch in data:
            model(**({**batch, "use_cache": False} if hasattr(model.config, "use_cache") else batch))
    for handle in handles:
        handle.remove()
    worst = 0.0

    def compare(index: int, name: str, block: nn.Module, run_block: Any) -> None:
        nonlocal worst
        seen: list[torch.Tensor] = []
        handle = block.register_forward_hook(lambda m, a, o: seen.append(block_output(o)))
        run_block()
        handle.remove()
        worst = max([worst] + [float((x - y).abs().max()) for x, y in zip(seen, own[name])])

    calibrate_sequentially(model, data, compare, progress=False)
    return worst


def seconds(function: Any) -> float:
    """Wall time of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def oneshot_ratio(model: nn.Module, data: list[dict[str, torch.Tensor]], rounds: int) -> float:
    """Best one-shot time over best forward time, the two interleaved over `rounds` rounds.

    Each round prunes a fresh copy of the model made before its clock starts.
    """

    def forward() -> None:
        with torch.no_grad():
            for batch in data:
                model(**batch)

    forward()  # warm-up
    forward_times, oneshot_times = [], []
    for _ in range(rounds):
        forward_times.append(seconds(forward))
        copied = copy.deepcopy(model)
        oneshot_times.append(
            seconds(
                lambda copied=copied: prune_oneshot(
                    copied, data, method="wanda", pattern="2:4", min_expert_tokens=1, progress=False
                )
            )
        )
    return min(oneshot_times) / min(forward_times)


def row(case: Case, batches: int, length: int, rounds: int) -> list[str]:
    """One table row for `case`."""
    model = case.build()
    data = case.batches(count=batches, length=length)
    stacks = [name for name, _ in find_blocks(model)]
    difference = driver_difference(model, data)

    pruned = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ratio = oneshot_ratio(model, data, rounds)
        prune_oneshot(pruned, data, method="wanda", pattern="2:4", min_expert_tokens=1, progress=False)
    masks, matrices = get_masks(pruned), block_matrices(pruned)
    share = {}
    for experts in (False, True):
        chosen = {n: p for n, p in matrices.items() if (p.dim() == 3) == experts}
        total = sum(p.numel() for p in chosen.values())
        share[experts] = (
            f"{100 * sum(p.numel() for n, p in chosen.items() if n in masks) / total:.0f}%" if total else "–"
        )
    return [
        case.name,
        " → ".join(stacks),
        share[False],
        share[True],
        f"{difference:.1e}" if difference else "0",
        f"{ratio:.2f}×",
    ]


def main() -> None:
    """Print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--width", type=int, default=8, help="multiply every hidden/intermediate width of the test table by this"
    )
    parser.add_argument("--batches", type=int, default=16, help="calibration batches (of 2 sequences)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--only", nargs="*", default=None, help="architecture names to run (default: all)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved forward / one-shot timing rounds (best of each)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    header = [
        "architecture",
        "block stacks (execution order)",
        "block matrices pruned",
        "expert matrices pruned",
        "max |driver − model|",
        "Wanda 2:4 / forward",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        print(
            "| " + " | ".join(row(widened(case, args.width), args.batches, args.length, args.rounds)) + " |", flush=True
        )


if __name__ == "__main__":
    main()
