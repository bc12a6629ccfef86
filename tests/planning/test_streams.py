"""How many decoded streams a writer keeps for a tensor (`planning/streams.py`), and that the predicted peak counts
them: metadata built by hand, literal counts. The executor keeping exactly these: tests/execution/test_held.py."""
import pytest

from streamconv.model import BlobLocation, CheckpointMetadata, Chunk
from streamconv.planning import plan as plan_module
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.planning.streams import (MAX_STREAMS_PER_WRITER, STREAM_BYTES, WINDOW_BYTES, stream_bytes,
                                        streams_kept)
from tests.support.plan_builders import tensor

ZSTD = ("stream.zstd/1",)


def zloc(rank, compressed=True):
    return BlobLocation(f"__{rank}_0.distcp", 0, 100, ZSTD if compressed else ())


def blocks(shape, grid, compressed=True):
    """`shape` cut into grid[0] x grid[1] boxes, each in its own blob."""
    (rows, cols), (gr, gc) = shape, grid
    h, w = rows // gr, cols // gc
    return tuple(Chunk((i * h, j * w), (h, w), zloc(i * gc + j, compressed)) for i in range(gr) for j in range(gc))


def plan_of(*tensors, **options):
    return build_plan(CheckpointMetadata(tensors=tensors), PlanOptions(**options))


@pytest.mark.parametrize("grid, compressed, kept", [
    ((1, 4), True, 4),          # Shard(1) over 4 ranks: every band reads the 4 column blocks in turn
    ((1, 16), True, 16),
    ((1, 64), True, MAX_STREAMS_PER_WRITER),    # more are decoded again per band
    ((2, 2), True, 2),          # a 2x2 mesh: two blocks share each row
    ((4, 1), True, 1),          # FSDP Shard(0): a plain copy, block after block
    ((1, 4), False, 1),         # plain blobs keep no stream
])
def test_streams_kept_counts_the_compressed_chunks_bands_read_in_turn(grid, compressed, kept):
    (t,) = plan_of(tensor("model.w", (64, 256), chunks=blocks((64, 256), grid, compressed))).tensors
    assert streams_kept(t) == kept


def test_staggered_and_empty_chunks():
    """Row ranges that overlap only in part count where most overlap; FSDP2's empty chunks count for nothing."""
    chunks = (Chunk((0, 0), (6, 4), zloc(0)), Chunk((0, 4), (3, 4), zloc(1)), Chunk((3, 4), (5, 4), zloc(2)),
              Chunk((6, 0), (2, 4), zloc(3)), Chunk((8, 0), (0, 8), zloc(4)))
    (t,) = plan_of(tensor("model.w", (8, 8), chunks=chunks)).tensors
    assert streams_kept(t) == 2


def test_the_predicted_peak_counts_the_streams_of_the_writers_tensors():
    """Each running writer may write the tensor with the most streams at once: the two largest counts beyond the
    first stream each, with two writers; with one, the largest. A stream of 4 MiB chunks fills zstd's window."""
    shape = (2048, 4096)
    tensors = [tensor(f"model.w{n}", shape, chunks=blocks(shape, (1, n))) for n in (2, 4, 8)]
    rows = tensor("model.rows", shape, chunks=blocks(shape, (4, 1)))
    with_blocks, plain = plan_of(*tensors, rows), plan_of(rows)
    assert {stream_bytes(t) for t in with_blocks.tensors} == {STREAM_BYTES}
    assert plan_module._more_streams_bytes(with_blocks.tensors, 2) == (7 + 3) * STREAM_BYTES
    assert plan_module._more_streams_bytes(with_blocks.tensors, 1) == 7 * STREAM_BYTES
    assert plan_module._more_streams_bytes(plain.tensors, 2) == 0
    assert with_blocks.peak_bytes - plan_of(*tensors[:1], rows).peak_bytes > (7 + 3 - 1) * STREAM_BYTES


def test_a_small_chunk_fills_only_its_part_of_the_window():
    """The window is touched only as far as the blob is decoded: 16 KiB column blocks cost their bytes and the
    stream's fixed part, not 2 MiB each."""
    (t,) = plan_of(tensor("model.w", (64, 256), chunks=blocks((64, 256), (1, 4)))).tensors
    assert stream_bytes(t) == STREAM_BYTES - WINDOW_BYTES + 64 * 64 * 4
