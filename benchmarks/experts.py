"""Expert removal benchmark (issue 28): a small Qwen3-MoE-style model trained on the pydoc text.

The testbed (built once, saved under `--testbed`, reloaded afterwards): 4 layers, 8 routed experts,
top-2 (Qwen3-MoE's default `norm_topk_prob`=False, so `renormalize` matters), hidden 64, trained on
`pydoc_data.topics` with AdamW (3e-3, cosine decay to 0 over `--max-steps`), the held-out perplexity
printed every `--chunk` steps (it plateaus as the rate decays). Prints Markdown tables:

1. held-out perplexity (every validation window, fixed length, every token once) at 25% and 50% of
   the experts removed, for reap, frequency, routing_weight and random (3 seeds: their mean), with
   `renormalize` True and False for reap;
2. distillation from the dense MoE (pure KL, T = 1) of the REAP 50% model, `--distill-steps` steps,
   the removed experts kept removed: the share of the one-shot perplexity loss it recovers; the same
   steps of plain next-token fine-tuning for comparison;
3. the compacted models (25%, 50%): parameters and CPU forward time of a (16, 64) batch vs dense
   (one thread, interleaved repeats, medians), outputs checked against the masked model.

    OMP_NUM_THREADS=1 python benchmarks/experts.py --testbed /tmp/moe_testbed     # ~15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from structured import interleaved_medians  # benchmarks/, beside this script
from torch import nn

from lightning_prune import compact, keep_masks_applied, prune_experts
from lightning_prune.recovery.losses import kd_kl_loss

MOE = dict(
    model_type="qwen3_moe",
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=64,
    num_experts=8,
    num_experts_per_tok=2,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict]) -> float:
    """exp of the mean token NLL over fixed-length windows (equal sizes: the mean of batch means)."""
    model.eval()
    losses = [float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in batches]
    return float(torch.tensor(losses).mean().exp())


def data(args: argparse.Namespace) -> tuple[list[dict], list[dict], int]:
    from lightning_prune.data import TextDataModule

    torch.manual_seed(0)
    module = TextDataModule(seq_len=args.seq_len, batch_size=16, vocab_size=args.vocab)
    module.setup("fit")
    train, val = list(module.train_dataloader()), list(module.val_dataloader())
    return train, [b for b in val if b["input_ids"].shape[0] == 16], len(module.tokenizer)


def testbed(args: argparse.Namespace, train: list[dict], val: list[dict], vocab: int) -> nn.Module:
    """The trained dense MoE: loaded from `--testbed` when there, else trained to a plateau and saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(args.testbed)
    if (path / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    settings = dict(MOE, vocab_size=vocab, max_position_embeddings=args.seq_len)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))
    )
    step, start = 0, time.perf_counter()
    while step < args.max_steps:
        model.train()
        for batch in train[: min(args.chunk, args.max_steps - step)]:
            model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
        ppl = perplexity(model, val)
        print(f"  testbed step {step}: val ppl {ppl:.2f} ({time.perf_counter() - start:.0f}s)", flush=True)
        train = train[args.chunk :] + train[: args.chunk]
    model.save_pretrained(path)
    return model.eval()


def fine_tune(model: nn.Module, teacher: nn.Module | None, train: list[dict], steps: int) -> nn.Module:
    """`steps` AdamW steps, masks kept applied: KL to `teacher` (distillation) or next-token loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    handle = keep_masks_applied(optimizer, model)
    model.train()
    for batch in train[:steps]:
        ids = batch["input_ids"]
        if teacher is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with torch.no_grad():
                target = teacher(input_ids=ids).logits
            loss = kd_kl_loss(model(input_ids=ids).logits, target, temperature=1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    handle.remove()
    return model.eval()


def find_count(model: nn.Module) -> int:
    """The routed experts per layer the model's config states."""
    return int(getattr(model.config, "num_experts", None) or model.config.num_local_experts)


def pruned(dense: nn.Module, calibration: list[dict], sparsity: float, **kwargs: object) -> nn.Module:
    model = copy.deepcopy(dense)
    prune_experts(model, calibration, expert_sparsity=sparsity, **kwargs)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--testbed", default="/tmp/lightning_prune_moe_testbed", help="where the testbed is saved")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--max-steps", type=int, default=700, help="testbed training steps (cosine schedule)")
    parser.add_argument("--chunk", type=int, default=100, help="steps between held-out evaluations")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences (16 per batch)")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    train, val, vocab = data(args)
    dense = testbed(args, train, val, vocab)
    calibration = train[: args.samples // 16]
    base = perplexity(dense, val)
    print(f"\ndense testbed: held-out ppl {base:.2f} on {len(val) * 16} windows of {args.seq_len} tokens\n")

    rows, models = [], {}
    for sparsity in (0.25, 0.5):
        results: dict[str, float] = {}
        for method in ("reap", "frequency", "routing_weight"):
            models[method, sparsity] = pruned(dense, calibration, sparsity, method=method)
            results[method] = perplexity(models[method, sparsity], val)
        draws = [
            perplexity(pruned(dense, [], sparsity, method="random", method_options={"seed": s}), val) for s in (0, 1, 2)
        ]
        results["random (3 seeds)"] = statistics.mean(draws)
        results["reap, renormalize=False"] = perplexity(pruned(dense, calibration, sparsity, renormalize=False), val)
        for name, ppl in results.items():
            rows.append([f"{sparsity:.0%}", name, f"{ppl:.2f}", f"{ppl / base - 1:+.1%}"])
    print(table(["experts removed", "method", "held-out ppl", "vs dense"], rows), "\n")

    one_shot = models["reap", 0.5]
    shot = perplexity(one_shot, val)
    steps = train[args.samples // 16 :][: args.distill_steps]
    distilled = perplexity(fine_tune(copy.deepcopy(one_shot), dense, steps, len(steps)), val)
    tuned = perplexity(fine_tune(copy.deepcopy(one_shot), None, steps, len(steps)), val)
    dense_tuned = perplexity(fine_tune(copy.deepcopy(dense), None, steps, len(steps)), val)
    rows = [
        ["REAP 50%, one-shot", f"{shot:.2f}", "-"],
        [
            f"+ distillation from the dense MoE ({len(steps)} steps)",
            f"{distilled:.2f}",
            f"{(shot - distilled) / (shot - base):.0%}",
        ],
        [f"+ next-token fine-tuning ({len(steps)} steps)", f"{tuned:.2f}", f"{(shot - tuned) / (shot - base):.0%}"],
    ]
    print(f"dense {base:.2f}; dense + the same {len(steps)} steps of next-token fine-tuning {dense_tuned:.2f}\n")
    print(table(["model", "held-out ppl", "share of the one-shot loss recovered"], rows), "\n")

    batch = val[0]["input_ids"]
    runs: dict[str, Callable[[], object]] = {"dense": lambda: dense(input_ids=batch)}
    rows = [["dense", f"{sum(p.numel() for p in dense.parameters()):,}", "", ""]]
    for sparsity in (0.25, 0.5):
        masked = models["reap", sparsity]
        with torch.no_grad():
            expected = masked(input_ids=batch).logits
            small = compact(copy.deepcopy(masked)).eval()
            error = float((small(input_ids=batch).logits - expected).abs().max())
        runs[f"{sparsity:.0%}"] = lambda small=small: small(input_ids=batch)
        rows.append(
            [
                f"{sparsity:.0%} removed ({find_count(small)} experts)",
                f"{sum(p.numel() for p in small.parameters()):,}",
                "",
                f"{error:.1e}",
            ]
        )
    medians = interleaved_medians(runs, args.repeats)
    for row, name in zip(rows, runs, strict=True):
        row[2] = f"{medians[name] * 1e3:.1f} ms ({medians['dense'] / medians[name]:.2f}x)"
    print(table(["model", "parameters", "forward (16x64), 1 thread", "max |compact - masked|"], rows))
    print(f"\ntotal {time.perf_counter() - begin:.0f}s")


if __name__ == "__main__":
    main()
