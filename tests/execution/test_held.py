"""Compressed chunks held in the buffer (`execution/held.py`): a chunk in a zstd blob that several bands read is
decoded once, before the first of them, when the tensor's compressed chunks fit the writer's buffer beside
smaller bands; else each band decodes it again (the bounded fallback). Counted by the blob reader's own tally of
decoded bytes (`BlobReader.decoded_bytes`), on random boxes stored transposed or row-major in their own zstd
blobs, against memory. torch's own zstd blob of a transposed tensor: tests/execution/test_strided.py."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamconv import dtypes
from streamconv.execution import held
from streamconv.execution.executor import choose
from streamconv.execution.workspace import Workspace
from streamconv.output.sink import MemorySink
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.source.blob_reader import BlobReader
from tests.support.memory_checkpoints import cases, permuted_checkpoint

pytest.importorskip("zstandard")


def layout_of(ws, t):
    """The layout the assemblers choose for `t` in workspace `ws`."""
    assembler = choose(t, ws.stored).name
    item = dtypes.BY_NAME[t.src_dtype].itemsize
    from streamconv.execution import band, strided
    bands = {"band": band._bands, "strided": strided._bands}[assembler]
    return held.layout(t, item, ws.buffer_bytes, lambda room: ws.band_budget(t, room),
                       lambda budget, chunks: bands(t, item, budget, chunks))


def write_alone(t, reader, stored, buffer_bytes):
    """Write one tensor through its assembler in a `buffer_bytes` workspace; (its bytes, the workspace)."""
    ws = Workspace(reader, stored, buffer_bytes)
    sink = MemorySink(t.begin + t.nbytes)
    choose(t, stored).write(ws, t, sink)
    return bytes(sink.data[t.begin:]), ws


def _zstd_tensor(arr, cuts, orders, **options):
    meta, files, stored = permuted_checkpoint(arr, cuts, orders, zstd=True)
    (t,) = build_plan(meta, PlanOptions(**options)).shards[0].tensors
    return t, BlobReader(files, stored), stored


def _decoded_once(stored) -> int:
    return sum(3 + s.data_nbytes for s in stored.values() if s.data_nbytes)     # each stream up to its tensor's end


@settings(max_examples=150, deadline=None)
@given(case=cases(), buffer_share=st.sampled_from([0, 0.3, 1.1, 1.3, 1.6, 1.9, 4]), seed=st.integers(0, 2**16),
       permuted=st.booleans(), cast=st.sampled_from([None, ("float32", "float16"), ("float16", "float32")]))
def test_boxes_in_zstd_blobs_reassemble_exactly_each_decoded_once_when_held(case, buffer_share, seed, permuted,
                                                                            cast):
    """Random boxes, each in its own zstd blob, stored in a random dim order (strided) or row-major (band, when
    the boxes are not a plain copy), with a buffer around the tensor's size, cast or not: bit for bit; when the
    layout holds the chunks every blob is decoded exactly once and the buffer is never exceeded."""
    arr, cuts = case
    if arr.ndim < 2:
        return
    rng = np.random.default_rng(seed)
    orders = [tuple(rng.permutation(arr.ndim).tolist()) if permuted else tuple(range(arr.ndim)) for _ in range(3)]
    arr = arr.astype(cast[0]) if cast else arr      # narrowed or widened in place in the buffer
    t, reader, stored = _zstd_tensor(arr, cuts, orders, **({"dtype": cast[1]} if cast else {}))
    if choose(t, stored).name not in ("band", "strided"):
        return      # a plain copy: each chunk one run of the output, read once anyway
    buffer_bytes = max(1, int(buffer_share * arr.nbytes))
    got, ws = write_alone(t, reader, stored, buffer_bytes)
    want = arr.tobytes()
    if cast:
        from streamconv.execution.cast import cast_into
        want = cast_into(np.frombuffer(want, np.uint8), cast[0], cast[1], path="vector").tobytes()
    assert got == want
    layout = layout_of(ws, t)
    if layout.held:
        assert (reader.decoded_bytes, reader.restarts) == (_decoded_once(stored), 0)
        assert ws.buffer_nbytes <= buffer_bytes
    else:
        assert reader.decoded_bytes >= _decoded_once(stored)


def test_row_blocks_of_a_transposed_tensor_share_the_held_area():
    """FSDP's Shard(0) of a transposed [64, 48] float32 weight: four 3 KiB row blocks, each stored transposed in
    its own zstd blob. An 8 KiB buffer cannot hold the 12 KiB tensor, but holds the block or two that bands read
    at a time: each blob decoded once, its slot reused by a later block, the buffer never exceeded."""
    arr = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    t, reader, stored = _zstd_tensor(arr, [[16, 32, 48], []], [(1, 0)])
    got, ws = write_alone(t, reader, stored, 8 << 10)
    assert got == arr.tobytes() and choose(t, stored).name == "strided"
    layout = layout_of(ws, t)
    assert len(layout.held) == 4 and layout.held_bytes < arr.nbytes
    assert len({h.offset for h in layout.held}) < 4         # a slot reused
    assert (reader.decoded_bytes, reader.restarts) == (_decoded_once(stored), 0)
    assert ws.buffer_nbytes <= 8 << 10


@pytest.mark.parametrize("columns", [4, 16])
@pytest.mark.parametrize("buffer_bytes, held_", [(1060 << 10, True), (64 << 10, False)])
def test_column_blocks_in_zstd_blobs_are_decoded_once_held_or_not(columns, buffer_bytes, held_):
    """Tensor-parallel Shard(1) of a [256, 1024] float32 weight in zstd blobs: every band reads every column
    block. Held (1060 KiB of buffer for the 1 MiB tensor, two bands), each is decoded once into the buffer. In
    64 KiB they cannot be held: the writer keeps a stream per block (planning/streams.py), so each is still decoded
    once, front to back (the blob reader used to keep 8 streams for all writers: 16 blocks decoded 9.5x the
    tensor)."""
    arr = np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)
    t, reader, stored = _zstd_tensor(arr, [[], [1024 // columns * i for i in range(1, columns)]], [(0, 1)])
    got, ws = write_alone(t, reader, stored, buffer_bytes)
    assert got == arr.tobytes() and choose(t, stored).name == "band"
    layout = layout_of(ws, t)
    assert bool(layout.held) == held_ and len(list(layout.geometry.bands())) > 1
    assert (reader.decoded_bytes, reader.restarts) == (_decoded_once(stored), 0)
    assert ws.buffer_nbytes <= buffer_bytes and reader.kept_streams() == 0     # all let go at the end


@pytest.fixture(scope="module")
def column_blocks(tmp_path_factory):
    from streamconv.demo_checkpoint import run_distributed
    out = tmp_path_factory.mktemp("columns")
    run_distributed("tests.support.zstd_writers:write_column_blocks", 1, dict(out_dir=str(out)))
    return out


def _write_torch_checkpoint(path, buffer_bytes):
    """The one tensor of a torch-written checkpoint through its assembler: (bytes, reader, tensor plan, stored)."""
    import streamconv
    from streamconv.runs.checkpoint import blob_reader, load, locate_chunks
    conversion = streamconv.plan(str(path))
    files, _ = load(str(path))
    with files:
        stored = locate_chunks(conversion, files)
        reader = blob_reader(conversion, files, stored)
        (t,) = conversion.tensors
        got, ws = write_alone(t, reader, stored, buffer_bytes)
    return got, reader, t, stored, len(list(layout_of(ws, t).geometry.bands()))


@pytest.mark.parametrize("columns", [16, 32])
def test_many_column_blocks_of_a_torch_zstd_checkpoint(column_blocks, columns):
    """torch's own zstd blobs of a [256, 2048] float32 weight in 16 or 32 column blocks, with a 64 KiB buffer
    (37 bands, nothing held). 16 blocks: the writer keeps a stream for each, every blob decoded once. 32 (more
    than MAX_STREAMS_PER_WRITER): the bounded fallback, exact; the 15 streams kept first stay, so each band
    decodes the other 17 again from their start, not all 32."""
    from streamconv.planning.streams import MAX_STREAMS_PER_WRITER, streams_kept
    from tests.support import dcp_writers
    path = column_blocks / f"column_blocks_{columns}"
    got, reader, t, stored, bands = _write_torch_checkpoint(path, 64 << 10)
    assert got == dcp_writers.reference_state_dict(path)["w"].numpy().tobytes()
    assert len(t.chunks) == columns and all(c.location.transform_descriptors for c in t.chunks)
    once = sum(stored[c.location].data_offset + stored[c.location].data_nbytes for c in t.chunks)
    assert streams_kept(t) == min(columns, MAX_STREAMS_PER_WRITER)
    if columns <= MAX_STREAMS_PER_WRITER:
        assert (reader.decoded_bytes, reader.restarts) == (once, 0)
    else:
        again = columns - MAX_STREAMS_PER_WRITER + 1        # per band after the first (one fewer in the last)
        assert bands > 30 and again * (bands - 1) - 1 == reader.restarts
        # Each restart decodes its blob up to the band's rows again: about half of it on average (one more
        # `once` of margin). Dropping the oldest stream instead restarted all 32 every band: 1.7x these bytes.
        assert once < reader.decoded_bytes < once * (2 + again * bands // 2 // columns)


def test_a_layout_holds_no_more_than_the_plan_counts_for_the_tensor():
    """The writer's share may be far larger than the tensor; what is held stays within the plan's count for it
    (planning.plan.buffer_need_bytes), so the predicted peak stays true."""
    from streamconv.planning.plan import buffer_need_bytes
    arr = np.zeros((64, 48), np.float32)
    t, _, stored = _zstd_tensor(arr, [[16, 32, 48], []], [(1, 0)])
    item = 4
    for buffer_bytes in (8 << 10, 13 << 10, 20 << 10, 1 << 20):
        layout = held.layout(t, item, buffer_bytes, lambda room: max(item, room // item * item),
                             lambda budget, chunks: held.BandGeometry.fit_with_staging(
                                 t.shape, item, budget, [c.sizes for c in chunks] or [(1, 1)]))
        used = layout.front_bytes + layout.held_bytes if layout.held else 0
        assert used <= min(buffer_bytes, buffer_need_bytes(t, set(stored)))
