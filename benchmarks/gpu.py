"""Accelerator benchmark: one-shot, gradual and LoRA pruning against the reference math and dense runs.

Everything is compared inside one process, interleaved (every variant once per round; medians over
rounds), timed with CUDA events and with peak memory from `torch.cuda.max_memory_allocated` (above
what was allocated before the call). Prints Markdown tables, one per section:

- layers: per layer size, our SparseGPT and Wanda against the reference math (IST-DASLab
  `fasterprune`, locuslab `prune_wanda`) at 50% and 2:4 — time and peak memory;
- select: the selection alone (the k-th value on the device) against the reference's sort;
- oneshot: Wanda and SparseGPT on a ~1B Llama-style model (bf16, random weights, built from a
  config), with and without `offload`, against one plain forward pass over the same calibration
  data; with `offload` also at half the depth (peak memory must not depend on depth);
- gradual: a training step (bf16, fused AdamW) with masks attached vs dense, and one mask update;
- lora: a LoRA step with the masked delta vs plain LoRA on the pruned model;
- semi: `load_sparse(semi_structured=True)` linears vs dense at batch 1, 16, 256, eager and under
  CUDA graphs (CUDA only).

    python benchmarks/gpu.py --sections layers,select,semi   # a few minutes on an H100-class GPU
    python benchmarks/gpu.py --sections oneshot               # the longest: ~5 minutes
    python benchmarks/gpu.py --sections gradual,lora
    python benchmarks/gpu.py --quick              # every section, smaller sizes, fewer rounds
    python benchmarks/gpu.py --cpu-smoke          # every section at toy sizes on the CPU (a test)

Without CUDA (and without --cpu-smoke) it prints why nothing was measured and exits with 0.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_prune.oneshot.sparsegpt import sparsegpt_prune
from lightning_prune.oneshot.wanda import wanda_mask
from lightning_prune.selection import lowest_k, lowest_k_per_row, parse_pattern, prune_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark modules


def sibling(names: Sequence[str], attribute: str) -> Any:
    """`attribute` from the first importable sibling module (e.g. the reference SparseGPT, which
    may live in benchmarks/reference_sparsegpt.py or in benchmarks/oneshot.py)."""
    for name in names:
        try:
            return getattr(importlib.import_module(name), attribute)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of the benchmark modules {list(names)} defines {attribute!r}")


SECTIONS = ("layers", "select", "oneshot", "gradual", "lora", "semi")
LAYER_SIZES = ((4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096))  # (out, in)
PATTERNS = (None, "2:4")

# (prepare, run): `prepare()` is untimed and builds what `run(state)` uses; `run` is timed.
Case = tuple[Callable[[], Any], Callable[[Any], Any]]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `fn` takes: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type != "cuda":
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s
    synchronize(device)
    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
    start.record()
    fn()
    end.record()
    synchronize(device)
    return float(start.elapsed_time(end)) / 1e3


def measure(cases: dict[str, Case], repeats: int, device: torch.device) -> dict[str, tuple[float, int | None]]:
    """{case: (median seconds, peak bytes above the starting allocation or None off CUDA)}.

    One warm-up call per case measures the peak memory (and stands in for the time when
    `repeats` is 0); then `repeats` interleaved rounds call every case once each.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    peaks: dict[str, int | None] = {}
    for name, (prepare, run) in cases.items():
        state = prepare()
        synchronize(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = elapsed(functools.partial(run, state), device)
        peaks[name] = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
        times[name] += [] if repeats else [warm]
        state = None  # freed before the next case prepares
    for _ in range(repeats):
        for name, (prepare, run) in cases.items():
            state = prepare()
            times[name].append(elapsed(functools.partial(run, state), device))
            state = None
    return {name: (statistics.median(times[name]), peaks[name]) for name in cases}


def _nothing() -> None:
    return None


def call(fn: Callable[..., Any], *args: Any) -> Case:
    """A case with nothing to prepare that times `fn(*args)`."""
    return (_nothing, lambda _state: fn(*args))


def on_copy(tensor: torch.Tensor, fn: Callable[..., Any], *args: Any) -> Case:
    """A case that times `fn(copy, *args)` on a fresh (untimed) copy of `tensor`."""
    return (tensor.clone, lambda copy: fn(copy, *args))


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def mib(peak: int | None) -> str:
    return "n/a" if peak is None else f"{peak / 2**20:.0f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


# --- layers and selection ---------------------------------------------------------------------------


def reference_wanda(
    weight: torch.Tensor, feature_norms: torch.Tensor, sparsity: float, pattern: str | None
) -> torch.Tensor:
    """locuslab/wanda `prune_wanda`'s math for one layer: |W|·‖X‖, a stable sort per row (or, for
    N:M, a topk over each group of M columns, one group per loop step), then `W[mask] = 0`."""
    metric = weight.abs() * feature_norms.reshape(1, -1)
    pruned = torch.zeros_like(metric, dtype=torch.bool)
    if pattern is None:
        order = torch.sort(metric, dim=-1, stable=True)[1]
        pruned.scatter_(1, order[:, : int(metric.shape[1] * sparsity)], True)
    else:
        n, m = parse_pattern(pattern)
        for column in range(0, metric.shape[1], m):
            group = metric[:, column : column + m].float()
            pruned.scatter_(1, column + torch.topk(group, m - n, dim=1, largest=False)[1], True)
    weight[pruned] = 0
    return weight


def ours_wanda(weight: torch.Tensor, feature_norms: torch.Tensor, sparsity: float, pattern: str | None) -> torch.Tensor:
    """Our Wanda on one layer, zeroing included (as `prune_oneshot` applies it)."""
    return weight.masked_fill_(~wanda_mask(weight, feature_norms, sparsity, pattern), 0.0)


def layer_inputs(out_features: int, in_features: int, tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A random bf16 weight, and the Hessian and feature norms of `tokens` random inputs."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, generator=generator)
    weight = torch.randn(out_features, in_features, device=device, generator=generator).to(torch.bfloat16)
    return {"weight": weight, "hessian": x.t() @ x * (2.0 / tokens), "norms": x.square().sum(0).sqrt()}


def layers_section(sizes: Sequence[tuple[int, int]], tokens: int, repeats: int, device: torch.device) -> str:
    reference_sparsegpt = sibling(("reference_sparsegpt", "oneshot"), "reference_sparsegpt")
    rows = []
    for out_features, in_features in sizes:
        inputs = layer_inputs(out_features, in_features, tokens, device)
        w, h, norms = inputs["weight"], inputs["hessian"], inputs["norms"]
        for pattern in PATTERNS:
            n, m = parse_pattern(pattern) if pattern else (0, 0)  # the reference takes (m − n) and m
            cases: dict[str, Case] = {
                "sparsegpt": call(sparsegpt_prune, w, h, 0.5, pattern),
                "reference sparsegpt": call(
                    reference_sparsegpt, w, h, 0.5, m - n, m
                ),  # prunes m−n of m (0: unstructured)
                "wanda": on_copy(w, ours_wanda, norms, 0.5, pattern),
                "reference wanda": on_copy(w, reference_wanda, norms, 0.5, pattern),
            }
            result = measure(cases, repeats, device)
            for method in ("sparsegpt", "wanda"):
                (ours, ours_peak), (ref, ref_peak) = result[method], result[f"reference {method}"]
                rows.append(
                    [
                        f"{out_features}×{in_features}",
                        pattern or "50%",
                        method,
                        ms(ours),
                        ms(ref),
                        ratio(ours, ref),
                        mib(ours_peak),
                        mib(ref_peak),
                    ]
                )
    title = (
        f"Layers: ours vs the reference math, bf16 weight, {tokens} calibration tokens; "
        f"median of {repeats} interleaved rounds (goal: ours/ref ≤ 1.00×)"
    )
    return table(
        title,
        ["W (out×in)", "sparsity", "method", "ours ms", "ref ms", "ours/ref", "ours peak MiB", "ref peak MiB"],
        rows,
    )


def host_threshold(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The selection this replaced: the k-th value computed on the host, then copied back."""
    return flat <= torch.kthvalue(flat.cpu(), k).values.to(flat.device)


def sorted_threshold(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The reference SparseGPT's selection: a full sort, the k-th value read on the device."""
    return flat <= torch.sort(flat)[0][k - 1]


def device_kthvalue(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th value by `torch.kthvalue` where the scores are (one thread block per slice on CUDA)."""
    return flat <= torch.kthvalue(flat, k).values


def topk_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's k-th value by topk instead of kthvalue (the alternative for Wanda's selection)."""
    return scores <= torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)


def sorted_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The reference Wanda's selection: a stable sort of every row."""
    return torch.sort(scores, dim=1, stable=True)[1][:, :k]


def select_section(sizes: Sequence[tuple[int, int]], repeats: int, device: torch.device) -> str:
    """The selection alone: our k-th value on the device vs the host round-trip it replaced, vs sorts."""
    rows = []
    for out_features, in_features in sizes:
        scores = torch.rand(out_features, in_features, device=device)
        block = scores[:, :128].contiguous().reshape(-1)  # what SparseGPT selects from, per block
        for name, flat in (("SparseGPT block (out×128)", block), ("whole layer", scores.reshape(-1))):
            k = prune_count(flat.numel(), 0.5)
            result = measure(
                {
                    "ours": call(lowest_k, flat, k),
                    "alternative": call(device_kthvalue, flat, k),
                    "host kthvalue (before)": call(host_threshold, flat, k),
                    "sort (reference)": call(sorted_threshold, flat, k),
                },
                repeats,
                device,
            )
            rows.append(
                [
                    f"{out_features}×{in_features}",
                    f"{name}; alt.: kthvalue on the device",
                    *(ms(result[c][0]) for c in result),
                ]
            )
        k = prune_count(in_features, 0.5)
        cases = {
            "ours": call(lowest_k_per_row, scores, k),
            "alternative": call(topk_per_row, scores, k),
            "sort (reference)": call(sorted_per_row, scores, k),
        }
        result = measure(cases, repeats, device)
        rows.append(
            [
                f"{out_features}×{in_features}",
                "per row (Wanda); alt.: topk per row",
                ms(result["ours"][0]),
                ms(result["alternative"][0]),
                "—",
                ms(result["sort (reference)"][0]),
            ]
        )
    title = (
        f"Selection alone at 50% (fp32 scores), ms; median of {repeats} interleaved rounds; "
        "ours = kthvalue per row, topk for one slice off the CPU"
    )
    return table(
        title, ["W (out×in)", "scope", "ours", "alternative", "host kthvalue (before)", "sort (reference)"], rows
    )


# --- driver --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="every section at toy sizes on the CPU (CUDA-only ones skipped)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds after a warm-up (default 3, --quick 2, --cpu-smoke 0)",
    )
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    args.repeats = args.repeats if args.repeats is not None else (0 if args.cpu_smoke else 2 if args.quick else 3)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen sections and print their tables; returns the exit code (0 when skipped)."""
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "benchmarks/gpu.py: no CUDA device, nothing measured "
            "(run it on a GPU; --cpu-smoke checks the script on the CPU)"
        )
        return 0
    import gpu_model  # the model-level sections

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sizes = ((64, 32), (48, 96)) if args.cpu_smoke else LAYER_SIZES[:1] if args.quick else LAYER_SIZES
    print(
        f"torch {torch.__version__}, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU smoke run (toy sizes)'}\n"
    )
    runs: dict[str, Callable[[], str]] = {
        "layers": lambda: layers_section(sizes, 64 if args.cpu_smoke else 2048, args.repeats, device),
        "select": lambda: select_section(sizes, args.repeats, device),
        "oneshot": lambda: gpu_model.oneshot_section(gpu_model.model_settings(args), args.repeats, device),
        "gradual": lambda: gpu_model.gradual_section(gpu_model.model_settings(args), args.repeats, device),
        "lora": lambda: gpu_model.lora_section(gpu_model.model_settings(args), args.repeats, device),
        "semi": lambda: gpu_model.semi_section(sizes, (1, 16, 256), args.repeats, 20 if args.quick else 100),
    }
    for section in args.sections:
        if section == "semi" and device.type != "cuda":
            print("semi: skipped, torch.sparse.to_sparse_semi_structured runs only on CUDA\n")
            continue
        print(runs[section](), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
