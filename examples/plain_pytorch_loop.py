"""Gradual magnitude pruning inside a plain PyTorch training loop (no Lightning), on scikit-learn digits.

The engine underneath the callbacks, used by hand: `find_targets` picks the layers (the output
head stays dense), `update_masks` prunes the lowest-|w| weights at the sparsity the cubic schedule
gives for the step, `keep_masks_applied` keeps pruned weights at +0.0 after every optimizer step,
and `finalize` bakes the masks in and leaves a plain `nn.Module`.

    python examples/plain_pytorch_loop.py                    # 90% sparsity, a few seconds on a CPU
    python examples/plain_pytorch_loop.py --sparsity 0.5 --epochs 3
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from sklearn.datasets import load_digits
from torch import nn

from lightning_prune import finalize, find_targets, keep_masks_applied, make_schedule, sparsity_report, update_masks


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs, train labels, test inputs, test labels): a seeded 80/20 split, pixels in [0, 1]."""
    inputs, labels = load_digits(return_X_y=True)
    inputs, labels = torch.tensor(inputs, dtype=torch.float32) / 16.0, torch.tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    return inputs[order[:cut]], labels[order[:cut]], inputs[order[cut:]], labels[order[cut:]]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train and prune an MLP; print and return the targets' sparsity and the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9, help="final fraction of zeros in every pruned layer")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--frequency", type=int, default=10, help="optimizer steps between mask updates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    train_x, train_y, test_x, test_y = digits(args.seed)
    model = nn.Sequential(
        nn.Linear(64, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, args.hidden),
        nn.ReLU(),
        nn.Linear(args.hidden, 10),
    )
    targets = find_targets(model)  # the two hidden layers; the last Linear is the output head
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle = keep_masks_applied(optimizer, model)

    batches = train_x.split(64), train_y.split(64)
    steps = args.epochs * len(batches[0])
    # Reach the final sparsity at 3/4 of training, leaving the rest to recover.
    schedule = make_schedule("cubic", args.sparsity, start_step=0, end_step=max(1, 3 * steps // 4))
    step = 0
    for _ in range(args.epochs):
        for inputs, labels in zip(*batches):
            if step % args.frequency == 0 or step == schedule.end:
                update_masks(targets, {t.name: t.weight.detach().abs() for t in targets}, schedule(step))
            loss = nn.functional.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # the hook re-zeroes every pruned weight right after the update
            step += 1
    if step <= schedule.end:  # a run shorter than the schedule still ends at the target
        update_masks(targets, {t.name: t.weight.detach().abs() for t in targets}, schedule(schedule.end))

    handle.remove()
    finalize(model)  # exact +0.0 zeros, no masks or hooks: a plain nn.Sequential
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    report = sparsity_report(model, targets, patterns=dict.fromkeys((t.name for t in targets), None))  # unstructured
    print(report)
    print(f"sparsity {report.global_sparsity:.4f}")
    print(f"test accuracy {accuracy:.4f}")
    return {"sparsity": report.global_sparsity, "accuracy": accuracy}


if __name__ == "__main__":
    main()
