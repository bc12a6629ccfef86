"""The Workspace (one buffer, staging behind it, cast in place, pieced writes, cancellation) and the one band
geometry every band-building assembler uses."""
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamconv.execution.geometry import Band, BandGeometry
from streamconv.source.blob_reader import BlobReader
from streamconv.execution.workspace import WRITE_PIECE_BYTES, Cancelled, Workspace
from streamconv.source.io import MemoryReader
from streamconv.model import numel
from streamconv.planning.plan import TensorPlan


def _plan(shape=(1000,), src="float32", dst="float32", begin=0):
    n = numel(shape)
    return TensorPlan(name="t", source_fqn="t", src_dtype=src, dst_dtype=dst, shape=shape, chunks=(), begin=begin,
                      nbytes=n * np.dtype(dst if dst != "bfloat16" else "uint16").itemsize)


def test_scratch_and_staging_share_one_buffer_that_is_reused():
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 1 << 10)
    block, staging = ws.scratch_and_staging(96, _plan(), 32)
    assert (len(block), len(staging)) == (96, 32)
    assert staging.ctypes.data == block.ctypes.data + 96 and ws.buffer_nbytes == 128
    again = ws.scratch(64, _plan())
    assert again.ctypes.data == block.ctypes.data and ws.buffer_nbytes == 128    # smaller: the same buffer


def test_a_widening_cast_gets_room_for_its_output_and_casts_in_place():
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 1 << 10)
    t = _plan((4,), src="bfloat16", dst="float32")
    block = ws.scratch(8, t)
    assert ws.buffer_nbytes == 16
    block[:] = np.frombuffer(np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32).tobytes(), dtype=np.uint8)\
        .reshape(4, 4)[:, 2:].reshape(-1)       # the bfloat16 halves of these float32 values
    out = ws.cast(block, t, 0)
    assert out.ctypes.data == block.ctypes.data
    assert np.frombuffer(out.tobytes(), dtype=np.float32).tolist() == [1.0, -2.0, 0.5, 3.0]


def test_band_budget_leaves_room_for_a_widening_cast_and_is_whole_elements():
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 1000)
    assert ws.band_budget(_plan(src="float32")) == 1000
    assert ws.band_budget(_plan(src="bfloat16", dst="float32")) == 500
    assert ws.band_budget(_plan(src="float64")) == 1000 // 8 * 8
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 1)
    assert ws.band_budget(_plan(src="float64")) == 8   # at least one element


class RecordingSink:
    def __init__(self):
        self.writes = []

    def write_at(self, offset, data):
        self.writes.append((offset, len(memoryview(data).cast("B"))))


def test_emit_writes_pieces_at_the_elements_place_and_counts_progress():
    progress = []
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 1 << 22, progress=progress.append)
    t = _plan((1 << 20,), begin=4096)
    block = ws.scratch(WRITE_PIECE_BYTES * 2 + 40, t)
    sink = RecordingSink()
    ws.emit(t, sink, block, first_element=10)
    start = 4096 + 10 * 4
    assert sink.writes == [(start, WRITE_PIECE_BYTES), (start + WRITE_PIECE_BYTES, WRITE_PIECE_BYTES),
                           (start + 2 * WRITE_PIECE_BYTES, 40)]
    assert progress == [WRITE_PIECE_BYTES * 2 + 40]


def test_check_stop_raises_cancelled_once_the_run_is_abandoned():
    stop = threading.Event()
    ws = Workspace(BlobReader(MemoryReader({}), {}), {}, 64, stop=stop)
    ws.check_stop()
    stop.set()
    with pytest.raises(Cancelled):
        ws.check_stop()


def test_band_geometry_literal():
    g = BandGeometry.fit((4, 6, 8), 4, 100)       # one index of dim 0 is 192 bytes, of dim 1 32 bytes
    assert (g.dim, g.row_bytes, g.rows_per_band, g.max_band_bytes) == (1, 32, 3, 96)
    assert list(g.bands())[:3] == [Band((0,), 0, 3), Band((0,), 3, 6), Band((1,), 0, 3)]
    assert g.first_element(Band((1,), 3, 6)) == 1 * 48 + 3 * 8
    assert BandGeometry.fit((4, 6, 8), 4, 200).dim == 0
    assert BandGeometry.fit_with_staging((4, 6, 8), 4, 100).rows_per_band == 1     # half of 100: 48 bytes
    assert g.limited(2).rows_per_band == 2 and g.limited(0).rows_per_band == 1 and g.limited(9) == g
    # Four column blocks of a [64, 32] bf16 tensor: each row of a band stages 16 bytes (one block's row), not a
    # whole row, so the band gets 1000 // (64 + 16) = 12 rows, where halving the buffer gave it 7.
    blocks = BandGeometry.fit_with_staging((64, 32), 2, 1000, [(64, 8)] * 4)
    assert (blocks.dim, blocks.rows_per_band, blocks.max_band_bytes, blocks.max_staging_bytes) == (0, 12, 768, 192)
    assert BandGeometry.fit_with_staging((64, 32), 2, 1000).rows_per_band == 7      # a whole band staged
    assert BandGeometry.fit_with_staging((64, 32), 2, 2, [(64, 8)]).dim == 1       # one element and its staging
    scalar = BandGeometry.fit((), 2, 1)
    assert list(scalar.bands()) == [Band((), 0, 1)] and scalar.band_bytes(Band((), 0, 1)) == 2
    assert scalar.first_element(Band((), 0, 1)) == 0


@settings(max_examples=200, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=0, max_size=4), item=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 400), staged=st.booleans(), limit=st.integers(0, 5))
def test_bands_tile_the_tensor_in_order_within_the_budget(shape, item, budget, staged, limit):
    budget = max(item, budget // item * item)       # the workspace's band budget is whole elements
    fit = BandGeometry.fit_with_staging if staged else BandGeometry.fit
    g = fit(tuple(shape), item, budget)
    if limit:
        g = g.limited(limit)
    expected_first = 0
    for band in g.bands():
        assert g.first_element(band) == expected_first         # each band starts where the last one ended
        nbytes = g.band_bytes(band)
        assert 0 < nbytes <= max(budget, g.row_bytes) and nbytes <= g.max_band_bytes
        expected_first += nbytes // item
    assert expected_first == numel(shape)                      # ... and together they are the whole tensor
