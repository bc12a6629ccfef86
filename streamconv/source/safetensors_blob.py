"""Tensors inside safetensors blobs, found from the blob's JSON header (no torch, no safetensors package).

Two of torch's DCP writers put many tensors into one safetensors blob:

* `FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)` (torch >= 2.8): each data file holds its
  bytes items as torch.save blobs, then ONE safetensors blob with every tensor chunk of that file. In `.metadata`
  every tensor's `_StorageInfo.offset` is that blob's start and `length` is the tensor's byte size; the header's
  keys are the DCP fqns (torch keys its dict by `MetadataIndex.fqn`, so a file holds one chunk per tensor).
  torch's own FileSystemReader unpickles these bytes and fails.
* `HuggingFaceStorageWriter(save_distributed=True)`: every file of every rank IS a safetensors blob (see
  `hf_shards.py`, which builds the metadata from these headers).

A safetensors blob: an 8-byte little-endian header length N, N bytes of JSON (`{key: {"dtype", "shape",
"data_offsets": [begin, end]}}` plus an optional `"__metadata__": {str: str}`), then the data; `data_offsets`
count from the data's start. Both writers record each piece's place in its global tensor in `__metadata__`:
`"DCP_SHARDING_INFO": json.dumps({key: {"saved_offsets": [...]}})`.

Headers are untrusted: at most MAX_HEADER_BYTES (the safetensors library's own limit, so nothing it can load is
refused), parsed as JSON with duplicate keys refused, every field checked for type and size, every data range
inside the file. Each header is read once per (file, offset).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .. import dtypes
from ..errors import CheckpointError, UnsupportedFeatureError
from .io import RangeReader
from ..model import BlobLocation, Chunk, StoredTensor, TensorEntry
from ..safetensors_format import MAX_HEADER_BYTES
from ..safetensors_format import (LENGTH, decode_body, header_length, pop_metadata, read_entry,
                                  unique_keys)
from .unpickle import describe

# MAX_HEADER_BYTES is the format's one limit (safetensors_format.py), named here so a test can see this module
# reads blob headers under it and has no limit of its own.
__all__ = ["MAX_HEADER_BYTES", "MAX_DIMS", "SHARDING_INFO_KEY", "SAVED_OFFSETS_KEY", "HeaderTensor", "Header",
           "read_header", "stored_tensor", "locate_all"]

MAX_DIMS = 64
SHARDING_INFO_KEY = "DCP_SHARDING_INFO"     # torch.distributed.checkpoint._hf_utils names
SAVED_OFFSETS_KEY = "saved_offsets"
_BY_CODE = {d.safetensors: d for d in dtypes.BY_NAME.values()}


@dataclass(frozen=True)
class HeaderTensor:
    """One tensor of a safetensors header, with absolute file offsets."""

    key: str
    dtype: str                                # torch name
    shape: Tuple[int, ...]
    data_offset: int                          # absolute offset of its first byte in the file
    nbytes: int
    saved_offsets: Optional[Tuple[int, ...]]  # DCP_SHARDING_INFO's place in the global tensor; None if absent


@dataclass(frozen=True)
class Header:
    relative_path: str
    offset: int                           # where the blob starts in the file
    data_start: int                       # absolute offset of the data section
    tensors: Dict[str, HeaderTensor]      # in header order
    metadata: Dict[str, str]              # __metadata__
    sharding_order: Tuple[str, ...]       # DCP_SHARDING_INFO's keys in its order (the writer's state-dict order)

    @property
    def has_sharding_info(self) -> bool:
        return SHARDING_INFO_KEY in self.metadata


def _where(relative_path: str, offset: int) -> str:
    return f"{relative_path}: safetensors blob at offset {offset}"


def read_header(reader: RangeReader, relative_path: str, offset: int = 0, *,
                file_bytes: Optional[int] = None) -> Header:
    """Parse and check the safetensors header of the blob at `offset` (CheckpointError naming file and field).
    The format's rules are `safetensors_format`'s; what is added here is DCP's: a known dtype, the sharding info."""
    where = _where(relative_path, offset)
    if file_bytes is None:
        file_bytes = reader.size(relative_path)
    blob_bytes = max(0, file_bytes - offset)
    first = reader.read(relative_path, offset, min(LENGTH.size, blob_bytes))
    header_bytes, problem = header_length(first, blob_bytes)
    if problem:
        raise CheckpointError(f"{where}: {problem}; this is not a safetensors blob, or the file is truncated or "
                              "does not belong to this checkpoint")
    data_start = offset + LENGTH.size + header_bytes
    try:
        parsed = decode_body(reader.read(relative_path, offset + LENGTH.size, header_bytes))
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}; the file is corrupt or not a safetensors blob") from None
    metadata, problem = pop_metadata(parsed)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    metadata = metadata or {}
    saved, order = _sharding_info(where, metadata.get(SHARDING_INFO_KEY))
    data_bytes = file_bytes - data_start
    tensors: Dict[str, HeaderTensor] = {}
    for key, info in parsed.items():
        tensors[key] = _tensor(where, key, info, data_start, data_bytes, saved)
    if saved is not None and set(saved) != set(tensors):
        odd = sorted(set(saved) ^ set(tensors))
        raise CheckpointError(f"{where}: DCP_SHARDING_INFO and the header list different tensors "
                              f"(e.g. {describe(odd[:3])}); the file is corrupt")
    return Header(relative_path, offset, data_start, tensors, metadata, order)


def _ints(value: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(value, list) and len(value) <= MAX_DIMS and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    return None


def _sharding_info(where: str, text: Optional[str]) -> Tuple[Optional[Dict[str, Tuple[int, ...]]], Tuple[str, ...]]:
    if text is None:
        return None, ()
    try:
        info = json.loads(text, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: __metadata__ DCP_SHARDING_INFO is not valid JSON "
                              f"({describe(str(exc))})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: DCP_SHARDING_INFO is not a JSON object: {describe(info)}")
    saved: Dict[str, Tuple[int, ...]] = {}
    for key, entry in info.items():
        offsets = _ints(entry.get(SAVED_OFFSETS_KEY)) if isinstance(entry, dict) else None
        if offsets is None:
            raise CheckpointError(f"{where}: DCP_SHARDING_INFO for {describe(key)} has no list of non-negative "
                                  f"saved_offsets: {describe(entry)}")
        saved[key] = offsets
    return saved, tuple(info)


def _tensor(where: str, key: str, info: Any, data_start: int, data_bytes: int,
            saved: Optional[Dict[str, Tuple[int, ...]]]) -> HeaderTensor:
    at = f"{where}: tensor {describe(key)}"
    code = info.get("dtype") if isinstance(info, dict) else None
    if isinstance(info, dict) and (not isinstance(code, str) or code not in _BY_CODE):
        raise CheckpointError(f"{at}: dtype {describe(code)} is not supported; supported: "
                              f"{', '.join(sorted(_BY_CODE))}")
    entry, problem = read_entry(key, info)
    if problem:
        raise CheckpointError(f"{where}: {problem}; the file is corrupt")
    if len(entry.shape) > MAX_DIMS:
        raise CheckpointError(f"{at}: shape has {len(entry.shape)} dims, more than {MAX_DIMS}; the file is corrupt")
    if entry.end > data_bytes:
        raise CheckpointError(
            f"{at}: data_offsets [{entry.begin}, {entry.end}) run past the {data_bytes}-byte data section; the file "
            "is truncated or corrupt")
    placed = None
    if saved is not None:
        placed = saved.get(key)
        if placed is not None and len(placed) != len(entry.shape):
            raise CheckpointError(f"{at}: DCP_SHARDING_INFO saved_offsets {list(placed)} do not match its "
                                  f"shape {list(entry.shape)}")
    return HeaderTensor(key, _BY_CODE[code].name, entry.shape, data_start + entry.begin, entry.end - entry.begin,
                        placed)


def stored_tensor(t: HeaderTensor) -> StoredTensor:
    """The executor's view of a header tensor: contiguous, and no recorded CRC-32 (safetensors has none; the
    record spans exactly the tensor, so resume records read its bytes back to checksum them)."""
    stride, step = [], 1
    for d in reversed(t.shape):
        stride.append(step)
        step *= d
    return StoredTensor(dtype=t.dtype, shape=t.shape, stride=tuple(reversed(stride)), data_offset=t.data_offset,
                        data_nbytes=t.nbytes, record_offset=t.data_offset, record_nbytes=t.nbytes, crc32=None)


def locate_all(reader: RangeReader,
               users: Mapping[BlobLocation, Sequence[Tuple[TensorEntry, Chunk]]]) -> Dict[BlobLocation, StoredTensor]:
    """StoredTensor for every location naming a tensor inside a safetensors blob (`location.tensor_key`), each
    header read once. Checks that the header holds that tensor with the byte size `.metadata` gives and, when
    the header records it, at the chunk's offsets (dtype and shape are checked by the caller)."""
    headers: Dict[Tuple[str, int], Header] = {}
    found: Dict[BlobLocation, StoredTensor] = {}
    for location in sorted(users, key=lambda loc: (loc.relative_path, loc.offset, loc.tensor_key)):
        where = _where(location.relative_path, location.offset)
        if location.transform_descriptors:
            raise UnsupportedFeatureError(
                f"{where}: tensor {describe(location.tensor_key)} was saved in safetensors format through the "
                f"stream transform(s) {list(location.transform_descriptors)}; streamconv does not read that "
                "combination. Save with either serialization_format=SAFETENSORS or _extensions, not both.")
        header = headers.get((location.relative_path, location.offset))
        if header is None:
            header = headers[(location.relative_path, location.offset)] = read_header(
                reader, location.relative_path, location.offset)
        t = header.tensors.get(location.tensor_key)
        if t is None:
            raise CheckpointError(
                f"{where}: .metadata puts tensor {describe(location.tensor_key)} in this blob, but its header holds "
                f"{_names(header.tensors)}; .metadata and the data files come from different saves")
        if t.nbytes != location.length:
            raise CheckpointError(
                f"{where}: tensor {describe(t.key)} is {t.nbytes} bytes in the header, {location.length} in "
                ".metadata; .metadata and the data files come from different saves")
        for entry, chunk in users[location]:
            if t.saved_offsets is not None and t.saved_offsets != chunk.offsets:
                raise CheckpointError(
                    f"{where}: tensor {describe(entry.fqn)}: the header holds the chunk at offsets "
                    f"{list(t.saved_offsets)}, .metadata wants the one at {list(chunk.offsets)}. torch's safetensors "
                    "writer keeps one chunk per tensor and file (the others are lost), or the files come from "
                    "different saves")
        found[location] = stored_tensor(t)
    return found


def _names(tensors: Iterable[str], shown: int = 5) -> str:
    names = list(tensors)
    text = ", ".join(describe(n) for n in names[:shown])
    return f"[{text}{', ...' if len(names) > shown else ''}] ({len(names)} tensors)"
