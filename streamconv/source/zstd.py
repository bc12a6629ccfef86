"""Checkpoints saved with `FileSystemWriter(path, _extensions=[ZStandard()])`: every item's whole `torch.save`
blob is one zstd stream (`_StorageInfo.transform_descriptors == ['stream.zstd/1']`), so a tensor's bytes have no
file offset. They are decompressed while streaming, never held whole:

* `locate_compressed` decodes a blob's head only (the zip's local records come in order: data.pkl, the small
  records, then the local header of data/<key>) to learn dtype, shape, stride and where the raw bytes start in
  the decoded stream; data.pkl gives their length.
* `DecodingReader` wraps the checkpoint's `RangeReader` and gives each compressed blob's decoded bytes an address
  *past the end of its file* (file size + the blobs decoded before it, in file order), so the executor reads and
  copies them like any other chunk bytes, with `read_into` / `copy_to` at an offset. A read decodes the stream up
  to the wanted offset and on into the caller's buffers; the decoder is kept for the next read of that blob, so
  reads in increasing order (the copy path; bands in row order) decode each blob once. A read before the
  decoder's position starts it again from the blob's first byte (slower, never wrong).

The CRC-32 of a decoded data/<key> record sits in the zip data descriptor right after it (`PK\\x07\\x08`, crc,
sizes), read through the same reader (`crc_after_record`). `zstandard` is an optional extra: without it, a
message naming `pip install 'streamconv[zstd]'`.
"""
from __future__ import annotations

import bisect
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import CheckpointError, CorruptChunkError, UnsupportedFeatureError
from ..model import BlobLocation, StoredTensor
from . import safe_pickle as sp

ZSTD_DESCRIPTOR = "stream.zstd/1"
ZSTD_EXTRA = "pip install 'streamconv[zstd]'"
MAGIC = b"\x28\xb5\x2f\xfd"
MAX_HEAD_BYTES = (1 << 20) + (64 << 10)  # data.pkl (at most 1 MiB, see blob.py) and the small records before data/
MAX_WINDOW_BYTES = 1 << 27               # zstd's own default limit (128 MiB): a frame asking for more is refused
DECODE_PIECE_BYTES = 1 << 20             # decoded bytes copied through memory at a time (per thread)
COMPRESSED_READ_BYTES = 256 << 10          # compressed bytes read from the file at a time
# Locating decodes only a blob's first block (at most 128 KiB of output, about as much input): read it in small
# steps, and ask the kernel for it up front (blob.locate_all prefetches every blob's head before parsing any).
HEAD_READ_BYTES = 32 << 10
HEAD_PREFETCH_BYTES = 160 << 10
KEPT_DECODERS = 8                        # decoders kept for the next read (each holds its window, ~2 MiB)
MAX_SMALL_RECORD_BYTES = 1 << 20           # data.pkl and the other records before data/<key>
DESCRIPTOR_BYTES = 24                    # data descriptor after a record: signature, crc, sizes (8-byte with zip64)

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_LOCAL_SIG, _DESCRIPTOR_SIG = 0x04034B50, 0x08074B50


def zstandard_module():
    """The `zstandard` package, or UnsupportedFeatureError naming the extra that installs it."""
    try:
        import zstandard
    except ImportError:
        raise UnsupportedFeatureError(
            "the checkpoint was saved with FileSystemWriter(_extensions=[ZStandard()]): its blobs are "
            "zstd-compressed ('stream.zstd/1') and decompressing them needs the `zstandard` package, which is not "
            f"installed. Install streamconv's zstd extra: {ZSTD_EXTRA}") from None
    return zstandard


def can_decode() -> bool:
    try:
        zstandard_module()
    except UnsupportedFeatureError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# decoding one blob as a stream


class _CompressedRange:
    """The compressed bytes of one blob as a file-like `read(n)` for zstandard's stream reader."""

    def __init__(self, reader, location: BlobLocation):
        self.reader, self.location, self.pos = reader, location, 0

    def read(self, n: int = -1) -> bytes:
        left = self.location.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = self.reader.read(self.location.relative_path, self.location.offset + self.pos, n)
        self.pos += len(data)
        return data


class _Decoder:
    """A zstd stream over one blob, at decoded offset `pos`; moves forward only."""

    def __init__(self, reader, location: BlobLocation, fqn: str, read_bytes: int = COMPRESSED_READ_BYTES):
        zstandard = zstandard_module()
        self.location, self.fqn, self.pos = location, fqn, 0
        # The decoded range whose CRC-32 is kept in `crc` as it passes (check_while_reading).
        self.sum_from = self.sum_to = 0
        self.crc = 0
        head = reader.read(location.relative_path, location.offset, min(4, location.length))
        if head != MAGIC:
            raise CheckpointError(
                f"{self.where}: .metadata says it is zstd-compressed ({ZSTD_DESCRIPTOR}) but it starts with "
                f"{head.hex()}, not the zstd magic 28b52ffd: the .distcp file does not belong to this .metadata")
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW_BYTES)
        self._error = zstandard.ZstdError
        self._stream = dctx.stream_reader(_CompressedRange(reader, location), read_size=read_bytes,
                                          read_across_frames=True)

    @property
    def where(self) -> str:
        loc = self.location
        return f"{loc.relative_path}: blob at offset {loc.offset} ({loc.length} bytes) for tensor {self.fqn!r}"

    def readinto(self, view: memoryview) -> None:
        """Fill `view` with the next decoded bytes (CheckpointError if the stream ends first or is corrupt)."""
        got = self.read_some(view)
        if got < len(view):
            raise CheckpointError(f"{self.where}: the zstd stream ends after {self.pos} decoded bytes, "
                                  f"{len(view) - got} short of what the archive needs (truncated blob?)")

    def read_some(self, view: memoryview) -> int:
        """Fill `view` as far as the stream goes; how many bytes that was."""
        done = 0
        while done < len(view):
            try:
                n = self._stream.readinto(view[done:])
            except self._error as exc:
                raise CheckpointError(f"{self.where}: zstd data is corrupt after {self.pos + done} decoded bytes "
                                      f"({exc}); restore the .distcp file from a good copy") from None
            if not n:
                break
            first = self.pos + done             # decoded offset of view[done]
            a, b = max(first, self.sum_from), min(first + n, self.sum_to)
            if a < b:
                self.crc = zlib.crc32(view[done + a - first:done + b - first], self.crc)
            done += n
        self.pos += done
        return done

    def skip_to(self, pos: int, scratch: memoryview) -> None:
        while self.pos < pos:
            self.readinto(scratch[:min(len(scratch), pos - self.pos)])


# ---------------------------------------------------------------------------------------------------------
# the reader


class _Decoded:
    __slots__ = ("base", "span", "location", "fqn")

    def __init__(self, base: int, span: int, location: BlobLocation, fqn: str):
        self.base, self.span, self.location, self.fqn = base, span, location, fqn


class DecodingReader:
    """A RangeReader over `inner` whose files go on past their end with the decoded bytes of their compressed
    blobs (registered by `locate_compressed`). Everything else is `inner`'s. Safe to share between threads:
    a decoder is used by one thread at a time."""

    def __init__(self, inner):
        self.inner = inner
        self._lock = threading.Lock()
        self._blobs: Dict[str, List[_Decoded]] = {}      # per file, by base
        self._bases: Dict[str, List[int]] = {}           # the same blobs' bases, for bisection
        self._next: Dict[str, int] = {}
        self._by_location: Dict[BlobLocation, _Decoded] = {}
        self._idle: "OrderedDict[int, Tuple[_Decoded, _Decoder]]" = OrderedDict()
        self._local = threading.local()
        self._checks: Dict[BlobLocation, Tuple[int, int, object]] = {}   # check_while_reading, not yet done
        self.decoded_bytes = 0      # decoded bytes produced (skipped ones included), for reports and tests
        self.restarts = 0           # reads that had to decode a blob again from its start

    # -- what is the inner reader's: the folder, its files, its hints -------------------------------------
    @property
    def root(self) -> str:
        return self.inner.root

    @property
    def fast(self):
        return self.inner.fast

    def path(self, relative_path: str) -> str:
        return self.inner.path(relative_path)

    def set_random_access(self, random_access: bool) -> None:
        self.inner.set_random_access(random_access)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.inner.close()

    # -- registering blobs ------------------------------------------------------------------------------
    def add(self, location: BlobLocation, span: int, fqn: str) -> int:
        """Give the blob's first `span` decoded bytes an address; returns the address of decoded byte 0."""
        with self._lock:
            known = self._by_location.get(location)
            if known is not None:
                return known.base
            path = location.relative_path
            if path not in self._next:
                self._next[path] = self.inner.size(path)
            base = self._next[path]
            self._next[path] = base + span
            entry = _Decoded(base, span, location, fqn)
            self._blobs.setdefault(path, []).append(entry)      # bases grow, so the list stays sorted
            self._bases.setdefault(path, []).append(base)
            self._by_location[location] = entry
            return base

    def _find(self, path: str, offset: int, length: int) -> Optional[_Decoded]:
        blobs = self._blobs.get(path)
        if not blobs or offset < blobs[0].base:
            return None
        entry = blobs[bisect.bisect_right(self._bases[path], offset) - 1]
        if offset + length > entry.base + entry.span:
            raise CheckpointError(f"{path}: decoded range [{offset}, {offset + length}) runs past the blob it "
                                  "starts in (internal error: please report)")
        return entry

    # -- decoders -----------------------------------------------------------------------------------------
    def _scratch(self) -> memoryview:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = memoryview(bytearray(DECODE_PIECE_BYTES))
        return scratch

    def _decoder_at(self, entry: _Decoded, pos: int) -> _Decoder:
        with self._lock:
            held = self._idle.pop(id(entry), None)
        decoder = held[1] if held is not None else None
        if decoder is None or decoder.pos > pos:
            if decoder is not None:
                self.restarts += 1
            decoder = _Decoder(self.inner, entry.location, entry.fqn)
            check = self._checks.get(entry.location)
            if check is not None:
                decoder.sum_from, decoder.sum_to = check[0], check[0] + check[1]
        start = decoder.pos
        decoder.skip_to(pos, self._scratch())
        self.decoded_bytes += pos - start
        return decoder

    def check_while_reading(self, location: BlobLocation, record_offset: int, record_nbytes: int, verdict) -> bool:
        """RangeReader's offer, taken for a compressed blob: sum the decoded record [record_offset, + record_nbytes)
        as the next reads of this blob pass it, then read the CRC-32 from the data descriptor right after it and
        call `verdict(computed, recorded or None)`, which raises on a mismatch. Costs one zlib.crc32 pass instead of
        a second decompression. A blob whose record is never read to its end is never judged."""
        entry = self._by_location.get(location)
        if entry is None:
            return self.inner.check_while_reading(location, record_offset, record_nbytes, verdict)
        with self._lock:
            self._checks[location] = (record_offset - entry.base, record_nbytes, verdict)
        return True

    def _judge(self, entry: _Decoded, decoder: _Decoder) -> None:
        check = self._checks.get(entry.location)
        if check is None or decoder.pos != decoder.sum_to or decoder.sum_to != check[0] + check[1]:
            return
        with self._lock:
            if self._checks.pop(entry.location, None) is None:
                return
        descriptor = bytearray(16)
        decoder.readinto(memoryview(descriptor))
        sig, recorded, compressed, plain = struct.unpack("<IIII", descriptor)
        if sig != _DESCRIPTOR_SIG or plain not in (check[1] & 0xFFFFFFFF, compressed):
            raise _no_descriptor(entry.location, entry.fqn, check[1])
        check[2](decoder.crc, None if recorded == 0 and check[1] else recorded)

    def _done_with(self, entry: _Decoded, decoder: _Decoder) -> None:
        self._judge(entry, decoder)
        if decoder.pos >= entry.span - DESCRIPTOR_BYTES:
            return      # past the tensor's bytes (and its CRC, read in the same call): nothing left to read
        with self._lock:
            self._idle[id(entry)] = (entry, decoder)
            while len(self._idle) > KEPT_DECODERS:
                self._idle.popitem(last=False)

    # -- RangeReader ----------------------------------------------------------------------------------------
    def size(self, relative_path: str) -> int:
        return self.inner.size(relative_path)

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        if self._find(relative_path, offset, length) is None:
            return self.inner.read(relative_path, offset, length)
        out = bytearray(length)
        self.read_into(relative_path, offset, [memoryview(out)])
        return bytes(out)

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        total = sum(len(b) for b in buffers)
        entry = self._find(relative_path, offset, total)
        if entry is None:
            return self.inner.read_into(relative_path, offset, buffers)
        decoder = self._decoder_at(entry, offset - entry.base)
        for buf in buffers:
            decoder.readinto(memoryview(buf).cast("B"))
        self.decoded_bytes += total
        self._done_with(entry, decoder)

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        entry = self._find(relative_path, offset, length)
        if entry is None:
            return self.inner.copy_to(sink, relative_path, offset, dst_offset, length)
        decoder = self._decoder_at(entry, offset - entry.base)
        scratch = self._scratch()
        done = 0
        while done < length:    # decoded in pieces into memory, each written in place
            piece = scratch[:min(len(scratch), length - done)]
            decoder.readinto(piece)
            sink.write_at(dst_offset + done, piece)
            done += len(piece)
        self.decoded_bytes += length
        self._done_with(entry, decoder)

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        if self._find(relative_path, offset, 0) is None:
            prefetch = getattr(self.inner, "prefetch", None)
            if prefetch is not None:
                prefetch(relative_path, offset, length)


# ---------------------------------------------------------------------------------------------------------
# locating a tensor in a decoded blob


def check_descriptors(location: BlobLocation, fqn: str) -> None:
    if location.transform_descriptors != (ZSTD_DESCRIPTOR,):
        raise UnsupportedFeatureError(
            f"{location.relative_path}: blob at offset {location.offset} for tensor {fqn!r} was saved through the "
            f"stream transform(s) {list(location.transform_descriptors)}; streamconv undoes only "
            f"{[ZSTD_DESCRIPTOR]} (torch's ZStandard extension). Load the checkpoint with the extension that wrote "
            "it and save it again without `_extensions` (or with [ZStandard()]).")


def locate_compressed(reader, location: BlobLocation, fqn: str, stored_from_record) -> StoredTensor:
    """The StoredTensor of a zstd-compressed blob, its data addressed through `reader` (a DecodingReader).
    `stored_from_record(fail, record, record_nbytes, data_offset, crc32, transforms)` builds and checks it."""
    check_descriptors(location, fqn)
    if not isinstance(reader, DecodingReader):
        raise CheckpointError(f"{location.relative_path}: tensor {fqn!r} is zstd-compressed and must be read "
                              "through source.zstd.DecodingReader (internal error: please report)")
    decoder = _Decoder(reader.inner, location, fqn, HEAD_READ_BYTES)
    head = _Head(decoder)

    def fail(message: str, error=CheckpointError):
        raise error(f"{decoder.where}: {message}")

    name, data_start = head.local_record(fail)
    if not name.endswith(b"/data.pkl") or name.count(b"/") != 1:
        fail(f"the decoded archive starts with {name[:60]!r}, not <prefix>/data.pkl: not a torch.save blob")
    prefix = name[:-len(b"data.pkl")]
    pkl = head.record_data(fail, name, data_start)
    record = sp.load_tensor_record(pkl, source=f"{decoder.where}: data.pkl")
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
    from .. import dtypes
    itemsize = dtypes.lookup(record.dtype, where=decoder.where).itemsize
    record_nbytes = storage.numel if storage.storage_class.dtype is None else storage.numel * itemsize
    base = reader.add(location, data_start + record_nbytes + DESCRIPTOR_BYTES, fqn)
    return stored_from_record(fail, record, record_nbytes, base + data_start, None, location.transform_descriptors)


class _Head:
    """The decoded head of a blob, decoded on demand and kept (it is small: MAX_HEAD_BYTES at most)."""

    def __init__(self, decoder: _Decoder):
        self.decoder, self.data, self.pos = decoder, bytearray(), 0

    def need(self, fail, end: int) -> None:
        """Decode until at least `end` bytes of the head are held (fail if the stream ends first)."""
        if end > MAX_HEAD_BYTES:
            fail(f"the records before the tensor's data run past {MAX_HEAD_BYTES} decoded bytes: not a tensor blob")
        while len(self.data) < end:
            piece = bytearray(max(end - len(self.data), 4096))
            got = self.decoder.read_some(memoryview(piece))
            self.data += piece[:got]
            if got < len(piece) and len(self.data) < end:
                fail(f"the zstd stream ends after {len(self.data)} decoded bytes, inside the archive's first "
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


def crc_after_record(reader, path: str, record_offset: int, record_nbytes: int, piece: memoryview,
                     fqn: str, location: BlobLocation) -> Tuple[int, Optional[int]]:
    """(computed, recorded) CRC-32 of a decoded data/<key> record: decoded in pieces and summed, then its data
    descriptor read (recorded None when it holds 0: torch.save with compute_crc32=False)."""
    crc, done = 0, 0
    descriptor = bytearray(16)
    while True:
        view = piece[:min(len(piece), record_nbytes - done)]
        last = done + len(view) == record_nbytes
        # The last piece and the descriptor in one read: the decoder is let go once past the record.
        reader.read_into(path, record_offset + done, [view, memoryview(descriptor)] if last else [view])
        crc = zlib.crc32(view, crc)
        done += len(view)
        if last:
            break
    sig, recorded, compressed, plain = struct.unpack("<IIII", descriptor)
    if sig != _DESCRIPTOR_SIG or plain not in (record_nbytes & 0xFFFFFFFF, compressed):
        raise _no_descriptor(location, fqn, record_nbytes)
    return crc, (None if recorded == 0 and record_nbytes else recorded)


def _no_descriptor(location: BlobLocation, fqn: str, record_nbytes: int) -> CorruptChunkError:
    return CorruptChunkError(
        f"{location.relative_path}: tensor {fqn!r}: no zip data descriptor after the decoded storage record "
        f"({record_nbytes} bytes) of the zstd blob at offset {location.offset}: the blob is corrupt",
        file=location.relative_path, tensor=fqn, begin=location.offset, end=location.offset + location.length)
