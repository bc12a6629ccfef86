"""torch's ZStandard extension as a stream transform over a blob, as torch's own `_extension.py` undoes it
(`ZStandard.transform_from(stream)`).

`FileSystemWriter(path, _extensions=[ZStandard()])` passes each item's whole `torch.save` blob through zstd and lists
`'stream.zstd/1'` in its `_StorageInfo.transform_descriptors`. `ZstdStream(files, location, where)` is that blob's
decoded bytes front to back: it reads the compressed bytes from the blob's own range of its file (`location`: file,
offset, length of the *stored* bytes) and never holds more than zstd's window. It knows nothing of what the decoded
bytes are (a torch.save archive: `streamed_blob.py`) nor of who reads them at which decoded offset
(`blob_reader.BlobReader`). `zstandard` is an optional extra: without it, a message naming
`pip install 'streamconv[zstd]'`.
"""
from __future__ import annotations

from ..errors import CheckpointError, UnsupportedFeatureError
from ..model import BlobLocation

DESCRIPTOR = "stream.zstd/1"
ZSTD_EXTRA = "pip install 'streamconv[zstd]'"
MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW_BYTES = 1 << 27               # zstd's own default limit (128 MiB): a frame asking for more is refused
COMPRESSED_READ_BYTES = 256 << 10        # compressed bytes read from the file at a time
# Locating decodes only a blob's first block (at most 128 KiB of output, about as much input): read it in small
# steps, and ask the kernel for it up front (located.locate_all prefetches every blob's head before parsing any).
HEAD_READ_BYTES = 32 << 10
HEAD_PREFETCH_BYTES = 160 << 10


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


class _CompressedRange:
    """The stored bytes of one blob, [location.offset, + location.length) of its file, as the file-like `read(n)`
    zstandard's stream reader pulls from: never a byte outside the blob."""

    def __init__(self, files, location: BlobLocation):
        self.files, self.location, self.pos = files, location, 0

    def read(self, n: int = -1) -> bytes:
        left = self.location.length - self.pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = self.files.read(self.location.relative_path, self.location.offset + self.pos, n)
        self.pos += len(data)
        return data


class ZstdStream:
    """The decoded bytes of one zstd blob, at decoded offset `pos`; moves forward only (`transforms.DecodedStream`).
    `files` is the RangeReader of the checkpoint's files; `where` names the blob (and its tensor) in messages."""

    def __init__(self, files, location: BlobLocation, where: str, read_bytes: int = COMPRESSED_READ_BYTES,
                 contexts=None):
        zstandard = zstandard_module()
        self.where, self.pos = where, 0
        head = files.read(location.relative_path, location.offset, min(4, location.length))
        if head != MAGIC:
            raise CheckpointError(
                f"{where}: .metadata says it is zstd-compressed ({DESCRIPTOR}) but it starts with "
                f"{head.hex()}, not the zstd magic 28b52ffd: the .distcp file does not belong to this .metadata")
        # (`transforms.Contexts`: a context another stream of this thread is done with; a new reader resets it)
        self._contexts = contexts
        self._dctx = (contexts.take(DESCRIPTOR) if contexts is not None else None) or zstandard.ZstdDecompressor(
            max_window_size=MAX_WINDOW_BYTES)
        self._error = zstandard.ZstdError
        self._stream = self._dctx.stream_reader(_CompressedRange(files, location), read_size=read_bytes,
                                                read_across_frames=True)

    def close(self) -> None:
        """Never read again: the decompression context serves this thread's next stream (`transforms.Contexts`)."""
        if self._contexts is not None and self._dctx is not None:
            self._contexts.give(DESCRIPTOR, self._dctx)
        self._dctx = self._stream = None

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
            done += n
        self.pos += done
        return done

    def readinto(self, view: memoryview) -> None:
        """Fill `view` with the next decoded bytes (CheckpointError if the stream ends first or is corrupt)."""
        got = self.read_some(view)
        if got < len(view):
            raise CheckpointError(f"{self.where}: the zstd stream ends after {self.pos} decoded bytes, "
                                  f"{len(view) - got} short of what the archive needs (truncated blob?)")
