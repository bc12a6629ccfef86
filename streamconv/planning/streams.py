"""How many decoded streams one writer keeps alive while it writes a tensor: pure arithmetic over the plan, shared
by the planner (which counts their memory in the predicted peak) and the executor (which keeps no more).

A compressed chunk (a zstd blob) is a forward-only stream: a band that reads it after another band did finds its
stream where that band left it only if the stream was kept in between (`source.blob_reader.BlobReader`), else it
decodes the blob again from its first byte. Bands go in row order, so the chunks whose streams must be kept at
once are those the bands read in turn: the chunks that share a row of the tensor's first dim (`streams_kept`:
tensor-parallel Shard(1) over N ranks, N; FSDP's Shard(0) row blocks, 1: each is read to its end before the next
starts, and a stream is let go once past its chunk). Each kept stream holds zstd's window (2 MiB at torch's
default level) and its input: STREAM_BYTES. At most MAX_STREAMS_PER_WRITER are kept; a tensor whose bands read
more in turn keeps that many and decodes the others again for each band (slower, never wrong, same memory).
A tensor held in the buffer instead (`execution/held.py`: each chunk decoded once, whole) keeps one.
"""
from __future__ import annotations

from typing import Sequence

from .. import dtypes
from ..model import numel
from .coverage import columns_of

# What one more live zstd stream adds to the peak: its window (2 MiB, torch's default level 3 on blobs of
# unknown size, touched only as far as the blob has been decoded: a smaller chunk touches less), zstd's input block
# buffer, the compressed read it decodes from (zstd.COMPRESSED_READ_BYTES) and the decoder context. Measured
# 2.6 MiB a stream (VmRSS after 16 streams each 3 MiB into a 4 MiB bf16 blob, zstandard 0.25.0, 2026-12-07).
WINDOW_BYTES = 2 * 2**20
STREAM_BYTES = 21 * 2**17
# 16 streams are 42 MiB: Shard(1) over up to 16 ranks keeps them all; beyond, the rest are decoded again per band.
MAX_STREAMS_PER_WRITER = 16


def streams_kept(t) -> int:
    """Decoded streams a writer keeps while writing `t` (a `plan.TensorPlan`, whose module imports this one): 1
    for a tensor without compressed chunks or copied chunk after chunk (row-contiguous: the copy assembler), else
    the most compressed chunks that cover one index of dim 0 (at most MAX_STREAMS_PER_WRITER)."""
    if not t.is_compressed or len(t.shape) == 0 or t.is_row_contiguous:
        return 1
    return max(1, min(MAX_STREAMS_PER_WRITER, _most_sharing_a_row(t.chunks, len(t.shape))))


def stream_bytes(t) -> int:
    """What one kept stream of `t` holds: STREAM_BYTES, with only as much of the window as its largest chunk
    fills."""
    largest = max((numel(c.sizes) for c in t.chunks), default=0) * dtypes.BY_NAME[t.src_dtype].itemsize
    return STREAM_BYTES - WINDOW_BYTES + min(WINDOW_BYTES, largest)


def _most_sharing_a_row(chunks: Sequence, ndim: int) -> int:
    """The most non-empty chunks whose dim-0 extents overlap at one index (a sweep over their ends)."""
    if not chunks:
        return 0
    columns = columns_of(chunks)
    sizes = columns[ndim:]
    edges = []
    for i, start in enumerate(columns[0]):
        if all(size[i] for size in sizes):
            edges += [(start, 1), (start + sizes[0][i], -1)]
    live = most = 0
    for _, step in sorted(edges):       # an end (-1) sorts before a start (+1) at the same index
        live += step
        most = max(most, live)
    return most
