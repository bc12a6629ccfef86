"""Executor tests against memory: random N-D tensors cut into random boxes, reassembled bit for bit.

Blob parsing is not involved here (the `stored` map is built directly); real torch checkpoints are
covered end to end in test_convert.py.
"""
import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from streamconv.execution import band as band_assembler  # SHORT_RUN_BYTES, IOV_MAX
from streamconv.errors import CheckpointError
from streamconv.source.io import MemoryReader
from streamconv.model import CheckpointMetadata, StoredTensor, TensorEntry
from tests.support.memory_checkpoints import NP, cases, make_checkpoint, read_safetensors, run

# How runs reach the band: staged and scattered by numpy (every run "short"), or read in place with preadv
# in batches of `iov_max` runs (every run "long"; a batch of 1 or 3 splits a part's runs over many reads).
RUN_PATHS = {"staged": dict(SHORT_RUN_BYTES=1 << 62), "in place": dict(SHORT_RUN_BYTES=0, IOV_MAX=3),
             "one run per read": dict(SHORT_RUN_BYTES=0, IOV_MAX=1), "default": {}}


@contextlib.contextmanager
def run_path(name):
    with contextlib.ExitStack() as stack:
        for attr, value in RUN_PATHS[name].items():
            stack.enter_context(mock.patch.object(band_assembler, attr, value))
        yield


@settings(max_examples=300, deadline=None)
@given(case=cases(), buffer_bytes=st.sampled_from([1, 8, 24, 100, 4096]), path=st.sampled_from(sorted(RUN_PATHS)))
def test_random_boxes_reassemble_exactly(case, buffer_bytes, path):
    arr, cuts = case
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": cuts})
    with run_path(path):
        plan, out = run(meta, reader, stored, buffer_bytes)
    tensors = read_safetensors(out["model.safetensors"])
    assert tensors["w"] == arr.tobytes()


def test_column_shards_go_through_bands_and_match():
    arr = np.arange(96 * 171, dtype=np.float32).reshape(96, 171)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[], [86]]})
    plan, out = run(meta, reader, stored, buffer_bytes=2048)
    assert not plan.tensors[0].is_row_contiguous
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()


def test_2d_grid_with_shuffled_chunk_order():
    arr = np.arange(96 * 96, dtype=np.int64).reshape(96, 96)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[24, 48, 72], [48]]})
    entry = meta.tensors[0]
    shuffled = CheckpointMetadata(tensors=(TensorEntry(entry.fqn, entry.dtype, entry.shape,
                                                       tuple(reversed(entry.chunks)), entry.path),))
    _, out = run(shuffled, reader, stored, buffer_bytes=1000)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()


def test_many_tensors_across_shards():
    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}.w": rng.standard_normal((5 + i, 3)).astype(np.float32) for i in range(12)}
    cuts = {k: [[2], []] if i % 2 else [[1, 3], [1]] for i, k in enumerate(arrays)}
    meta, reader, stored = make_checkpoint(arrays, cuts)
    plan, out = run(meta, reader, stored, buffer_bytes=64, max_shard_bytes=300)
    assert len(plan.shards) > 1
    found = {}
    for blob in out.values():
        found.update(read_safetensors(blob))
    assert found == {k: v.tobytes() for k, v in arrays.items()}


def test_stored_shape_mismatch_is_reported_with_tensor_name():
    arr = np.zeros((4, 4), dtype=np.float32)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[2], []]})
    loc = next(iter(stored))
    s = stored[loc]
    stored[loc] = StoredTensor(s.dtype, (9, 9), s.stride, s.data_offset, s.data_nbytes)
    with pytest.raises(CheckpointError, match="'w'.*stored shape"):
        run(meta, reader, stored, 64)


def test_non_contiguous_stored_chunk_is_refused_with_fix():
    """Strides that are not a permutation of contiguous ones (here: gapped rows); transposed ones are read."""
    arr = np.zeros((4, 4), dtype=np.float32)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[], []]})
    loc = next(iter(stored))
    s = stored[loc]
    stored[loc] = StoredTensor(s.dtype, s.shape, (8, 1), s.data_offset, s.data_nbytes)
    with pytest.raises(CheckpointError, match="contiguous"):
        run(meta, reader, stored, 64)


@settings(max_examples=150, deadline=None)
@given(case=cases(), buffer_bytes=st.sampled_from([1, 8, 24, 100, 4096]),
       dst=st.sampled_from(["bfloat16", "float16", "float32"]), path=st.sampled_from(sorted(RUN_PATHS)))
def test_random_boxes_with_cast_match_a_whole_tensor_cast(case, buffer_bytes, dst, path):
    from streamconv.execution.cast import cast_into  # bit-exact vs torch, see test_cast.py

    arr, cuts = case
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float32)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": cuts})
    with run_path(path):
        plan, out = run(meta, reader, stored, buffer_bytes, dtype=dst)
    want = cast_into(arr.tobytes(), str(arr.dtype), dst, path="scalar" if arr.ndim == 0 else "vector").tobytes()
    assert read_safetensors(out["model.safetensors"])["w"] == want


@st.composite
def short_run_cases(draw):
    """Wide trailing dims cut into narrow slices: thousands of runs of 1..64 bytes per chunk, as MoE experts
    [E, out, in] split on `in`, convolutions split on a small dim, or 2-D meshes on trailing dims."""
    shape = (draw(st.integers(1, 6)), draw(st.integers(16, 300)), draw(st.integers(2, 16)))
    dim = draw(st.sampled_from([1, 2]))
    cuts = [[], [], []]
    cuts[dim] = draw(st.lists(st.integers(1, shape[dim] - 1), min_size=1, max_size=3))
    if draw(st.booleans()):    # and a grid: cut dim 0 too
        cuts[0] = draw(st.lists(st.integers(1, max(1, shape[0] - 1)), max_size=2)) if shape[0] > 1 else []
    dtype = draw(st.sampled_from(["float32", "float16", "int8"]))
    arr = (np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape) * 100).astype(NP[dtype])
    return arr, cuts


@settings(max_examples=100, deadline=None)
@given(case=short_run_cases(), buffer_bytes=st.sampled_from([1, 100, 4096, 1 << 20]),
       path=st.sampled_from(sorted(RUN_PATHS)))
def test_short_runs_reassemble_exactly(case, buffer_bytes, path):
    arr, cuts = case
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": cuts})
    with run_path(path):
        plan, out = run(meta, reader, stored, buffer_bytes)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()


class CountingReader(MemoryReader):
    def __init__(self, files):
        super().__init__(files)
        self.calls, self.most_buffers = 0, 0

    def read_into(self, relative_path, offset, buffers):
        self.calls += 1
        self.most_buffers = max(self.most_buffers, len(buffers))
        super().read_into(relative_path, offset, buffers)


def test_short_runs_take_one_read_per_chunk_and_band():
    """8-byte runs (the [4096, 256, 4] Shard(2) case, scaled down): never one buffer per run."""
    arr = np.arange(512 * 64 * 4, dtype=np.float32).reshape(512, 64, 4)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[], [], [2]]}, n_files=2)
    counting = CountingReader(reader._files)
    plan, out = run(meta, counting, stored, buffer_bytes=1 << 20)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()
    assert counting.most_buffers == 1 and counting.calls == 2


class PrefetchingReader(MemoryReader):
    """Records what the executor asks to prefetch and what it then reads (one range per read_into call)."""

    def __init__(self, files):
        super().__init__(files)
        self.prefetched, self.read_ranges = [], []

    def prefetch(self, relative_path, offset, length):
        self.prefetched.append((relative_path, offset, length))

    def read_into(self, relative_path, offset, buffers):
        self.read_ranges.append((relative_path, offset, sum(len(b) for b in buffers)))
        super().read_into(relative_path, offset, buffers)


def test_each_band_is_prefetched_while_the_one_before_is_filled():
    arr = np.arange(512 * 64 * 4, dtype=np.float32).reshape(512, 64, 4)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[], [], [2]]}, n_files=2)
    recording = PrefetchingReader(reader._files)
    # 512 KiB tensor: rows of 1 KiB, each with 512 bytes of one chunk staged behind the band, so 42 rows a band
    # (64 KiB // 1.5 KiB): 13 bands, each read as two 21 KiB parts.
    plan, out = run(meta, recording, stored, buffer_bytes=64 << 10)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()
    assert len(recording.read_ranges) == 2 * 13 and recording.read_ranges[0][2] == 42 * 512
    assert recording.prefetched == recording.read_ranges[2:]     # all but the first band's two parts


class AnnouncingReader(MemoryReader):
    """Records, in order, the ranges a copy announces and those it then copies."""

    def __init__(self, files):
        super().__init__(files)
        self.events = []

    def announce(self, relative_path, offset, length):
        self.events.append(("announce", relative_path, offset, length))

    def copy_to(self, sink, relative_path, offset, dst_offset, length):
        self.events.append(("copy", relative_path, offset, length))
        super().copy_to(sink, relative_path, offset, dst_offset, length)


def test_a_copy_announces_a_tensors_chunks_before_copying_them():
    """What lets a reader of objects start the next chunk's GETs while one is written (source/remote.py)."""
    arr = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[16, 40], []]}, n_files=2)
    recording = AnnouncingReader(reader._files)
    plan, out = run(meta, recording, stored, buffer_bytes=1 << 20)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()
    copies = [e[1:] for e in recording.events if e[0] == "copy"]
    assert len(copies) == 3
    assert recording.events == [("announce",) + c for c in copies] + [("copy",) + c for c in copies]


def test_long_runs_are_read_in_place_in_iov_max_batches():
    arr = np.random.default_rng(0).integers(-128, 128, size=(3000, 2048), dtype=np.int8)   # 1 KiB runs
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[], [1024]]}, n_files=2)
    counting = CountingReader(reader._files)
    with mock.patch.object(band_assembler, "SHORT_RUN_BYTES", 512):
        plan, out = run(meta, counting, stored, buffer_bytes=8 << 20)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()
    assert counting.most_buffers == band_assembler.IOV_MAX and counting.calls == 2 * 3   # 3000 runs: 3 batches


# --- casts through the executor are torch's `tensor.to`, NaN bits included -------------------------------------

def _nan_heavy(shape, dtype, seed):
    """Random bit patterns, half of them NaNs with random sign and payload: every element tells the loops apart."""
    uint = {"float64": np.uint64, "float32": np.uint32, "float16": np.uint16}[dtype]
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, np.iinfo(uint).max, size=shape, dtype=uint, endpoint=True)
    exp_mask = {"float64": 0x7FF0000000000000, "float32": 0x7F800000, "float16": 0x7C00}[dtype]
    nan = rng.random(shape) < 0.5
    bits[nan] |= uint(exp_mask) | uint(1)
    return bits.view(dtype)


@pytest.mark.parametrize("src,dst", [("float64", "bfloat16"), ("float16", "float32"), ("float32", "bfloat16"),
                                     ("float64", "float16"), ("float32", "float16")])
@pytest.mark.parametrize("shape,cuts", [((100,), [[40]]), ((31,), [[]]), ((3, 37), [[1], [20]]), ((), []),
                                        ((5, 7, 9), [[2], [], [4]]), ((2, 16), [[], [8]])])
@pytest.mark.parametrize("buffer_bytes", [8, 96, 4096])
def test_cast_matches_torch_single_threaded_nan_bits_included(src, dst, shape, cuts, buffer_bytes):
    """The tail of a tensor that does not fill a vector takes torch's scalar loop (float64 -> bfloat16 elements
    96-99 of 100: 0x7FC0, not the vector loop's 0xFFFF); so does a 0-d tensor. Bands and cast blocks cut
    through that tail anywhere."""
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("NaN bits of torch's x86 kernels")
    arr = _nan_heavy(shape, src, seed=len(shape) * 7 + buffer_bytes)
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": cuts})
    plan, out = run(meta, reader, stored, buffer_bytes, dtype=dst)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = torch.from_numpy(arr.copy()).to(getattr(torch, dst))
    finally:
        torch.set_num_threads(before)
    got = read_safetensors(out["model.safetensors"])["w"]
    want_bytes = want.reshape(-1).view(torch.uint8).numpy().tobytes()
    width = np.dtype(np.uint16 if dst != "float32" else np.uint32)
    g, w = np.frombuffer(got, width), np.frombuffer(want_bytes, width)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, f"{bad.size} of {g.size} differ, first at {bad[0]}: got {g[bad[0]]:#x} torch {w[bad[0]]:#x}"


def test_cast_with_multithreaded_torch_differs_only_in_nan_payloads():
    """What README promises beyond one thread: torch splits a tensor above 32768 elements over its threads, and
    each thread's block has its own scalar tail. Values, infinities and NaN-ness stay identical."""
    torch = pytest.importorskip("torch")
    arr = _nan_heavy((5, 20011), "float64", seed=1)
    arr.reshape(-1)[::3] = np.linspace(-1e5, 1e5, arr.size)[::3]     # plenty of ordinary values too
    meta, reader, stored = make_checkpoint({"w": arr}, {"w": [[2], []]})
    plan, out = run(meta, reader, stored, 1 << 16, dtype="bfloat16")
    got = torch.frombuffer(bytearray(read_safetensors(out["model.safetensors"])["w"]), dtype=torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        want = torch.from_numpy(arr.copy()).to(torch.bfloat16).reshape(-1)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        # the NaNs that do differ are those in the tails of torch's inner thread blocks, and only those
        from streamconv.execution.cast import torch_scalar_ranges
        inner_tails = set(torch_scalar_ranges(arr.shape, "float64", "bfloat16", num_threads=3)) - \
            set(torch_scalar_ranges(arr.shape, "float64", "bfloat16", num_threads=1))
        differ = (got.view(torch.int16) != want.view(torch.int16)).nonzero().reshape(-1).tolist()
        assert differ and all(any(a <= i < b for a, b in inner_tails) for i in differ), (differ, inner_tails)
