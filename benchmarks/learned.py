"""Learned 2:4 masks (MaskLLM) against SparseGPT 2:4 on the real all-MiniLM-L6-v2, at the same token budget.

    python benchmarks/learned.py --steps 48   # every training row: 48 steps of 16 paragraphs (logits lr 1e-2)
    python benchmarks/learned.py --only learned --logits-lr 1e-2 --prior-strength 1   # one row, other settings

Rows (cosine between the dense and the pruned model's mean-pooled embeddings of held-out pydoc
paragraphs, as benchmarks/recovery.py): SparseGPT 2:4 one-shot; + reconstruction (towards the dense
model's hidden states); + distillation (masked full fine-tuning from the dense model, `--steps`);
SparseGPT's 2:4 mask on the unchanged dense weights (where a frozen-weight learned mask starts);
the learned mask with every weight frozen (`LearnedSparsity(prior="sparsegpt", freeze_others=True)`,
`--steps`, the loss: cosine distillation from the dense model); the learned mask for half the steps,
then distillation with it fixed for the other half; GMP 2:4 (`GradualPruning`, magnitude, with the
same distillation) for the time per step. Training rows see the same batches in the same order.
`--only` runs some rows (the cheap one-shot rows always run: they are the reference); the `--tau-*`,
`--scale-*`, `--anneal`, `--logits-lr` and `--prior-strength` options are LearnedSparsity's; `--mask-fraction`
and `--train-weights` shape the learned + distillation row (its mask phase's share of the steps, and
whether the weights learn, towards the dense model, while the mask does).
Time per step is the median wall time of a training batch (forward, backward, optimizer steps);
bytes per weight is what the method keeps per pruned weight beyond the weights (masks: 1 byte).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from recovery import EncoderDistillation, embed, masked_copy, minilm_setup, timed
from torch import nn

from lightning_prune import GradualPruning, KnowledgeDistillation, LearnedSparsity, get_masks, load_masks, prune_oneshot
from lightning_prune.masking import remove_masks
from lightning_prune.selection import group_counts

Batch = dict[str, torch.Tensor]
ROWS = ("reconstruction", "distillation", "learned", "learned+distillation", "gmp")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration paragraphs (the prior's too)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per paragraph")
    parser.add_argument("--train-batch", type=int, default=16, help="paragraphs per training step")
    parser.add_argument("--steps", type=int, default=48, help="training steps of every training row")
    parser.add_argument("--reconstruct-steps", type=int, default=100)
    parser.add_argument("--distill-lr", type=float, default=2e-4, help="weights' learning rate (distillation)")
    parser.add_argument("--logits-lr", type=float, default=1e-2, help="the learned mask's logits' learning rate")
    parser.add_argument("--prior-strength", type=float, default=10.0, help="MaskLLM's prior strength (std devs)")
    parser.add_argument("--tau-start", type=float, default=4.0, help="Gumbel-softmax temperature at step 0")
    parser.add_argument("--tau-end", type=float, default=0.05, help="... at the last step")
    parser.add_argument("--scale-start", type=float, default=100.0, help="logit scale κ at step 0")
    parser.add_argument("--scale-end", type=float, default=500.0, help="... at the last step")
    parser.add_argument("--anneal", default="linear", choices=("linear", "exponential"), help="τ/κ schedule shape")
    parser.add_argument("--mask-fraction", type=float, default=0.5, help="learned + distillation: mask phase share")
    parser.add_argument("--train-weights", action="store_true", help="learned + distillation: weights learn too")
    parser.add_argument("--paragraphs", type=int, default=64, help="held-out paragraphs for the metric")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows to train: {','.join(ROWS)}")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    if unknown := args.only - set(ROWS):
        parser.error(f"--only: unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    if not 0.0 < args.mask_fraction <= 1.0:
        parser.error(f"--mask-fraction must be in (0, 1], got {args.mask_fraction}")
    return args


class StepTimer(pl.Callback):
    """Wall time of every training batch, start to end (callbacks' work included)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)

    def median(self) -> float:
        return statistics.median(self.seconds[1:] or self.seconds)


class MaskOnly(EncoderDistillation):
    """`EncoderDistillation` with a forward: the prior's one-shot calibration runs the module on a batch."""

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)


def train(
    student: nn.Module, teacher: nn.Module, batches: list[Batch], steps: int, lr: float, extra: pl.Callback | None
) -> StepTimer:
    """`steps` steps of cosine distillation from `teacher` (masks kept), with `extra` (a pruning callback)."""
    timer = StepTimer()
    callbacks = [KnowledgeDistillation(alpha=0.0, loss="cosine", teacher=teacher), timer]
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks if extra is None else [extra, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    module = MaskOnly if isinstance(extra, LearnedSparsity) else EncoderDistillation
    trainer.fit(module(student, batches, lr))
    return timer


def check_2_4(model: nn.Module) -> None:
    """Every mask is exactly 2:4 and every pruned weight +0.0."""
    for name, mask in get_masks(model).items():
        weight = model.get_parameter(name).detach()
        assert group_counts(mask, 4).eq(2).all() and not weight[~mask].ne(0).any(), name
        assert not torch.signbit(weight[~mask]).any(), name


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    dense, tokenizer, calibration, training, paragraphs, reference, teacher = minilm_setup(args)
    rows: list[tuple[str, float, int, str, str, float]] = []

    def add(name: str, model: nn.Module, steps: int, step_s: float | None, memory: float | None, total: float) -> None:
        check_2_4(model)
        cosine = float(nn.functional.cosine_similarity(reference, embed(model, tokenizer, paragraphs)).mean())
        step = "–" if step_s is None else f"{step_s:.2f}"
        rows.append((name, cosine, steps, step, "–" if memory is None else f"{memory:g}", total))
        print(f"{name}: {cosine:.4f} ({steps} steps, {step} s/step, {total:.0f} s)", flush=True)

    options: dict[str, Any] = dict(method="sparsegpt", sparsity=0.5, pattern="2:4", progress=False)
    oneshot = copy.deepcopy(dense)
    add("SparseGPT 2:4 one-shot", oneshot, 0, None, None, timed(prune_oneshot, oneshot, calibration, **options))
    mask_only = copy.deepcopy(dense)
    masks = {name: mask.clone() for name, mask in get_masks(oneshot).items()}
    load_masks(mask_only, masks)
    add("SparseGPT's 2:4 mask on the dense weights", mask_only, 0, None, None, 0.0)
    if args.only & {"reconstruction", "distillation"}:
        tuned = copy.deepcopy(dense)
        recon = dict(reconstruct=True, reconstruct_steps=args.reconstruct_steps, reconstruct_target="model")
        seconds = timed(prune_oneshot, tuned, calibration, **options, **recon)
        add("+ reconstruction", tuned, 0, None, None, seconds)
    if "distillation" in args.only:
        distilled = masked_copy(dense, tuned)
        start = time.perf_counter()
        timer = train(distilled, teacher, training, args.steps, args.distill_lr, None)
        total = seconds + time.perf_counter() - start
        add("+ reconstruction + distillation", distilled, args.steps, timer.median(), 1, total)

    def learned(train_weights: bool = False) -> LearnedSparsity:
        return LearnedSparsity(
            prior="sparsegpt", calibration=calibration, num_samples=args.calibration, lr=args.logits_lr,
            prior_strength=args.prior_strength, tau_start=args.tau_start, tau_end=args.tau_end,
            scale_start=args.scale_start, scale_end=args.scale_end, anneal=args.anneal,
            train_weights=train_weights, freeze_others=not train_weights,
        )  # fmt: skip

    if "learned" in args.only:
        learner = copy.deepcopy(dense)
        callback = learned()
        start = time.perf_counter()
        timer = train(learner, teacher, training, args.steps, args.distill_lr, callback)
        total = time.perf_counter() - start
        add("learned mask (weights frozen)", learner, args.steps, timer.median(), callback.memory["total"], total)

    if "learned+distillation" in args.only:
        first = max(1, round(args.steps * args.mask_fraction))
        both = copy.deepcopy(dense)
        callback = learned(train_weights=args.train_weights)
        start = time.perf_counter()
        train(both, teacher, training[:first], first, args.distill_lr, callback)
        if first < args.steps:
            train(both, teacher, training[first:] or training, args.steps - first, args.distill_lr, None)
        weights = ", weights learning" if args.train_weights else ""
        name = f"learned mask ({first} steps{weights}) + distillation ({args.steps - first} steps)"
        add(name, both, args.steps, None, callback.memory["total"], time.perf_counter() - start)

    if "gmp" in args.only:
        gmp = copy.deepcopy(dense)
        schedule = GradualPruning(
            0.5, pattern="2:4", end_step=max(1, args.steps * 3 // 4), frequency=max(1, args.steps // 8)
        )
        start = time.perf_counter()
        timer = train(gmp, teacher, training, args.steps, args.distill_lr, schedule)
        add("GMP 2:4 + distillation (dense start)", gmp, args.steps, timer.median(), 1, time.perf_counter() - start)
        remove_masks(gmp)

    tokens = sum(int(b["attention_mask"].sum()) for b in training[: args.steps])
    print(
        f"\nall-MiniLM-L6-v2, {len(paragraphs)} held-out paragraphs; {args.calibration} calibration paragraphs; "
        f"{args.steps} training steps of {args.train_batch} paragraphs (≤{args.max_length} tokens, {tokens} tokens); "
        f"logits lr {args.logits_lr:g}, prior strength {args.prior_strength:g}, τ {args.tau_start:g}→{args.tau_end:g}, "
        f"κ {args.scale_start:g}→{args.scale_end:g} ({args.anneal})\n"
    )
    print("| row | cosine to dense | steps | s / step | bytes / weight | wall s |\n|---|---|---|---|---|---|")
    for name, cosine, steps, step, memory, seconds in rows:
        print(f"| {name} | {cosine:.4f} | {steps} | {step} | {memory} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
