"""The splitter's row gather against numpy's ``take``, which it replaces."""

from __future__ import annotations

import numpy as np
import pytest

from mascara._gather import gather_pieces
from mascara.lightcurves import _PIECE_DTYPES, _ROW_DTYPES


def _with_take(table: np.ndarray, key: np.ndarray, order: np.ndarray, dtype: np.dtype) -> np.ndarray:
    piece = np.empty(table.size, dtype)
    w = table.dtype.itemsize
    whole = piece.view(np.dtype([("key", "<u8"), ("row", f"V{w}")]))
    whole["key"] = np.take(key, order)
    whole["row"] = np.take(table.view(f"V{w}"), order)
    return piece


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_gather_pieces_writes_the_bytes_of_numpy_take(kind):
    rng = np.random.default_rng(3)
    dtype = _ROW_DTYPES[kind]
    n = 5_003
    table = np.empty(n, dtype)
    table.view(np.uint8)[:] = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8)  # every byte, NaNs too
    key = rng.integers(0, 2**64, n, dtype=np.uint64)
    order = rng.permutation(n)
    piece = np.empty(n, _PIECE_DTYPES[kind])
    gather_pieces(table, key, order, piece)
    assert piece.tobytes() == _with_take(table, key, order, _PIECE_DTYPES[kind]).tobytes()


def test_gather_pieces_of_no_rows_and_of_a_wrong_piece():
    dtype = _ROW_DTYPES["fast"]
    gather_pieces(np.empty(0, dtype), np.empty(0, np.uint64), np.empty(0, np.intp), np.empty(0, _PIECE_DTYPES["fast"]))
    with pytest.raises(ValueError, match="rows of"):
        gather_pieces(np.empty(3, dtype), np.zeros(3, np.uint64), np.arange(3), np.empty(3, _PIECE_DTYPES["slow"]))
