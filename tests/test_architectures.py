"""One table of architectures (tests/architectures.py) through the one-shot, export and training contracts.

Per architecture: the driver's block outputs equal the model's own (bitwise, CPU fp32); Wanda and
SparseGPT 2:4 are exact on every targeted weight, experts included; every block weight matrix is a
target; masks through the driver equal masks from pruning block by block with the model's own
forward; a 2:4 export round-trips; GradualPruning to 50%, finalize, strict reload.

Per architecture (module-scoped fixtures, so the tests of one architecture run together): the
model is built and its calibration batches made once (`built`; tests that change it work on a
deep copy), and one Wanda 2:4 pruning (`wanda_2_4`) serves the exactness, export and
driver-versus-own-forward checks.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from architectures import CASES, Case
from conftest import make_trainer
from torch import nn

from lightning_prune import GradualPruning, finalize, get_masks, prune_oneshot
from lightning_prune.calibration.blocks import find_blocks
from lightning_prune.calibration.collect import collect_statistics
from lightning_prune.calibration.driver import block_output, calibrate_sequentially
from lightning_prune.calibration.stats import FeatureNormStats
from lightning_prune.export import load_sparse, save_sparse
from lightning_prune.oneshot.api import ONESHOT_TYPES, block_targets
from lightning_prune.oneshot.prune import prune_target
from lightning_prune.oneshot.wanda import Wanda
from lightning_prune.report import SparsityReport, max_nonzeros_per_group
from lightning_prune.targets import find_targets, router_names

PARAMS = [pytest.param(case, id=case.name, marks=[pytest.mark.slow] if case.slow else []) for case in CASES]
Data = list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=PARAMS)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built(case: Case) -> tuple[nn.Module, Data]:
    """The unpruned model and its calibration batches; tests that change the model copy it."""
    return case.build(), case.batches()


@pytest.fixture(scope="module")
def wanda_2_4(built: tuple[nn.Module, Data]) -> tuple[nn.Module, SparsityReport]:
    """A copy pruned once with Wanda 2:4 (no expert left dense, no stack left out: warnings are errors)."""
    model, data = copy.deepcopy(built[0]), built[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = prune_oneshot(model, data, method="wanda", pattern="2:4", min_expert_tokens=1, progress=False)
    return model, report


def _no_cache(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A cache changes T5's rounding on its own (1e-6); the driver never passes one to a block.
    return {**batch, "use_cache": False} if hasattr(model.config, "use_cache") else batch


def _own_block_outputs(model: nn.Module, data: list[dict[str, torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, k=f"{name}.{i}": outputs.setdefault(k, []).append(block_output(o)))
        for name, blocks in find_blocks(model)
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        for batch in data:
            model(**_no_cache(model, batch))
    for handle in handles:
        handle.remove()
    return outputs


def test_driver_block_outputs_equal_the_models_own_bitwise(built: tuple[nn.Module, Data]) -> None:
    model, data = built  # calibrate_sequentially without pruning leaves it as it was
    expected = _own_block_outputs(model, data)
    got: dict[str, list[torch.Tensor]] = {}

    def record(index: int, name: str, block: nn.Module, run_block: Any) -> None:
        handle = block.register_forward_hook(lambda m, a, o: got.setdefault(name, []).append(block_output(o)))
        run_block()
        handle.remove()

    stacks = calibrate_sequentially(model, data, record, progress=False)
    assert stacks == [name for name, _ in find_blocks(model)]
    assert got.keys() == expected.keys()
    for name, outputs in expected.items():
        for want, have in zip(outputs, got[name]):
            assert torch.equal(want, have), name


def _block_matrices(model: nn.Module) -> dict[str, int]:
    """Every weight matrix inside the blocks but routers and embeddings (T5's position bias)."""
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    routers = {f"{n}.weight" for n in router_names(model)}
    prefixes = tuple(f"{name}." for name, _ in find_blocks(model))
    return {
        n: p.numel()
        for n, p in model.named_parameters()
        if n.startswith(prefixes) and p.dim() >= 2 and not n.endswith("bias") and n not in embeddings | routers
    }


def _check_2_4_on_every_block_weight(case: Case, model: nn.Module, report: SparsityReport) -> None:
    assert not report.skipped
    masks = get_masks(model)
    assert set(masks) == set(_block_matrices(model))  # 100% of the block's weight matrices
    targets = find_targets(model, types=ONESHOT_TYPES)
    for target in (t for t in targets if t.name in masks):
        for name, matrix in zip(target.matrix_names(), target.matrices(target.weight)):
            assert max_nonzeros_per_group(matrix, 4) <= 2, name
    assert any(t.experts for t in targets if t.name in masks) == case.experts
    assert report.global_sparsity == pytest.approx(0.5, abs=0.01)


def test_wanda_2_4_is_exact_on_every_block_weight_experts_included(
    case: Case, wanda_2_4: tuple[nn.Module, SparsityReport]
) -> None:
    _check_2_4_on_every_block_weight(case, *wanda_2_4)


def test_sparsegpt_2_4_is_exact_on_every_block_weight_experts_included(
    case: Case, built: tuple[nn.Module, Data]
) -> None:
    model, data = copy.deepcopy(built[0]), built[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no expert left dense, no stack left out
        report = prune_oneshot(model, data, method="sparsegpt", pattern="2:4", min_expert_tokens=1, progress=False)
    _check_2_4_on_every_block_weight(case, model, report)


def _prune_with_the_models_own_forward(model: nn.Module, data: Data) -> None:
    """Block by block, stack by stack: run the whole model (earlier blocks pruned), collect, prune."""
    stacks = find_blocks(model)
    per_block = block_targets(model, stacks, None, None)
    for name, targets in per_block.items():

        def run() -> None:
            with torch.no_grad():
                for batch in data:
                    model(**_no_cache(model, batch))

        stats = collect_statistics(targets, (FeatureNormStats,), run)
        for target in targets:
            prune_target(target, Wanda(), None, stats, 0.5, "2:4")


def test_driver_masks_equal_masks_from_the_models_own_forward(
    built: tuple[nn.Module, Data], wanda_2_4: tuple[nn.Module, SparsityReport]
) -> None:
    driven, by_hand, data = wanda_2_4[0], copy.deepcopy(built[0]), built[1]
    _prune_with_the_models_own_forward(by_hand, data)
    expected = get_masks(by_hand)
    assert get_masks(driven).keys() == expected.keys()
    for name, mask in get_masks(driven).items():
        assert torch.equal(mask, expected[name]), name


def test_2_4_export_round_trips(wanda_2_4: tuple[nn.Module, SparsityReport], tmp_path: Path) -> None:
    model = copy.deepcopy(wanda_2_4[0])  # finalized below
    pruned = set(get_masks(model))
    save_sparse(model, tmp_path / "out", format="sparse-24-bitmask")
    loaded = load_sparse(tmp_path / "out")
    finalize(model)
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    # Layers by module name, fused experts by parameter name: exactly the pruned weights.
    assert sorted(config["targets"]) == sorted(
        t.name if t.experts else t.module_name
        for t in find_targets(model, ignore_output_head=False)
        if t.name in pruned
    )


class _Wrapper(pl.LightningModule):
    def __init__(self, model: nn.Module, data: Data) -> None:
        super().__init__()
        self.model, self.data = model, data

    def training_step(self, batch: int, batch_idx: int) -> torch.Tensor:
        outputs = self.model(**self.data[batch])
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        return logits.float().square().mean()

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(list(range(len(self.data))), batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_gradual_pruning_to_half_then_finalize_reloads_strictly(built: tuple[nn.Module, Data]) -> None:
    model, data = copy.deepcopy(built[0]), built[1]
    callback = GradualPruning(sparsity=0.5, start_step=0, end_step=1, frequency=1)
    make_trainer(max_steps=2, callbacks=[callback]).fit(_Wrapper(model, data))
    assert callback.current_sparsity == pytest.approx(0.5, abs=0.01)
    expert_names = [t.name for t in find_targets(model) if t.experts]
    assert all(name in get_masks(model) for name in expert_names)
    finalize(model)
    fresh = copy.deepcopy(built[0])  # a fresh, unpruned instance
    fresh.load_state_dict(model.state_dict(), strict=True)
    for name in expert_names:
        weight = dict(fresh.named_parameters())[name]
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
