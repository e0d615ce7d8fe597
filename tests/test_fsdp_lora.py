"""LoRARecovery under FSDP2 (Lightning's ModelParallelStrategy): two gloo CPU processes against one.

Both launches run every phase of tests/fsdp_lora_job.py (2:4 masks attached before sharding and a
masked-delta forward; a one-shot-pruned model with plain LoRA; a tiny Llama sharded per decoder
layer; resume); the one-process run also
resumes from the two-process run's checkpoint and records the layouts that are refused. The tests
below the launches need no process group: what is refused before sharding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from architectures import BY_NAME
from conftest import joined_ranks, load_rank, run_job, tiny_gpt2
from fsdp_job import ShardedMLP
from fsdp_lora_job import LlamaLM, pruned
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_prune import LoRARecovery, load_lora, update_masks
from lightning_prune.report import max_nonzeros_per_group
from lightning_prune.targets import find_targets

JOB = Path(__file__).with_name("fsdp_lora_job.py")
LORA = ["net.0.weight", "net.2.weight"]  # the pruned layers; the head stays dense


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One FSDP2 run on 2 ranks and one on 1 rank with the same global batch (~35 s and ~20 s)."""
    two, one = tmp_path_factory.mktemp("lora2"), tmp_path_factory.mktemp("lora1")
    run_job(JOB, two, 2)
    run_job(JOB, one, 1, "--resume-from", str(two / "epoch1-2"))
    return {"two": two, "one": one}


def joined(runs: dict[str, Path], run: str, phase: str, key: str) -> dict[str, torch.Tensor]:
    """Whole tensors under `key`: the two ranks' row blocks stacked, or the one rank's."""
    return load_rank(runs["one"], phase)[key] if run == "one" else joined_ranks(runs["two"], phase, key)


def plain_architecture(phase: str) -> nn.Module:
    """A fresh unwrapped, unsharded instance of the phase's model (its state dict's keys)."""
    return LlamaLM(16) if phase == "llama" else ShardedMLP(32)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["masked", "zeros", "llama"])
def test_two_sharded_ranks_merge_what_one_process_merges(runs: dict[str, Path], phase: str) -> None:
    masks, single = joined(runs, "two", phase, "masks"), load_rank(runs["one"], phase)
    assert len(masks) == {"masked": 2, "zeros": 0, "llama": 14}[phase]  # masks derived from zeros go with the merge
    for name, mask in single["masks"].items():
        assert torch.equal(masks[name], mask), name
    weights = joined(runs, "two", phase, "weights")
    assert sorted(weights) == sorted(single["before"])  # the plain architecture's keys: no base_layer, no adapters
    for name, value in single["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-6)
    plain_architecture(phase).load_state_dict(weights, strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["two", "one"])
def test_merge_keeps_every_zero_and_every_2of4_group(runs: dict[str, Path], run: str) -> None:
    before = load_rank(runs[run], "masked")["before"]
    masks, merged = joined(runs, run, "masked", "masks"), joined(runs, run, "masked", "weights")
    for name in LORA:
        pruned = ~masks[name]
        assert torch.equal(before[name][pruned], torch.zeros(int(pruned.sum())))
        assert not merged[name][pruned].any() and not torch.signbit(merged[name][pruned]).any(), name
        assert max_nonzeros_per_group(merged[name], 4) == 2
        assert not torch.equal(merged[name], before[name])  # the adapters did change the kept weights
    kept_zero = masks["net.2.weight"] & (before["net.2.weight"] == 0)
    assert int(kept_zero.sum()) == 1 and bool(
        merged["net.2.weight"][kept_zero].ne(0).all()
    )  # kept, so the delta reached it
    llama_masks, llama = joined(runs, run, "llama", "masks"), joined(runs, run, "llama", "weights")
    for name, mask in llama_masks.items():  # a Llama sharded per decoder layer: every projection stays 2:4
        assert not llama[name][~mask].any() and not torch.signbit(llama[name][~mask]).any(), name
        assert max_nonzeros_per_group(llama[name], 4) == 2
    zeros_before, zeros_merged = load_rank(runs[run], "zeros")["before"], joined(runs, run, "zeros", "weights")
    for name in LORA:  # one-shot-pruned (no masks): exactly the zero set stays, as +0.0
        assert torch.equal(zeros_merged[name] == 0, zeros_before[name] == 0), name
        assert not torch.signbit(zeros_merged[name][zeros_before[name] == 0]).any()


@pytest.mark.slow
@pytest.mark.parametrize(("run", "ranks"), [("two", (0, 1)), ("one", (0,))])
def test_forward_sees_frozen_zeros_and_exactly_the_merged_model(
    runs: dict[str, Path], run: str, ranks: tuple[int, ...]
) -> None:
    """Every forward's (gathered) base weight is the frozen pruned one, and the trained adapters'
    forward gives the merged model's outputs: no delta reached a pruned weight."""
    merged = joined(runs, run, "masked", "weights")
    for rank in ranks:
        for phase in ("masked", "zeros", "llama"):
            state = load_rank(runs[run], phase, rank)
            assert len(state["base_seen"]) == (14 if phase == "llama" else 2)
            for name, seen in state["base_seen"].items():
                assert torch.equal(seen, state["before"][name]), (phase, name)
        state = load_rank(runs[run], "masked", rank)
        for name in LORA:
            x, y = state["io"][name]
            bias = merged[name.replace("weight", "bias")]
            torch.testing.assert_close(y, x @ merged[name].T + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("run", "rows"), [("two", 24), ("one", 48)])
def test_adapters_train_sharded_and_masks_stay_row_blocks(runs: dict[str, Path], run: str, rows: int) -> None:
    for phase in ("masked", "zeros"):
        state = load_rank(runs[run], phase)
        assert state["merged"] and not state["wrapped"]
        assert state["trainable"] == sorted(state["adapters"])  # only the adapters train
        a_rows = 4 * rows // 48  # lora_A is r × in, split by its r rows too
        expected = {"net.0": ((a_rows, 64), (rows, 4)), "net.2": ((a_rows, 48), (rows, 4))}
        for layer, (a_shape, b_shape) in expected.items():
            assert state["adapters"][f"{layer}.lora_A.default.weight"] == ("DTensor", a_shape)
            assert state["adapters"][f"{layer}.lora_B.default.weight"] == ("DTensor", b_shape)
        assert state["mask_shapes"] == {
            "net.0.base_layer.weight": (rows, 64),
            "net.2.base_layer.weight": (rows, 48),
        }  # 1/world each
    assert load_rank(runs[run], "masked")["forward_masks"] == {
        "net.0": "nonzero",
        "net.2": "gathered",
    }  # net.2 keeps a zero weight


@pytest.mark.slow
@pytest.mark.parametrize(("run", "phase"), [("two", "resumed"), ("one", "resumed"), ("one", "resharded")])
def test_distributed_checkpoint_resumes_exactly(runs: dict[str, Path], run: str, phase: str) -> None:
    """Resumed after epoch 1 of 3 (adapters in the model's distributed state dict, AdamW state):
    bitwise the uninterrupted merge on the same ranks; from the 2-rank checkpoint on 1 rank, close."""
    uninterrupted, resumed = load_rank(runs[run], "masked"), load_rank(runs[run], phase)
    for name, mask in uninterrupted["masks"].items():
        assert torch.equal(mask, resumed["masks"][name]), name
    for name, value in uninterrupted["weights"].items():
        if phase == "resharded":  # the first epoch's gradients were reduced over 2 ranks
            torch.testing.assert_close(value, resumed["weights"][name], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(value, resumed["weights"][name]), name
    if run == "two":
        assert torch.equal(
            load_rank(runs[run], phase, 1)["weights"]["net.2.weight"],
            load_rank(runs[run], "masked", 1)["weights"]["net.2.weight"],
        )


@pytest.mark.slow
@pytest.mark.parametrize(("run", "devices"), [("two", 2), ("one", 1)])
def test_unmerged_adapters_saved_under_fsdp2_load_with_peft_on_one_process(
    runs: dict[str, Path], run: str, devices: int
) -> None:
    """`merge=False`: `save_adapter` gathers the sharded adapters; peft loads them (`load_lora`) into the
    unsharded pruned model, which then computes what the sharded, still wrapped network computed."""
    from safetensors.torch import load_file

    directory = runs[run] / f"adapter-{devices}"
    saved = load_file(str(directory / "adapter_model.safetensors"))
    assert {name: tuple(value.shape) for name, value in saved.items()} == {
        "base_model.model.net.0.lora_A.weight": (4, 64),
        "base_model.model.net.0.lora_B.weight": (48, 4),
        "base_model.model.net.2.lora_A.weight": (4, 48),
        "base_model.model.net.2.lora_B.weight": (48, 4),
    }  # whole tensors, not one rank's blocks
    model = pruned("masked", 32)
    with torch.no_grad():
        plain = model.net(load_rank(runs[run], "unmerged")["batch"])
    loaded = load_lora(model, str(directory))
    for rank in range(devices):
        state = load_rank(runs[run], "unmerged", rank)
        assert state["wrapped"]
        with torch.no_grad():
            output = loaded.base_model.model.net(state["batch"])
        torch.testing.assert_close(output, state["output"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(output, plain, atol=1e-4)  # the trained adapters act


def test_save_adapter_needs_attached_adapters_and_is_save_pretrained_on_one_process(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no adapters are attached \(with merge=True they are merged"):
        LoRARecovery().save_adapter(tmp_path)
    torch.manual_seed(0)
    module, recovery = ShardedMLP(32), LoRARecovery(r=4)
    masked(module)
    recovery.inject(module)  # what `on_fit_start` does on one process
    with torch.no_grad():
        module.get_parameter("net.0.lora_B.default.weight").normal_()
        x = torch.rand(3, 64, generator=torch.Generator().manual_seed(1))
        expected = module.net(x)
    recovery.save_adapter(tmp_path)
    torch.manual_seed(0)
    loaded = load_lora(masked(ShardedMLP(32)), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded.base_model.model.net(x), expected)


@pytest.mark.slow
def test_layouts_the_masked_forward_cannot_run_are_refused_with_the_fix(runs: dict[str, Path]) -> None:
    units = (runs["one"] / "refused-units.txt").read_text()
    assert "applied `fully_shard` to a part of the LoRA layer 'net.0'" in units and "masked_delta=False" in units
    root = (runs["one"] / "refused-root.txt").read_text()
    assert "runs its forward with sharded weights" in root and "isinstance(m, nn.Linear)" in root


def setup_under_fsdp2(model: nn.Module, **kwargs: object) -> None:
    """LoRARecovery's `setup` as Lightning calls it under ModelParallelStrategy, before `configure_model`."""
    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1))
    LoRARecovery(**kwargs).setup(trainer, model, "fit")  # type: ignore[arg-type]


def masked(model: nn.Module) -> nn.Module:
    targets = find_targets(model)
    update_masks(targets, {t.name: t.weight.abs() for t in targets}, 0.5, pattern="2:4")
    return model


def test_fused_experts_transposed_conv1d_and_meta_weights_are_refused_before_injection() -> None:
    mixtral = masked(BY_NAME["mixtral"].build())
    with pytest.raises(ValueError, match=r"fused expert parameters .* not supported under FSDP2"):
        setup_under_fsdp2(mixtral)
    assert not any(".lora_" in name for name, _ in mixtral.named_parameters())  # refused before peft touched it
    with pytest.raises(ValueError, match=r"is a Conv1D; under FSDP2 LoRARecovery adapts \(out, in\) nn.Linear"):
        setup_under_fsdp2(masked(tiny_gpt2()))
    with torch.device("meta"):
        meta = ShardedMLP(32)
    with pytest.raises(ValueError, match=r"on the meta device when LoRARecovery injects"):
        setup_under_fsdp2(meta, target_modules=r"net\.0")


def test_under_fsdp2_adapters_are_injected_in_setup_before_sharding() -> None:
    torch.manual_seed(0)
    module = masked(ShardedMLP(32))
    setup_under_fsdp2(module)
    assert {name for name, p in module.named_parameters() if p.requires_grad} == {
        f"net.{i}.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB"
    }  # injected and frozen before `configure_model`, so `fully_shard` covers the adapters


def test_fsdp1_is_still_refused_and_the_message_points_to_fsdp2() -> None:
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match=r"FSDPStrategy .* use one process or ModelParallelStrategy \(FSDP2"):
        LoRARecovery().setup(trainer, ShardedMLP(32), "fit")  # type: ignore[arg-type]
