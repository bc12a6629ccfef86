"""A shard's CRC-32 without reading it back: combined from the CRCs of the pieces that make it.

Bytes that pass through memory (the header, cast or assembled bands) are checksummed as they are written.
Bytes copied in-kernel (`copy_file_range`) never reach user space, but each is a whole storage record of a
`torch.save` zip, whose CRC-32 the zip directory already holds. `crc32_combine` joins them in file order.
Any range without a known CRC is read back from the file, so the result is always the whole file's CRC-32.
Reading a 2 GB output back would cost ~0.4 s on a 1.5 s conversion; combining costs microseconds per piece.

Bytes that must be checksummed go through `crc32`: zlib's, or libdeflate's where the system has it (a shared
library found once at import, like libz's `crc32_combine` below). libdeflate folds with PCLMULQDQ: ~8 GB/s
against zlib 1.2.13's ~1.5-2.4 GB/s on the 2-core test VM, and an unstacked expert's plane has no recorded CRC, so
a MoE conversion checksums nearly every byte it writes (docs/benchmarks.md). STREAMCONV_NO_FAST_PATHS=1 (or
all) keeps zlib's, as it turns the other fast paths off.
"""
from __future__ import annotations

import ctypes
import functools
import threading
import zlib
from typing import Callable, Dict, Optional, Tuple

from .. import failpoints

_POLY = 0xEDB88320     # CRC-32 (zip), reflected


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (zlib's multmodp)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


@functools.lru_cache(maxsize=None)
def _x2n() -> Tuple[int, ...]:
    """x^(2^k) mod p: x^1, x^2, x^4, ... Built on first use, not at import: 10 ms of start-up that only a system
    without libz's crc32_combine needs."""
    table = [1 << 30]
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return tuple(table)


def _x8nmodp(nbytes: int) -> int:
    x2n = _x2n()
    p, k, n = 1 << 31, 3, nbytes
    while n:
        if n & 1:
            p = _multmodp(x2n[k & 31], p)
        n >>= 1
        k += 1
    return p


def _combine_python(crc1: int, crc2: int, len2: int) -> int:
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def _load_library(name: str, soname: str) -> ctypes.CDLL:
    """The shared library by its usual soname; `find_library` (which runs `ldconfig -p` in a child process: a
    fork at every start-up) only where that name is not found. OSError when neither loads."""
    try:
        return ctypes.CDLL(soname)
    except OSError:
        from ctypes.util import find_library     # (and subprocess with it: only without the usual soname)
        found = find_library(name)
        if found is None:
            raise
        return ctypes.CDLL(found)


def _libz_combine() -> Optional[Callable[[int, int, int], int]]:
    try:
        lib = _load_library("z", "libz.so.1")
        fn = getattr(lib, "crc32_combine64", None) or lib.crc32_combine
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_ulong
    fn.argtypes = [ctypes.c_ulong, ctypes.c_ulong, ctypes.c_int64]
    return lambda crc1, crc2, len2: fn(crc1, crc2, len2) & 0xFFFFFFFF


_combine_c = _libz_combine()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A+B from crc(A), crc(B) and len(B) (zlib's crc32_combine; pure Python without libz)."""
    if len2 <= 0:
        return crc1
    return _combine_c(crc1, crc2, len2) if _combine_c else _combine_python(crc1, crc2, len2)


# Below this, a ctypes call costs more than zlib's loop saves.
_FAST_MIN_BYTES = 64 << 10


def _libdeflate_crc32() -> Optional[Callable[[int, object, int], int]]:
    try:
        lib = _load_library("deflate", "libdeflate.so.0")
        fn = lib.libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32        # ctypes calls release the GIL: writers checksum side by side
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return checked(fn)


def checked(fn: Callable[[int, object, int], int]) -> Optional[Callable[[int, object, int], int]]:
    """`fn` if it computes zlib's CRC-32 (the standard check value, and continuing a running CRC), else None: a
    library of that name that answers differently is never trusted with the records."""
    try:
        ok = fn(0, b"123456789", 9) == 0xCBF43926 and fn(zlib.crc32(b"1234"), b"56789", 5) == 0xCBF43926
    except (OSError, TypeError, ValueError, ctypes.ArgumentError):
        return None
    return fn if ok else None


def _fast_crc32_on() -> bool:
    return failpoints.no_fast_paths().strip().lower() not in ("1", "all")


_deflate_crc32 = _libdeflate_crc32() if _fast_crc32_on() else None


def crc32_libdeflate(data, crc: int = 0) -> int:
    """libdeflate's CRC-32 of a C-contiguous bytes-like object (continuing `crc`); the caller checks that
    libdeflate was found (`FAST_CRC32`)."""
    if isinstance(data, bytes):
        return _deflate_crc32(crc, data, len(data))     # ctypes passes a bytes object's own buffer
    view = memoryview(data).cast("B")
    if view.readonly:                   # ctypes takes the address of writable buffers only
        return zlib.crc32(view, crc)
    return _deflate_crc32(crc, (ctypes.c_char * len(view)).from_buffer(view), len(view))


FAST_CRC32 = _deflate_crc32 is not None       # whether `crc32` uses libdeflate in this process


def crc32(data, crc: int = 0) -> int:
    """zlib.crc32(data, crc): the same value, computed by libdeflate where it is installed."""
    if FAST_CRC32 and memoryview(data).nbytes >= _FAST_MIN_BYTES:
        return crc32_libdeflate(data, crc)
    return zlib.crc32(data, crc)


class PieceCrcs:
    """CRC-32s of the ranges written into one file, keyed by offset. Several workers fill one file (each
    its own tensors), hence the lock.

    A piece of known CRC that starts where another of known CRC ends is folded into it (crc32_combine): a
    writer fills its tensors front to back, so a shard's ranges stay a few runs however it was written. Kept
    piece by piece, the records grew with the shard instead: a 5 GB shard assembled in 256 KiB writes held 80k
    of them, 13 MiB above the buffer (11B, column blocks)."""

    def __init__(self):
        self._pieces: Dict[int, Tuple[int, Optional[int]]] = {}
        self._run_ends: Dict[int, int] = {}     # end offset -> start of a piece of known CRC ending there
        # start -> [length, CRC-32, next offset]: ranges whose CRC-32 the caller gave before writing them (`expect`)
        self._expected: Dict[int, list] = {}
        self._lock = threading.Lock()

    def add(self, offset: int, length: int, crc: Optional[int]) -> None:
        if length > 0:
            with self._lock:
                if crc is not None or not self._counted(offset, length):
                    self._add(offset, length, crc)

    def _add(self, offset: int, length: int, crc: Optional[int]) -> None:
        start = self._run_ends.pop(offset, None) if crc is not None else None
        if start is not None and self._pieces.get(start, (0, None))[1] is not None:
            run_length, run_crc = self._pieces[start]
            self._pieces[start] = (run_length + length, crc32_combine(run_crc, crc, length))
        else:
            start = offset
            self._pieces[offset] = (length, crc)
        if crc is not None:
            self._run_ends[offset + length] = start

    def add_bytes(self, offset: int, data) -> None:
        if len(data) == 0:
            return
        with self._lock:        # (the CRC-32 is computed outside the lock: writers sum side by side)
            if self._counted(offset, len(data)):
                return
        self.add(offset, len(data), crc32(data))

    def expect(self, offset: int, length: int, crc: int) -> None:
        """The bytes about to be written to [offset, offset + length) have this CRC-32 (a storage record's, from
        the checkpoint's zip directory). The writes that then fill the range front to back are counted, not
        summed, and once they reach its end it is one piece of that CRC. Told afterwards instead, the range's
        writes would already be summed (for nothing) and folded into a run that started before it, which no CRC
        can be taken out of: total() then read the whole file back (2.3 s at the end of a 2 GB conversion from a
        bucket). A write into the range anywhere else than where the last one ended cancels the expectation: the
        bytes counted so far are then a range of unknown CRC, read back by total()."""
        if length > 0:
            with self._lock:
                self._expected[offset] = [length, crc, offset]

    def _counted(self, offset: int, length: int) -> bool:
        """Whether [offset, offset + length) continues an expected range (then counted toward it); the caller
        holds the lock."""
        start = next((s for s, (n, _, _) in self._expected.items() if s <= offset < s + n), None)
        if start is None:
            return False
        entry = self._expected[start]
        if offset != entry[2] or offset + length > start + entry[0]:
            del self._expected[start]       # not front to back: trust only the file
            return False
        entry[2] += length
        if entry[2] == start + entry[0]:
            del self._expected[start]
            self._add(start, entry[0], entry[1])
        return True

    def total(self, nbytes: int, read: Callable[[int, int], bytes]) -> int:
        """The CRC-32 of the file's first `nbytes`; ranges not covered exactly once are read back."""
        crc, pos = 0, 0
        with self._lock:
            pieces = dict(self._pieces)
        for offset in sorted(pieces):
            length, piece = pieces[offset]
            if offset < pos:                        # overlapping writes: trust only the file itself
                return _read_crc(0, nbytes, read)
            if offset > pos:
                crc = crc32_combine(crc, _read_crc(pos, offset - pos, read), offset - pos)
            if piece is None:
                piece = _read_crc(offset, length, read)
            crc = crc32_combine(crc, piece, length)
            pos = offset + length
        if pos < nbytes:
            crc = crc32_combine(crc, _read_crc(pos, nbytes - pos, read), nbytes - pos)
        return crc


# Small: each piece is a fresh bytes object, and copies without a recorded CRC (chunks in safetensors blobs,
# torch.save with compute_crc32=False) are all read back; 8 MiB pieces added ~10 MiB to peak RSS.
_READ_PIECE_BYTES = 1 << 20


def _read_crc(offset: int, length: int, read: Callable[[int, int], bytes]) -> int:
    crc = 0
    end = offset + length
    while offset < end:
        data = read(offset, min(_READ_PIECE_BYTES, end - offset))
        if not data:
            raise OSError(f"file ends at offset {offset}, expected {end - offset} more bytes")
        crc = crc32(data, crc)
        offset += len(data)
    return crc
