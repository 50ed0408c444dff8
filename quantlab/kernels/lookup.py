"""Exact nearest-code search in O(1): a table indexed by a float's high bits, then a few compares.

A code index is ``count(points < u)`` for sorted float32 decision points (``Code.midpoints`` for
nearest rounding, ``Code.floor_points`` for the lower neighbour of stochastic rounding). A binary
search costs 8 dependent compares per element. Instead:

1. Map u's float32 bits to an integer key that is monotone in u (negative floats have their
   magnitude bits flipped), and take the key's high bits as a bucket: with ``shift`` = 16 a bucket
   is 1 sign + 8 exponent + 7 mantissa bits wide. The table covers -1 <= u <= 1, which holds for
   u = x / absmax(block) by IEEE division, so the kernels need no clamp (32514 one-byte entries).
2. ``table[bucket]`` = the number of points below the bucket's smallest value. Every point it
   counts is below u.
3. The points inside the bucket are counted by ``steps`` branch-free compares
   ``i += points[i] < u``, where ``steps`` is the largest number of points any bucket holds. A
   sentinel +inf after the last point stops the walk.

This is exact for every code and every float32 u by construction (steps 2 and 3 count exactly the
points below u); tests check it exhaustively over float32 inputs. For the dynamic maps the
densest buckets hold one point, so ``steps`` is 1: one table load and one compare per element.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..codes import Code

TABLE_SHIFT = 16
_MAGNITUDE_BITS = 0x7FFFFFFF


def sortable_key(u: np.ndarray) -> np.ndarray:
    """int64 keys with key(a) < key(b) whenever float32 a < b (-0.0 sorts just below +0.0)."""
    s = np.asarray(u, dtype=np.float32).view(np.int32).astype(np.int64)
    return s ^ ((s >> 31) & _MAGNITUDE_BITS)


def _float_of_key(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, dtype=np.int64)
    s = np.where(k < 0, k ^ _MAGNITUDE_BITS, k)
    return s.astype(np.int32).view(np.float32)


@dataclass(frozen=True)
class SearchTable:
    points: np.ndarray  # float32 decision points followed by one +inf sentinel
    table: np.ndarray  # uint8 count of points below each bucket
    shift: int
    bias: int  # bucket = (key + bias) >> shift, never negative for -1 <= u <= 1
    steps: int  # compares needed after the table look-up

    def index(self, u) -> np.ndarray:
        """count(points < u) via the table (NumPy), for checking the kernels' search."""
        u = np.asarray(u, dtype=np.float32)
        if np.any(np.abs(u) > 1):
            raise ValueError("the search table covers -1 <= u <= 1 only")
        i = self.table[(sortable_key(u) + self.bias) >> self.shift].astype(np.int64)
        for _ in range(self.steps):
            i += self.points[i] < u
        return i


def build_search_table(points: np.ndarray, shift: int = TABLE_SHIFT) -> SearchTable:
    points = np.asarray(points, dtype=np.float32)
    if points.size > 255 or np.any(np.diff(points) < 0):
        raise ValueError("decision points must be sorted and at most 255")
    low, high = sortable_key(np.float32(-1.0)) >> shift, sortable_key(np.float32(1.0)) >> shift
    buckets = np.arange(low, high + 1, dtype=np.int64)
    smallest = _float_of_key(buckets << shift)
    below = np.searchsorted(points, smallest, side="left")
    below_next = np.append(below[1:], points.size)
    return SearchTable(
        points=np.append(points, np.float32(np.inf)).astype(np.float32),
        table=below.astype(np.uint8),
        shift=shift,
        bias=int(-low) << shift,
        steps=int(np.max(below_next - below)),
    )


@lru_cache(maxsize=64)
def search_tables(code: Code) -> tuple[SearchTable, SearchTable]:
    """(nearest, floor) search tables of a code; built once per code."""
    return build_search_table(code.midpoints), build_search_table(code.floor_points)
