"""Every located chunk of a conversion, held as columns: what `locate_all` found for each blob, read back as a
`StoredTensor` only when one is asked for.

`convert` locates every chunk before anything is published (a corrupt blob fails the run; the first tensors'
before the first byte, the others in batches while those are written: runs/locating.py, `LocatedBatches` below)
and keeps what it found for the whole run. A `BlobLocation` key and a `StoredTensor` value per chunk cost 1,316 bytes
(756 resident per chunk at 671B scale, 604 MiB for 481k chunks: docs/benchmarks.md); here a chunk is one row of
64 bytes: its blob's offset and length, the tensor's data offset and size, its storage record's offset and size,
the recorded CRC-32 (8 bytes each), a layout id and the id of the tensor it was located for (4 bytes each). The
layouts (dtype, shape, stride), the places (relative_path, transform_descriptors, tensor_key) and the names are
few and kept once each.

Rows are grouped by place and sorted by blob (offset, length) within one, so a lookup is a dict get and a bisect
(one per batch's table in `LocatedBatches`).
"""
from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Mapping
from itertools import groupby
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from ..errors import CheckpointError
from ..model import BlobLocation, Chunk, StoredTensor, TensorEntry
from . import blob, safetensors_blob
from .io import RangeReader

Place = Tuple[str, Tuple[str, ...], str]     # (relative_path, transform_descriptors, tensor_key)
Layout = Tuple[str, Tuple[int, ...], Tuple[int, ...]]    # (dtype, shape, stride)
_NO_CRC = -1


def place_of(location: BlobLocation) -> Place:
    return location.relative_path, location.transform_descriptors, location.tensor_key


def place_order(place: Place) -> Tuple[str, str, Tuple[str, ...]]:
    """The order places are located and kept in: by file, then the blobs of a file together."""
    return place[0], place[2], place[1]


class _FileOrdered(Mapping):
    """A {BlobLocation: StoredTensor} Mapping whose keys and values come from its `items()`, in file order."""

    __slots__ = ()

    def __iter__(self) -> Iterator[BlobLocation]:
        for location, _ in self.items():
            yield location

    def values(self) -> Iterator[StoredTensor]:   # type: ignore[override]
        for _, stored in self.items():
            yield stored

    def names(self) -> "Mapping[BlobLocation, str]":
        """{location: the tensor it was located for}, a view (messages name it: `BlobReader`'s `names`)."""
        return _Names(self)


class LocatedChunks(_FileOrdered):
    """{BlobLocation: StoredTensor} of every located chunk (a read-only Mapping), built by `add` one place at a
    time, each place's blobs in increasing (offset, length). Iterates in file order: by relative_path, then (offset,
    tensor_key, length), the order the source fingerprint hashes them in."""

    __slots__ = ("_spans", "_offsets", "_lengths", "_data", "_layout_ids", "_layouts", "_layout_index", "_open",
                 "_name_ids", "_names", "_name_index")

    def __init__(self) -> None:
        self._spans: Dict[Place, Tuple[int, int]] = {}      # place -> its rows [start, end)
        self._offsets, self._lengths = array("q"), array("q")
        # Per row: data_offset, data_nbytes, record_offset, record_nbytes, crc32 (-1: none recorded).
        self._data = array("q")
        self._layout_ids = array("I")
        self._layouts: List[Layout] = []
        self._layout_index: Dict[Layout, int] = {}
        self._open: Optional[Place] = None
        # The tensor each blob was located for (its first user), named in messages about it: 4 bytes a row.
        self._name_ids = array("I")
        self._names: List[str] = []
        self._name_index: Dict[str, int] = {}

    # -- building ------------------------------------------------------------------------------------------
    def add(self, location: BlobLocation, stored: StoredTensor, fqn: str = "") -> None:
        """Append a located chunk (found for tensor `fqn`): a new place, or the place last added at a larger
        (offset, length)."""
        place = place_of(location)
        row = len(self._offsets)
        if place != self._open:
            if place in self._spans:
                raise ValueError(f"place {place!r} added twice: add each place's blobs together")
            self._open = place
            self._spans[place] = (row, row)
        elif (self._offsets[row - 1], self._lengths[row - 1]) >= (location.offset, location.length):
            raise ValueError(f"blob at {location.offset} ({location.length} bytes) added after the one at "
                             f"{self._offsets[row - 1]} ({self._lengths[row - 1]} bytes)")
        layout = (stored.dtype, tuple(stored.shape), tuple(stored.stride))
        layout_id = self._layout_index.get(layout)
        if layout_id is None:
            layout_id = self._layout_index[layout] = len(self._layouts)
            self._layouts.append(layout)
        self._offsets.append(location.offset)
        self._lengths.append(location.length)
        self._data.extend((stored.data_offset, stored.data_nbytes, stored.record_offset, stored.record_nbytes,
                           _NO_CRC if stored.crc32 is None else stored.crc32))
        self._layout_ids.append(layout_id)
        name_id = self._name_index.get(fqn)
        if name_id is None:
            name_id = self._name_index[fqn] = len(self._names)
            self._names.append(fqn)
        self._name_ids.append(name_id)
        start, _ = self._spans[place]
        self._spans[place] = (start, row + 1)

    # -- reading -------------------------------------------------------------------------------------------
    def _row(self, location: BlobLocation) -> int:
        """The location's row, or -1."""
        span = self._spans.get(place_of(location))
        if span is None:
            return -1
        start, end = span
        i = bisect_left(self._offsets, location.offset, start, end)
        while i < end and self._offsets[i] == location.offset:     # one row, unless .metadata is odd
            if self._lengths[i] == location.length:
                return i
            i += 1
        return -1

    def _stored(self, row: int, transforms: Tuple[str, ...]) -> StoredTensor:
        dtype, shape, stride = self._layouts[self._layout_ids[row]]
        at = 5 * row
        data_offset, data_nbytes, record_offset, record_nbytes, crc32 = self._data[at:at + 5]
        return StoredTensor(dtype, shape, stride, data_offset, data_nbytes, record_offset, record_nbytes,
                            None if crc32 == _NO_CRC else crc32, transforms)

    def layout(self, location: BlobLocation) -> Layout:
        """(dtype, shape, stride) of the located chunk, without making its StoredTensor (KeyError if absent)."""
        row = self._row(location)
        if row < 0:
            raise KeyError(location)
        return self._layouts[self._layout_ids[row]]

    def non_contiguous(self) -> Set[BlobLocation]:
        """The chunks stored with strides that are not row-major (transposed, channels_last...): found from the few
        distinct layouts, so the common answer, none, costs no pass over the rows."""
        odd = {i for i, (_, shape, stride) in enumerate(self._layouts)
               if not StoredTensor("", shape, stride, 0, 0).is_contiguous}
        found: Set[BlobLocation] = set()
        for (path, transforms, key), (start, end) in self._spans.items() if odd else ():
            found.update(BlobLocation(path, self._offsets[row], self._lengths[row], transforms, key)
                         for row in range(start, end) if self._layout_ids[row] in odd)
        return found

    def crcs_recorded(self) -> bool:
        """Whether every chunk of a plain blob is its whole storage record with a recorded CRC-32
        (`StoredTensor.storage_crc32`), so that no shard it is copied into in-kernel is read back for its CRC:
        the columns compared whole, no pass in Python. A transformed blob's bytes are summed as they are decoded."""
        for (_, transforms, _), (start, end) in self._spans.items():
            rows = self._data[5 * start:5 * end]
            if not transforms and (rows[0::5] != rows[2::5] or rows[1::5] != rows[3::5] or _NO_CRC in rows[4::5]):
                return False
        return True

    def name_of(self, location: BlobLocation) -> str:
        """The tensor the location was located for (KeyError if absent)."""
        row = self._row(location) if isinstance(location, BlobLocation) else -1
        if row < 0:
            raise KeyError(location)
        return self._names[self._name_ids[row]]

    def __getitem__(self, location: BlobLocation) -> StoredTensor:
        if not isinstance(location, BlobLocation):
            raise KeyError(location)
        row = self._row(location)
        if row < 0:
            raise KeyError(location)
        return self._stored(row, location.transform_descriptors)

    def __contains__(self, location) -> bool:
        return isinstance(location, BlobLocation) and self._row(location) >= 0

    def __len__(self) -> int:
        return len(self._offsets)

    def _place_items(self, place: Place) -> Iterator[Tuple[BlobLocation, StoredTensor]]:
        path, transforms, key = place
        start, end = self._spans[place]
        for row in range(start, end):
            yield BlobLocation(path, self._offsets[row], self._lengths[row], transforms, key), \
                self._stored(row, transforms)

    def items(self) -> Iterator[Tuple[BlobLocation, StoredTensor]]:   # type: ignore[override]
        """(location, stored) of every chunk in file order, each made when reached."""
        places = sorted(self._spans, key=place_order)
        for _, same_file in groupby(places, key=lambda place: place[0]):
            streams = [self._place_items(place) for place in same_file]
            yield from heapq.merge(*streams, key=lambda item: (item[0].offset, item[0].tensor_key, item[0].length))

    def __repr__(self) -> str:
        return f"LocatedChunks({len(self)} chunks in {len(self._spans)} places, {len(self._layouts)} layouts)"


class _Names(Mapping):
    __slots__ = ("table",)

    def __init__(self, table: _FileOrdered):
        self.table = table

    def __getitem__(self, location: BlobLocation) -> str:
        return self.table.name_of(location)

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[BlobLocation]:
        return iter(self.table)


class LocatedBatches(_FileOrdered):
    """{BlobLocation: StoredTensor} of chunks located batch by batch (`locate_all(..., known=this)`, each blob in
    one batch only): the same answers as one `LocatedChunks` of them all, file order included, while later
    batches are still being added (by one thread; readers look up only chunks of batches already added)."""

    __slots__ = ("_tables",)

    def __init__(self) -> None:
        self._tables: Tuple[LocatedChunks, ...] = ()

    def add(self, table: LocatedChunks) -> None:
        self._tables = self._tables + (table,)      # (one assignment: a reader sees the old tuple or the new)

    def _table_of(self, location: BlobLocation) -> LocatedChunks:
        for table in self._tables:
            if location in table:
                return table
        raise KeyError(location)

    def __getitem__(self, location: BlobLocation) -> StoredTensor:
        return self._table_of(location)[location]

    def layout(self, location: BlobLocation) -> Layout:
        return self._table_of(location).layout(location)

    def __contains__(self, location) -> bool:
        return any(location in table for table in self._tables)

    def __len__(self) -> int:
        return sum(len(table) for table in self._tables)

    def items(self) -> Iterator[Tuple[BlobLocation, StoredTensor]]:   # type: ignore[override]
        """In file order, as `LocatedChunks.items`: the batches' own orders merged."""
        return heapq.merge(*(table.items() for table in self._tables), key=lambda item: (
            item[0].relative_path, item[0].offset, item[0].tensor_key, item[0].length))

    def non_contiguous(self) -> Set[BlobLocation]:
        return set().union(*(table.non_contiguous() for table in self._tables))

    def crcs_recorded(self) -> bool:
        return all(table.crcs_recorded() for table in self._tables)

    def name_of(self, location: BlobLocation) -> str:
        if not isinstance(location, BlobLocation):
            raise KeyError(location)
        return self._table_of(location).name_of(location)

    def __repr__(self) -> str:
        return f"LocatedBatches({len(self)} chunks in {len(self._tables)} batches)"


# ---------------------------------------------------------------------------------------------------------
# locating every chunk


class _Wanted:
    """The blobs wanted in one place, as columns: offset, length and first user per blob; a user is the entry's
    index << 32 | the chunk's index in it (`user_of`)."""

    __slots__ = ("offsets", "lengths", "users")

    def __init__(self) -> None:
        self.offsets, self.lengths, self.users = array("q"), array("q"), array("q")

    def sorted_unique(self) -> "_Wanted":
        """The same blobs by (offset, length), each once (a blob several chunks share is located once). Two lengths
        at one offset are two blobs, as they are two `BlobLocation`s: locating the wrong one fails."""
        out = _Wanted()
        offsets, lengths, users = self.offsets, self.lengths, self.users
        for i in sorted(range(len(offsets)), key=lambda i: (offsets[i], lengths[i])):
            if out.offsets and out.offsets[-1] == offsets[i] and out.lengths[-1] == lengths[i]:
                continue
            out.offsets.append(offsets[i])
            out.lengths.append(lengths[i])
            out.users.append(users[i])
        return out


def wanted_blobs(entries: List[TensorEntry], known: Optional[LocatedBatches] = None
                 ) -> Tuple[Dict[Place, _Wanted], Dict[BlobLocation, List[Tuple[TensorEntry, Chunk]]]]:
    """Every place's wanted blobs (sorted, each once) but those `known` holds, and the chunks inside safetensors
    blobs with their users (which `safetensors_blob.locate_all` checks against its header)."""
    wanted: Dict[Place, _Wanted] = {}
    packed: Dict[BlobLocation, List[Tuple[TensorEntry, Chunk]]] = {}
    for index, entry in enumerate(entries):
        for number, chunk in enumerate(entry.chunks):
            location = chunk.location
            if location.tensor_key:     # (every user is checked against the header, a known blob's too)
                packed.setdefault(location, []).append((entry, chunk))
            if known is not None and location in known:
                continue
            place = place_of(location)
            blobs = wanted.get(place)
            if blobs is None:
                blobs = wanted[place] = _Wanted()
            blobs.offsets.append(location.offset)
            blobs.lengths.append(location.length)
            blobs.users.append(index << 32 | number)
    return {place: blobs.sorted_unique() for place, blobs in wanted.items()}, packed


def user_of(entries: List[TensorEntry], user: int) -> Tuple[TensorEntry, Chunk]:
    """The (entry, chunk) a `_Wanted` user names."""
    entry = entries[user >> 32]
    return entry, entry.chunks[user & 0xFFFFFFFF]


def locate_all(reader: RangeReader, tensors: Iterable[TensorEntry], known: Optional[LocatedBatches] = None,
               check_stop: Callable[[], None] = lambda: None) -> LocatedChunks:
    """`blob.locate_tensor` for every chunk of `tensors`, read in file order, each blob once; blobs `known`
    already holds (located with an earlier batch of tensors) are not located again, nor kept twice.
    `check_stop()` runs before each blob (it raises to stop: a conversion that ended while a batch was located).

    Also checks that each blob holds what the metadata says (dtype and chunk sizes): a mismatch means the
    .distcp files and .metadata come from different saves.
    """
    entries = list(tensors)
    wanted, packed = wanted_blobs(entries, known)
    # Chunks inside safetensors blobs (serialization_format=SAFETENSORS, HF per-rank shards) come from headers.
    from_headers = safetensors_blob.locate_all(reader, packed) if packed else {}
    del packed
    places = sorted(wanted, key=place_order)
    # On a cold cache each blob costs two small random reads (3,500 chunks of an 11B model: 0.7 s one at a
    # time). Ask the kernel for all of them up front (POSIX_FADV_WILLNEED starts the reads without waiting),
    # then parse in order while they land. Threads were tried: the parsing holds the GIL and they lost.
    for place in places:
        if not place[2]:
            blob.prefetch_heads(reader, place[0], place[1], wanted[place].offsets, wanted[place].lengths)
    found = LocatedChunks()
    file_sizes: Dict[str, int] = {}
    for place in places:
        path, transforms, key = place
        blobs = wanted.pop(place)
        for offset, length, user in zip(blobs.offsets, blobs.lengths, blobs.users):
            check_stop()
            location = BlobLocation(path, offset, length, transforms, key)
            fqn = entries[user >> 32].fqn
            stored = from_headers[location] if key else blob.locate_blob(reader, location, fqn, file_sizes)
            found.add(location, stored, fqn)
    _check_users(entries, found, known)
    return found


def _check_users(entries: List[TensorEntry], found: LocatedChunks, known: Optional[LocatedBatches]) -> None:
    for entry in entries:
        for chunk in entry.chunks:
            location = chunk.location
            dtype, shape, _ = (found if known is None or location in found else known).layout(location)
            if dtype != entry.dtype or shape != tuple(chunk.sizes):
                raise CheckpointError(
                    f"{location.relative_path}: blob at offset {location.offset} for tensor {entry.fqn!r} chunk "
                    f"at offsets {list(chunk.offsets)}: .metadata says {entry.dtype} {list(chunk.sizes)}, the blob "
                    f"holds {dtype} {list(shape)}; .metadata and the .distcp files come from "
                    "different saves")
