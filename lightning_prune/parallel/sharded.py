"""Parameters sharded by FSDP2 (`fully_shard`): local shards, and an exact k-th-lowest across shards.

FSDP2 holds every parameter as a `DTensor` split into row blocks (`Shard(0)`), one block per rank
of the sharding mesh dimension, in rank order. A mask covers only the rank's own block (1/world of
the full mask). Row-wise and N:M selection need nothing from other ranks (rows stay whole); a layer
or global threshold does, and `sharded_lowest_k` finds it exactly without moving a weight: a radix
select on the scores' bit patterns, 8 bits per round, one all-reduce of 256-bin histograms per round
for all selections at once, then one all-gather of per-rank tie counts so that ties go to the lower
index of the unsharded tensor, exactly as `selection.lowest_k` breaks them. Pure torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from lightning_prune.parallel.collectives import collective_device
from lightning_prune.selection import (
    SCOPES,
    keep_monotone,
    n_m_candidates,
    parse_pattern,
    prune_count,
    scores_with_pruned,
    select_row_wise,
)
from lightning_prune.targets import PruneTarget

_KEY_DTYPE = {4: torch.int32, 8: torch.int64}


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own block of a DTensor (sharing its storage), or `tensor` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 parameters and their gradients)."""
    return isinstance(tensor, DTensor)


def shard_group(tensor: DTensor, name: str) -> dist.ProcessGroup | None:
    """The process group whose ranks hold `tensor`'s row blocks, in block order (None: one block).

    Only row sharding (`Shard(0)`, FSDP2's layout; HSDP adds `Replicate()` dimensions) keeps rows
    whole, which row-wise and N:M selection and the tie order rely on.
    """
    shard_dims = [dim for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard)]
    if any(tensor.placements[dim] != Shard(0) for dim in shard_dims) or len(shard_dims) > 1:
        raise ValueError(
            f"{name!r} is placed as {tensor.placements}; pruning supports parameters sharded by rows only "
            "(FSDP2's Shard(0), optionally replicated: HSDP), not tensor parallelism"
        )
    if not shard_dims or tensor.device_mesh.size(shard_dims[0]) == 1:
        return None
    return tensor.device_mesh.get_group(shard_dims[0])


def _sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers ordered like the float scores (NaN-free; -0.0 counted as +0.0, as `<` and `==` do)."""
    bits = (scores + 0.0).contiguous().view(_KEY_DTYPE[scores.element_size()])
    low = torch.iinfo(bits.dtype).max  # flip all but the sign bit of negative floats: signed order = float order
    return torch.where(bits < 0, bits ^ low, bits)


def _transport(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`tensor` where a collective over `group` needs it (no group: no collective, on the CPU)."""
    return tensor.to(collective_device(group)) if group is not None else tensor.cpu()


def _digits(keys: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    """The byte of `keys` at `shift`, in unsigned order (the top byte's sign bit flipped: negatives first)."""
    digits = (keys >> shift) & 255
    return digits ^ 128 if shift == width - 8 else digits


def _histograms(
    keys: list[torch.Tensor], active: list[torch.Tensor], shift: int, width: int, problems: Sequence[Sequence[int]]
) -> torch.Tensor:
    """(problems, 256) counts of each digit at `shift` over the still-active entries of each problem."""
    rows = []
    for segments in problems:
        counts = torch.zeros(256, dtype=torch.int64)
        for s in segments:
            digits = _digits(keys[s][active[s]], shift, width).long()
            counts += torch.bincount(digits, minlength=256).to(counts.device)
        rows.append(counts)
    return torch.stack(rows)


def sharded_lowest_k(
    segments: Sequence[torch.Tensor],
    problems: Sequence[Sequence[int]],
    ks: Sequence[int],
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """Bool masks of the `ks[p]` lowest entries of each problem, each problem spread over ranks.

    A problem is a list of indices into `segments` (1-D local blocks); the unsharded vector of
    problem p is, for each of its segments in order, that segment's blocks in rank order. Ties go to
    the lower index of that vector. Every rank calls this with the same problems and `ks`, in the
    same order. Returns one mask per segment (local shape).
    """
    if sorted(s for segment_ids in problems for s in segment_ids) != list(range(len(segments))) or len(ks) != len(
        problems
    ):
        raise ValueError(
            "`problems` must use every segment exactly once and `ks` give one k per problem, "
            f"got {list(problems)} for {len(segments)} segments and ks={list(ks)}"
        )
    dtype = torch.float64 if any(segment.dtype == torch.float64 for segment in segments) else torch.float32
    keys = [_sortable_keys(segment.to(dtype)) for segment in segments]
    width = 8 * dtype.itemsize
    active = [torch.ones_like(key, dtype=torch.bool) for key in keys]
    remaining = list(ks)
    thresholds = [0] * len(problems)  # the k-th lowest key, as an unsigned integer built digit by digit
    for shift in range(width - 8, -1, -8):
        counts = _transport(_histograms(keys, active, shift, width, problems), group)
        if group is not None:
            dist.all_reduce(counts, group=group)
        cumulative = counts.cumsum(1).tolist()
        for p, segment_ids in enumerate(problems):
            remaining[p] = min(remaining[p], cumulative[p][-1])  # k beyond the count: all of them
            digit = next(d for d in range(256) if cumulative[p][d] >= remaining[p])  # counts are of active entries only
            remaining[p] -= cumulative[p][digit - 1] if digit else 0
            thresholds[p] = thresholds[p] * 256 + digit
            for s in segment_ids:
                active[s] &= _digits(keys[s], shift, width) == digit
    return _select_with_ties(keys, problems, remaining, thresholds, width, group)


def _select_with_ties(
    keys: list[torch.Tensor],
    problems: Sequence[Sequence[int]],
    remaining: list[int],
    thresholds: list[int],
    width: int,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """Entries below each threshold, plus the first `remaining[p]` tied ones in unsharded order."""
    masks: list[torch.Tensor] = [torch.zeros(0)] * len(keys)
    tied_local = torch.zeros(len(keys), dtype=torch.int64)
    below: dict[int, torch.Tensor] = {}
    tied: dict[int, torch.Tensor] = {}
    for p, segment_ids in enumerate(problems):
        threshold = thresholds[p] - (1 << (width - 1))  # back from unsigned order to the signed key
        for s in segment_ids:
            below[s], tied[s] = keys[s] < threshold, keys[s] == threshold
            tied_local[s] = tied[s].sum()
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    gathered = [_transport(tied_local.clone(), group) for _ in range(world)]
    if group is not None:
        dist.all_gather(gathered, _transport(tied_local, group), group=group)
    tied_all = torch.stack([g.cpu() for g in gathered]).tolist()  # (world, segments)
    for p, segment_ids in enumerate(problems):
        before = 0  # tied entries ahead of this rank's block: earlier segments on all ranks, this one on lower ranks
        for s in segment_ids:
            allowance = max(0, min(remaining[p] - before - sum(tied_all[r][s] for r in range(rank)), tied_all[rank][s]))
            count = torch.int32 if keys[s].numel() < 2**31 else torch.int64
            masks[s] = below[s] | (tied[s] & (tied[s].cumsum(0, dtype=count) <= allowance))
            before += sum(tied_all[r][s] for r in range(world))
    return masks


def all_gather_floats(values: Iterable[float], group: dist.ProcessGroup | None) -> list[list[float]]:
    """Every rank's list of floats (the same length on every rank), by rank."""
    local = torch.tensor(list(values), dtype=torch.float64)
    if group is None:
        return [local.tolist()]
    gathered = [_transport(torch.empty_like(local), group) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, _transport(local, group), group=group)
    return [g.cpu().tolist() for g in gathered]


def _layer_problems(
    flats: dict[str, torch.Tensor], ks: dict[str, int], group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """One k-lowest problem per layer (flat local blocks), all answered in the same collectives."""
    names = sorted(flats)
    dropped = sharded_lowest_k(
        [flats[n] for n in names], [[i] for i in range(len(names))], [ks[n] for n in names], group
    )
    return dict(zip(names, dropped))


def _global_dropped(flats: dict[str, torch.Tensor], k: int, group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """`select_global`'s threshold over every layer's blocks: each layer's first maximum is kept."""
    names = list(flats)  # the caller's order is the unsharded concatenation order
    local_max = [float(flats[n].max()) if flats[n].numel() else float("-inf") for n in names]
    gathered = all_gather_floats(local_max, group)
    rank = 0 if group is None else dist.get_rank(group)
    for i, name in enumerate(names):  # the first rank holding the layer's maximum owns its first occurrence
        column = [values[i] for values in gathered]
        if column.index(max(column)) == rank and flats[name].numel():
            flats[name] = flats[name].index_fill(0, torch.argmax(flats[name]).reshape(1), float("inf"))
    dropped = sharded_lowest_k([flats[n] for n in names], [list(range(len(names)))], [k], group)
    return dict(zip(names, dropped))


def select_masks_sharded(
    scores: dict[str, torch.Tensor],
    rows: dict[str, int],
    sparsity: float,
    scope: str = "layer",
    pattern: str | None = None,
    pruned: dict[str, torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, torch.Tensor]:
    """`selection.select_masks` for row blocks: `scores` are each rank's (local rows, in) blocks,
    `rows` the unsharded row counts; the masks are exactly the unsharded masks' blocks."""
    pruned = pruned or {}
    nan_layers = sum(
        bool(torch.isnan(s).any()) for s in scores.values()
    )  # every rank must raise, or the others wait forever
    if sum_over_shards([nan_layers], group)[0]:
        raise ValueError(
            "scores contain NaN on some rank's block; check the model's weights and calibration activations"
        )
    masked = {name: scores_with_pruned(s, pruned.get(name)) for name, s in scores.items()}
    numel = {name: rows[name] * s.shape[1] for name, s in scores.items()}
    if pattern is not None:
        n, m = parse_pattern(pattern)
        candidates = {name: n_m_candidates(s, n, m) for name, s in masked.items()}
        if sparsity >= (m - n) / m - 1e-9:
            return {name: keep_monotone(~c, pruned.get(name)) for name, c in candidates.items()}
        flats = {name: s.masked_fill(~candidates[name], float("inf")).reshape(-1) for name, s in masked.items()}
        dropped = _layer_problems(flats, {name: prune_count(numel[name], sparsity) for name in flats}, group)
    elif scope == "row":
        return {name: select_row_wise(s, sparsity, pruned.get(name)) for name, s in scores.items()}
    elif scope == "layer":
        flats = {name: s.reshape(-1) for name, s in masked.items()}
        dropped = _layer_problems(flats, {name: prune_count(numel[name], sparsity) for name in flats}, group)
    elif scope == "channel":
        norms = {name: s.float().norm(dim=1) for name, s in scores.items()}
        norms = {
            name: v.masked_fill(pruned[name].all(dim=1), float("-inf")) if name in pruned else v
            for name, v in norms.items()
        }
        rows_dropped = _layer_problems(norms, {name: prune_count(rows[name], sparsity) for name in norms}, group)
        dropped = {name: d.unsqueeze(1).expand_as(scores[name]).clone() for name, d in rows_dropped.items()}
    elif scope == "global":
        total, k = sum(numel.values()), prune_count(sum(numel.values()), sparsity)
        if k > total - len(scores):
            raise ValueError(
                f"`sparsity`={sparsity} would empty a layer in global scope "
                f"({k} of {total} weights over {len(scores)} layers)"
            )
        dropped = _global_dropped({name: s.reshape(-1).float() for name, s in masked.items()}, k, group)
    else:
        raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
    return {name: keep_monotone(~dropped[name].reshape(scores[name].shape), pruned.get(name)) for name in scores}


def sum_over_shards(values: Sequence[int], group: dist.ProcessGroup | None) -> list[int]:
    """Each integer summed over the ranks of `group` (counts of kept weights per block)."""
    local = torch.tensor(list(values), dtype=torch.int64)
    if group is not None:
        local = _transport(local, group)
        dist.all_reduce(local, group=group)
    return [int(v) for v in local.cpu().tolist()]


def targets_shard_group(targets: Sequence[PruneTarget]) -> dist.ProcessGroup | None:
    """The one process group over which every target is sharded by rows (None: one block each).

    Raises a ValueError naming the first target that is not an FSDP2 row-sharded (out, in) weight.
    """
    groups = []
    for target in targets:
        if not is_sharded(target.weight) or target.experts or target.transposed:
            raise ValueError(
                f"target {target.name!r} cannot be pruned beside FSDP2-sharded weights: every target must be a "
                "row-sharded (out, in) weight (`fully_shard` it; "
                "fused experts and transposed Conv1D weights are not supported); leave it out with `ignore`"
            )
        groups.append(shard_group(target.weight, target.name))  # type: ignore[arg-type]  # a DTensor, checked above
    if any(group is not groups[0] for group in groups):
        raise ValueError("every sharded target must be sharded over the same ranks (one FSDP2 mesh)")
    return groups[0] if groups else None


def select_target_masks_sharded(
    targets: Sequence[PruneTarget],
    matrices: dict[str, torch.Tensor],
    sparsity: float,
    scope: str,
    pattern: str | None,
    pruned: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """`select_masks_sharded` for `update_masks`: every target must be a DTensor sharded by output rows."""
    group = targets_shard_group(targets)
    rows = {target.name: target.weight.shape[0] for target in targets}
    return select_masks_sharded(matrices, rows, sparsity, scope=scope, pattern=pattern, pruned=pruned, group=group)
