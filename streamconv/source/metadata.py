"""Decode a DCP `.metadata` file into streamconv's frozen model (`streamconv/model.py`), without torch.

`load_metadata` reads the pickle through the allow-listed unpickler, validates every field it uses, and
attaches each chunk's blob location (storage_data is keyed by MetadataIndex(fqn, chunk offsets)).
`find_metadata_file` tells which metadata file a checkpoint folder has, or explains why it is not one.
"""
from __future__ import annotations

import os
import re
from array import array
from functools import partial
from itertools import chain, repeat
from operator import eq
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from .. import dtypes, failpoints
from ..errors import CheckpointError
from ..fs import location
from .io import RangeReader
from ..model import (NOTHING_LEFT_OUT, BlobLocation, BytesEntry, CheckpointMetadata, ChunkTable, LeftOut,
                     LeftOutChunks, PathElement, TensorEntry, numel)
from . import fast_records, safe_pickle as sp
from .unpickle import describe

METADATA_NAME = ".metadata"
# FileSystemWriter with use_collectives=False: every rank writes its own `__{rank}.metadata`.
# Rank numbers as torch writes them (no leading zeros); a name with more digits than any real world size is
# not a rank file.
RANK_METADATA = re.compile(r"__(0|[1-9][0-9]{0,8})\.metadata")

# storage_data key: (fqn, chunk offsets) for tensor chunks, (fqn, None) for bytes items.
_StorageKey = Tuple[str, Optional[Tuple[int, ...]]]


@dataclass
class _TensorDecl:
    dtype: str
    shape: Tuple[int, ...]
    dims: List[Tuple[int, ...]]  # offsets, sizes, offsets, sizes, ... of each chunk as listed (shared tuples)
    seen: Optional[set] = None   # the (offsets, sizes) pairs, built when per-rank files are merged

    def pairs(self):
        return zip(self.dims[0::2], self.dims[1::2])


@dataclass
class _Decoded:
    """One metadata file, validated, still keyed the way torch keys it."""

    name: str
    entries: Dict[str, Optional[_TensorDecl]]      # fqn -> tensor, or None for a bytes item; in file order
    paths: Dict[str, Tuple[PathElement, ...]]
    locations: "_Locations"
    version: Optional[str]
    torch_version_hint: str
    files: set = field(default_factory=set)
    left_out: LeftOut = NOTHING_LEFT_OUT     # whose chunk locations were left out


# ---------------------------------------------------------------------------------------------------------
# public API


def load_metadata(reader: RangeReader, metadata_name: str = METADATA_NAME,
                  left_out: LeftOut = NOTHING_LEFT_OUT) -> CheckpointMetadata:
    """Decode `metadata_name` (relative to the reader's folder) into a CheckpointMetadata.

    Given `__0.metadata` (a checkpoint saved with use_collectives=False, as `find_metadata_file` reports it),
    the per-rank files `__0.metadata`, `__1.metadata`, ... are read until one is missing and merged: tensor
    chunks are united (a chunk saved by several ranks is kept once, from the lowest rank), bytes items and
    paths come from the lowest rank that has them.

    `left_out`: tensors whose chunk locations may be left undecoded (`LeftOutChunks`) because planning leaves them
    out; not for per-rank files, whose merge needs every location.
    """
    rank_match = RANK_METADATA.fullmatch(metadata_name)
    if rank_match and rank_match.group(1) == "0":
        decoded = _merge_ranks([_decode(reader, name) for name in _rank_metadata_names(reader)])
    else:
        decoded = _decode(reader, metadata_name, left_out)
        if decoded.left_out.top_keys and not _left_out_confirmed(decoded):
            decoded = _decode(reader, metadata_name)    # a guess the paths do not confirm: everything, again
    return _build(decoded)


def find_metadata_file(root: "str | os.PathLike[str]") -> str:
    """The metadata file name in checkpoint folder `root`: ".metadata", or "__0.metadata" for a checkpoint saved
    with use_collectives=False (load_metadata then merges all ranks). CheckpointError explaining what a DCP
    folder looks like otherwise."""
    root = os.fspath(root)
    where = location.at(root)
    if not where.is_dir():
        what = "is not a directory" if where.exists() else "does not exist"
        raise CheckpointError(f"{root} {what}; pass the DCP checkpoint folder (the one holding `.metadata`)")
    if _check_regular(root, METADATA_NAME):
        return METADATA_NAME
    names = sorted(where.names())
    ranks = sorted(int(m.group(1)) for m in map(RANK_METADATA.fullmatch, names) if m)
    if ranks:
        # Ranks must be 0..n-1. Compared against the files present, so a name like `__10000000.metadata`
        # costs nothing more than any other file.
        if ranks[-1] != len(ranks) - 1:
            raise CheckpointError(
                f"{root}: per-rank metadata (saved with use_collectives=False) is missing for rank(s) "
                f"[{_missing_ranks(ranks)}]; found `__<rank>.metadata` for ranks [{_rank_list(ranks)}]. "
                "Copy the missing files.")
        for rank in ranks:
            _check_regular(root, f"__{rank}.metadata")
        return "__0.metadata"
    raise CheckpointError(_not_a_checkpoint_message(root, names))


def _check_regular(root: str, name: str) -> bool:
    """True if `name` is a regular file in `root`, False if absent; CheckpointError for a FIFO, device or
    directory (opening a FIFO would block forever). stat does not open the file."""
    where = location.at(root)
    path = where.join(name)
    try:
        entry = where.entry(name)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    if entry is None or entry.detail == "a symbolic link to a missing file":
        return False
    if entry.kind != location.FILE:
        kind = "a directory" if entry.kind == location.DIRECTORY else entry.detail
        raise CheckpointError(f"{path} is {kind}, not a regular file; streamconv reads checkpoint metadata "
                              "only from regular files")
    return True


def _rank_list(ranks: List[int], shown: int = 10) -> str:
    text = ", ".join(map(str, ranks[:shown]))
    return text + (f", ... ({len(ranks)} in all)" if len(ranks) > shown else "")


def _missing_ranks(ranks: List[int], shown: int = 10) -> str:
    """The first few numbers absent from sorted `ranks` within 0..max, without building the whole range."""
    missing: List[int] = []
    expected = 0
    for rank in ranks:
        while expected < rank and len(missing) <= shown:
            missing.append(expected)
            expected += 1
        expected = rank + 1
    total = ranks[-1] + 1 - len(ranks)
    text = ", ".join(map(str, missing[:shown]))
    return text + (f", ... ({total} in all)" if total > shown else "")


# ---------------------------------------------------------------------------------------------------------
# decoding one file


def _decode(reader: RangeReader, name: str, left_out: LeftOut = NOTHING_LEFT_OUT) -> _Decoded:
    try:
        size_bytes = reader.size(name)
    except CheckpointError as exc:
        raise CheckpointError(f"{name}: metadata file not found ({exc}); find_metadata_file(folder) tells which "
                              "metadata file a checkpoint folder has") from exc
    if not size_bytes:
        raise CheckpointError(f"{name}: file is empty (the save was interrupted or the copy is incomplete)")
    # Streamed: a corrupt or hostile file fails at its first bad byte, and a huge one is never held whole.
    pickled = sp.load_metadata_pickle(source=name, read=lambda offset, length: reader.read(name, offset, length),
                                      size=size_bytes,
                                      fast=partial(fast_records.handlers, left_out=left_out) if fast_records_on() else None)
    md = pickled.root
    columns = pickled.columns if pickled.columns is not None else fast_records.Columns()
    if not isinstance(md, sp.Metadata):
        raise CheckpointError(f"{name}: holds a {type(md).__name__}, not a DCP Metadata object")

    sdm = md.get("state_dict_metadata")
    if not isinstance(sdm, dict):
        raise CheckpointError(f"{name}: state_dict_metadata is missing or not a dict")
    entries: Dict[str, Optional[_TensorDecl]] = {}
    for fqn, item in sdm.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{name}: state_dict_metadata key {describe(fqn)} is not a string")
        entries[fqn] = _tensor_decl(name, fqn, item, columns)
    columns.chunk_dims = []     # copied into each tensor's declaration

    locations, files = _storage_locations(name, md.get("storage_data"), columns, left_out)
    version = md.get("version")
    if version is not None and not isinstance(version, str):
        raise CheckpointError(f"{name}: version {describe(version)} is not a string")
    locations.check(entries)
    return _Decoded(name, entries, _planner_paths(md.get("planner_data")), locations, version,
                    _torch_version_hint(md, pickled.globals_seen), files, left_out)


def fast_records_on() -> bool:
    """Whether torch's per-chunk records are read in bulk (fast_records.py); STREAMCONV_NO_FAST_PATHS=1 (or all)
    turns it off with the IO fast paths, so `make test-no-fast-paths` runs the general machine on every test."""
    return failpoints.no_fast_paths().strip().lower() not in ("1", "all")


def _tensor_decl(name: str, fqn: str, item: Any, columns: fast_records.Columns) -> Optional[_TensorDecl]:
    if isinstance(item, sp.BytesStorageMetadata):
        return None
    if not isinstance(item, sp.TensorStorageMetadata):
        raise CheckpointError(
            f"{name}: entry {describe(fqn)} is a {type(item).__name__}, expected tensor or bytes metadata")
    where = f"{name}: tensor {describe(fqn)}"
    props = item.get("properties")
    dtype = props.get("dtype") if isinstance(props, sp.TensorProperties) else None
    if not isinstance(dtype, sp.TorchDtype):
        raise CheckpointError(f"{where}: properties have no torch dtype (found {describe(props)})")
    shape = _dims(where, "size", item.get("size"))
    chunks_in = item.get("chunks")
    if not isinstance(chunks_in, list):
        raise CheckpointError(f"{where}: chunks is not a list")
    dims: List[Tuple[int, ...]] = []
    for chunk in chunks_in:
        if type(chunk) is fast_records.ChunkRows:
            if chunk.ndim != len(shape):
                raise CheckpointError(f"{where}: chunks have {chunk.ndim} dims, the tensor's shape {list(shape)} has "
                                      f"{len(shape)}")
            dims += columns.chunk_dims[chunk.start:chunk.start + 2 * chunk.count]   # numbers checked there
            continue
        if not isinstance(chunk, sp.ChunkStorageMetadata):
            raise CheckpointError(f"{where}: chunk is a {type(chunk).__name__}, not ChunkStorageMetadata")
        offsets = _dims(where, "chunk offsets", chunk.get("offsets"))
        sizes = _dims(where, "chunk sizes", chunk.get("sizes"))
        if not len(offsets) == len(sizes) == len(shape):
            raise CheckpointError(
                f"{where}: chunk offsets {offsets} / sizes {sizes} do not match the tensor's rank {len(shape)}")
        dims += (offsets, sizes)
    return _TensorDecl(dtype.name, shape, dims)


def _dims(where: str, what: str, value: Any) -> Tuple[int, ...]:
    # torch.Size decodes to a tuple (safe_pickle maps it to `tuple`); plain lists are accepted as well.
    if isinstance(value, (tuple, list)) and len(value) <= sp.MAX_DIMS:
        for v in value:
            if type(v) is not int or v < 0:
                break
        else:
            return tuple(value)
    raise CheckpointError(f"{where}: {what} {describe(value)} is not a tuple of non-negative ints")


def _storage_locations(name: str, storage_data: Any, columns: fast_records.Columns,
                       left_out: LeftOut) -> Tuple["_Locations", set]:
    if not isinstance(storage_data, dict):
        raise CheckpointError(
            f"{name}: storage_data is missing (found {type(storage_data).__name__}); this metadata was not "
            "written by FileSystemWriter, so streamconv does not know where the data is")
    locations = _Locations(name, columns)
    files = set()
    for index, info in storage_data.items():
        if type(index) is fast_records.StorageRows:
            continue                        # read into the columns by a fast path, numbers already checked
        if not (isinstance(index, sp.MetadataIndex) and isinstance(info, sp.StorageInfo)):
            raise CheckpointError(
                f"{name}: storage_data maps {type(index).__name__} -> {type(info).__name__}, "
                "expected MetadataIndex -> _StorageInfo")
        fqn = index.get("fqn")
        offset = index.get("offset")  # absent for bytes items (left at the class default None)
        if not isinstance(fqn, str):
            raise CheckpointError(f"{name}: storage_data key has fqn {describe(fqn)}, expected a string")
        location = _blob_location(name, fqn, info)
        if offset is None:
            locations.add((fqn, None), location)
            files.add(location.relative_path)
            continue
        offsets = _dims(f"{name}: storage for {describe(fqn)}", "offset", offset)
        place = columns.place_id(location.relative_path, location.transform_descriptors)
        if left_out.guesses(fqn):
            columns.leave_out([fqn], [offsets], [place])
        else:
            columns.add_row(fqn, offsets, place, location.offset, location.length)
    files.update(path for path, _, _ in columns.places)
    return locations, files


class _Locations:
    """Where each chunk's blob is: the rows of `columns` (fast_records.py: every tensor chunk's storage_data item,
    32 bytes each), found through one tensor's index at a time, and in a dict the bytes items and what per-rank
    files add when they are merged."""

    def __init__(self, name: str, columns: fast_records.Columns):
        self.name, self.columns = name, columns
        self.built: Dict[_StorageKey, BlobLocation] = {}
        self.built_fqns: set = set()
        self._indexed: Tuple[Optional[str], Dict[Tuple[int, ...], int]] = (None, {})

    def add(self, key: _StorageKey, location: BlobLocation) -> None:
        if key in self.built:
            raise _duplicate(self.name, key, self.built[key], location)
        self.built[key] = location
        self.built_fqns.add(key[0])

    def location(self, row: int) -> BlobLocation:
        c = self.columns
        path, transforms, _ = c.places[c.row_places[row]]
        return BlobLocation(path, c.row_blob_offsets[row], c.row_lengths[row], transforms)

    def index_of(self, fqn: str) -> Dict[Tuple[int, ...], int]:
        """{chunk offsets: row} of `fqn`'s rows, refusing a chunk listed twice (as `add` does)."""
        if self._indexed[0] == fqn:
            return self._indexed[1]
        rows = self.columns.rows_of.get(fqn, ())
        index = dict(zip(map(self.columns.row_offsets.__getitem__, rows), rows))
        if len(index) < len(rows):
            seen: Dict[Tuple[int, ...], int] = {}
            for row in sorted(rows):
                key = self.columns.row_offsets[row]
                if key in seen:
                    raise _duplicate(self.name, (fqn, key), self.location(seen[key]), self.location(row))
                seen[key] = row
        self._indexed = (fqn, index)
        return index

    def get(self, key: _StorageKey) -> Optional[BlobLocation]:
        found = self.built.get(key)
        if found is not None or key[1] is None or key[0] not in self.columns.rows_of:
            return found
        row = self.index_of(key[0]).get(key[1])
        return None if row is None else self.location(row)

    def check(self, entries: Dict[str, Any]) -> None:
        """Refuse a chunk listed twice among the rows of an fqn that is not a tensor (`_build` checks the others as
        it indexes them)."""
        for fqn in self.columns.rows_of:
            if entries.get(fqn) is None:
                self.index_of(fqn)

    def items(self):
        yield from self.built.items()
        for fqn in self.columns.rows_of:
            for offsets, row in self.index_of(fqn).items():
                yield (fqn, offsets), self.location(row)

    def setdefault(self, key: _StorageKey, location: BlobLocation) -> None:
        if self.get(key) is None:
            self.built[key] = location
            self.built_fqns.add(key[0])


def _duplicate(name: str, key: _StorageKey, first: BlobLocation, second: BlobLocation) -> CheckpointError:
    # torch's own dict cannot hold two (its MetadataIndex compares by fqn and offset); only a crafted or
    # corrupted pickle can. torch.load would take the last, an earlier version of us the first: refuse.
    fqn, offset = key
    return CheckpointError(
        f"{name}: storage_data lists {describe(fqn)}"
        f"{'' if offset is None else f' chunk at offsets {list(offset)}'} twice ({_where(first)} "
        f"and {_where(second)}); the metadata is corrupt or crafted")


def _blob_location(name: str, fqn: str, info: sp.StorageInfo) -> BlobLocation:
    path, offset, length = info.get("relative_path"), info.get("offset"), info.get("length")
    transforms = info.get("transform_descriptors") or ()
    if not (isinstance(path, str) and path and type(offset) is int and offset >= 0
            and type(length) is int and length >= 0):
        raise CheckpointError(
            f"{name}: storage for {describe(fqn)} has invalid file/offset/length {info.describe_fields()}")
    if not (isinstance(transforms, (list, tuple)) and all(isinstance(t, str) for t in transforms)):
        raise CheckpointError(
            f"{name}: storage for {describe(fqn)} has invalid transform_descriptors {describe(transforms)}")
    return BlobLocation(path, offset, length, tuple(transforms))


def _planner_paths(planner_data: Any) -> Dict[str, Tuple[PathElement, ...]]:
    # DefaultSavePlanner stores {fqn: path tuple}; a custom planner may store nothing (None) or something else.
    if not isinstance(planner_data, dict):
        return {}
    paths = {}
    for fqn, path in planner_data.items():
        if (isinstance(fqn, str) and isinstance(path, (tuple, list))
                and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)):
            paths[fqn] = tuple(path)
    return paths


def _torch_version_hint(md: sp.Metadata, globals_seen: frozenset) -> str:
    """Coarse writer version from the pickle's shape (see docs/dcp-format.md, version history)."""
    version = md.get("version")
    if version == "1.0.0":
        return ">=2.9"
    if version is not None:
        return f">=2.9 (DCP format version {version})"
    if md.has("storage_meta"):
        return "2.4-2.8"
    if f"{sp.OLD_PROPERTIES_MODULE}.TensorProperties" in globals_seen:
        return "2.0-2.2"
    if any(g.endswith(".TensorProperties") for g in globals_seen):
        return "2.3"
    return "2.0-2.3"  # no tensors, so nothing tells 2.0-2.2 from 2.3


def _left_out_confirmed(decoded: _Decoded) -> bool:
    """Whether the rows left out while decoding are exactly those of tensors planning leaves out: every tensor whose
    key was guessed has a planner_data path that confirms it (`LeftOut.confirms`), and the rows counted are its chunks, no more,
    none missing, none twice (their number and their sum of hash((fqn, offsets))). Else the file is decoded again
    without leaving anything out, which refuses a missing or duplicated row as it always did."""
    left_out, columns = decoded.left_out, decoded.locations.columns
    # Bytes items are never left out (their rows have no offsets): the guessed tensors.
    guessed = [fqn for fqn, decl in decoded.entries.items() if decl is not None and left_out.guesses(fqn)]
    if not all(left_out.confirms(fqn, decoded.paths.get(fqn, ())) for fqn in guessed):
        return False
    rows = columns.left_out_rows
    dims = [decoded.entries[fqn].dims for fqn in guessed]
    return (set(rows) <= set(guessed) and all(rows[fqn] == len(d) // 2 for fqn, d in zip(guessed, dims))
            and columns.left_out_hash == sum(sum(map(hash, zip(repeat(fqn), d[0::2]))) for fqn, d in zip(guessed, dims)))


# ---------------------------------------------------------------------------------------------------------
# per-rank metadata (use_collectives=False)


def _rank_metadata_names(reader: RangeReader) -> List[str]:
    names = ["__0.metadata"]
    while True:
        candidate = f"__{len(names)}.metadata"
        try:
            reader.size(candidate)
        except CheckpointError:
            return names
        names.append(candidate)


def _merge_ranks(ranks: List[_Decoded]) -> _Decoded:
    merged = ranks[0]
    for other in ranks[1:]:
        for fqn, decl in other.entries.items():
            mine = merged.entries.setdefault(fqn, decl)
            if mine is decl:
                continue
            if (mine is None) != (decl is None) or (
                    decl is not None and (mine.dtype, mine.shape) != (decl.dtype, decl.shape)):
                raise CheckpointError(
                    f"{other.name}: {describe(fqn)} is {_describe(decl)} but {merged.name} says {_describe(mine)}")
            if decl is not None:
                if mine.seen is None:
                    mine.seen = set(mine.pairs())
                for chunk in decl.pairs():
                    if chunk not in mine.seen:
                        mine.seen.add(chunk)
                        mine.dims += chunk
        for key, blob in other.locations.items():
            merged.locations.setdefault(key, blob)
        for fqn, path in other.paths.items():
            merged.paths.setdefault(fqn, path)
        merged.files |= other.files
    return merged


def _where(location: BlobLocation) -> str:
    return f"{describe(location.relative_path)} at offset {location.offset}"


def _describe(decl: Optional[_TensorDecl]) -> str:
    return "a bytes item" if decl is None else f"a {decl.dtype} tensor of shape {list(decl.shape)}"


# ---------------------------------------------------------------------------------------------------------
# to the model


# FileSystemWriter(serialization_format=SAFETENSORS): named by `inspect` and the notes.
SAFETENSORS_FLAVOR = (
    "safetensors-serialized DCP (FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS), torch >= "
    "2.8): each data file holds one safetensors blob with its tensors; torch's own FileSystemReader cannot load it")


def _packed(location: BlobLocation, fqn: str, dtype: str, sizes: Tuple[int, ...]) -> BlobLocation:
    """The chunk's location, naming it inside its file's safetensors blob when the checkpoint was saved with
    serialization_format=SAFETENSORS. torch then records the tensor's byte size as `length`, where a torch.save
    blob (a zip archive with its headers) is always longer than the tensor: equality tells the two apart, and
    the blob's header confirms it when the chunk is located."""
    itemsize = dtypes.BY_NAME[dtype].itemsize if dtype in dtypes.BY_NAME else 0
    numel = 1
    for s in sizes:
        numel *= s
    if itemsize and location.length == numel * itemsize:
        return replace(location, tensor_key=fqn)
    return location


def _build(decoded: _Decoded) -> CheckpointMetadata:
    tensors, byte_entries = [], []
    columns = decoded.locations.columns
    shared = _SharedColumns()
    for fqn, decl in decoded.entries.items():
        path = decoded.paths.get(fqn, ())
        if decl is None:
            byte_entries.append(BytesEntry(fqn, decoded.locations.get((fqn, None)), path))
            continue
        if decoded.left_out.guesses(fqn):       # confirmed by `_left_out_confirmed`
            tensors.append(TensorEntry(fqn, decl.dtype, decl.shape, LeftOutChunks(
                len(decl.shape), shared.of(array("q", chain.from_iterable(decl.dims))), len(decl.dims) // 2), path))
            decl.dims = []
            continue
        table = _table_of_rows(decoded.locations, fqn, decl) or _table_by_chunk(decoded, fqn, decl)
        table = ChunkTable(table.ndim, shared.of(table.boxes), table.blobs, shared.of(table.where), columns.places)
        tensors.append(TensorEntry(fqn, decl.dtype, decl.shape, table, path))
        decl.dims = []          # each tensor's decoded tuples go as soon as its table is built
    packed = any(key for _, _, key in columns.places)
    return CheckpointMetadata(
        tensors=tuple(tensors),
        byte_entries=tuple(byte_entries),
        version=decoded.version,
        torch_version_hint=decoded.torch_version_hint,
        files=tuple(sorted(decoded.files)),
        flavor=SAFETENSORS_FLAVOR if packed else "",
        left_out_blobs=_left_out_blobs(columns),
    )


def _left_out_blobs(columns: fast_records.Columns) -> Tuple[Tuple[Tuple[str, ...], int], ...]:
    """((transform descriptors, blobs), ...) of the rows left out while decoding."""
    found: Dict[Tuple[str, ...], int] = {}
    for place, count in columns.left_out_places.items():
        descriptors = columns.places[place][1]
        found[descriptors] = found.get(descriptors, 0) + count
    return tuple(sorted(found.items()))


class _SharedColumns:
    """One array for equal columns: a layer's weights share their chunk boxes and files with every other layer's of
    that shape, and an optimizer's moments with their parameter's (on DeepSeek-V3 with AdamW's state, 1.4M chunks'
    boxes in a few hundred arrays). ChunkTables never change their columns."""

    def __init__(self) -> None:
        self.seen: Dict[Tuple[str, int, int], List[array]] = {}

    def of(self, column: array) -> array:
        same = self.seen.setdefault((column.typecode, len(column), hash(column.tobytes())), [])
        for known in same:
            if known == column:
                return known
        same.append(column)
        return column


def _table_of_rows(locations: "_Locations", fqn: str, decl: _TensorDecl) -> Optional[ChunkTable]:
    """The tensor's table, made a column at a time when every chunk has a row of its own and none is a tensor in a
    safetensors blob (`_packed`); None otherwise."""
    columns, dims = locations.columns, decl.dims
    sizes = dims[1::2]
    rows = list(map(locations.index_of(fqn).get, dims[0::2]))
    if None in rows or fqn in locations.built_fqns:
        return None
    lengths = array("q", map(columns.row_lengths.__getitem__, rows))
    itemsize = dtypes.BY_NAME[decl.dtype].itemsize if decl.dtype in dtypes.BY_NAME else 0
    if itemsize:
        nbytes = {s: numel(s) * itemsize for s in set(sizes)}
        if any(map(eq, lengths, map(nbytes.__getitem__, sizes))):
            return None
    blobs = array("q", chain.from_iterable(zip(map(columns.row_blob_offsets.__getitem__, rows), lengths)))
    where = array("I", map(columns.row_places.__getitem__, rows))
    return ChunkTable(len(decl.shape), array("q", chain.from_iterable(dims)), blobs, where, columns.places)


def _table_by_chunk(decoded: _Decoded, fqn: str, decl: _TensorDecl) -> ChunkTable:
    """The tensor's table, a chunk at a time: a chunk another rank's file lists (merged per-rank metadata), or a
    tensor in a safetensors blob."""
    columns = decoded.locations.columns
    boxes, blobs, where = array("q"), array("q"), array("I")
    for offsets, sizes in decl.pairs():
        location = decoded.locations.get((fqn, offsets))
        if location is None:
            raise CheckpointError(
                f"{decoded.name}: tensor {describe(fqn)} chunk at offsets {list(offsets)} (sizes {list(sizes)}) has no "
                "entry in storage_data, so its data file is unknown; the metadata is inconsistent")
        location = _packed(location, fqn, decl.dtype, sizes)
        boxes.extend(offsets)
        boxes.extend(sizes)
        blobs.append(location.offset)
        blobs.append(location.length)
        where.append(columns.place_id(location.relative_path, location.transform_descriptors, location.tensor_key))
    return ChunkTable(len(decl.shape), boxes, blobs, where, columns.places)


def _not_a_checkpoint_message(root: str, names: List[str]) -> str:
    shown = ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
    lines = [
        f"{root} is not a DCP checkpoint folder: it has no `.metadata` file.",
        "A folder written by torch.distributed.checkpoint.save(..., storage_writer=FileSystemWriter(path)) holds "
        "`.metadata` plus data files `__<rank>_<n>.distcp` (or one `__<rank>.metadata` per rank when saved with "
        "use_collectives=False).",
        f"Found: {shown}." if names else "The folder is empty.",
    ]
    if any(n.endswith(".distcp") for n in names):
        lines.append("The .distcp data files are here but `.metadata` is not: torch writes it last, so the save did "
                     "not finish, or it was not copied (names starting with '.' are easy to miss).")
    if ".metadata.tmp" in names:
        lines.append("`.metadata.tmp` exists: the save was interrupted while writing the metadata.")
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        from .hf_shards import explain_model_folder
        lines.append(explain_model_folder(root, names))
    where = location.at(root)
    nested = [n for n in names if _is_file(where, f"{n}/{METADATA_NAME}")]
    if nested:
        lines.append("Did you mean: " + ", ".join(where.join(n) for n in nested[:5]) + "?")
    return "\n".join(lines)


def _is_file(where, name: str) -> bool:
    try:
        entry = where.entry(name)
    except (OSError, CheckpointError):
        return False
    return entry is not None and entry.kind == location.FILE
