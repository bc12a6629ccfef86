"""Find the raw bytes of one stored tensor chunk without torch.load.

Each tensor item in a `.distcp` file is a complete `torch.save` zip archive at (offset, length). Its entries
are stored uncompressed, so the tensor's bytes sit at a fixed place: parse the zip's end records and central
directory (at the blob's tail), decode `<prefix>/data.pkl` with the allow-listed unpickler to learn dtype,
shape, stride and storage key, then read the local header of `<prefix>/data/<key>` (its extra field, used for
64-byte alignment, can differ from the central one) to get where the data starts.

Reads are small and few: a blob of up to WHOLE_BLOB_BYTES is read in one pread; a larger one costs one pread
of its head (local headers and data.pkl) and one of its tail (central directory). All zip offsets are
relative to the blob start (torch.save wrote the archive into a stream starting there).
"""
from __future__ import annotations

import struct
import zlib
from typing import Dict, Iterable, List, NoReturn, Optional, Tuple, Type

from .. import dtypes
from ..errors import CheckpointError, CorruptChunkError, UnsupportedFeatureError
from .io import RangeReader
from ..model import BlobLocation, StoredTensor
from . import safe_pickle as sp
from . import safetensors_blob, streamed_blob, transforms

HEAD_BYTES = 4096
TAIL_BYTES = 4096
WHOLE_BLOB_BYTES = HEAD_BYTES + TAIL_BYTES
MAX_DATA_PKL_BYTES = 1 << 20   # a one-tensor data.pkl is ~200 bytes; more means this is not a tensor blob
MAX_CENTRAL_DIRECTORY_BYTES = 1 << 20  # ~7 entries, well under 1 KiB; a corrupt size must not trigger a huge read
# Records up to this size besides the tensor storage (data.pkl, byteorder, version, serialization_id...) have
# their CRC-32 checked while locating: they sit in the head/tail windows already read, so it is free.
SMALL_RECORD_BYTES = 1 << 16

_LOCAL = struct.Struct("<IHHHHHIIIHH")              # local file header, 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")      # central directory header, 46 bytes
_EOCD = struct.Struct("<IHHHHIIH")                  # end of central directory, 22 bytes
_EOCD64_LOCATOR = struct.Struct("<IIQI")            # zip64 end of central directory locator, 20 bytes
_EOCD64 = struct.Struct("<IQHHIIQQQQ")              # zip64 end of central directory record, 56 bytes
_LOCAL_SIG, _CENTRAL_SIG, _EOCD_SIG = 0x04034B50, 0x02014B50, 0x06054B50
_EOCD64_LOCATOR_SIG, _EOCD64_SIG = 0x07064B50, 0x06064B50
_ZIP64_EXTRA_ID = 0x0001
_U32_MAX, _U16_MAX = 0xFFFFFFFF, 0xFFFF
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class _Entry:
    __slots__ = ("name", "method", "compressed_size", "size", "header_offset", "crc32", "data_start")

    def __init__(self, name: bytes, method: int, compressed_size: int, size: int, header_offset: int, crc32: int):
        self.name, self.method = name, method
        self.compressed_size, self.size, self.header_offset = compressed_size, size, header_offset
        self.crc32 = crc32
        self.data_start = -1     # where its data begins, once its local header was read (`_data_start`)

    @property
    def recorded_crc32(self) -> Optional[int]:
        """The CRC-32 from the central directory; None when the writer stored none (0 for non-empty data:
        torch.save with compute_crc32=False. A real CRC of 0 happens once in 2**32 and is then unchecked)."""
        return None if self.crc32 == 0 and self.size else self.crc32


class _Blob:
    """Byte ranges of one blob (offsets relative to its start): fetched in a few preads, kept, bounds-checked."""

    def __init__(self, reader: RangeReader, location: BlobLocation, fqn: str):
        self.reader, self.location, self.limit, self.fqn = reader, location, location.length, fqn
        self.windows: List[Tuple[int, bytes]] = []

    @property
    def where(self) -> str:
        loc = self.location
        return f"{loc.relative_path}: blob at offset {loc.offset} ({loc.length} bytes) for tensor {self.fqn!r}"

    def fail(self, message: str, error: Type[CheckpointError] = CheckpointError) -> NoReturn:
        raise error(f"{self.where}: {message}")

    def fetch(self, start: int, length: int) -> bytes:
        start, end = max(0, start), min(self.limit, start + length)
        data = self.reader.read(self.location.relative_path, self.location.offset + start, end - start)
        self.windows.append((start, data))
        return data

    def get(self, start: int, length: int) -> bytes:
        if start < 0 or length < 0 or start + length > self.limit:
            self.fail(f"needs bytes [{start}, {start + length}) of the blob, which has only {self.limit}: "
                      "the archive is truncated or corrupt")
        for window_start, data in self.windows:
            if window_start <= start and start + length <= window_start + len(data):
                return data[start - window_start:start - window_start + length]
        return self.fetch(start, length)


# ---------------------------------------------------------------------------------------------------------
# public API


def locate_tensor(reader: RangeReader, location: BlobLocation, *, fqn: str) -> StoredTensor:
    """dtype, shape, stride and ABSOLUTE file offset of the tensor in the torch.save blob at `location` (for a
    transformed blob, its offset in the decoded stream: the blob's bytes have no file offset).

    Non-contiguous strides are returned as stored; the caller decides. `fqn` is only used in messages.
    A location inside a safetensors blob (`location.tensor_key`) is found from that blob's header.
    """
    if location.tensor_key:
        return safetensors_blob.locate_all(reader, {location: ()})[location]
    return locate_blob(reader, location, fqn, {})


def _read_plan(blob_bytes: int) -> Tuple[Tuple[int, int], ...]:
    """The (start, length) ranges of a blob read up front: all of a small one, else its head and tail."""
    if blob_bytes <= WHOLE_BLOB_BYTES:
        return ((0, blob_bytes),)
    return ((0, HEAD_BYTES), (blob_bytes - TAIL_BYTES, TAIL_BYTES))


def locate_blob(reader: RangeReader, location: BlobLocation, fqn: str, file_sizes: Dict[str, int]) -> StoredTensor:
    """locate_tensor of a torch.save blob (plain or transformed); `file_sizes` caches the sizes of its files."""
    if location.transform_descriptors:   # the blob is a transformed stream: located by decoding its head
        return streamed_blob.locate_streamed(reader, location, fqn, stored_from_record)
    blob = _Blob(reader, location, fqn)
    file_bytes = file_sizes.get(location.relative_path)
    if file_bytes is None:
        file_bytes = file_sizes[location.relative_path] = reader.size(location.relative_path)
    if location.offset + location.length > file_bytes:
        blob.fail(f"runs past the end of the file ({file_bytes} bytes): the .distcp file is truncated "
                  "(incomplete copy?) or does not belong to this .metadata")
    for start, length in _read_plan(location.length):
        blob.fetch(start, length)
    _check_magic(blob, file_bytes)

    entries, cd_offset = _central_directory(blob)
    prefix = _archive_prefix(blob, entries)
    _check_byteorder(blob, entries, cd_offset, prefix)
    pkl = entries[prefix + b"data.pkl"]
    if pkl.size > MAX_DATA_PKL_BYTES:
        blob.fail(f"data.pkl is {pkl.size} bytes; a one-tensor torch.save pickle is a few hundred: not a tensor blob")
    record = sp.load_tensor_record(_entry_bytes(blob, pkl, cd_offset), source=f"{blob.where}: data.pkl")
    stored = _stored_tensor(blob, entries, cd_offset, prefix, record)
    _check_small_records(blob, entries, cd_offset, prefix)
    return stored


def prefetch_heads(reader: RangeReader, relative_path: str, transform_descriptors: Tuple[str, ...],
                   offsets: Iterable[int], lengths: Iterable[int]) -> None:
    """Ask the kernel for what locating these blobs of one file will read (their heads and tails, or a
    transformed blob's first block): `located.locate_all` asks for all of them before parsing any."""
    for offset, length in zip(offsets, lengths):
        if transform_descriptors:     # transformed: its head is decoded from its first block
            location = BlobLocation(relative_path, offset, length, transform_descriptors)
            reader.prefetch(relative_path, offset, transforms.head_prefetch_bytes(location))
            continue
        for start, size in _read_plan(length):
            reader.prefetch(relative_path, offset + start, size)


# ---------------------------------------------------------------------------------------------------------
# zip structure


def _check_magic(blob: _Blob, file_bytes: int) -> None:
    head = blob.get(0, min(4, blob.limit))
    if head == b"PK\x03\x04":
        return
    if head == _ZSTD_MAGIC:
        blob.fail("is zstd-compressed although .metadata lists no transform for it. " + _RESAVE_HINT,
                  UnsupportedFeatureError)
    # FileSystemWriter(serialization_format=SAFETENSORS) (torch>=2.8): every tensor's offset points at ONE
    # safetensors blob per file and length is the tensor's nbytes; such chunks are named by
    # metadata._packed and never come here. A safetensors blob with another length is not what torch writes.
    first = blob.reader.read(blob.location.relative_path, blob.location.offset,
                             min(9, file_bytes - blob.location.offset))
    if len(first) == 9 and first[8:9] == b"{":
        blob.fail(
            "is a safetensors blob (FileSystemWriter(serialization_format=SerializationFormat.SAFETENSORS)), but "
            "the length .metadata gives is not the tensor's byte size, as torch records it for that format: "
            ".metadata and the data files come from different saves")
    blob.fail(f"does not start with a zip local header (PK\\x03\\x04) but {first[:4].hex()}: not a torch.save "
              "archive; do the .metadata and .distcp files come from the same save?")


def _central_directory(blob: _Blob) -> Tuple[Dict[bytes, _Entry], int]:
    """{entry name: entry} and the central directory's offset (every entry's data lies before it)."""
    if blob.limit < _EOCD.size:
        blob.fail("is too short to be a zip archive (truncated)")
    eocd_at = blob.limit - _EOCD.size
    sig, disk, _, _, count, cd_size, cd_offset, comment_bytes = _EOCD.unpack(blob.get(eocd_at, _EOCD.size))
    if sig != _EOCD_SIG or comment_bytes != 0:
        blob.fail("has no zip end-of-central-directory record at its end: the blob is truncated, or the "
                  "offset/length in .metadata do not match this file")
    cd_end = eocd_at
    if count == _U16_MAX or cd_size == _U32_MAX or cd_offset == _U32_MAX:
        # zip64 (torch.save of a chunk >= 4 GiB): the real values are in the EOCD64 record.
        locator_at = eocd_at - _EOCD64_LOCATOR.size
        sig, _, eocd64_at, _ = _EOCD64_LOCATOR.unpack(blob.get(locator_at, _EOCD64_LOCATOR.size))
        if sig != _EOCD64_LOCATOR_SIG:
            blob.fail("has zip64 placeholders in its end record but no zip64 locator before it (corrupt)")
        record = blob.get(eocd64_at, _EOCD64.size) if eocd64_at <= locator_at - _EOCD64.size else b""
        if len(record) != _EOCD64.size or _EOCD64.unpack(record)[0] != _EOCD64_SIG:
            blob.fail(f"zip64 end record expected at blob offset {eocd64_at} is missing (corrupt)")
        count, cd_size, cd_offset = _EOCD64.unpack(record)[7:10]
        cd_end = eocd64_at
    if disk != 0 or cd_offset + cd_size > cd_end or cd_size > MAX_CENTRAL_DIRECTORY_BYTES:
        blob.fail(f"central directory [{cd_offset}, {cd_offset + cd_size}) does not fit before the end record "
                  f"at {cd_end} or is implausibly large (corrupt archive)")
    return _parse_central(blob, blob.get(cd_offset, cd_size), count), cd_offset


def _parse_central(blob: _Blob, cd: bytes, count: int) -> Dict[bytes, _Entry]:
    entries: Dict[bytes, _Entry] = {}
    pos = 0
    for _ in range(count):
        if pos + _CENTRAL.size > len(cd):
            blob.fail("central directory is shorter than its entry count says (corrupt)")
        (sig, _, _, _, method, _, _, crc32, compressed, size, name_len, extra_len, comment_len,
         _, _, _, header_offset) = _CENTRAL.unpack_from(cd, pos)
        if sig != _CENTRAL_SIG:
            blob.fail(f"bad central directory header signature at entry {len(entries)} (corrupt)")
        name_at = pos + _CENTRAL.size
        name = cd[name_at:name_at + name_len]
        if _U32_MAX in (compressed, size, header_offset):
            size, compressed, header_offset = _zip64_values(
                blob, cd[name_at + name_len:name_at + name_len + extra_len], size, compressed, header_offset)
        entries[name] = _Entry(name, method, compressed, size, header_offset, crc32)
        pos = name_at + name_len + extra_len + comment_len
    return entries


def _zip64_values(blob: _Blob, extra: bytes, size: int, compressed: int, header_offset: int) -> Tuple[int, int, int]:
    """Replace 0xFFFFFFFF placeholders from the zip64 extra field, which lists only those, in this order."""
    pos = 0
    while pos + 4 <= len(extra):
        field_id, field_len = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + field_len > len(extra):
            break
        if field_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{field_len // 8}Q", extra, pos + 4))
            out = []
            for value in (size, compressed, header_offset):
                if value == _U32_MAX:
                    if not values:
                        break
                    value = values.pop(0)
                out.append(value)
            if len(out) == 3:
                return out[0], out[1], out[2]
            break
        pos += 4 + field_len
    blob.fail("central directory entry has zip64 placeholders but no matching zip64 extra field (corrupt)")


def _archive_prefix(blob: _Blob, entries: Dict[bytes, _Entry]) -> bytes:
    """`archive/` (torch.save into a stream) or whatever single top-level folder holds data.pkl."""
    prefixes = [n[:-len(b"data.pkl")] for n in entries if n.endswith(b"/data.pkl") and n.count(b"/") == 1]
    if len(prefixes) != 1:
        blob.fail(f"expected one <prefix>/data.pkl in the archive, found {len(prefixes)} "
                  f"(entries: {[n.decode('utf-8', 'replace') for n in list(entries)[:10]]}): not a torch.save blob")
    return prefixes[0]


def _check_byteorder(blob: _Blob, entries: Dict[bytes, _Entry], cd_offset: int, prefix: bytes) -> None:
    # The `byteorder` record exists since torch 2.1; before that the writer's native order (little on
    # every platform torch trains on) applies.
    entry = entries.get(prefix + b"byteorder")
    if entry is not None and entry.size <= 16 and _entry_bytes(blob, entry, cd_offset) != b"little":
        blob.fail("was saved on a big-endian machine; streamconv copies raw bytes and needs little-endian data",
                  UnsupportedFeatureError)


def _data_start(blob: _Blob, entry: _Entry, cd_offset: int) -> int:
    """Where the entry's data begins, from its LOCAL header (its extra length may differ from the central one)."""
    if entry.data_start >= 0:
        return entry.data_start
    name = entry.name.decode("utf-8", "replace")
    if entry.method != 0 or entry.compressed_size != entry.size:
        blob.fail(f"archive entry {name} is compressed (zip method {entry.method}); torch.save stores entries "
                  "uncompressed and streamconv copies raw bytes. Was the blob re-packed by another tool?")
    header = blob.get(entry.header_offset, _LOCAL.size + len(entry.name))    # the header and the name it gives
    fields = _LOCAL.unpack_from(header)
    sig, name_len, extra_len = fields[0], fields[9], fields[10]
    start = entry.header_offset + _LOCAL.size
    if sig != _LOCAL_SIG or name_len != len(entry.name) or header[_LOCAL.size:] != entry.name:
        blob.fail(f"local header of {name} at blob offset {entry.header_offset} is missing or names another "
                  "entry (corrupt)")
    start += name_len + extra_len
    if start + entry.size > cd_offset:
        blob.fail(f"data of {name} [{start}, {start + entry.size}) runs into the central directory at {cd_offset}")
    entry.data_start = start
    return start


def _entry_bytes(blob: _Blob, entry: _Entry, cd_offset: int) -> bytes:
    return blob.get(_data_start(blob, entry, cd_offset), entry.size)


def _check_small_records(blob: _Blob, entries: Dict[bytes, _Entry], cd_offset: int, prefix: bytes) -> None:
    """CRC-32 of the archive's small records (data.pkl says where the tensor's bytes are: a flipped bit there
    could move them). The tensor storage itself is checked by `source.integrity`, when asked."""
    for entry in entries.values():
        recorded = entry.recorded_crc32
        if (recorded is None or entry.method != 0 or entry.size > SMALL_RECORD_BYTES
                or entry.name.startswith(prefix + b"data/")):
            continue
        start = _data_start(blob, entry, cd_offset)
        computed = zlib.crc32(blob.get(start, entry.size))
        if computed != recorded:
            begin = blob.location.offset + start
            name = entry.name.decode("utf-8", "replace")
            raise CorruptChunkError(
                f"{blob.where}: archive record {name}, bytes [{begin}, {begin + entry.size}) of the file, fails its "
                f"CRC-32 check (recorded {recorded:08x}, computed {computed:08x}): the .distcp file is corrupt "
                "(disk or copy error); restore it from a good copy",
                file=blob.location.relative_path, tensor=blob.fqn, begin=begin, end=begin + entry.size,
                recorded=recorded, computed=computed)


# ---------------------------------------------------------------------------------------------------------
# tensor record -> StoredTensor


def _stored_tensor(blob: _Blob, entries: Dict[bytes, _Entry], cd_offset: int, prefix: bytes,
                   record: sp.TensorRecord) -> StoredTensor:
    dtypes.lookup(record.dtype, where=blob.where)
    storage = record.storage
    entry = entries.get(prefix + b"data/" + storage.key.encode("utf-8"))
    if entry is None:
        blob.fail(f"data.pkl refers to storage {storage.key!r} but the archive has no data/{storage.key} record")
    data_start = _data_start(blob, entry, cd_offset)
    return stored_from_record(blob.fail, record, entry.size, blob.location.offset + data_start,
                              entry.recorded_crc32)


def stored_from_record(fail, record: sp.TensorRecord, record_nbytes: int, data_offset: int, crc32: Optional[int],
                       transforms: Tuple[str, ...] = ()) -> StoredTensor:
    """The StoredTensor of a decoded data.pkl whose storage record (`record_nbytes`) starts at `data_offset`
    (in the file for a plain blob, in the decoded stream for a transformed one: `streamed_blob.py`);
    `fail(message)` raises naming the blob."""
    dtype = dtypes.lookup(record.dtype)
    storage = record.storage
    # Typed storages count elements; UntypedStorage (_rebuild_tensor_v3) counts bytes.
    storage_nbytes = storage.numel if storage.storage_class.dtype is None else storage.numel * dtype.itemsize
    if record_nbytes != storage_nbytes:
        fail(f"storage record data/{storage.key} is {record_nbytes} bytes, but data.pkl says {storage.numel} "
             f"{'bytes' if storage.storage_class.dtype is None else 'elements'} of {dtype.name} "
             f"= {storage_nbytes} bytes")
    if record.flags:
        fail(f"tensor has the {'/'.join(record.flags)} bit set, so its stored bytes are not its values; "
             "save `t.resolve_conj().resolve_neg()` instead", UnsupportedFeatureError)
    numel = 1
    for dim in record.shape:
        numel *= dim
    # The view (storage_offset, shape, stride) must stay inside the storage.
    last_element = record.storage_offset + sum((d - 1) * s for d, s in zip(record.shape, record.stride))
    view_end_bytes = (last_element + 1) * dtype.itemsize if numel else record.storage_offset * dtype.itemsize
    if view_end_bytes > storage_nbytes:
        fail(f"tensor view (storage_offset {record.storage_offset}, shape {list(record.shape)}, stride "
             f"{list(record.stride)}) needs {view_end_bytes} bytes but its storage has {storage_nbytes}")
    return StoredTensor(
        dtype=dtype.name,
        shape=record.shape,
        stride=record.stride,
        data_offset=data_offset + record.storage_offset * dtype.itemsize,
        data_nbytes=numel * dtype.itemsize,
        record_offset=data_offset,
        record_nbytes=record_nbytes,
        crc32=crc32,
        transforms=transforms,
    )


_RESAVE_HINT = (
    "The blob was compressed after torch.save but .metadata does not list the transform, so the .metadata and "
    ".distcp files do not belong together (copied from different saves?); restore the checkpoint's own .metadata.")
