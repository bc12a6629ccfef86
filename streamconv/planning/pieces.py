"""A transformed tensor's pieces as columns: what the plan keeps of them. Pure, no IO.

A DeepSeek-V3-scale plan unstacks 44,544 expert outputs of 8 pieces each; as `Piece` objects (a dataclass with
three tuples, ~490 bytes with its share of the chunks) they were most of `plan`'s memory. A `PieceTable` keeps one
row of numbers per piece (9 for an unstacked expert: 36 bytes, 4 a number, 8 when a coordinate needs it) and makes
each `Piece` when it is asked for, so the executor, which reads one tensor at a time, holds one tensor's pieces at a
time. It is a sequence of `Piece`s equal to the tuple it was built from: plans, fingerprints and the executor see
the same pieces.

A row is: the piece's chunk (an index into `chunks`, the tensor's distinct chunks), `src_step`, then `src_start`
(one number per chunk dim), `dst_start` and `sizes` (one per output dim).
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Dict, Iterator, Optional, Tuple

from ..model import Chunk
from .transforms import Piece, is_contiguous_piece


class PieceTable(Sequence):
    """See the module docstring. `row_contiguous`: every piece is one contiguous run of the output and of its
    chunk (`transforms.is_contiguous_piece`), decided once when the table is built."""

    __slots__ = ("chunks", "n_src", "n_dst", "rows", "row_contiguous")

    def __init__(self, chunks: Sequence[Chunk], n_src: int, n_dst: int, rows: "array", row_contiguous: bool):
        self.chunks, self.n_src, self.n_dst, self.rows = chunks, n_src, n_dst, rows
        self.row_contiguous = row_contiguous

    @classmethod
    def packed(cls, pieces: Sequence[Piece], chunks: Sequence[Chunk], out_shape: Tuple[int, ...],
               shown: Optional[Sequence[Chunk]] = None) -> Optional["PieceTable"]:
        """The table of `pieces`, each piece's chunk one of `chunks` (found by identity, else by value); the table
        shows `shown` (the same chunks, e.g. as a view of a `ChunkTable`) or `chunks`. None when the pieces
        cannot share one table: pieces from chunks of different ranks (a stacked output of sources of other
        dims) stay a tuple."""
        if not pieces:
            return None
        try:
            return cls._packed(pieces, chunks, out_shape, shown, "i")
        except OverflowError:   # a coordinate past 2**31: 8-byte rows
            return cls._packed(pieces, chunks, out_shape, shown, "q")

    @classmethod
    def _packed(cls, pieces: Sequence[Piece], chunks: Sequence[Chunk], out_shape: Tuple[int, ...],
                shown: Optional[Sequence[Chunk]], typecode: str) -> Optional["PieceTable"]:
        n_src, n_dst = len(pieces[0].src_start), len(out_shape)
        by_id = {id(c): i for i, c in enumerate(chunks)}
        by_value: Dict[Chunk, int] = {}
        contiguous: Dict[tuple, bool] = {}      # pieces of one geometry (an expert's planes) share the answer
        rows = array(typecode)
        for p in pieces:
            if len(p.src_start) != n_src or len(p.dst_start) != n_dst or len(p.sizes) != n_dst:
                return None
            at = by_id.get(id(p.chunk))
            if at is None:
                by_value = by_value or {c: i for i, c in reversed(list(enumerate(chunks)))}
                at = by_value[p.chunk]
            rows.append(at)
            rows.append(p.src_step)
            rows.extend(p.src_start)
            rows.extend(p.dst_start)
            rows.extend(p.sizes)
            geometry = (p.chunk.sizes, p.sizes, p.src_step)      # what the strides and runs depend on
            if geometry not in contiguous:
                contiguous[geometry] = is_contiguous_piece(p, out_shape)
        return cls(chunks if shown is None else shown, n_src, n_dst, rows, all(contiguous.values()))

    @property
    def width(self) -> int:
        return 2 + self.n_src + 2 * self.n_dst

    def __len__(self) -> int:
        return len(self.rows) // self.width

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(len(self))))
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("piece index out of range")
        at, rows = i * self.width, self.rows
        dst_at = at + 2 + self.n_src
        size_at = dst_at + self.n_dst
        return Piece(self.chunks[rows[at]], tuple(rows[at + 2:dst_at]), tuple(rows[dst_at:size_at]),
                     tuple(rows[size_at:size_at + self.n_dst]), rows[at + 1])

    def __iter__(self) -> Iterator[Piece]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other) -> bool:
        if isinstance(other, (PieceTable, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PieceTable({len(self)} pieces from {len(self.chunks)} chunks)"

    def __getstate__(self):
        return (self.chunks, self.n_src, self.n_dst, self.rows, self.row_contiguous)

    def __setstate__(self, state) -> None:
        self.chunks, self.n_src, self.n_dst, self.rows, self.row_contiguous = state
