"""Export formats: file size vs dense, save/load time; on CUDA, 2:4 semi-structured linear vs dense.

    python benchmarks/export.py                       # CPU part (sizes, save/load) and GPU part if CUDA
    python benchmarks/export.py --hidden 256 --repeats 2 --no-gpu   # quick
    python benchmarks/export.py --no-files --batches 16,256,4096    # GPU part only

Everything is compared inside one run: sizes as ratios to the dense file of the same dtype, times
as medians over interleaved repeats. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lightning_prune import find_targets, update_masks
from lightning_prune.export import load_sparse, save_sparse
from lightning_prune.masking import keep_only_

FORMATS = ("dense", "sparse-24-bitmask", "sparse-bitmask")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (out, in) of Llama-7B's projections: q/k/v/o, gate/up, down.
LLM_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def mlp(hidden: int, layers: int, dtype: torch.dtype) -> nn.Module:
    """A stack of Llama-like MLP blocks (hidden → 2.6875·hidden → hidden), pruned 2:4 by magnitude."""
    torch.manual_seed(0)
    inner = int(hidden * 2.6875) // 64 * 64
    blocks = [
        nn.Sequential(nn.Linear(hidden, inner, bias=False), nn.Linear(inner, hidden, bias=False)) for _ in range(layers)
    ]
    model = nn.Sequential(*blocks).to(dtype)
    targets = find_targets(model, include=".")
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def file_table(hidden: int, layers: int, repeats: int) -> str:
    """Size ratio vs dense, and median save/load seconds, per format and dtype."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for dtype_name, dtype in DTYPES.items():
            model = mlp(hidden, layers, dtype)
            fresh = mlp(hidden, layers, dtype)
            times = {f: {"save": [], "load": []} for f in FORMATS}
            sizes = {}
            for _ in range(repeats):  # interleaved: every format once per round
                for fmt in FORMATS:
                    path = Path(root) / f"{dtype_name}-{fmt}"
                    start = time.perf_counter()
                    save_sparse(model, path, format=fmt, targets=".")
                    times[fmt]["save"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    load_sparse(path, model=fresh)
                    times[fmt]["load"].append(time.perf_counter() - start)
                    sizes[fmt] = directory_bytes(path)
            for fmt in FORMATS:
                rows.append(
                    f"| {dtype_name} | {fmt} | {sizes[fmt] / 2**20:.2f} | {sizes[fmt] / sizes['dense']:.4f} | "
                    f"{statistics.median(times[fmt]['save']):.3f} | {statistics.median(times[fmt]['load']):.3f} |"
                )
    params = sum(p.numel() for p in mlp(hidden, layers, torch.float32).parameters())
    header = (
        f"Files: {layers} MLP blocks, hidden {hidden}, {params / 1e6:.1f}M weights, all 2:4; "
        f"median of {repeats} interleaved repeats (save includes sha256 of every file, load verifies it)\n\n"
        "| dtype | format | MiB | size / dense | save s | load s |\n|---|---|---|---|---|---|"
    )
    return "\n".join([header, *rows])


def time_cuda(fn, iters: int) -> float:
    """Milliseconds per call, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graphed(fn):
    """`fn` captured in a CUDA graph: its replay shows kernel time without Python/dispatch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def two_four(out_features: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """A random (out, in) CUDA weight pruned 2:4 by magnitude along the input dimension."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, dtype=dtype, device="cuda")
    groups = weight.abs().reshape(out_features, -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
    return keep_only_(weight, keep.reshape(weight.shape))


def gpu_rows(
    dtype_name: str, backend: str, batches: list[int], repeats: int, iters: int, notes: list[str]
) -> list[str]:
    from torch.nn.functional import linear
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    rows = []
    for out_features, in_features in LLM_SHAPES:
        dense_weight = two_four(out_features, in_features, DTYPES[dtype_name])
        sparse_weight = to_sparse_semi_structured(dense_weight)
        for batch in batches:
            x = torch.randn(batch, in_features, dtype=dense_weight.dtype, device="cuda")
            torch.testing.assert_close(linear(x, sparse_weight), linear(x, dense_weight), rtol=5e-2, atol=5e-1)
            variants = {
                "dense": lambda x=x, w=dense_weight: linear(x, w),
                "sparse": lambda x=x, w=sparse_weight: linear(x, w),
            }
            try:
                variants.update(
                    {"dense graph": graphed(variants["dense"]), "sparse graph": graphed(variants["sparse"])}
                )
            except RuntimeError as error:  # reported under the table, not hidden
                notes.append(
                    f"{backend} {dtype_name} {out_features}×{in_features} batch {batch}: no CUDA graph ({error})"
                )
            measured = {name: [] for name in variants}
            for _ in range(repeats):  # interleaved
                for name, fn in variants.items():
                    measured[name].append(time_cuda(fn, iters))
            us = {name: statistics.median(times) * 1e3 for name, times in measured.items()}
            graph = (
                f"{us['dense graph']:.1f} | {us['sparse graph']:.1f} | {us['dense graph'] / us['sparse graph']:.2f}×"
                if "sparse graph" in us
                else "n/a | n/a | n/a"
            )
            tflops = 2 * batch * in_features * out_features / (us["dense"] * 1e-6) / 1e12
            rows.append(
                f"| {dtype_name} | {backend} | {out_features}×{in_features} | {batch} | {us['dense']:.1f} "
                f"| {us['sparse']:.1f} | {us['dense'] / us['sparse']:.2f}× | {graph} | {tflops:.0f} |"
            )
    return rows


def gpu_table(batches: list[int], repeats: int, iters: int, backends: list[str]) -> str:
    """Dense vs 2:4 semi-structured `F.linear` for Llama-7B shapes at several batch sizes."""
    rows: list[str] = []
    notes: list[str] = []
    major, minor = torch.cuda.get_device_capability()
    for backend in backends:
        if backend == "cutlass" and major != 8:  # PyTorch's CUTLASS 2:4 kernels are built for sm80-sm89 only
            notes.append(f"cutlass skipped: compute capability {major}.{minor}; PyTorch's CUTLASS 2:4 kernels need 8.x")
            continue
        for dtype_name in ("fp16", "bf16"):
            rows += gpu_rows(dtype_name, backend, batches, repeats, iters, notes)
    header = (
        f"GPU: {torch.cuda.get_device_name()} (sm{major}{minor}), torch {torch.__version__}; "
        "F.linear(x[batch, in], W[out, in]); "
        f"median of {repeats} interleaved repeats of {iters} calls; "
        "eager = one Python call each, graph = CUDA-graph replay\n\n"
        "| dtype | backend | W (out×in) | batch | dense µs | 2:4 µs | eager speed-up | dense graph µs | 2:4 graph µs "
        "| graph speed-up | dense TFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([header, *rows, *[f"\n- {note}" for note in notes]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the MLP blocks written to disk")
    parser.add_argument("--layers", type=int, default=4, help="number of MLP blocks")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per measurement")
    parser.add_argument("--iters", type=int, default=50, help="GPU calls per timed repeat")
    parser.add_argument("--batches", default="1,16,256,1024,4096,16384", help="GPU batch sizes (tokens)")
    parser.add_argument("--backends", default="cusparselt,cutlass", help="semi-structured kernels to time")
    parser.add_argument("--no-files", action="store_true", help="skip the file size / save / load table")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU table")
    args = parser.parse_args()
    if not args.no_files:
        print(file_table(args.hidden, args.layers, args.repeats), end="\n\n")
    if args.no_gpu:
        return
    if not torch.cuda.is_available():
        print("GPU table skipped: no CUDA device (torch.sparse.to_sparse_semi_structured runs only on CUDA).")
        return
    backends = [b for b in args.backends.split(",") if b]
    print(gpu_table([int(b) for b in args.batches.split(",")], args.repeats, args.iters, backends))


if __name__ == "__main__":
    main()
