"""Bit packing of the legacy compressed-tensors layouts, on hand-computed examples."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prune.export.bitmask import (
    compress_24,
    compress_bitmask,
    decompress_24,
    decompress_bitmask,
    measured_pattern,
    pack_bitmask,
    stored_positions_24,
    unpack_bitmask,
)


def test_pack_is_little_endian_along_rows():
    mask = torch.tensor([[False, False, True, True, False, False, True, True, True]])
    packed = pack_bitmask(mask)
    # bits 2, 3, 6, 7 → 4 + 8 + 64 + 128 = 204; the 9th column starts a second byte at bit 0.
    assert packed.dtype == torch.uint8 and packed.tolist() == [[204, 1]]
    assert torch.equal(unpack_bitmask(packed, (1, 9)), mask)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_pack_matches_numpy_packbits(rows, cols, seed):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) > 0.5
    expected = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(pack_bitmask(mask).numpy(), expected)
    assert torch.equal(unpack_bitmask(pack_bitmask(mask), (rows, cols)), mask)


def test_compress_24_on_weights_1_to_8():
    weights = torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]], dtype=torch.bfloat16)
    compressed, bitmask = compress_24(weights)
    assert compressed.dtype == torch.bfloat16 and compressed.tolist() == [[3.0, 4.0, 7.0, 8.0]]
    assert bitmask.dtype == torch.uint8 and bitmask.tolist() == [[204]]
    assert torch.equal(decompress_24(compressed, bitmask, [1, 8]), weights)


def test_group_with_fewer_than_two_nonzeros_stores_zeros_at_lowest_positions():
    weights = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    assert stored_positions_24(weights).tolist() == [[True, False, False, True, True, True, False, False]]
    compressed, bitmask = compress_24(weights)
    assert compressed.tolist() == [[0.0, 5.0, 0.0, 0.0]] and bitmask.tolist() == [[1 + 8 + 16 + 32]]
    assert not torch.signbit(compressed).any()


def test_compress_24_refuses_three_of_four():
    weights = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert measured_pattern(weights) == "3:4"
    with pytest.raises(ValueError, match="not 2:4: measured 3:4"):
        compress_24(weights)


def test_decompress_24_checks_popcount_and_shapes():
    compressed, bitmask = compress_24(torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        decompress_24(compressed, torch.tensor([[7]], dtype=torch.uint8), [1, 4])
    with pytest.raises(ValueError, match="bits set past the last column"):
        decompress_24(compressed, torch.tensor([[12 + 16]], dtype=torch.uint8), [1, 4])
    with pytest.raises(ValueError, match="compressed values must have shape"):
        decompress_24(compressed[:, :1], bitmask, [1, 4])


def test_bitmask_round_trip_keeps_values_and_row_offsets():
    weights = torch.tensor([[0.0, 1.5, 0.0], [-2.0, 0.0, 3.0]])
    values, bitmask, row_offsets = compress_bitmask(weights)
    assert values.tolist() == [1.5, -2.0, 3.0]
    assert bitmask.tolist() == [[2], [5]] and row_offsets.tolist() == [0, 1]
    assert torch.equal(decompress_bitmask(values, bitmask, [2, 3]), weights)
    with pytest.raises(ValueError, match="marks 3 values but 2 are stored"):
        decompress_bitmask(values[:2], bitmask, [2, 3])
