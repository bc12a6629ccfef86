"""A `torch.save` archive read front to back from a transformed blob's decoded stream (`transforms.open_stream`).

A plain blob is located from its zip central directory at the blob's tail (`blob.py`); a decoded stream has no
tail to seek to, so here the archive is read in the order torch.save wrote it. Its local records come in order:
data.pkl, the small records, then the local header of data/<key>; data.pkl gives dtype, shape, stride and the
record's length. Only this head is decoded (at most MAX_HEAD_BYTES). The StoredTensor's offsets are offsets *in
the decoded stream* (the blob's bytes have no file offset); `blob_reader.BlobReader` reads them by location.

torch.save streams its records, so each one is followed by a zip data descriptor (`PK\\x07\\x08`, CRC-32, sizes):
the small records' CRC-32s are checked here, the tensor record's by `recorded_crc32` when it is read.
"""
from __future__ import annotations

import struct
import zlib
from typing import Optional, Tuple

from .. import dtypes
from ..errors import CheckpointError, CorruptChunkError, UnsupportedFeatureError
from ..model import BlobLocation, StoredTensor
from . import safe_pickle as sp
from . import transforms
from .io import RangeReader

MAX_HEAD_BYTES = (1 << 20) + (64 << 10)  # data.pkl (at most 1 MiB, see blob.py) and the small records before data/
MAX_SMALL_RECORD_BYTES = 1 << 20         # data.pkl and the other records before data/<key>
DESCRIPTOR_BYTES = 16                    # data descriptor after a record: signature, crc, sizes (32-bit)

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG, _DESCRIPTOR_SIG = 0x04034B50, 0x08074B50


def locate_streamed(files: RangeReader, location: BlobLocation, fqn: str, stored_from_record) -> StoredTensor:
    """The StoredTensor of the transformed blob at `location`, its offsets in the decoded stream.
    `stored_from_record(fail, record, record_nbytes, data_offset, crc32, transforms)` builds and checks it."""
    where = transforms.where(location, fqn)
    transforms.check_supported(location, where)
    head = _Head(transforms.open_stream(files, location, where, head_only=True))

    def fail(message: str, error=CheckpointError):
        raise error(f"{where}: {message}")

    name, data_start = head.local_record(fail)
    if not name.endswith(b"/data.pkl") or name.count(b"/") != 1:
        fail(f"the decoded archive starts with {name[:60]!r}, not <prefix>/data.pkl: not a torch.save blob")
    prefix = name[:-len(b"data.pkl")]
    pkl = head.record_data(fail, name, data_start)
    record = sp.load_tensor_record(pkl, source=f"{where}: data.pkl")
    key = prefix + b"data/" + record.storage.key.encode("utf-8")
    while True:     # the small records after data.pkl (.format_version, byteorder, ...) up to data/<key>
        name, data_start = head.local_record(fail)
        if name == key:
            break
        if name.startswith(prefix + b"data/") or not name.startswith(prefix):
            fail(f"expected the record {key.decode('utf-8', 'replace')} after data.pkl, found "
                 f"{name[:60].decode('utf-8', 'replace')}")
        data = head.record_data(fail, name, data_start)
        if name == prefix + b"byteorder" and data != b"little":
            fail("was saved on a big-endian machine; streamconv copies raw bytes and needs little-endian data",
                 UnsupportedFeatureError)
    storage = record.storage
    itemsize = dtypes.lookup(record.dtype, where=where).itemsize
    record_nbytes = storage.numel if storage.storage_class.dtype is None else storage.numel * itemsize
    return stored_from_record(fail, record, record_nbytes, data_start, None, location.transform_descriptors)


def recorded_crc32(descriptor: bytes, record_nbytes: int, location: BlobLocation, fqn: str) -> Optional[int]:
    """The CRC-32 in the data descriptor that follows a decoded storage record of `record_nbytes` (None when it
    holds 0: torch.save with compute_crc32=False); CorruptChunkError when there is no such descriptor."""
    sig, recorded, compressed, plain = struct.unpack("<IIII", descriptor)
    if sig != _DESCRIPTOR_SIG or plain not in (record_nbytes & 0xFFFFFFFF, compressed):
        raise CorruptChunkError(
            f"{transforms.where(location, fqn)}: no zip data descriptor after the decoded storage record "
            f"({record_nbytes} bytes) of the {transforms.name(location.transform_descriptors)} blob: the blob is "
            "corrupt", file=location.relative_path, tensor=fqn, begin=location.offset,
            end=location.offset + location.length)
    return None if recorded == 0 and record_nbytes else recorded


class _Head:
    """The decoded head of a blob, decoded on demand and kept (it is small: MAX_HEAD_BYTES at most)."""

    def __init__(self, stream: transforms.DecodedStream):
        self.stream, self.data, self.pos = stream, bytearray(), 0

    def need(self, fail, end: int) -> None:
        """Decode until at least `end` bytes of the head are held (fail if the stream ends first)."""
        if end > MAX_HEAD_BYTES:
            fail(f"the records before the tensor's data run past {MAX_HEAD_BYTES} decoded bytes: not a tensor blob")
        while len(self.data) < end:
            piece = bytearray(max(end - len(self.data), 4096))
            got = self.stream.read_some(memoryview(piece))
            self.data += piece[:got]
            if got < len(piece) and len(self.data) < end:
                fail(f"the decoded stream ends after {len(self.data)} bytes, inside the archive's first "
                     "records (truncated blob?)")

    def local_record(self, fail) -> Tuple[bytes, int]:
        """(name, where its data starts) of the local header at `pos`."""
        self.need(fail, self.pos + _LOCAL.size)
        fields = _LOCAL.unpack_from(self.data, self.pos)
        sig, name_len, extra_len = fields[0], fields[9], fields[10]
        if sig != _LOCAL_SIG:
            found = bytes(self.data[self.pos:self.pos + 4]).hex()
            fail(f"no zip local header at decoded offset {self.pos} (found {found}): not a torch.save blob")
        self.need(fail, self.pos + _LOCAL.size + name_len + extra_len)
        name_at = self.pos + _LOCAL.size
        return bytes(self.data[name_at:name_at + name_len]), name_at + name_len + extra_len

    def record_data(self, fail, name: bytes, start: int) -> bytes:
        """A small record's data: it ends where a data descriptor (signature, CRC-32 of the data, sizes equal to
        the data's length) follows; the CRC must match. Moves `pos` to the next local header."""
        at = start
        while True:
            self.need(fail, at + 16)
            found = self.data.find(b"PK\x07\x08", at, len(self.data) - 12)
            if found < 0:
                at = max(start, len(self.data) - 15)     # a signature may straddle what is held so far
                continue
            size = found - start
            crc, compressed, plain = struct.unpack_from("<III", self.data, found + 4)
            if compressed == plain == size:     # the record's own descriptor (its sizes say so)
                computed = zlib.crc32(self.data[start:found])
                if computed != crc:
                    fail(f"archive record {name.decode('utf-8', 'replace')} fails its CRC-32 check (recorded "
                         f"{crc:08x}, computed {computed:08x}): the blob is corrupt; restore the .distcp file from "
                         "a good copy", CorruptChunkError)
                self.pos = found + 16
                return bytes(self.data[start:found])
            if size > MAX_SMALL_RECORD_BYTES:
                fail(f"record {name.decode('utf-8', 'replace')} has no data descriptor in its first "
                     f"{MAX_SMALL_RECORD_BYTES} bytes (or its CRC-32 does not match): corrupt archive",
                     CorruptChunkError)
            at = found + 1
