"""No host round-trip on a per-layer path: selections, Wanda, SparseGPT and mask updates run on
the "meta" device, where any read-back (`.item()`, `.cpu()`, `.tolist()`, `bool(tensor)`, a 0-d
index tensor, boolean indexing) raises. The one sync a layer may make, the NaN check, is counted
instead (its read-back is replaced by a counter), and must happen at most once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from lightning_prune.mask_updates import update_masks
from lightning_prune.masking import get_mask
from lightning_prune.oneshot import sparsegpt
from lightning_prune.oneshot.wanda import wanda_mask
from lightning_prune.selection import (
    select_channels,
    select_global,
    select_layer_wise,
    select_masks,
    select_n_m,
    select_row_wise,
)
from lightning_prune.targets import find_targets
from tests.conftest import DEVICES

META = torch.device("meta")


@pytest.fixture
def nan_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """Replace the per-layer NaN check (a permitted sync) by a record of the shapes it checked."""
    checked: list[tuple[int, ...]] = []

    def record(scores: torch.Tensor) -> None:
        checked.append(tuple(scores.shape))

    monkeypatch.setattr("lightning_prune.selection.check_scores", record)
    monkeypatch.setattr("lightning_prune.oneshot.sparsegpt.check_scores", record)
    yield checked


def test_meta_tensors_refuse_every_kind_of_read_back() -> None:
    # The mechanism the other tests rely on: each of these syncs on CUDA, and raises on meta.
    x = torch.empty(4, 8, device=META)
    reads: list[Callable[[], object]] = [
        lambda: x.sum().item(),
        lambda: x.cpu(),
        lambda: x.tolist(),
        lambda: bool(x.isnan().any()),
        lambda: int(x.sum()),
        lambda: x.reshape(-1)[torch.argmax(x)],  # a 0-d index tensor is read back
        lambda: x[x > 0],  # boolean indexing counts the selected entries on the host
    ]
    for read in reads:
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


def test_every_selection_runs_without_a_host_sync(nan_checks: list[tuple[int, ...]]) -> None:
    scores = torch.empty(8, 16, device=META)
    pruned = torch.empty(8, 16, dtype=torch.bool, device=META)
    results = [
        select_layer_wise(scores, 0.5, pruned),
        select_row_wise(scores, 0.5, pruned),
        select_n_m(scores, 2, 4, pruned=pruned),
        select_n_m(scores, 2, 4, sparsity=0.25, pruned=pruned),
        select_channels(scores, 0.5, pruned),
        *select_global({"a": scores, "b": scores[:4]}, 0.5, {"a": pruned}).values(),
        *select_masks({"a": scores, "b": scores[:4]}, 0.5, scope="layer").values(),
    ]
    assert all(mask.device == META and mask.dtype == torch.bool for mask in results)
    assert len(nan_checks) == 9  # one per layer: 5 single-layer calls, 2 + 2 in the dicts


def test_wanda_and_sparsegpt_make_one_check_per_layer_and_no_sync_per_block(
    nan_checks: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The damped Cholesky must read its `info` back (once per attempt); everything after it may not.
    monkeypatch.setattr(sparsegpt, "inverse_hessian_factor", lambda hessian, percdamp: torch.empty_like(hessian))
    weight, hessian = torch.empty(16, 32, device=META), torch.empty(32, 32, device=META)
    assert wanda_mask(weight, torch.empty(32, device=META), 0.5).device == META
    assert wanda_mask(weight, torch.empty(32, device=META), 0.5, "2:4").device == META
    for pattern in (None, "2:4"):
        new_weight, keep = sparsegpt.sparsegpt_prune(weight, hessian, 0.5, pattern, blocksize=8)
        assert new_weight.device == META and keep.shape == (16, 32)
    assert nan_checks == [(16, 32)] * 4  # 4 blocks of 8 columns each time, still one check per layer


@pytest.mark.parametrize("scope", ["layer", "row", "channel", "global"])
def test_mask_updates_of_a_model_stay_on_its_device(nan_checks: list[tuple[int, ...]], scope: str) -> None:
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 4)).to(META)
    targets = find_targets(model)
    for sparsity in (0.25, 0.5):  # the second update is monotone: it reads the first masks
        update_masks(targets, {t.name: t.weight.abs() for t in targets}, sparsity, scope=scope)
    masks = [get_mask(t.module, t.param_name) for t in targets]
    assert all(mask is not None and mask.device == META for mask in masks)
    assert len(nan_checks) == 2 * len(targets)


@pytest.mark.parametrize("device", [d for d in DEVICES if not isinstance(d, str)])
def test_cuda_selections_never_synchronize(device: str, nan_checks: list[tuple[int, ...]]) -> None:
    # On a real device: CUDA's own sync detector turns any synchronising call into an error.
    scores = torch.rand(64, 128, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scope in ("layer", "row", "channel", "global"):
            select_masks({"a": scores, "b": scores[:32]}, 0.5, scope=scope)
        select_masks({"a": scores}, 0.5, pattern="2:4")
    finally:
        torch.cuda.set_sync_debug_mode("default")
