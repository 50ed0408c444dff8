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
3. The table is made finer (smaller ``shift``) until no bucket holds more than one point, so one
   branch-free compare ``i + (points[i] < u)`` finishes the count; a sentinel +inf after the last
   point keeps the read in bounds. (On this project's 2-core CPU, a loop over a per-code number
   of compares ran ~25% slower, and a second compare ~35% slower: the loads dominate.)

This is exact for every code and every float32 u in [-1, 1] by construction (points 2 and 3 count
exactly the points below u); tests check it exhaustively over float32 inputs. Per element: one
table load, one point load, one compare.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from ..codes import Code

SEARCH_COMPARES = 1
COARSEST_SHIFT, FINEST_SHIFT = 16, 12  # 32514 to 520194 one-byte table entries
# Zero bytes after the last bucket: the CPU kernels gather the table four bytes a lane (simd.py).
TABLE_PADDING = 3
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
    table: np.ndarray  # uint8 count of points below each bucket, then TABLE_PADDING zero bytes
    shift: int
    bias: int  # bucket = (key + bias) >> shift, never negative for -1 <= u <= 1

    def __post_init__(self):
        for a in (self.points, self.table):
            a.setflags(write=False)  # shared through search_tables' cache; the CUDA kernels copy it once

    def args(self) -> tuple:
        """What the kernels take: (table, points, shift, bias)."""
        return self.table, self.points, self.shift, self.bias

    def index(self, u) -> np.ndarray:
        """count(points < u) via the table (NumPy), for checking the kernels' search."""
        u = np.asarray(u, dtype=np.float32)
        if np.any(np.abs(u) > 1):
            raise ValueError("the search table covers -1 <= u <= 1 only")
        i = self.table[(sortable_key(u) + self.bias) >> self.shift].astype(np.int64)
        for _ in range(SEARCH_COMPARES):
            i += self.points[i] < u
        return i


def build_search_table(points: np.ndarray) -> SearchTable:
    points = np.asarray(points, dtype=np.float32)
    if points.size > 255 or np.any(np.diff(points) < 0):
        raise ValueError("decision points must be sorted and at most 255")
    for shift in range(COARSEST_SHIFT, FINEST_SHIFT - 1, -1):
        low, high = sortable_key(np.float32(-1.0)) >> shift, sortable_key(np.float32(1.0)) >> shift
        smallest = _float_of_key(np.arange(low, high + 1, dtype=np.int64) << shift)
        below = np.searchsorted(points, smallest, side="left")
        most_in_a_bucket = np.max(np.append(below[1:], points.size) - below)
        if most_in_a_bucket <= SEARCH_COMPARES:
            table = np.append(below, np.zeros(TABLE_PADDING, np.int64)).astype(np.uint8)
            return SearchTable(points=np.append(points, np.float32(np.inf)).astype(np.float32),
                               table=table, shift=shift, bias=int(-low) << shift)
    raise ValueError(f"decision points closer than a 2**-{31 - FINEST_SHIFT - 8} relative spacing "
                     f"(more than {SEARCH_COMPARES} in one bucket): use backend='reference' for this code")


@lru_cache(maxsize=64)
def search_tables(code: Code) -> tuple[SearchTable, SearchTable]:
    """(nearest, floor) search tables of a code; built once per code."""
    return build_search_table(code.midpoints), build_search_table(code.floor_points)


STEP_VALUES = 256  # every uint8 index


@lru_cache(maxsize=64)
def step_values(code: Code) -> np.ndarray:
    """A code's values padded with NaN to 256 entries, read-only: what the 8-bit step kernels index
    with a state's uint8 codes. Loaded states are checked to index inside the code; the padding makes
    an index changed by hand afterwards read NaN, never memory past the values."""
    values = np.full(STEP_VALUES, np.nan, np.float32)
    values[:len(code.values)] = code.values
    values.setflags(write=False)
    return values

