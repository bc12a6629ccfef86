"""The records a DCP `.metadata` repeats per chunk, read in bulk into columns instead of one object each.

A 671B-parameter checkpoint's `.metadata` holds ~481k `ChunkStorageMetadata` records and as many `MetadataIndex ->
_StorageInfo` pairs; built as stand-ins (unpickle.py) they take ~1 KB each and most of the load's time. torch's
pickler writes each the same way (protocol 4, every object memoized):

    ChunkStorageMetadata   GET cls ) NEWOBJ MEMOIZE } MEMOIZE ( GET 'offsets' GET torch.Size <ints> TUPLEn MEMOIZE
                           TUPLE1 MEMOIZE REDUCE MEMOIZE GET 'sizes' ... the same ... SETITEMS BUILD
    storage_data item      GET MetadataIndex ) NEWOBJ ... ( GET 'fqn' GET <fqn> GET 'index' <int> GET 'offset'
                           <torch.Size as above> SETITEMS BUILD GET _StorageInfo ) NEWOBJ ... ( GET 'relative_path'
                           GET <path> GET 'offset' <int> GET 'length' <int> SETITEMS BUILD

These fast paths (`unpickle.Spec.fast_paths`) match runs of such records with one regular expression each, check
every memo reference they use (the keys, the torch.Size stand-in, the class), append the numbers to `Columns` and
put one `ChunkRows` / `StorageRows` marker in the records' place. Anything else, a record that differs by one
byte (a name first seen, such as each rank's own fqn strings when the ranks sent their results to the
coordinator, a FRAME inside it, a transform descriptor, a negative number, no or more than 3 dims), goes through
the general machine, which checks it as before: the fast path only ever takes the shapes it proves.
"""
from __future__ import annotations

import re
import struct
from array import array
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import safe_pickle as sp
from .unpickle import Record

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from
_i32 = struct.Struct("<i").unpack_from

# A memo reference (BINGET i / LONG_BINGET i) and an int (BININT1, BININT2, BININT, LONG1 of 1-8 bytes).
_GET = rb"(?:h(.)|j(.{4}))"
_INT = (rb"(?:K.|M..|J.{4}|\x8a\x01.|\x8a\x02..|\x8a\x03.{3}|\x8a\x04.{4}|\x8a\x05.{5}|\x8a\x06.{6}"
        rb"|\x8a\x07.{7}|\x8a\x08.{8})")
_SIZE = _GET + _GET + rb"(" + _INT + rb"{1,3})([\x85-\x87])\x94\x85\x94R\x94"   # GET key, GET torch.Size, dims
_NEW = rb"\)\x81\x94}\x94\("
_CHUNK = re.compile(_NEW + _SIZE + _SIZE + rb"ub", re.S)
_STORAGE = re.compile(_NEW + _GET + _GET + _GET + rb"(" + _INT + rb")" + _SIZE + rb"ub"
                      + rb"(?:\x95.{8})?" + _GET + _NEW + _GET + _GET + _GET + rb"(" + _INT + rb")" + _GET
                      + rb"(" + _INT + rb")ub", re.S)
_NEXT = re.compile(rb"(?:\x95.{8})?" + _GET, re.S)   # the next record's class reference
_INTS = re.compile(_INT, re.S)

_ROW_BYTES = 8      # charged per number stored in a column


def _index(short: Optional[bytes], long: Optional[bytes]) -> int:
    return short[0] if short is not None else _u32(long)[0]


def _int(raw: bytes) -> int:
    """The value of one matched int opcode; -1 for a negative one (never a size or offset)."""
    op = raw[0]
    if op == 0x4B:
        return raw[1]
    if op == 0x4D:
        return _u16(raw, 1)[0]
    if op == 0x4A:
        value = _i32(raw, 1)[0]
        return value if value >= 0 else -1
    value = int.from_bytes(raw[2:], "little", signed=True)
    return value if value >= 0 else -1


def _ints(raw: bytes, tuple_op: int) -> Optional[List[int]]:
    values = [_int(m.group()) for m in _INTS.finditer(raw)]
    if len(values) != tuple_op - 0x84 or min(values) < 0:
        return None
    return values


# Distinct dims strings remembered per load: a tensor's chunks repeat their sizes and the ranks' offsets, so most
# are read once (a 671B `.metadata` has 1.4M of them). Forgotten all at once past this many (a few MiB).
_KNOWN_DIMS = 1 << 15


def _remembered_ints() -> Callable[[Tuple[bytes, bytes]], Optional[List[int]]]:
    """`_ints` of (the ints' opcodes, the TUPLEn opcode), remembering its answers for one load."""
    known: Dict[Tuple[bytes, bytes], Optional[List[int]]] = {}

    def ints(raw: Tuple[bytes, bytes]) -> Optional[List[int]]:
        try:
            return known[raw]
        except KeyError:
            if len(known) >= _KNOWN_DIMS:
                known.clear()
            values = known[raw] = _ints(raw[0], raw[1][0])
            return values
    return ints


def _cached(get: Callable[[int], Any]) -> Callable[[int], Any]:
    """`get` remembering its answers for one run of records: no opcode runs inside a run, so the memo cannot
    change, and every record asks for the same keys and classes."""
    seen: Dict[int, Any] = {}

    def cached(i: int) -> Any:
        try:
            return seen[i]
        except KeyError:
            value = seen[i] = get(i)
            return value
    return cached


class ChunkRows(Record):
    """Stands in for `count` consecutive ChunkStorageMetadata records of `ndim` dims: their offsets and sizes are
    `Columns.chunks[start + 2 * ndim * k ...]` (offsets, then sizes) for the k-th."""

    __slots__ = ("start", "count", "ndim")

    def __init__(self, start: int, count: int, ndim: int):
        super().__init__()
        self.start, self.count, self.ndim = start, count, ndim


class StorageRows(Record):
    """Stands in for `count` consecutive storage_data items (a key; its value is None): row r's fqn is
    `Columns.fqns[r]`, its chunk offsets `Columns.offsets[start + ndim * (r - row)...]`, its file
    `Columns.paths[Columns.path_ids[r]]`, its blob `Columns.blobs[2r]` (offset) and `[2r + 1]` (length)."""

    __slots__ = ("start", "row", "count", "ndim")

    def __init__(self, start: int, row: int, count: int, ndim: int):
        super().__init__()
        self.start, self.row, self.count, self.ndim = start, row, count, ndim


class Columns:
    """What the fast paths read, as arrays (8 bytes a number) instead of objects."""

    def __init__(self) -> None:
        self.chunks = array("q")
        self.offsets = array("q")
        self.fqns: List[str] = []         # shared string objects: 8 bytes a row
        self.path_ids = array("I")
        self.paths: List[str] = []
        self._path_id: Dict[str, int] = {}
        self.blobs = array("q")

    def path_id(self, path: str) -> int:
        found = self._path_id.get(path)
        if found is None:
            found = self._path_id[path] = len(self.paths)
            self.paths.append(path)
        return found


def handlers(spec: sp._Spec) -> Tuple[Dict[int, Callable], Columns]:
    """The fast paths for a `.metadata` load by `spec`, and the columns they fill."""
    columns = Columns()
    chunk_cls, index_cls, info_cls = sp.ChunkStorageMetadata, sp.MetadataIndex, sp.StorageInfo
    size_call = sp.SIZE_CALL

    ints = _remembered_ints()

    def dims(get: Callable[[int], Any], m: "re.Match", g: int, key: str) -> Optional[List[int]]:
        """Groups g.. of a matched torch.Size: (key ref, key ref, Size ref, Size ref, ints, TUPLEn)."""
        if (get(_index(m.group(g), m.group(g + 1))) != key
                or get(_index(m.group(g + 2), m.group(g + 3))) is not size_call):
            return None
        return ints(m.group(g + 4, g + 5))

    def next_record(buf: bytes, pos: int, end: int, get: Callable[[int], Any], cls: type) -> int:
        """The position after the next record's reference to `cls`, or -1 when what follows is something else."""
        m = _NEXT.match(buf, pos, end)
        if m is None or get(_index(m.group(1), m.group(2))) is not cls:
            return -1
        return m.end()

    def chunk_run(buf: bytes, pos: int, end: int, get: Callable[[int], Any]):
        get = _cached(get)
        start, count, ndim, resume = len(columns.chunks), 0, 0, pos
        values = columns.chunks
        while True:
            m = _CHUNK.match(buf, pos, end)
            if m is None:
                break
            offsets = dims(get, m, 1, "offsets")
            sizes = dims(get, m, 7, "sizes")
            if offsets is None or sizes is None or len(offsets) != len(sizes) or (count and len(offsets) != ndim):
                break
            ndim = len(offsets)
            values.extend(offsets)
            values.extend(sizes)
            count += 1
            resume = m.end()
            pos = next_record(buf, resume, end, get, chunk_cls)
            if pos < 0:
                break
        if not count:
            return None
        return resume, (ChunkRows(start, count, ndim),), 8 * count, _ROW_BYTES * 2 * ndim * count

    def storage_run(buf: bytes, pos: int, end: int, get: Callable[[int], Any]):
        get = _cached(get)
        start, row, count, ndim, resume = len(columns.offsets), len(columns.fqns), 0, 0, pos
        while True:
            m = _STORAGE.match(buf, pos, end)
            if m is None or get(_index(m.group(1), m.group(2))) != "fqn":
                break
            fqn = get(_index(m.group(3), m.group(4)))
            offsets = dims(get, m, 8, "offset")
            index, blob_offset, length = _int(m.group(7)), _int(m.group(22)), _int(m.group(25))
            path = get(_index(m.group(18), m.group(19)))
            if (type(fqn) is not str or offsets is None or (count and len(offsets) != ndim) or index < 0
                    or get(_index(m.group(5), m.group(6))) != "index"
                    or get(_index(m.group(14), m.group(15))) is not info_cls
                    or get(_index(m.group(16), m.group(17))) != "relative_path" or type(path) is not str or not path
                    or get(_index(m.group(20), m.group(21))) != "offset" or blob_offset < 0
                    or get(_index(m.group(23), m.group(24))) != "length" or length < 0):
                break
            ndim = len(offsets)
            columns.fqns.append(fqn)
            columns.offsets.extend(offsets)
            columns.path_ids.append(columns.path_id(path))
            columns.blobs.append(blob_offset)
            columns.blobs.append(length)
            count += 1
            resume = m.end()
            pos = next_record(buf, resume, end, get, index_cls)
            if pos < 0:
                break
        if not count:
            return None
        # SETITEMS takes key, value pairs: the marker stands for every key, its value is unused.
        return resume, (StorageRows(start, row, count, ndim), None), 7 * count, _ROW_BYTES * (ndim + 4) * count

    return {id(chunk_cls): chunk_run, id(index_cls): storage_run}, columns
