"""Cost of masks under FSDP2: step time of a masked vs a dense `fully_shard` model, and mask bytes.

    python benchmarks/fsdp.py                     # 2 CPU processes (gloo), an MLP of 4 × 1024
    python benchmarks/fsdp.py --quick             # tiny sizes, a few rounds (seconds)
    python benchmarks/fsdp.py --world 2 --rounds 30 --width 2048

Each of `--world` processes holds two copies of the same model, each Linear and the root wrapped by
`fully_shard` (parameters are DTensors split by rows): dense, and masked at 50% magnitude sparsity
(`update_masks` selects across the shards; after backward `mask_sharded_gradients_`, after the
step `keep_masks_applied`'s re-zeroing). Every round times `--steps` AdamW(fused=True) steps of
each (on CPU the foreach path slows down on the pruned weights' zero second moments, DESIGN.md), in
alternating order (interleaved); the table gives the median step time over rounds and the masked
variant's ratio to dense, and the bytes of mask state on each rank against one unsharded model's
masks. Plain torch.distributed, no Lightning: the callbacks call the same functions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_prune import find_targets, get_masks, keep_masks_applied, update_masks
from lightning_prune.masking import mask_sharded_gradients_
from lightning_prune.parallel.sharded import local_tensor


def build(depth: int, width: int, mesh: object) -> nn.Module:
    """An MLP of `depth` Linear(width, width) + ReLU layers and a small head, sharded by FSDP2."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 16))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def time_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor, steps: int, masked: bool
) -> float:
    """Seconds per training step, averaged over `steps` (a barrier before and after)."""
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(batch).square().mean().backward()
        if masked:
            mask_sharded_gradients_(model)
        optimizer.step()
    dist.barrier()
    return (time.perf_counter() - start) / steps


def worker(rank: int, args: argparse.Namespace) -> None:
    """One rank: build both variants, time them interleaved, and (rank 0) print the table."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.world)
    mesh = init_device_mesh("cpu", (args.world,))
    dense = build(args.depth, args.width, mesh)
    masked = build(args.depth, args.width, mesh)  # same seed: the same initial weights
    targets = find_targets(masked)
    update_masks(targets, {t.name: local_tensor(t.weight).abs() for t in targets}, sparsity=0.5)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for name, model in (("dense", dense), ("masked", masked))
    }
    keep_masks_applied(optimizers["masked"], masked)
    batch = torch.randn(args.batch, args.width, generator=torch.Generator().manual_seed(rank))
    times: dict[str, list[float]] = {"dense": [], "masked": []}
    for round_index in range(args.warmup + args.rounds):
        order = ["dense", "masked"] if round_index % 2 == 0 else ["masked", "dense"]
        for name in order:
            seconds = time_steps(
                dense if name == "dense" else masked, optimizers[name], batch, args.steps, name == "masked"
            )
            if round_index >= args.warmup:
                times[name].append(seconds)
    local_bytes = sum(mask.numel() * mask.element_size() for mask in get_masks(masked).values())
    full_bytes = sum(t.weight.numel() for t in targets)  # one bool byte per element of every whole weight
    per_rank = [torch.zeros(1, dtype=torch.int64) for _ in range(args.world)]
    dist.all_gather(per_rank, torch.tensor([local_bytes]))
    if rank == 0:
        dense_median, masked_median = statistics.median(times["dense"]), statistics.median(times["masked"])
        print(
            f"FSDP2 on {args.world} CPU processes (gloo), MLP {args.depth} × {args.width}, batch {args.batch}/rank, "
            "AdamW(fused=True), 50% sparsity"
        )
        print(
            f"{args.rounds} interleaved rounds of {args.steps} steps (after {args.warmup} warm-up), "
            f"{args.threads} thread(s)/rank\n"
        )
        print("| variant | median step (ms) | vs dense |")
        print("|---|---|---|")
        print(f"| dense FSDP2 | {1e3 * dense_median:.2f} | 1.000× |")
        print(f"| masked FSDP2 | {1e3 * masked_median:.2f} | {masked_median / dense_median:.3f}× |")
        print(
            f"\nmask bytes per rank: {[int(b) for b in per_rank]} of {full_bytes} unsharded "
            f"(= {int(per_rank[0]) / full_bytes:.3f} of it; 1/world = {1 / args.world:.3f})"
        )
    dist.destroy_process_group()


def main() -> None:
    """Parse the sizes and spawn `--world` processes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="rows per rank")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    args = parser.parse_args()
    if args.quick:
        args.depth, args.width, args.batch, args.rounds, args.steps, args.warmup = 2, 128, 16, 4, 2, 1
    mp.spawn(worker, args=(args,), nprocs=args.world)


if __name__ == "__main__":
    main()
