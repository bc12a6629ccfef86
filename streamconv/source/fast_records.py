"""The records a DCP `.metadata` repeats per chunk, read in bulk into columns instead of one object each.

A 671B-parameter checkpoint's `.metadata` holds ~481k `ChunkStorageMetadata` records and as many `MetadataIndex ->
_StorageInfo` pairs (1.4M of each with AdamW's state); built as stand-ins (unpickle.py) they take ~1 KB each and
most of the load's time. torch's pickler writes each the same way (protocol 4, every object memoized):

    ChunkStorageMetadata   GET cls ) NEWOBJ MEMOIZE } MEMOIZE ( GET 'offsets' GET torch.Size <ints> TUPLEn MEMOIZE
                           TUPLE1 MEMOIZE REDUCE MEMOIZE GET 'sizes' ... the same ... SETITEMS BUILD
    storage_data item      GET MetadataIndex ) NEWOBJ ... ( GET 'fqn' <fqn> GET 'index' <int> GET 'offset'
                           <torch.Size as above> SETITEMS BUILD GET _StorageInfo ) NEWOBJ ... ( GET 'relative_path'
                           GET <path> GET 'offset' <int> GET 'length' <int> SETITEMS BUILD
    state_dict_metadata    GET TensorStorageMetadata ) NEWOBJ ... ( GET 'properties' GET TensorProperties ) NEWOBJ
      entry                MEMOIZE ( GET <dtype> GET <layout> NEWFALSE GET <memory format> NEWFALSE TUPLE MEMOIZE BUILD
                           GET 'size' <torch.Size> GET 'chunks' EMPTY_LIST MEMOIZE ( <chunk records> APPENDS SETITEMS
                           BUILD

A storage row's <fqn> is a memo reference when one process pickled the state dict, and the name itself
(SHORT_BINUNICODE MEMOIZE) in every checkpoint several ranks saved: the coordinator pickles each rank's rows with
that rank's own strings. Both are read here, the name's length checked after a bounded lazy match.

The fast paths (`unpickle.Spec.fast_paths`) read a run of chunk or storage records in two steps:

1. **Prove the first record** with a general pattern (every memo reference a group) and check each reference it
   makes (the keys, the torch.Size stand-in, the next record's class) against the memo.
2. **Read the rest of the run in C** with a pattern compiled for that proven shape: the same references as literal
   bytes (chunk records: the same number of dims; storage rows: any). No opcode runs inside a run, so the memo cannot
   change: a record the pattern matches makes exactly the proven references, and only the numbers, the fqn and the
   file vary. The run is `Pattern.scanner(...).match` repeated (each match starts where the last ended) and its
   numbers are decoded through `map` over the matches; the fqn and file references are checked once per load for
   each distinct one (again after a BINPUT replaces a memo entry).

A state_dict_metadata entry is read one at a time (`_Entries`: its key, which the general machine reads, stays in the
memo, since storage rows may refer to it): its references are proven once per shape, its TensorProperties checked by
its own `setstate`, its chunk list (as pickle batches it: one item and APPEND, or 2-1000 between MARK and APPENDS)
read in one pass of a pattern compiled for the tensor's number of dims; a 906-tensor checkpoint's entries are then
a few hundred microseconds of Python instead of ~30 opcodes each.

Numbers are taken only when non-negative (the patterns leave negative BININT and LONG1 out). Each run's records
are put in place as one `ChunkRows` / `StorageRows` marker, an entry as its `TensorStorageMetadata` with one
`ChunkRows`. Anything else, a record that differs by one byte (a name longer than 255 bytes, a FRAME inside it, a
transform descriptor, a negative number, a chunk of another rank), goes through the general machine, which checks it
as before: the fast path only ever takes the shapes it proves. The rows of tensors `model.LeftOut` leaves out are
counted and summed (`Columns.leave_out`), not kept.
"""
from __future__ import annotations

import re
import struct
from array import array
from collections import Counter, defaultdict
from itertools import chain, compress, repeat
from operator import itemgetter, not_, rshift
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..model import NOTHING_LEFT_OUT, LeftOut
from . import safe_pickle as sp
from .unpickle import Record

_u16 = struct.Struct("<H").unpack_from
_u32 = struct.Struct("<I").unpack_from

# A memo reference (BINGET i / LONG_BINGET i), and a non-negative int (BININT1, BININT2, BININT and LONG1 of 1-8
# bytes whose top bit is clear).
_GET = rb"(?:h.|j.{4})"
_BININT = rb"K.|M..|J...[\x00-\x7f]"
_LONG1 = rb"|".join(rb"%s.{%d}[\x00-\x7f]" % (re.escape(bytes([n])), n - 1) for n in range(1, 9))   # after \x8a
_INT = rb"(?:" + _BININT + rb"|\x8a(?:" + _LONG1 + rb"))"
_INTS = re.compile(_INT, re.S)
_FRAME = rb"(?:\x95.{8})?"
_NEW = rb"\)\x81\x94}\x94\("
# The ints of a torch.Size and the opcodes that close it: none (EMPTY_TUPLE), 1-3 (TUPLE1-3, each with as many ints)
# or 4+ (MARK ... TUPLE).
# (Factored so that each int is parsed once: a 3-d size is not tried as a 1-d and a 2-d one first.)
_DIMS_ANY = (rb"(?:\)|\((?:" + _INT + rb"){4,64}t\x94|" + _INT + rb"(?:\x85\x94|" + _INT + rb"(?:\x86\x94|" + _INT
             + rb"\x87\x94)))")
_DIMS_GENERAL = rb"(" + _DIMS_ANY + rb")"
_SIZE_END = rb"\x85\x94R\x94"


def _size(key: bytes, size: bytes) -> bytes:
    """GET key, GET torch.Size, its dims (group), TUPLE1 REDUCE: the general form when `key` and `size` are groups."""
    return key + size + _DIMS_GENERAL + _SIZE_END


_G = rb"(" + _GET + rb")"
# A storage row's fqn: a memo reference, or a name first seen there (SHORT_BINUNICODE, memoized), as in every
# checkpoint torch's writers save from several ranks: each rank's rows name its own strings. The match is lazy, so
# the string's length is checked after it (`_inline`): a name containing what looks like the rest of the record
# only ends its run early.
_NAME = rb"(" + _GET + rb"|\x8c.(?:.{0,255}?)\x94)"
_CHUNK = re.compile(_NEW + _size(_G, _G) + _size(_G, _G) + rb"ub", re.S)
_STORAGE = re.compile(_NEW + _G + _NAME + _G + _INT + _size(_G, _G) + rb"ub" + _FRAME + _G + _NEW + _G + _G + _G
                      + rb"(" + _INT + rb")" + _G + rb"(" + _INT + rb")ub", re.S)
_NEXT = re.compile(_FRAME + rb"(" + _GET + rb")", re.S)   # the next record's class reference
# A state_dict_metadata entry after its TensorStorageMetadata class: its TensorProperties (dtype, layout, requires_grad,
# memory format, pin_memory: a tuple BUILD), its torch.Size and its list of chunks, up to the list's first item (the
# chunk records are proven apart: `_FIRST_CHUNK`). Groups: the 'properties' key, TensorProperties, the dtype, the
# layout, requires_grad, the memory format, pin_memory, the 'size' key, torch.Size, the dims, the 'chunks' key.
_ENTRY_HEAD = re.compile(_NEW + _G + _G + rb"\)\x81\x94\(" + _G + _G + rb"([\x88\x89])" + _G + rb"([\x88\x89])t\x94b"
                         + _size(_G, _G) + _G + rb"\]\x94", re.S)
_FIRST_CHUNK = re.compile(rb"\(?" + _G + _CHUNK.pattern, re.S)      # a list's first chunk, after its MARK if any

_ROW_BYTES = 8      # charged per number or reference stored in a column
_RECORD_BYTES = 80  # charged per stand-in record a fast path makes (unpickle's estimate for one)
_KNOWN_DIMS = 1 << 16   # distinct dims remembered per load (forgotten all at once past this: a few MiB)
_KNOWN_SHAPES = 256     # compiled record patterns remembered per load


def _value(name: bytes) -> bytes:
    """A non-negative int whose value is that of its group's bytes, little-endian, shifted right by 8: BININT1/2 and
    BININT with their opcode byte, LONG1 from its length byte (group `name` holds the LONG1 opcode). Decoded with
    `_values`, in C."""
    return rb"(?P<%s>\x8a)?((?(%s)(?:%s)|(?:%s)))" % (name, name, _LONG1, _BININT)


def _values(raws) -> "map":
    return map(rshift, map(int.from_bytes, raws, repeat("little")), repeat(8))


def _int(raw: bytes) -> int:
    """The value of one matched non-negative int opcode."""
    op = raw[0]
    if op == 0x4B:
        return raw[1]
    if op == 0x4D:
        return _u16(raw, 1)[0]
    return int.from_bytes(raw[1:] if op == 0x4A else raw[2:], "little")


def _ref(raw: bytes) -> int:
    return raw[1] if raw[0] == 0x68 else _u32(raw, 1)[0]


def _inline(raw: bytes) -> Optional[str]:
    """The string of a matched SHORT_BINUNICODE + MEMOIZE (`_NAME`), decoded as the general machine decodes it; None
    when the match is not the whole string (its length byte disagrees) or it is not UTF-8."""
    if raw[1] != len(raw) - 3:
        return None
    try:
        return str(raw[2:-1], "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def _name_bytes(raw: bytes) -> int:
    """What the general machine charges for an fqn string a storage row names inline (none for a reference)."""
    return 0 if raw[0] != 0x8C else 64 + 4 * (len(raw) - 3)


class _Dims(dict):
    """The ints of a matched dims group (its raw bytes, closing opcodes or not) as one shared tuple: a tensor's
    chunks repeat their sizes and the ranks' offsets, so most are decoded once and each chunk keeps a pointer."""

    def __missing__(self, raw: bytes) -> Tuple[int, ...]:
        if len(self) >= _KNOWN_DIMS:
            self.clear()
        value = self[raw] = tuple(_int(m.group()) for m in _INTS.finditer(raw))
        return value


def _dims_pattern(n: int) -> bytes:
    """The ints of an n-dim torch.Size as one group, and its closing opcodes."""
    if n == 0:
        return rb"()\)"
    if n <= 3:
        return rb"((?:" + _INT + rb"){%d})" % n + bytes([0x84 + n]) + rb"\x94"
    return rb"\(((?:" + _INT + rb"){%d})t\x94" % n


def _size_slots(n: int) -> int:
    """Memo entries a torch.Size of n dims makes (TUPLEn or TUPLE, TUPLE1, REDUCE; an empty tuple is not memoized)."""
    return 2 if n == 0 else 3


class ChunkRows(Record):
    """Stands in for `count` consecutive ChunkStorageMetadata records of `ndim` dims: the k-th one's offsets and
    sizes are `Columns.chunk_dims[start + 2k]` and `[start + 2k + 1]`."""

    __slots__ = ("start", "count", "ndim")

    def __init__(self, start: int, count: int, ndim: int):
        super().__init__()
        self.start, self.count, self.ndim = start, count, ndim


class StorageRows(Record):
    """Stands in for consecutive storage_data items (a key; its value is None), read into `Columns` rows `start`,
    `start + 1`, ... (`count` of them: the items `LeftOut` leaves out are only counted)."""

    __slots__ = ("start", "count")

    def __init__(self, start: int, count: int):
        super().__init__()
        self.start, self.count = start, count


class Columns:
    """What the fast paths read: pointers to shared tuples and arrays of numbers instead of objects.

    Chunk records: `chunk_dims`, offsets then sizes of each (8 bytes a pointer). storage_data rows: `row_offsets`
    (the chunk's offsets, 8 bytes), `row_places` (its file and transforms, an index into `places`, 4 bytes),
    `row_blob_offsets` and `row_lengths` (its blob, 16 bytes), and `rows_of[fqn]` (4 bytes a row): 32 bytes a
    row. The general machine's rows are added (`add_row`) after the load, so every chunk's row is here."""

    def __init__(self) -> None:
        self.chunk_dims: List[Tuple[int, ...]] = []
        self.row_offsets: List[Tuple[int, ...]] = []
        self.row_places = array("I")
        self.row_blob_offsets = array("q")
        self.row_lengths = array("q")
        self.rows_of: Dict[str, array] = defaultdict(lambda: array("I"))
        # (relative_path, transform_descriptors, tensor_key): what ChunkTable.places holds. Rows have no tensor key.
        self.places: List[Tuple[str, Tuple[str, ...], str]] = []
        self._place_id: Dict[Tuple[str, Tuple[str, ...], str], int] = {}
        # The rows `LeftOut` left out: how many each fqn and each place id has, and the sum of hash((fqn, offsets))
        # over them, which `metadata.py` checks against the left-out tensors' chunks.
        self.left_out_rows: Counter = Counter()
        self.left_out_places: Counter = Counter()
        self.left_out_hash = 0

    def place_id(self, path: str, transforms: Tuple[str, ...] = (), tensor_key: str = "") -> int:
        key = (path, transforms, tensor_key)
        found = self._place_id.get(key)
        if found is None:
            found = self._place_id[key] = len(self.places)
            self.places.append(key)
        return found

    def add_row(self, fqn: str, offsets: Tuple[int, ...], place: int, blob_offset: int, length: int) -> None:
        """One row the general machine decoded (already checked by the caller)."""
        self.rows_of[fqn].append(len(self.row_offsets))
        self.row_offsets.append(offsets)
        self.row_places.append(place)
        self.row_blob_offsets.append(blob_offset)
        self.row_lengths.append(length)

    def leave_out(self, fqns: List[str], offsets: List[Tuple[int, ...]], places: List[int]) -> None:
        """Rows of tensors `LeftOut` leaves out: counted, not kept."""
        self.left_out_rows.update(fqns)
        self.left_out_places.update(places)
        self.left_out_hash += sum(map(hash, zip(fqns, offsets)))

    @property
    def row_count(self) -> int:
        return len(self.row_offsets)


_GROUPS = re.Match.groups
_FIRST_BYTE = itemgetter(0)


class _Strings:
    """The strings memo references name (the fqns and files of storage rows), each asked of the memo once while no
    entry is overwritten (`unpickle.Spec.fast_paths`), and the place id of each file."""

    def __init__(self, columns: Columns, left_out: LeftOut):
        self.columns, self.left_out, self.overwrites = columns, left_out, 0
        self.names: Dict[bytes, str] = {}
        self.kept: Dict[bytes, bool] = {}       # whether the fqn's rows are kept (not `LeftOut`)
        self.places: Dict[bytes, int] = {}

    def checked(self, get: Callable[[int], Any], overwrites: int, fqn_refs: List[bytes], path_refs: List[bytes]) -> int:
        """How many rows, from the first, name their fqn and (non-empty) file by strings."""
        if overwrites != self.overwrites:
            self.names.clear()
            self.kept.clear()
            self.places.clear()
            self.overwrites = overwrites
        names, places = self.names, self.places
        bad = set()
        for raw in set(fqn_refs).difference(names):
            value = _inline(raw) if raw[0] == 0x8C else get(_ref(raw))
            if type(value) is str:
                names[raw] = value
                self.kept[raw] = not self.left_out.guesses(value)
            else:
                bad.add(raw)
        for raw in set(path_refs).difference(places):
            value = get(_ref(raw))
            if type(value) is str and value:
                places[raw] = self.columns.place_id(value)
            else:
                bad.add(raw)
        if not bad:
            return len(fqn_refs)
        return next(k for k, refs in enumerate(zip(fqn_refs, path_refs)) if not bad.isdisjoint(refs))


class _Reader:
    """The fast paths of one `.metadata` load (`unpickle.Spec.fast_paths`): `chunk_run` and `storage_run` each read
    a run of records after the general machine fetched their class, into `columns`."""

    def __init__(self, left_out: LeftOut) -> None:
        self.columns = Columns()
        self.dims = _Dims()
        self.strings = _Strings(self.columns, left_out)
        self.shapes: Dict[Tuple[Any, ...], "re.Pattern"] = {}

    def shape(self, key: Tuple[Any, ...], build: Callable[[], bytes]) -> "re.Pattern":
        """The compiled pattern of one proven record shape (`build()`), made once per load."""
        found = self.shapes.get(key)
        if found is None:
            if len(self.shapes) >= _KNOWN_SHAPES:
                self.shapes.clear()
            found = self.shapes[key] = re.compile(build(), re.S)
        return found

    def size_of(self, get: Callable[[int], Any], key_ref: bytes, size_ref: bytes, raw: bytes, key: str):
        """The dims of a generally matched torch.Size, when its references are `key` and torch.Size."""
        if get(_ref(key_ref)) != key or get(_ref(size_ref)) is not sp.SIZE_CALL:
            return None
        return self.dims[raw]

    @staticmethod
    def next_class(buf: bytes, pos: int, end: int, get: Callable[[int], Any], cls: type) -> Optional[bytes]:
        """The next record's reference to `cls` (the bytes after an optional FRAME), or None."""
        m = _NEXT.match(buf, pos, end)
        return m.group(1) if m is not None and get(_ref(m.group(1))) is cls else None

    def chunk_run(self, buf: bytes, pos: int, end: int, get: Callable[[int], Any], overwrites: int):
        m = _CHUNK.match(buf, pos, end)
        if m is None:
            return None
        k1, s1, raw1, k2, s2, raw2 = m.groups()
        offsets, sizes = self.size_of(get, k1, s1, raw1, "offsets"), self.size_of(get, k2, s2, raw2, "sizes")
        if offsets is None or sizes is None or len(offsets) != len(sizes):
            return None
        n, chunk_dims = len(offsets), self.columns.chunk_dims
        start = len(chunk_dims)
        chunk_dims += (offsets, sizes)
        resume, count = m.end(), 1
        cls_ref = self.next_class(buf, resume, end, get, sp.ChunkStorageMetadata)
        if cls_ref is not None:
            shape = self.shape((0, cls_ref, k1, s1, k2, s2, n), lambda: (
                _FRAME + re.escape(cls_ref) + _NEW + re.escape(k1 + s1) + _dims_pattern(n) + _SIZE_END
                + re.escape(k2 + s2) + _dims_pattern(n) + _SIZE_END + rb"ub"))
            matches = list(iter(shape.scanner(buf, resume, end).match, None))
            if matches:
                chunk_dims.extend(map(self.dims.__getitem__, chain.from_iterable(map(_GROUPS, matches))))
                count += len(matches)
                resume = matches[-1].end()
        slots = (2 + 2 * _size_slots(n)) * count
        return resume, (ChunkRows(start, count, n),), slots, _ROW_BYTES * 2 * count

    def storage_first(self, buf: bytes, pos: int, end: int, get: Callable[[int], Any]):
        """The first record of a run, proven: (its match, its offsets), or None."""
        m = _STORAGE.match(buf, pos, end)
        if m is None:
            return None
        fqn_key, _, index_key, off_key, size_ref, raw, info_ref, path_key, _, off_key2, _, length_key, _ = m.groups()
        offsets = self.size_of(get, off_key, size_ref, raw, "offset")
        if (offsets is None or get(_ref(fqn_key)) != "fqn" or get(_ref(index_key)) != "index"
                or get(_ref(info_ref)) is not sp.StorageInfo or get(_ref(path_key)) != "relative_path"
                or get(_ref(off_key2)) != "offset" or get(_ref(length_key)) != "length"):
            return None
        return m, offsets

    def storage_rest(self, buf: bytes, pos: int, end: int, first: "re.Match", cls_ref: bytes) -> List["re.Match"]:
        """The records after the first, up to the first that differs from its shape (any number of dims)."""
        fqn_key, _, index_key, off_key, size_ref, _, info_ref, path_key, _, off_key2, _, length_key, _ = first.groups()
        shape = self.shape((1, cls_ref, fqn_key, index_key, off_key, size_ref, info_ref, path_key, off_key2,
                            length_key), lambda: (
            _FRAME + re.escape(cls_ref) + _NEW + re.escape(fqn_key) + _NAME + re.escape(index_key)
            + _INT + re.escape(off_key + size_ref) + _DIMS_GENERAL + _SIZE_END + rb"ub" + _FRAME
            + re.escape(info_ref) + _NEW + re.escape(path_key) + rb"(" + _GET + rb")" + re.escape(off_key2)
            + _value(b"b") + re.escape(length_key) + _value(b"l") + rb"ub"))
        return list(iter(shape.scanner(buf, pos, end).match, None))

    def storage_run(self, buf: bytes, pos: int, end: int, get: Callable[[int], Any], overwrites: int):
        proven = self.storage_first(buf, pos, end, get)
        if proven is None:
            return None
        m, offsets = proven
        _, fqn_ref, _, _, _, dims_raw, _, _, path_ref, _, blob_raw, _, length_raw = m.groups()
        fqn_refs, dims_in, path_refs = [fqn_ref], [dims_raw], [path_ref]
        blob_offsets, lengths = [_int(blob_raw)], [_int(length_raw)]
        matches: List["re.Match"] = []
        cls_ref = self.next_class(buf, m.end(), end, get, sp.MetadataIndex)
        if cls_ref is not None:
            matches = self.storage_rest(buf, m.end(), end, m, cls_ref)
            if matches:
                more = list(zip(*map(_GROUPS, matches)))
                fqn_refs += more[0]
                dims_in += more[1]
                path_refs += more[2]
                blob_offsets += _values(more[4])
                lengths += _values(more[6])
        count = self.strings.checked(get, overwrites, fqn_refs, path_refs)
        if count == 0:
            return None
        # Up to the first record that refers to something else: the general machine reads from there on.
        resume = m.end() if count == 1 else matches[count - 2].end()
        names, dims_in, start = fqn_refs[:count], dims_in[:count], self.columns.row_count
        self.add_rows(names, list(map(self.dims.__getitem__, dims_in)), path_refs, blob_offsets, lengths)
        # Memo entries: 4 for the two records and their state dicts, a torch.Size's (`_size_slots`), and one more
        # for an fqn named inline.
        inline = list(map(_FIRST_BYTE, names)).count(0x8C)
        slots = 7 * count - dims_in.count(b")") + inline
        charge = _ROW_BYTES * 4 * count + (sum(map(_name_bytes, names)) if inline else 0)
        # SETITEMS takes key, value pairs: the marker stands for every key, its value is unused.
        return resume, (StorageRows(start, self.columns.row_count - start), None), slots, charge

    def add_rows(self, fqn_refs: List[bytes], offsets: List[Tuple[int, ...]], path_refs: List[bytes],
                 blob_offsets: List[int], lengths: List[int]) -> None:
        """The first `len(fqn_refs)` rows read, into the columns (their references checked by `_Strings.checked`);
        the rows of tensors `LeftOut` leaves out only counted."""
        columns, strings, count = self.columns, self.strings, len(fqn_refs)
        columns_in = [fqn_refs, offsets, path_refs[:count], blob_offsets[:count], lengths[:count]]
        if strings.left_out.top_keys:
            kept = list(map(strings.kept.__getitem__, fqn_refs))
            if not all(kept):
                left = list(map(not_, kept))
                columns.leave_out(list(map(strings.names.__getitem__, compress(fqn_refs, left))),
                                  list(compress(offsets, left)),
                                  list(map(strings.places.__getitem__, compress(columns_in[2], left))))
                columns_in = [list(compress(column, kept)) for column in columns_in]
        fqn_refs, offsets, path_refs, blob_offsets, lengths = columns_in
        start = columns.row_count
        rows_of = columns.rows_of
        for raw_fqn, row in zip(fqn_refs, range(start, start + len(fqn_refs))):
            rows_of[strings.names[raw_fqn]].append(row)
        columns.row_offsets += offsets
        columns.row_places.extend(map(strings.places.__getitem__, path_refs))
        columns.row_blob_offsets.extend(blob_offsets)
        columns.row_lengths.extend(lengths)


class _Entries:
    """The fast path for one state_dict_metadata entry (a `TensorStorageMetadata` with its TensorProperties, torch.Size
    and chunk list) after the general machine fetched its class: its references proven (once per shape while no memo
    entry is overwritten), its chunk list read by a pattern compiled for that shape, its chunks into the columns as
    one `ChunkRows`. One entry at a time: the key the general machine reads next is memoized, and later records may
    refer to it (storage rows do when one process saved the checkpoint)."""

    def __init__(self, reader: "_Reader"):
        self.reader = reader
        self.proven: Dict[Tuple[bytes, ...], Tuple[bytes, bytes, bytes]] = {}
        self.properties: Dict[Tuple[bytes, ...], sp.TensorProperties] = {}
        self.overwrites = 0

    def run(self, buf: bytes, pos: int, end: int, get: Callable[[int], Any], overwrites: int):
        if overwrites != self.overwrites:
            self.proven.clear()
            self.properties.clear()
            self.overwrites = overwrites
        m = _ENTRY_HEAD.match(buf, pos, end)
        if m is None:
            return None
        props_key, tp_ref, dtype_ref, layout_ref, grad, memfmt_ref, pin, size_key, size_ref, dims_raw, chunks_key = \
            m.groups()
        refs = (props_key, tp_ref, layout_ref, memfmt_ref, size_key, size_ref, chunks_key)
        chunk_refs = self.proven.get(refs) or self.prove(buf, m.end(), end, get, refs)
        props = self.props(get, refs, dtype_ref, grad, pin)
        if chunk_refs is None or props is None:
            return None
        shape = self.reader.dims[dims_raw]
        taken = self.chunks(buf, m.end(), end, chunk_refs, len(shape))
        if taken is None:
            return None
        resume, dims = taken
        n, chunk_dims, count = len(shape), self.reader.columns.chunk_dims, len(dims) // 2
        record = sp.TensorStorageMetadata()
        record.properties, record.size = props, shape
        record.chunks = [ChunkRows(len(chunk_dims), count, n)] if count else []
        record.built = True
        chunk_dims += dims
        # Memo entries: the record, its state dict, TensorProperties and its state tuple, the torch.Size, the list,
        # and each chunk's record, state dict and two torch.Sizes.
        slots = 5 + _size_slots(n) + count * (2 + 2 * _size_slots(n))
        return resume, (record,), slots, 4 * _RECORD_BYTES + _ROW_BYTES * 2 * count

    def chunks(self, buf: bytes, pos: int, end: int, chunk_refs: bytes, n: int):
        """(the end of the entry, its chunks' dims) when the chunk list at `pos` is as pickle writes it (no item, one
        and APPEND, or 2-1000 between MARK and APPENDS) of records of `n` dims each, and the entry ends after it."""
        chunk = self.reader.shape((2, chunk_refs, n), lambda: (
            chunk_refs[0] + _NEW + chunk_refs[1] + _dims_pattern(n) + _SIZE_END + chunk_refs[2] + _dims_pattern(n)
            + _SIZE_END + rb"ub"))
        marked = buf[pos:pos + 1] == b"("
        matches = list(iter(chunk.scanner(buf, pos + marked, end).match, None))
        count = len(matches)
        after = matches[-1].end() if matches else pos
        closing = buf[after:after + 3]
        if not (closing == b"eub" if marked else closing == b"aub" if count == 1 else count == 0 and
                closing[:2] == b"ub") or (marked and not 2 <= count <= 1000):
            return None
        dims = list(map(self.reader.dims.__getitem__, chain.from_iterable(map(_GROUPS, matches))))
        return after + (3 if count else 2), dims

    def prove(self, buf: bytes, pos: int, end: int, get: Callable[[int], Any], refs: Tuple[bytes, ...]):
        """The chunk records' references (escaped for a pattern) after the head whose references are `refs`, once
        every reference is checked, or None. They are proven from the list's first record: a list without chunks has
        none to prove, and the general machine reads it."""
        props_key, tp_ref, layout_ref, memfmt_ref, size_key, size_ref, chunks_key = refs
        c = _FIRST_CHUNK.match(buf, pos, end)
        if c is None:
            return None
        csm_ref, off_key, size_ref1, _, sizes_key, size_ref2, _ = c.groups()
        if (get(_ref(props_key)) != "properties" or get(_ref(tp_ref)) is not sp.TensorProperties
                or get(_ref(size_key)) != "size" or get(_ref(size_ref)) is not sp.SIZE_CALL
                or get(_ref(chunks_key)) != "chunks" or get(_ref(csm_ref)) is not sp.ChunkStorageMetadata
                or get(_ref(off_key)) != "offsets" or get(_ref(sizes_key)) != "sizes"
                or size_ref1 != size_ref or size_ref2 != size_ref):
            return None
        if len(self.proven) >= _KNOWN_SHAPES:
            self.proven.clear()
        found = self.proven[refs] = (re.escape(csm_ref), re.escape(off_key + size_ref), re.escape(sizes_key + size_ref))
        return found

    def props(self, get: Callable[[int], Any], refs: Tuple[bytes, ...], dtype_ref: bytes, grad: bytes, pin: bytes):
        """The TensorProperties an entry's references and flags make (checked by its own `setstate`, as BUILD
        would), one per distinct kind; None when the general machine would refuse it."""
        key = (dtype_ref, refs[2], refs[3], grad, pin)
        found = self.properties.get(key)
        if found is None:
            found = sp.TensorProperties()
            try:
                found.setstate((get(_ref(dtype_ref)), get(_ref(refs[2])), grad == b"\x88", get(_ref(refs[3])),
                                pin == b"\x88"))
            except ValueError:
                return None
            found.built = True
            if len(self.properties) >= _KNOWN_SHAPES:
                self.properties.clear()
            self.properties[key] = found
        return found


def handlers(spec: sp._Spec, left_out: LeftOut = NOTHING_LEFT_OUT) -> Tuple[Dict[int, Callable], Columns]:
    """The fast paths for a `.metadata` load by `spec`, and the columns they fill (but the rows of tensors
    `left_out` leaves out: `Columns.leave_out`)."""
    reader = _Reader(left_out)
    return {id(sp.ChunkStorageMetadata): reader.chunk_run, id(sp.MetadataIndex): reader.storage_run,
            id(sp.TensorStorageMetadata): _Entries(reader).run}, reader.columns
