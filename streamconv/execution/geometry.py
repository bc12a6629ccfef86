"""Pure arithmetic the assemblers share: how a tensor's output is cut into bands that fit the buffer (one
`BandGeometry` for the band, strided and gather assemblers), and which dim order a stored chunk's bytes are in.

A band is a contiguous run of the output: rows a..b of the band dim at one prefix of indices of the dims before
it, every later dim whole. The band dim is the outermost whose single index (all later dims whole) fits the
budget, so a band is as long as the buffer allows and never a ragged piece of a row.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple

from ..model import numel, row_major_strides


@dataclass(frozen=True)
class Band:
    prefix: Tuple[int, ...]     # indices of the dims before the band dim
    a: int                      # first row of the band dim
    b: int                      # one past the last


@dataclass(frozen=True)
class BandGeometry:
    shape: Tuple[int, ...]
    item: int               # bytes per source element
    dim: int                # the band dim; len(shape) for a 0-d tensor (one band of its one element)
    row_bytes: int          # source bytes of one index of `dim`, every later dim whole
    rows_per_band: int
    staging_row_bytes: int = 0  # staging per row of a band: the widest chunk's extent after `dim`

    @classmethod
    def fit(cls, shape: Sequence[int], item: int, budget_bytes: int) -> "BandGeometry":
        """Bands of at most `budget_bytes` source bytes (at least one row, whatever the budget)."""
        return cls.fit_with_staging(shape, item, budget_bytes, chunk_sizes=())

    @classmethod
    def fit_with_staging(cls, shape: Sequence[int], item: int, budget_bytes: int,
                         chunk_sizes: Optional[Sequence[Sequence[int]]] = None) -> "BandGeometry":
        """Bands that fit the budget together with a staging area for one chunk's part of a band (read whole,
        then scattered into place). A chunk's part of rows a..b is at most (b - a) times its own row (its extent
        in the dims after the band dim), so the staging needs `max_staging_bytes`: a quarter of the band for four
        column blocks, not a half of the buffer set aside. `chunk_sizes`: every chunk's extents (None: stage a
        whole band; empty: no staging)."""
        shape = tuple(shape)
        sizes = [tuple(c) for c in chunk_sizes] if chunk_sizes is not None else [shape]
        inner = [numel(shape[k + 1:]) * item for k in range(len(shape))] + [item]
        staged = [max((numel(c[k + 1:]) * item for c in sizes), default=0) for k in range(len(shape))]
        staged.append(item if sizes else 0)
        # Nothing fits: one-element bands, or, when staging, one-row bands of the last dim (the assemblers index
        # chunk extents by the band dim) and a buffer grown to that row and its staging.
        fallback = len(shape) - 1 if shape and sizes else len(shape)
        dim = next((k for k in range(len(shape)) if inner[k] + staged[k] <= budget_bytes), fallback)
        per_row = inner[dim] + staged[dim]
        if dim == len(shape):
            return cls(shape, item, dim, item, 1, staged[dim])
        rows = max(1, budget_bytes // per_row) if per_row else max(1, shape[dim])
        return cls(shape, item, dim, inner[dim], rows, staged[dim])

    def limited(self, rows_per_band: int) -> "BandGeometry":
        """At most `rows_per_band` rows per band (at least one)."""
        return dataclasses.replace(self, rows_per_band=max(1, min(self.rows_per_band, rows_per_band)))

    @property
    def extent(self) -> int:
        """Indices of the band dim (1 for a 0-d tensor)."""
        return self.shape[self.dim] if self.dim < len(self.shape) else 1

    @property
    def max_band_bytes(self) -> int:
        return min(self.rows_per_band, self.extent) * self.row_bytes

    @property
    def max_staging_bytes(self) -> int:
        """Room for any one chunk's part of a band."""
        return min(self.rows_per_band, self.extent) * self.staging_row_bytes

    def bands(self) -> Iterator[Band]:
        """Every band, in output order."""
        for prefix in itertools.product(*(range(s) for s in self.shape[:self.dim])):
            for a in range(0, self.extent, self.rows_per_band):
                yield Band(prefix, a, min(self.extent, a + self.rows_per_band))

    def band_bytes(self, band: Band) -> int:
        return (band.b - band.a) * self.row_bytes

    def first_element(self, band: Band) -> int:
        """The band's first element, counted row-major in the whole tensor."""
        strides = row_major_strides(self.shape)
        first = sum(p * s for p, s in zip(band.prefix, strides))
        return first + (band.a * strides[self.dim] if self.dim < len(self.shape) else 0)


def storage_order(shape: Sequence[int], stride: Sequence[int]) -> Optional[Tuple[int, ...]]:
    """The dims from outermost to innermost in memory when `stride` is a permutation of contiguous strides for
    `shape` (size-1 dims, whose stride means nothing, go first); None otherwise. Empty tensors: the identity."""
    n = len(shape)
    if any(s == 0 for s in shape):
        return tuple(range(n))
    order = tuple(sorted(range(n), key=lambda i: (shape[i] != 1, -stride[i], i)))
    expected = 1
    for i in reversed(order):
        if shape[i] != 1:
            if stride[i] != expected:
                return None
            expected *= shape[i]
    return order


def element_dtype(itemsize: int):
    """A numpy dtype one element (or run) of `itemsize` bytes wide: an unsigned integer when there is one, so
    numpy copies it in one move, else a void scalar."""
    import numpy as np
    return {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(itemsize, np.dtype((np.void, itemsize)))
