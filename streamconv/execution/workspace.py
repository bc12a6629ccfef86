"""The workspace every assembler works in: the one working buffer (grown on first use, never two at once), the
cast that runs in place in it, the checks made between steps (cancellation, chunk CRC-32s), progress, and the one
way assembled bytes leave it (`emit`, in WRITE_PIECE_BYTES pieces).

An assembler decides which bytes go where; the workspace owns the memory they pass through, so peak memory is
the buffer whichever assembler runs. numpy and the cast module are imported only when a tensor needs the buffer:
the plain in-kernel copy starts faster without them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence, Tuple

from .. import dtypes
from ..source.blob_reader import BlobReader
from ..model import BlobLocation, Chunk, StoredTensor
from ..output.sink import ShardSink

if TYPE_CHECKING:
    import numpy as np
    from ..planning.plan import TensorPlan

Progress = Callable[[int], None]
Read = Tuple[BlobLocation, int, int]    # (blob, offset in its bytes, length)

# Assembled bytes go to the sink in pieces of this size. On Linux 6.x ext4, one 16 MiB pwrite costs about
# twice the wall and system time of the same bytes in 256 KiB pwrites (2gb shortrun preset, cold cache).
WRITE_PIECE_BYTES = 256 << 10


class Cancelled(Exception):
    """Another worker failed or the user interrupted; this one stopped between two steps."""


class Workspace:
    """What one worker's assemblers share: the reader (chunk bytes by blob location and offset in the blob's
    bytes: `source.blob_reader`), the stored-blob map, and one buffer of `buffer_bytes` (more only when a single
    element or a widening cast needs it), allocated once for the whole run."""

    def __init__(self, reader: BlobReader, stored: Mapping[BlobLocation, StoredTensor], buffer_bytes: int,
                 progress: Optional[Progress] = None, stop=None, integrity=None):
        if not isinstance(reader, BlobReader):
            raise TypeError(f"assemblers read through a source.blob_reader.BlobReader, not {type(reader).__name__}")
        self.reader = reader
        self.stored = stored
        self.buffer_bytes = buffer_bytes
        self.progress: Progress = progress or (lambda n: None)
        self.stop = stop            # a threading.Event set when the run is abandoned, checked between steps
        # A reader.integrity.ChunkIntegrity: each chunk's CRC-32 is checked before its bytes are moved.
        self.integrity = integrity
        self._buffer: Optional[np.ndarray] = None     # numpy uint8 array, grown on first use

    @property
    def buffer_nbytes(self) -> int:
        """Bytes of the working buffer allocated so far (0 before the first step that needs it)."""
        return 0 if self._buffer is None else len(self._buffer)

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Cancelled()

    def check_integrity(self, t: TensorPlan, chunks: Iterable[Chunk]) -> None:
        """Check each chunk's CRC-32 (the checker remembers chunks already checked in this run)."""
        if self.integrity is not None:
            for chunk in chunks:
                self.integrity.check(t.source_fqn, chunk)

    def band_budget(self, t: TensorPlan, buffer_bytes: Optional[int] = None) -> int:
        """Source bytes per step: whole elements, at least one, and small enough that the step's cast output
        (in place, in the same buffer) fits the buffer too; in `buffer_bytes` of it when given (the rest of the
        buffer is used otherwise: `held.py`)."""
        src = dtypes.BY_NAME[t.src_dtype].itemsize
        widest = max(src, dtypes.BY_NAME[t.dst_dtype].itemsize)
        share = (self.buffer_bytes if buffer_bytes is None else buffer_bytes) * src // widest
        return max(src, share // src * src)

    def scratch(self, nbytes: int, t: TensorPlan) -> np.ndarray:
        """A block of `nbytes` at the start of the buffer, with room behind it for the block's cast output."""
        return self.scratch_and_staging(nbytes, t, 0)[0]

    def scratch_and_staging(self, nbytes: int, t: TensorPlan, staging_bytes: int) -> Tuple[np.ndarray, np.ndarray]:
        """A block of `nbytes` at the start of the buffer and `staging_bytes` right behind it (used while the
        block is filled, before the cast). Casts run in place, so a widening cast needs the larger size."""
        import numpy as np
        from .cast import output_nbytes
        need = nbytes + staging_bytes
        if t.is_cast:
            need = max(need, output_nbytes(nbytes, t.src_dtype, t.dst_dtype))
        if self._buffer is None or len(self._buffer) < need:
            self._buffer = None     # drop the old one first, so the two never coexist
            self._buffer = np.empty(need, dtype=np.uint8)
        return self._buffer[:nbytes], self._buffer[nbytes:nbytes + staging_bytes]

    def cast(self, block: np.ndarray, t: TensorPlan, first_element: int) -> np.ndarray:
        """Cast in place the block (from `scratch`) holding elements first_element.. of the tensor. The elements
        torch's own cast leaves to its scalar loop (a 0-d tensor, the tail that does not fill a vector), whose
        NaN bits differ from its vector loop's, are set aside first and cast the scalar way, as torch does with
        one intra-op thread (see cast.torch_scalar_ranges)."""
        from .cast import cast_into, output_nbytes, torch_scalar_ranges
        src_item = dtypes.BY_NAME[t.src_dtype].itemsize
        dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
        last_element = first_element + len(block) // src_item
        tails = []
        for a, b in torch_scalar_ranges(t.shape, t.src_dtype, t.dst_dtype, num_threads=1):
            a, b = max(a, first_element) - first_element, min(b, last_element) - first_element
            if a < b:   # at most 15 elements: the copy is tiny
                tails.append((a, b, block[a * src_item:b * src_item].copy()))
        out_bytes = output_nbytes(len(block), t.src_dtype, t.dst_dtype)
        out = cast_into(block, t.src_dtype, t.dst_dtype, out=self._buffer[:out_bytes])
        for a, b, src in tails:
            cast_into(src, t.src_dtype, t.dst_dtype, out=out[a * dst_item:b * dst_item], path="scalar")
        return out

    def emit(self, t: TensorPlan, sink: ShardSink, block: np.ndarray, first_element: int) -> None:
        """Write the block (source dtype, elements first_element.. of `t`) to its place in the shard: cast when
        the plan casts, in WRITE_PIECE_BYTES pieces, and counted as progress."""
        out = self.cast(block, t, first_element) if t.is_cast else block
        offset = t.begin + first_element * dtypes.BY_NAME[t.dst_dtype].itemsize
        for start in range(0, len(out), WRITE_PIECE_BYTES):
            sink.write_at(offset + start, out[start:start + WRITE_PIECE_BYTES])
        self.progress(len(out))


@dataclass(frozen=True)
class Assembler:
    """One way of putting a tensor's bytes together. The executor asks each in turn whether it `accepts(t,
    stored)` the tensor (chunks already checked against the metadata) and hands it to the first that does;
    `write(workspace, t, sink)` then writes bytes t.begin.. of the shard, checking `workspace.check_stop()`
    between steps and using no memory but the workspace's buffer; `reads(t, stored)`: the ranges it copies whole,
    in order, that may be announced ahead (below)."""
    name: str
    accepts: Callable[["TensorPlan", Mapping[BlobLocation, StoredTensor]], bool]
    write: Callable[[Workspace, "TensorPlan", ShardSink], None]
    # The source ranges `write` reads with `reader.copy_to`, one each, in this order: the executor announces them
    # (`BlobReader.announce`) before the tensor is written, and the next tensor's after them, so a bucket's GETs
    # never drain between two tensors. Empty by default: an assembler whose reads take other paths announces none.
    reads: Callable[["TensorPlan", Mapping[BlobLocation, StoredTensor]], Sequence[Read]] = lambda t, stored: ()
