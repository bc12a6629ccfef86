"""Each source tensor's chunks proven once per plan, and each output's chunks and pieces cut from them. Pure, no IO.

A plain tensor's chunks are deduplicated and proven to tile it (`coverage`). A transformed output (`Derived`) is
cut from its sources' proven chunks: each take (a box of a source) intersected with the chunks it crosses
(`transforms.cut_boxes`), the takes proven to tile the output and each take's pieces to fill it
(`transforms.check_gather`'s proof). An unstacked [E, F, D] expert weight feeds E outputs: its proof, its index and
its boxes are made once for all of them (`Proven`).

Packed (`pieces_packed`, the default), an output read from one source keeps its pieces as rows of a `PieceTable`
and its chunks as a view of its source's `ChunkTable`, both made straight from the source's columns: no `Chunk` or
`Piece` object per piece (a DeepSeek-V3-scale plan cuts 356k pieces). STREAMCONV_NO_FAST_PATHS=1 keeps the general
form, tuples of `Piece` and `Chunk`, which the tests prove equal to the packed one.
"""
from __future__ import annotations

import itertools
from array import array
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from .. import failpoints
from ..errors import OptionsError
from ..model import Chunk, ChunkTable, TensorEntry, numel
from .coverage import check_coverage, columns_of, dedup_chunks
from .pieces import PieceTable
from .transforms import (Derived, Piece, check_gather, check_take_filled, check_takes, cut_all, cut_boxes,
                         distinct_chunks, flatten, is_contiguous_geometry)


def pieces_packed() -> bool:
    """Whether a transformed tensor's pieces are kept as a `PieceTable` (and its chunks as a view of its source's
    table); STREAMCONV_NO_FAST_PATHS=1 (or all) keeps the general form, tuples of `Piece` and `Chunk`, which the
    tests prove equal to the packed one (`make test-no-fast-paths` runs every test on it)."""
    return failpoints.no_fast_paths().strip().lower() not in ("1", "all")


class Box(NamedTuple):
    """A proven chunk of a source as the cut reads it: its box and its place `at` in the proven table."""
    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    at: int


class PlaneBoxes:
    """The boxes of a source that hold one plane of its `n_lead` leading dims, in the order of their place in it,
    and what the planes they hold share: the chunks' view, the elements they fill, whether each piece is one
    contiguous run, and each row's part after the plane's index (made on first use)."""

    __slots__ = ("boxes", "n_lead", "shown", "filled", "contiguous", "tails")

    def __init__(self, boxes: List[Box], n_lead: int) -> None:
        self.boxes = sorted(boxes, key=lambda box: box.offsets[n_lead:])
        self.n_lead, self.shown = n_lead, None

    def made(self, table: ChunkTable, shape: Tuple[int, ...]) -> "PlaneBoxes":
        if self.shown is None:
            n, boxes = self.n_lead, self.boxes
            self.filled = sum(numel(box.sizes[n:]) for box in boxes)
            self.contiguous = all(is_contiguous_geometry(sizes, sizes[n:], 1, shape)
                                  for sizes in {box.sizes for box in boxes})
            zeros = (0,) * (len(boxes[0].offsets) - n if boxes else 0)
            self.tails = [zeros + box.offsets[n:] + box.sizes[n:] for box in boxes]
            self.shown = table.select([box.at for box in boxes])
        return self


class Proven:
    """Each source tensor's chunks deduplicated and proven to tile it once per plan, and the index a transform
    cuts them by: an unstacked [E, F, D] expert weight feeds E outputs, and proving it for each would cost E x its
    chunks (a DeepSeek-V3-scale plan spent most of its time there).

    A source's boxes or `Chunk` objects (`listed`) and indexes live only while outputs that read it are left to
    plan (`uses`, counted up front), so a 671B plan's 89k expert chunks are not all held at once."""

    def __init__(self, uses: Optional[Dict[str, int]] = None) -> None:
        self.chunks: Dict[Tuple[str, int], Sequence[Chunk]] = {}
        self.indexes: Dict = {}
        self.listed: Dict[Tuple[str, int], Tuple[List[Chunk], Dict[int, int]]] = {}
        self.boxed: Dict[Tuple[str, int], Optional[List[Box]]] = {}
        self.planes: Dict[Tuple[str, int, int], Dict[Tuple[int, ...], List[Box]]] = {}
        self.uses = dict(uses or {})

    @staticmethod
    def counted(entries: Sequence[TensorEntry]) -> Dict[str, int]:
        """{source fqn: how many of `entries` read it through a transform}."""
        uses: Dict[str, int] = {}
        for entry in entries:
            for src in getattr(entry, "sources", ()):
                uses[src.fqn] = uses.get(src.fqn, 0) + 1
        return uses

    def of(self, entry: TensorEntry) -> Sequence[Chunk]:
        key = (entry.fqn, id(entry.chunks))
        chunks = self.chunks.get(key)
        if chunks is None:
            chunks = dedup_chunks(entry.chunks)
            check_coverage(entry.fqn, entry.shape, chunks)
            self.chunks[key] = chunks
        return chunks

    def as_list(self, entry: TensorEntry) -> List[Chunk]:
        """The proven chunks of a transform's source as objects, made once while the source is in use: the pieces
        cut from them share them, and `compact` finds each one's place by identity."""
        key = (entry.fqn, id(entry.chunks))
        found = self.listed.get(key)
        if found is None:
            chunks = list(self.of(entry))
            found = self.listed[key] = (chunks, {id(c): i for i, c in enumerate(chunks)})
        return found[0]

    def boxes(self, entry: TensorEntry) -> Optional[List[Box]]:
        """The proven chunks of a transform's source as `Box`es, made once from the columns of its table while the
        source is in use; None when they are not a table."""
        key = (entry.fqn, id(entry.chunks))
        if key not in self.boxed:
            table, boxes = self.of(entry), None
            if isinstance(table, ChunkTable):
                columns, n = columns_of(table), table.ndim
                offsets = zip(*columns[:n]) if n else [()] * len(table)
                sizes = zip(*columns[n:]) if n else [()] * len(table)
                boxes = [Box(o, s, i) for i, (o, s) in enumerate(zip(offsets, sizes))]
            self.boxed[key] = boxes
        return self.boxed[key]

    def by_lead(self, entry: TensorEntry, n_lead: int) -> Dict[Tuple[int, ...], "PlaneBoxes"]:
        """{index of the `n_lead` leading dims: the boxes that hold that plane} of a source whose chunks are a table
        (`boxes`), made once for all the planes unstacked from it; planes held by the same boxes (the experts of
        one expert-parallel rank) share one `PlaneBoxes`, and what is made of it."""
        key = (entry.fqn, id(entry.chunks), n_lead)
        found = self.planes.get(key)
        if found is None:
            by_lead: Dict[Tuple[int, ...], List[Box]] = {}
            for box in self.boxes(entry):
                for lead in itertools.product(*(range(o, o + s) for o, s in zip(box.offsets[:n_lead],
                                                                                box.sizes[:n_lead]))):
                    by_lead.setdefault(lead, []).append(box)
            shared: Dict[Tuple[int, ...], PlaneBoxes] = {}
            found = self.planes[key] = {}
            for lead, boxes in by_lead.items():
                held_by = tuple(box.at for box in boxes)
                plane = shared.get(held_by)
                found[lead] = plane if plane is not None else shared.setdefault(held_by, PlaneBoxes(boxes, n_lead))
        return found

    def compact(self, entry: Derived, chunks: Tuple[Chunk, ...]) -> Sequence[Chunk]:
        """`chunks` (distinct chunks of `entry`'s pieces) as a view of its one source's table, sharing its
        columns; as they are when the output reads several sources or the source's chunks are not a table."""
        if len(entry.sources) != 1:
            return chunks
        src = entry.sources[0]
        key = (src.fqn, id(src.chunks))
        table = self.chunks.get(key)
        if not isinstance(table, ChunkTable) or key not in self.listed:
            return chunks
        position = self.listed[key][1]
        return table.select([position[id(c)] for c in chunks])

    def done(self, entry: Derived) -> None:
        """`entry` is planned: drop what its sources hold for the outputs still to come, once none are left."""
        for src in entry.sources:
            left = self.uses.get(src.fqn, 0) - 1
            self.uses[src.fqn] = left
            if left > 0:
                continue
            self.listed.pop((src.fqn, id(src.chunks)), None)
            self.boxed.pop((src.fqn, id(src.chunks)), None)
            for key in [k for k in self.planes if k[0] == src.fqn]:
                del self.planes[key]
            for key in [k for k in self.indexes if k[0] == src.fqn]:
                del self.indexes[key]


def chunks_and_pieces(entry: TensorEntry, name: str, proven: Optional[Proven] = None,
                      packed: bool = False) -> Tuple[Sequence[Chunk], Sequence[Piece]]:
    """A plain tensor's chunks, proven to tile it; or a transformed tensor's pieces, proven to tile the output
    (each source's chunks proven to tile the source first, once per plan through `proven`). `packed`: the pieces
    as a `PieceTable` and the chunks as a view of the source's table where they can be (`pieces_packed`)."""
    proven = proven or Proven()
    if not isinstance(entry, Derived):
        return proven.of(entry), ()
    for src in entry.sources:
        proven.of(src)
        if src.dtype != entry.dtype:
            raise OptionsError(f"{name!r} gathers tensors of different dtypes ({src.dtype}, {entry.dtype})")
    found = _packed_from_table(entry, name, proven) if packed and len(entry.sources) == 1 else None
    if found is None:
        found = _as_objects(entry, name, proven, packed)
    proven.done(entry)
    return found


def _as_objects(entry: Derived, name: str, proven: Proven, packed: bool) -> Tuple[Sequence[Chunk], Sequence[Piece]]:
    """The general form: pieces cut from `Chunk` objects as `Piece`s, proven piece by piece; packed into a table
    afterwards when `packed` (an output of several sources, or of chunks that are not a table)."""
    sources = {src.fqn: (tuple(src.shape), proven.as_list(src) if packed else proven.of(src))
               for src in entry.sources}
    groups = cut_all(entry.takes, sources, proven.indexes)
    check_gather(name, tuple(entry.shape), entry.takes, groups)
    pieces = flatten(groups)
    chunks = distinct_chunks(pieces)
    if packed:
        shown = proven.compact(entry, chunks)
        table = PieceTable.packed(pieces, chunks, tuple(entry.shape), shown)
        chunks, pieces = shown, (table if table is not None else pieces)
    return chunks, pieces


def _packed_from_table(entry: Derived, name: str, proven: Proven) -> Optional[Tuple[ChunkTable, Sequence[Piece]]]:
    """An output of one source whose proven chunks are a table, cut from its `Box`es into the rows of a
    `PieceTable` (the same rows `PieceTable.packed` makes of the general form's pieces); None for other sources.

    The proof is `check_gather`'s: the takes tile the output, and each take's pieces add up to it; the pieces are
    inside their chunks and the take by how they are cut, so `check_gather`'s bounds test of each piece is not
    repeated here (tests/planning/test_proven.py refuses the same inputs both ways)."""
    src = entry.sources[0]
    boxes = proven.boxes(src)
    if boxes is None:
        return None
    shape = tuple(entry.shape)
    check_takes(name, shape, entry.takes)
    n_lead = _whole_plane(entry)
    if n_lead:
        return _plane(entry, name, proven, n_lead)
    groups = cut_all(entry.takes, {src.fqn: (tuple(src.shape), boxes)}, proven.indexes, cutter=cut_boxes)
    for take, group in zip(entry.takes, groups):
        check_take_filled(name, take, sum(numel(sizes) for _, _, _, sizes, _ in group))
    pieces = sorted((p for group in groups for p in group), key=lambda p: p[2])
    shown = proven.of(src).select(list(dict.fromkeys(box.at for box, _, _, _, _ in pieces)))
    if not pieces:      # an output with no elements
        return shown, ()
    try:
        return shown, _piece_table(pieces, shown, shape, "i")
    except OverflowError:       # a coordinate past 2**31: 8-byte rows
        return shown, _piece_table(pieces, shown, shape, "q")


def _piece_table(pieces: Sequence[tuple], shown: ChunkTable, shape: Tuple[int, ...], typecode: str) -> PieceTable:
    """The `PieceTable` of cut `pieces` (sorted by output place) whose chunks `shown` lists in order of first use."""
    place: Dict[int, int] = {}
    contiguous: Dict[tuple, bool] = {}      # pieces of one geometry (an expert's planes) share the answer
    rows = array(typecode)
    for box, src_start, dst_start, sizes, step in pieces:
        rows.append(place.setdefault(box.at, len(place)))
        rows.append(step)
        rows.extend(src_start)
        rows.extend(dst_start)
        rows.extend(sizes)
        geometry = (box.sizes, sizes, step)
        if geometry not in contiguous:
            contiguous[geometry] = is_contiguous_geometry(box.sizes, sizes, step, shape)
    return PieceTable(shown, len(pieces[0][1]), len(shape), rows, all(contiguous.values()))


def _whole_plane(entry: Derived) -> int:
    """How many leading dims of its source `entry`'s one take fixes when the take is the whole plane they leave
    (an unstacked expert, layer or scalar, rows as they are); 0 for any other take."""
    if len(entry.takes) != 1:
        return 0
    take, source_shape = entry.takes[0], tuple(entry.sources[0].shape)
    n_lead = len(source_shape) - len(take.sizes)
    if (n_lead < 1 or take.src_step != 1 or take.sizes != source_shape[n_lead:] or any(take.dst_start)
            or any(take.src_start[n_lead:])):
        return 0
    return n_lead


def _plane(entry: Derived, name: str, proven: Proven, n_lead: int) -> Tuple[ChunkTable, Sequence[Piece]]:
    """The pieces of an output that is one whole plane of its source (`_whole_plane`): one per box that holds the
    plane, the box's part of it, in the order of their place in the output (`Proven.by_lead`, made once per
    source). What `cut_boxes` would cut, without cutting: the plane of a proven tiling is tiled by the boxes that
    hold it. That they fill it is still counted, as for any take."""
    src, take, shape = entry.sources[0], entry.takes[0], tuple(entry.shape)
    lead = take.src_start[:n_lead]
    plane = proven.by_lead(src, n_lead).get(lead) or PlaneBoxes([], n_lead)
    plane.made(proven.of(src), shape)
    check_take_filled(name, take, plane.filled)
    if not plane.boxes:       # an output with no elements
        return plane.shown, ()
    try:
        rows = _plane_rows(plane, lead, "i")
    except OverflowError:       # a coordinate past 2**31: 8-byte rows
        rows = _plane_rows(plane, lead, "q")
    return plane.shown, PieceTable(plane.shown, len(src.shape), len(shape), rows, plane.contiguous)


def _plane_rows(plane: PlaneBoxes, lead: Tuple[int, ...], typecode: str) -> "array":
    """The `PieceTable` rows of the plane at `lead` (`_plane`): box k is the piece's chunk k, read from its index of
    the plane, at its own place in the output."""
    rows = array(typecode)
    for k, (box, tail) in enumerate(zip(plane.boxes, plane.tails)):
        rows.extend((k, 1) + tuple(i - o for i, o in zip(lead, box.offsets)) + tail)
    return rows
