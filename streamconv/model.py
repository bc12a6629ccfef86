"""streamconv's own view of a DCP checkpoint: frozen dataclasses, no IO, no torch.

`.metadata` is decoded once (see `reader/metadata.py`) into these; nothing downstream sees a pickle.
dtypes are torch's names without the `torch.` prefix ("bfloat16", "float32", "int64", ...).
"""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple, Union

PathElement = Union[str, int]


def numel(shape: Sequence[int]) -> int:
    """Elements in a box of this shape (1 for a 0-d tensor)."""
    n = 1
    for s in shape:
        n *= s
    return n


def row_major_strides(shape: Sequence[int]) -> List[int]:
    """Element strides of a contiguous (row-major) tensor of this shape."""
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return strides[::-1]


@dataclass(frozen=True)
class BlobLocation:
    """Where one item's serialized blob (a `torch.save` zip) lives, relative to the checkpoint folder."""

    relative_path: str
    offset: int
    length: int
    # Extension transforms (e.g. "stream.zstd/1"), in the order torch lists them. Empty for plain blobs.
    transform_descriptors: Tuple[str, ...] = ()
    # Set when the blob at `offset` is a safetensors blob holding several tensors (FileSystemWriter with
    # serialization_format=SAFETENSORS, HuggingFaceStorageWriter): the tensor's key in its header. `length` is
    # then the tensor's byte size, not the blob's. Empty for a one-tensor torch.save blob.
    tensor_key: str = ""


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor: global element offsets and sizes per dim, and where its bytes are."""

    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    location: BlobLocation

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


class ChunkTable(Sequence):
    """A tensor's chunks as columns: 2 x ndim + 2 numbers of 8 bytes and a 4-byte place per chunk instead of a
    `Chunk` (with its `BlobLocation` and tuples: ~550 bytes). It is a sequence of `Chunk`s, each made when asked
    for, so code that iterates chunks reads it as it reads a tuple; the planner's proofs read `box(i)` instead.

    `boxes`: offsets then sizes of each chunk; `blobs`: (offset, length) of each chunk's blob; `where`: index into
    `places`, the distinct (relative_path, transform_descriptors, tensor_key) of the checkpoint. `rows`: the rows
    of the table this one shows, in order (a deduplicated, sorted view shares the columns), or None for all.
    """

    __slots__ = ("ndim", "boxes", "blobs", "where", "places", "rows")

    def __init__(self, ndim: int, boxes: "array", blobs: "array", where: "array",
                 places: Sequence[Tuple[str, Tuple[str, ...], str]], rows: Optional["array"] = None):
        self.ndim, self.boxes, self.blobs, self.where, self.places, self.rows = ndim, boxes, blobs, where, places, rows

    @classmethod
    def of(cls, chunks: Sequence[Chunk], ndim: int) -> "ChunkTable":
        """The table of `chunks` (all of `ndim` dims)."""
        boxes, blobs, where = array("q"), array("q"), array("I")
        places: Dict[Tuple[str, Tuple[str, ...], str], int] = {}
        for c in chunks:
            loc = c.location
            boxes.extend(c.offsets)
            boxes.extend(c.sizes)
            blobs.append(loc.offset)
            blobs.append(loc.length)
            where.append(places.setdefault((loc.relative_path, loc.transform_descriptors, loc.tensor_key),
                                           len(places)))
        return cls(ndim, boxes, blobs, where, tuple(places))

    def __len__(self) -> int:
        return len(self.where) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        return i if self.rows is None else self.rows[i]

    def box(self, i: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(offsets, sizes) of chunk i, without making the Chunk."""
        n = self.ndim
        at = 2 * n * self._row(i)
        boxes = self.boxes
        return tuple(boxes[at:at + n]), tuple(boxes[at + n:at + 2 * n])

    def located(self) -> Iterator[Tuple[str, int, int, Tuple[int, ...], Tuple[int, ...]]]:
        """(relative_path, blob offset, blob length, offsets, sizes) of each chunk, without making its Chunk."""
        n, boxes, blobs, places, where = self.ndim, self.boxes, self.blobs, self.places, self.where
        for i in range(len(self)):
            row = self._row(i)
            at = 2 * n * row
            yield (places[where[row]][0], blobs[2 * row], blobs[2 * row + 1], tuple(boxes[at:at + n]),
                   tuple(boxes[at + n:at + 2 * n]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[k] for k in range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError("chunk index out of range")
        row = self._row(i)
        n = self.ndim
        at = 2 * n * row
        boxes = self.boxes
        path, transforms, key = self.places[self.where[row]]
        return Chunk(tuple(boxes[at:at + n]), tuple(boxes[at + n:at + 2 * n]),
                     BlobLocation(path, self.blobs[2 * row], self.blobs[2 * row + 1], transforms, key))

    def __iter__(self) -> Iterator[Chunk]:
        for i in range(len(self)):
            yield self[i]

    def select(self, indexes: Sequence[int]) -> "ChunkTable":
        """The chunks at `indexes` (positions in this table), in that order, sharing the columns."""
        rows = array("I", (self._row(i) for i in indexes))
        return ChunkTable(self.ndim, self.boxes, self.blobs, self.where, self.places, rows)

    @property
    def transformed(self) -> bool:
        """True when some chunk's blob goes through a stream transform. Asks only this table's chunks: `places` is
        the whole checkpoint's, and a 671B plan asks each of its 45k tensors."""
        places, where = self.places, self.where
        rows = range(len(where)) if self.rows is None else self.rows
        return any(places[where[r]][1] for r in rows)

    def __eq__(self, other) -> bool:
        if isinstance(other, (ChunkTable, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"ChunkTable({len(self)} chunks of {self.ndim} dims)"

    def __getstate__(self):
        return (self.ndim, self.boxes, self.blobs, self.where, self.places, self.rows)

    def __setstate__(self, state) -> None:
        self.ndim, self.boxes, self.blobs, self.where, self.places, self.rows = state


@dataclass(frozen=True)
class LeftOut:
    """Which tensors' chunk locations decoding `.metadata` may leave undecoded, decided once from the options
    (`planning.plan.left_out_while_decoding`) because planning leaves those tensors out whatever else it decides:
    a tensor whose checkpoint key's first segment is one of `top_keys` (guessed from the key: storage rows are read
    before the tensors' paths are known) and whose planner_data path then confirms it (two or more elements, the
    first of `top_keys`: what `planning.naming` skips as optimizer or trainer state). A decoder that cannot confirm
    its guesses decodes again without them. `NOTHING_LEFT_OUT`: every location decoded (inspect, verify, discovery,
    a flavor with nothing to leave out)."""

    top_keys: FrozenSet[str] = frozenset()

    def guesses(self, fqn: str) -> bool:
        return bool(self.top_keys) and fqn.split(".", 1)[0] in self.top_keys

    def confirms(self, fqn: str, path: Tuple["PathElement", ...]) -> bool:
        return len(path) >= 2 and str(path[0]) in self.top_keys and self.guesses(fqn)


NOTHING_LEFT_OUT = LeftOut()


class LeftOutChunks(Sequence):
    """The chunks of a tensor whose locations decoding left out (`LeftOut`): how many there are and their boxes (from
    state_dict_metadata); their blobs are counted in `CheckpointMetadata.left_out_blobs`. Planning only counts them;
    a chunk asked for is a bug (the verb had to decode with `NOTHING_LEFT_OUT`)."""

    __slots__ = ("ndim", "boxes", "count")

    def __init__(self, ndim: int, boxes: "array", count: int):
        self.ndim, self.boxes, self.count = ndim, boxes, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        raise LookupError("this tensor's chunk locations were left out while decoding .metadata (LeftOut); a verb "
                          "that reads them decodes with NOTHING_LEFT_OUT")

    def __repr__(self) -> str:
        return f"LeftOutChunks({self.count} chunks of {self.ndim} dims)"


@dataclass(frozen=True)
class TensorEntry:
    fqn: str                      # flat key in the checkpoint, e.g. "model.layers.0.mlp.up_proj.weight"
    dtype: str                    # torch dtype name, e.g. "bfloat16"
    shape: Tuple[int, ...]        # global shape
    chunks: Sequence[Chunk]       # as listed in the metadata (rank order, not sorted): a tuple or a ChunkTable
    path: Tuple[PathElement, ...] = ()  # planner_data path: nested dict keys, e.g. ("model", "layers.0.w")


@dataclass(frozen=True)
class BytesEntry:
    """A non-tensor item (torch.save of a python object). Never loaded; only listed."""

    fqn: str
    location: Optional[BlobLocation]
    path: Tuple[PathElement, ...] = ()


@dataclass(frozen=True)
class CheckpointMetadata:
    tensors: Tuple[TensorEntry, ...]
    byte_entries: Tuple[BytesEntry, ...] = ()
    version: Optional[str] = None           # Metadata.version ("1.0.0" from torch 2.9 on)
    # What the pickle's shape says about the writer's torch version, e.g. "2.3-2.8", ">=2.9".
    torch_version_hint: str = "unknown"
    # Files referenced by storage_data, relative to the checkpoint folder, sorted.
    files: Tuple[str, ...] = field(default=())
    # How the writer stored the tensors, when not torch's default (one torch.save blob per chunk): a short
    # sentence for `inspect` and the notes, e.g. "safetensors-serialized DCP (...)". Empty for the default.
    flavor: str = ""
    # The blobs of the chunks whose locations decoding left out (`LeftOut`), by stream transform: ((transform
    # descriptors, blobs), ...), for the notes. Empty when nothing was left out.
    left_out_blobs: Tuple[Tuple[Tuple[str, ...], int], ...] = ()


@dataclass(frozen=True)
class StoredTensor:
    """What a chunk's `torch.save` blob says about its raw bytes (found without torch.load)."""

    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    # Offsets address the blob's bytes as `source.blob_reader.BlobReader` reads them: for a plain blob, absolute
    # offsets in the .distcp file; for a transformed one (`transforms` set), offsets in its decoded stream.
    data_offset: int     # offset of the first element
    data_nbytes: int     # numel * itemsize
    # The zip record holding the tensor's storage, and the CRC-32 torch.save recorded for it in the central
    # directory. The CRC covers the whole record, which can be larger than the tensor's view of it.
    record_offset: int = -1    # offset of the record's data (file or decoded stream, as data_offset)
    record_nbytes: int = 0
    crc32: Optional[int] = None  # None: the writer recorded none (torch.save with compute_crc32=False stores 0)
    # The blob's stream transforms (BlobLocation.transform_descriptors). When set, the CRC-32 is not known before
    # the record is read: it sits in the data descriptor after it in the decoded stream.
    transforms: Tuple[str, ...] = ()

    @property
    def storage_crc32(self) -> Optional[int]:
        """CRC-32 of exactly the tensor's bytes, when the tensor is its whole storage record (resume records
        derive a shard's CRC from it instead of reading copied bytes back)."""
        whole = self.record_offset == self.data_offset and self.record_nbytes == self.data_nbytes
        # Decoded bytes pass through memory, so the sink sums what it really wrote: never substitute a record's.
        return self.crc32 if whole and not self.transforms else None

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True
