"""The copy assembler: every chunk (or, for a transformed tensor, every piece) is one contiguous run of the
output (FSDP's dim-0 shards, RoPE's whole-head pieces, an unstacked expert's plane). Bytes go straight from the
.distcp file to the shard (copy_file_range, in-kernel), or through the workspace's buffer in band-budget steps when
a dtype cast is needed. A zstd chunk's run is decoded once, front to back (`BlobReader.copy_to`).

A piece that is only part of its stored chunk (an expert's plane of a grouped chunk) has no recorded CRC-32, and
the shard's CRC would then be read back from the file by the one writer that finishes it, after every other
writer is done (reading a 2.75 GB MoE shard back and checksumming it took 7.5 s on a loaded 2-core machine). Such a
piece is read one IO step at a time (`PREAD_STEP_BYTES`, outside the buffer, already counted per writer by the
plan's peak) and written from there, and the sink checksums the bytes as it writes them (`FileSink.write_at`), on
every writer side by side. That is one pass over the bytes in user space, and the CRC-32 is of exactly the bytes
written. Copying in-kernel and then reading the source again for its CRC-32 (until 2026-12-07) took 5-17% more CPU
per GB (3 MiB planes from the page cache, Linux 6.18 ext4), and checksummed what the source held at the second
read. The checksum is `output.crc.crc32` (libdeflate where installed): with zlib's it was most of what unstacking
cost beyond the dense path (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Tuple

from .. import dtypes
from ..fs.fastpaths import PREAD_STEP_BYTES
from ..model import BlobLocation, StoredTensor, row_major_strides
from ..planning.transforms import piece_strides
from .workspace import Assembler, Read, Workspace

if TYPE_CHECKING:
    from ..planning.plan import TensorPlan
    from ..output.sink import ShardSink


def accepts(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> bool:
    return t.is_row_contiguous and all(stored[c.location].is_contiguous for c in t.chunks)


def write(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    if t.pieces:
        _copy_pieces(ws, t, sink)
    else:
        _copy_chunks(ws, t, sink)


def copy_run(ws: Workspace, t: TensorPlan, location: BlobLocation, src: int, dst: int, src_nbytes: int,
             sink: ShardSink) -> None:
    """Copy `src_nbytes` contiguous source bytes of `t` at `src` in the blob at `location` to the output at `dst`:
    in-kernel, or cast through the buffer in steps of the band budget."""
    if not t.is_cast:
        ws.reader.copy_to(sink, location, src, dst, src_nbytes)
        ws.progress(src_nbytes)
        return
    src_item = dtypes.BY_NAME[t.src_dtype].itemsize
    dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
    budget = ws.band_budget(t)
    remaining = src_nbytes
    while remaining:
        ws.check_stop()
        step = min(remaining, budget)
        block = ws.scratch(step, t)
        ws.reader.read_into(location, src, [memoryview(block)])
        ws.emit(t, sink, block, (dst - t.begin) // dst_item)
        src += step
        dst += step // src_item * dst_item
        remaining -= step


def _copy_chunks(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
    strides = row_major_strides(t.shape)
    for chunk in t.chunks:
        ws.check_stop()     # between chunks too: a large tensor's chunks took 0.65 s to finish after a Ctrl-C
        stored = ws.stored[chunk.location]
        first = sum(o * s for o, s in zip(chunk.offsets, strides))
        dst = t.begin + first * dst_item
        ws.check_integrity(t, [chunk])      # reads it into the page cache for the copy below
        if not t.is_cast and stored.storage_crc32 is not None:     # the sink neither sums it nor reads it back
            sink.note_source_crc32(dst, stored.data_nbytes, stored.storage_crc32)
        copy_run(ws, t, chunk.location, stored.data_offset, dst, stored.data_nbytes, sink)


def reads(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> Tuple[Read, ...]:
    """The chunks an uncast tensor copies whole, in order (`_copy_chunks`): announced by the executor, so a
    bucket's GETs for the next chunk, and the next tensor's, start while this one is written."""
    if t.is_cast or t.pieces:
        return ()
    return tuple((c.location, stored[c.location].data_offset, stored[c.location].data_nbytes) for c in t.chunks)


def _copy_pieces(ws: Workspace, t: TensorPlan, sink: ShardSink) -> None:
    ws.check_integrity(t, (piece.chunk for piece in t.pieces))  # once per run, however many pieces a chunk feeds
    src_item = dtypes.BY_NAME[t.src_dtype].itemsize
    dst_item = dtypes.BY_NAME[t.dst_dtype].itemsize
    for piece in t.pieces:
        ws.check_stop()
        dst_strides, _, base = piece_strides(piece, t.shape)
        first = sum(o * s for o, s in zip(piece.dst_start, dst_strides))
        stored = ws.stored[piece.chunk.location]
        src, dst, nbytes = stored.data_offset + base * src_item, t.begin + first * dst_item, piece.numel * src_item
        location = piece.chunk.location
        whole_chunk = src == stored.data_offset and nbytes == stored.data_nbytes
        # decoded (zstd) bytes pass through memory anyway, and the sink sums them as it writes
        if t.is_cast or stored.transforms or (whole_chunk and stored.storage_crc32 is not None):
            if not t.is_cast and stored.storage_crc32 is not None:   # the chunk's recorded CRC-32 is the piece's
                sink.note_source_crc32(dst, nbytes, stored.storage_crc32)
            copy_run(ws, t, location, src, dst, nbytes, sink)
        else:
            _copy_through_step(ws, location, src, dst, nbytes, sink)


def _copy_through_step(ws: Workspace, location: BlobLocation, src: int, dst: int, nbytes: int,
                       sink: ShardSink) -> None:
    """Read the piece one IO step at a time and write each step from memory; the sink takes its CRC-32 as it writes
    it, so the shard is not read back later (see the module docstring)."""
    step = memoryview(bytearray(min(PREAD_STEP_BYTES, nbytes)))   # one step at a time: the plan counts one
    done = 0
    while done < nbytes:
        n = min(len(step), nbytes - done)
        ws.reader.read_into(location, src + done, [step[:n]])
        sink.write_at(dst + done, step[:n])
        done += n
    ws.progress(nbytes)


ASSEMBLER = Assembler("copy", accepts, write, reads)
