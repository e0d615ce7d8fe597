"""Sections of benchmarks/gpu.py beyond single layers: one-shot, GradualPruning's and LoRA's
steps on a model, and 2:4 semi-structured inference.

The model is Llama-style with TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 blocks, GQA 32/4
heads, vocabulary 32000), bf16 with random weights, built from a config: time and memory do not
depend on the values. Run through benchmarks/gpu.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gpu import Case, measure, mib, ms, ratio, sibling, table
from torch import nn

from lightning_prune import find_targets, keep_masks_applied, prune_oneshot, update_masks
from lightning_prune.lora import adapter_parameters, attach_lora


@dataclass(frozen=True)
class ModelSettings:
    """Shape of the model and of the data the sections feed it."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    samples: int = 128  # calibration sequences (the papers' 128)
    seq_len: int = 2048
    batch: int = 8  # sequences per calibration batch
    train_batch: int = 4  # sequences per training step
    train_seq_len: int = 1024
    steps: int = 5  # training steps timed per round
    frequency: int = 100  # GradualPruning's default steps between mask updates


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """Full size; --quick: 8 blocks and 32 short sequences; --cpu-smoke: a toy model."""
    if args.cpu_smoke:
        return ModelSettings(
            hidden=64,
            intermediate=128,
            layers=2,
            heads=4,
            kv_heads=2,
            vocab=128,
            samples=4,
            seq_len=16,
            batch=2,
            train_batch=2,
            train_seq_len=16,
            steps=2,
        )
    if args.quick:
        return ModelSettings(layers=8, samples=32, seq_len=512)
    return ModelSettings()


_MODELS: dict[tuple[ModelSettings, int], nn.Module] = {}


def master_model(settings: ModelSettings, layers: int | None = None) -> nn.Module:
    """The bf16 Llama-style model on the CPU (built once per depth; sections copy it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    depth = layers or settings.layers
    if (settings, depth) not in _MODELS:
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=settings.hidden,
            intermediate_size=settings.intermediate,
            num_hidden_layers=depth,
            num_attention_heads=settings.heads,
            num_key_value_heads=settings.kv_heads,
            vocab_size=settings.vocab,
            max_position_embeddings=max(settings.seq_len, settings.train_seq_len),
            tie_word_embeddings=False,
            use_cache=False,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
        _MODELS[(settings, depth)] = model.eval()
    return _MODELS[(settings, depth)]


def token_batches(settings: ModelSettings, count: int, batch: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"input_ids": torch.randint(0, settings.vocab, (batch, seq_len), generator=generator)} for _ in range(count)
    ]


def copied(settings: ModelSettings, where: torch.device | str, layers: int | None = None) -> Callable[[], nn.Module]:
    """Preparation of a one-shot case: a fresh copy of the model, on `where`."""
    return lambda: copy.deepcopy(master_model(settings, layers)).to(where)


def pruning(
    calibration: list[dict[str, torch.Tensor]], method: str, offload: bool, device: torch.device
) -> Callable[[nn.Module], Any]:
    """The timed part of a one-shot case: `prune_oneshot` at 50%."""
    return lambda model: prune_oneshot(
        model, calibration, method=method, sparsity=0.5, offload=offload, device=device, progress=False
    )


def oneshot_cases(settings: ModelSettings, device: torch.device, layers: int | None = None) -> dict[str, Case]:
    """One plain forward pass, and Wanda and SparseGPT with and without offload (offload only
    when `layers` asks for a shallower copy of the model)."""
    calibration = token_batches(settings, settings.samples // settings.batch, settings.batch, settings.seq_len)
    on_device = [{k: v.to(device) for k, v in b.items()} for b in calibration]

    def forward(model: nn.Module) -> None:
        with torch.no_grad():
            for batch in on_device:
                model(**batch)

    cases: dict[str, Case] = {} if layers else {"forward": (copied(settings, device), forward)}
    for method in ("wanda", "sparsegpt"):
        if not layers:
            cases[method] = (copied(settings, device), pruning(calibration, method, False, device))
        cases[f"{method} offload"] = (copied(settings, "cpu", layers), pruning(calibration, method, True, device))
    return cases


def oneshot_section(settings: ModelSettings, repeats: int, device: torch.device) -> str:
    """Whole-model one-shot vs one plain forward pass; offload at two depths for the memory goal."""
    half = max(settings.layers // 2, 1)
    result = measure(oneshot_cases(settings, device), repeats, device)
    halves = {f"{name}, {half} blocks": case for name, case in oneshot_cases(settings, device, half).items()}
    result.update(measure(halves, 0, device))  # memory only: one run each
    forward = result["forward"][0]
    rows = [[name, ms(seconds), ratio(seconds, forward), mib(peak)] for name, (seconds, peak) in result.items()]
    params = sum(p.numel() for p in master_model(settings).parameters())
    title = (
        f"One-shot, 50%, Llama-style {params / 1e9:.2f}B bf16 ({settings.layers} blocks), "
        f"{settings.samples}×{settings.seq_len} calibration tokens; median of {repeats} interleaved rounds "
        "(goals: Wanda ≤ 2.2×, SparseGPT ≤ 4× the forward; "
        f"offload peak equal at {settings.layers} and {half} blocks); "
        "peaks are above what was allocated before the call: "
        "the model itself for the runs without offload, nothing for the offloaded ones (model on the CPU)"
    )
    return table(title, ["run", "ms", "/ forward", "peak MiB above start"], rows)


class Trainee:
    """A model on the device with its fused AdamW; `steps()` runs `count` optimizer steps."""

    def __init__(
        self, model: nn.Module, params: list[nn.Parameter], settings: ModelSettings, device: torch.device
    ) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
        self.batches = [
            b["input_ids"].to(device)
            for b in token_batches(settings, settings.steps, settings.train_batch, settings.train_seq_len)
        ]

    def steps(self) -> None:
        for ids in self.batches:
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def masked_copy(settings: ModelSettings, device: torch.device) -> nn.Module:
    """The model on `device` with 50% magnitude masks attached to every block's linear layers."""
    model = copy.deepcopy(master_model(settings)).to(device)
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5)
    return model


def gradual_section(settings: ModelSettings, repeats: int, device: torch.device) -> str:
    """GradualPruning's cost: a step with masks (gradient hooks + re-zeroing after AdamW) vs dense,
    and one mask update (magnitude scores → selection → masks), amortised over `frequency` steps."""
    dense_model = copy.deepcopy(master_model(settings)).to(device)
    dense = Trainee(dense_model, list(dense_model.parameters()), settings, device)
    masked_model = masked_copy(settings, device)
    masked = Trainee(masked_model, list(masked_model.parameters()), settings, device)
    keep_masks_applied(masked.optimizer, masked_model)
    targets = find_targets(masked_model)

    def update(_: None) -> None:
        update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5)

    result = measure(
        {
            "dense step": (lambda: dense, lambda t: t.steps()),
            "masked step": (lambda: masked, lambda t: t.steps()),
            "mask update": (lambda: None, update),
        },
        repeats,
        device,
    )
    step, masked_step, update_s = (
        result["dense step"][0] / settings.steps,
        result["masked step"][0] / settings.steps,
        result["mask update"][0],
    )
    rows = [
        ["dense step", ms(step), "1.00×", mib(result["dense step"][1])],
        ["masked step", ms(masked_step), ratio(masked_step, step), mib(result["masked step"][1])],
        ["mask update (all layers)", ms(update_s), ratio(update_s, step), mib(result["mask update"][1])],
        [
            f"masked step + update / {settings.frequency}",
            ms(masked_step + update_s / settings.frequency),
            ratio(masked_step + update_s / settings.frequency, step),
            "",
        ],
    ]
    title = (
        "GradualPruning step vs dense: bf16, fused AdamW, "
        f"{settings.train_batch}×{settings.train_seq_len} tokens per step, "
        f"50% masks; median of {repeats} rounds of {settings.steps} steps (goal: ≤ 1.03×)"
    )
    return table(title, ["step", "ms", "/ dense", "peak MiB above start"], rows)


def lora_section(settings: ModelSettings, repeats: int, device: torch.device) -> str:
    """A LoRA step with the masked delta (`W·x + (M ⊙ s·B·A)·x`) vs plain LoRA on the pruned model."""
    trainees = {}
    for masked_delta in (False, True):
        peft_model = attach_lora(masked_copy(settings, device), r=16, alpha=32, masked_delta=masked_delta)
        trainees[masked_delta] = Trainee(peft_model, adapter_parameters(peft_model), settings, device)
    result = measure(
        {
            "plain LoRA step": (lambda: trainees[False], lambda t: t.steps()),
            "masked-delta LoRA step": (lambda: trainees[True], lambda t: t.steps()),
        },
        repeats,
        device,
    )
    plain = result["plain LoRA step"][0]
    rows = [
        [name, ms(seconds / settings.steps), ratio(seconds, plain), mib(peak)]
        for name, (seconds, peak) in result.items()
    ]
    title = (
        "LoRA r=16 on the 50%-pruned model, bf16, fused AdamW on the adapters; "
        f"median of {repeats} rounds of {settings.steps} steps"
    )
    return table(title, ["step", "ms", "/ plain", "peak MiB above start"], rows)


# --- 2:4 semi-structured ------------------------------------------------------------------------------


def semi_section(sizes: Sequence[tuple[int, int]], batches: Sequence[int], repeats: int, iters: int) -> str:
    """`load_sparse(semi_structured=True)` linears vs the dense linear, eager and as CUDA graphs."""
    from lightning_prune import find_targets, update_masks
    from lightning_prune.export import load_sparse, save_sparse

    rows: list[list[str]] = []
    notes: list[str] = []
    for out_features, in_features in sizes:
        layer = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
        dense = torch.nn.Sequential(layer)
        update_masks(find_targets(dense, include="."), {"0.weight": layer.weight.abs()}, 0.5, pattern="2:4")
        fresh = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16))
        with tempfile.TemporaryDirectory() as directory:
            save_sparse(dense, Path(directory) / "export", format="sparse-24-bitmask", targets=".")
            sparse = load_sparse(Path(directory) / "export", model=fresh, semi_structured=True)
        dense.cuda()
        for batch in batches:
            rows.append(
                [f"{out_features}×{in_features}", str(batch), *semi_times(dense, sparse, batch, repeats, iters, notes)]
            )
    title = (
        "2:4 semi-structured (load_sparse) vs dense nn.Linear, bf16, µs per call; "
        f"median of {max(repeats, 1)} rounds of {iters} calls"
    )
    header = ["W (out×in)", "batch", "dense", "2:4", "dense graph", "2:4 graph", "eager speed-up", "graph speed-up"]
    return table(title, header, rows) + "".join(f"{note}\n" for note in notes)


@torch.no_grad()
def semi_times(
    dense: torch.nn.Module, sparse: torch.nn.Module, batch: int, repeats: int, iters: int, notes: list[str]
) -> list[str]:
    """µs per call of both modules, eager and replayed from a CUDA graph, and the speed-ups."""
    time_cuda, graphed = sibling(("export",), "time_cuda"), sibling(("export",), "graphed")
    in_features = next(dense.parameters()).shape[1]
    x = torch.randn(batch, in_features, dtype=torch.bfloat16, device="cuda")
    variants: dict[str, Callable[[], Any]] = {"dense": functools.partial(dense, x), "2:4": functools.partial(sparse, x)}
    for name, fn in list(variants.items()):
        try:
            variants[f"{name} graph"] = graphed(fn)
        except RuntimeError as error:  # reported under the table, not hidden
            notes.append(f"- {name}, batch {batch}, in {in_features}: no CUDA graph ({error})")
    measured: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(repeats, 1)):
        for name, fn in variants.items():
            measured[name].append(time_cuda(fn, iters))
    us = {name: statistics.median(values) * 1e3 for name, values in measured.items()}
    cells = [f"{us[name]:.1f}" if name in us else "n/a" for name in ("dense", "2:4", "dense graph", "2:4 graph")]
    graph = ratio(us["dense graph"], us["2:4 graph"]) if "2:4 graph" in us and "dense graph" in us else "n/a"
    return [*cells, ratio(us["dense"], us["2:4"]), graph]
