"""Bit packing for the legacy compressed-tensors sparse layouts (pure tensor functions, no I/O).

Layouts, as compressed-tensors <= 0.14 writes them (`compressors/sparse_compressors/`):

- `sparse-24-bitmask` (one 2-D weight, rows × cols): `compressed` holds exactly 2 values of every
  group of 4 consecutive columns, in order (rows × cols/2, the weight's dtype; a group with fewer
  than 2 non-zeros stores some zeros); `bitmask` marks the stored positions, packed 8 per byte
  along each row, least significant bit first (numpy `packbits(..., bitorder="little")`):
  rows × ceil(cols/8), uint8.
- `sparse-bitmask` (any shape): `compressed` is the flat vector of the non-zeros in row-major order,
  `bitmask` marks them (packed the same way along the last dimension), `row_offsets` is the index
  in `compressed` where each row starts (int64).

Every packer refuses input it would have to change: a group of 4 with more than 2 non-zeros is an
error, never a quiet drop (compressed-tensors' `get_24_bytemasks` keeps the 2 largest silently).
"""

from __future__ import annotations

import torch

from lightning_prune.selection import group_counts

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor 8 per byte along its last dimension, least significant bit first.

    Shape (..., n) → (..., ceil(n/8)) uint8; equal to numpy `packbits(mask, axis=-1, bitorder="little")`.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a bool tensor, got dtype {mask.dtype}")
    if mask.dim() == 0:
        raise ValueError("`mask` must have at least one dimension, got a scalar")
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8))
    groups = padded.reshape(*mask.shape[:-1], -1, 8)
    return (groups * _BIT_WEIGHTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Inverse of `pack_bitmask`: a bool tensor of `shape`; the padding bits must be zero."""
    shape = tuple(int(s) for s in shape)
    expected = (*shape[:-1], (shape[-1] + 7) // 8)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ValueError(
            f"bitmask must be uint8 of shape {expected} for a weight of shape {shape}, "
            f"got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    bits = bits.reshape(*shape[:-1], -1)
    if bits[..., shape[-1] :].any():
        raise ValueError(f"bitmask for shape {shape} has bits set past the last column")
    return bits[..., : shape[-1]].contiguous()


def measured_pattern(matrix: torch.Tensor, m: int = 4) -> str:
    """ "k:m" where k is the most non-zeros in any group of `m` consecutive columns of a row."""
    cols = matrix.shape[1]
    if cols % m:
        return f"unstructured ({cols} columns do not split into groups of {m})"
    most = int(group_counts(matrix != 0, m).max()) if matrix.numel() else 0
    return f"{most}:{m}"


def is_2_4(matrix: torch.Tensor) -> bool:
    """True when every group of 4 consecutive columns of every row has at most 2 non-zeros."""
    return matrix.dim() == 2 and matrix.shape[1] % 4 == 0 and measured_pattern(matrix) in ("0:4", "1:4", "2:4")


def stored_positions_24(matrix: torch.Tensor) -> torch.Tensor:
    """Bool (rows, cols): the 2 positions per group of 4 that `compress_24` stores.

    The non-zeros of a group first, then its lowest-index zeros, so a group always stores 2.
    Expects a matrix that `is_2_4`.
    """
    rows, cols = matrix.shape
    nonzero = (matrix != 0).reshape(rows, cols // 4, 4)
    missing = 2 - group_counts(nonzero.reshape(rows, cols), 4).unsqueeze(-1)  # zeros still to store, 0..2
    zero_rank = (~nonzero).view(torch.uint8).cumsum(-1, dtype=torch.uint8)  # 1 for a group's first zero, ...
    keep = nonzero | (~nonzero & (zero_rank <= missing))
    return keep.reshape(rows, cols)


def compress_24(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(compressed rows × cols/2, bitmask rows × ceil(cols/8) uint8) of an exactly-2:4 matrix.

    Raises:
        ValueError: when the matrix is not 2-D, its columns are not a multiple of 4, or a group
            holds more than 2 non-zeros (the message gives the measured pattern).
    """
    if matrix.dim() != 2:
        raise ValueError(f"sparse-24-bitmask packs 2-D matrices, got shape {tuple(matrix.shape)}")
    if not is_2_4(matrix):
        raise ValueError(f"matrix of shape {tuple(matrix.shape)} is not 2:4: measured {measured_pattern(matrix)}")
    keep = stored_positions_24(matrix)
    compressed = matrix[keep].reshape(matrix.shape[0], matrix.shape[1] // 2)
    return compressed, pack_bitmask(keep)


def decompress_24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int] | list[int]) -> torch.Tensor:
    """Dense (rows, cols) matrix from `compress_24`'s output, after checking sizes and popcounts."""
    rows, cols = (int(s) for s in shape)
    if cols % 4 or tuple(compressed.shape) != (rows, cols // 2):
        raise ValueError(
            f"compressed values must have shape {(rows, cols // 2)} for shape {(rows, cols)}, "
            f"got {tuple(compressed.shape)}"
        )
    keep = unpack_bitmask(bitmask, (rows, cols))
    per_group = group_counts(keep, 4)
    if not bool((per_group == 2).all()):
        raise ValueError(
            "bitmask does not mark exactly 2 of every 4 positions "
            f"(found {int(per_group.min())}..{int(per_group.max())})"
        )
    dense = torch.zeros((rows, cols), dtype=compressed.dtype, device=compressed.device)
    dense[keep] = compressed.reshape(-1)
    return dense


def compress_bitmask(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, bitmask, row_offsets) of any-shaped `tensor`, keeping exactly its non-zeros."""
    if tensor.dim() == 0:
        raise ValueError("sparse-bitmask packs tensors with at least one dimension, got a scalar")
    keep = tensor != 0
    row_counts = keep.sum(dim=-1)
    row_offsets = torch.cumsum(row_counts, 0) - row_counts
    return tensor[keep], pack_bitmask(keep), row_offsets


def decompress_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Dense tensor of `shape` from `compress_bitmask`'s values and bitmask, after checking counts."""
    keep = unpack_bitmask(bitmask, shape)
    if values.dim() != 1 or values.numel() != int(keep.sum()):
        raise ValueError(
            f"bitmask marks {int(keep.sum())} values but {values.numel()} are stored (shape {tuple(values.shape)})"
        )
    dense = torch.zeros(tuple(shape), dtype=values.dtype, device=values.device)
    dense[keep] = values
    return dense
