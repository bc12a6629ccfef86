"""Chunks stored with permuted strides (`execution/strided.py`), against memory: random N-D tensors cut into random boxes,
each box stored in its own random dim order, reassembled bit for bit at any buffer size, also with a cast.
Real torch-written transposed and channels_last checkpoints: tests/source/test_zstd_strided.py."""
import numpy as np
import pytest

from streamconv.model import CheckpointMetadata
from streamconv.source.blob_reader import BlobReader
from hypothesis import given, settings, strategies as st

from tests.support.memory_checkpoints import cases, permuted_checkpoint, read_safetensors, run


@settings(max_examples=300, deadline=None)
@given(case=cases(), buffer_bytes=st.sampled_from([1, 8, 24, 100, 4096]), seed=st.integers(0, 2**16),
       cast=st.booleans())
def test_permuted_boxes_reassemble_exactly(case, buffer_bytes, seed, cast):
    arr, cuts = case
    if arr.ndim < 2:
        return
    rng = np.random.default_rng(seed)
    orders = [tuple(rng.permutation(arr.ndim).tolist()) for _ in range(3)]
    meta, reader, stored = permuted_checkpoint(arr, cuts, orders)
    if cast:
        arr = arr.astype(np.float32)
        meta, reader, stored = permuted_checkpoint(arr, cuts, orders)
        from streamconv.execution.cast import cast_into
        _, out = run(meta, reader, stored, buffer_bytes, dtype="float16")
        want = cast_into(arr.tobytes(), "float32", "float16", path="vector").tobytes()
    else:
        _, out = run(meta, reader, stored, buffer_bytes)
        want = arr.tobytes()
    assert read_safetensors(out["model.safetensors"])["w"] == want


def test_transposed_matrix_in_many_bands_reads_runs():
    """A transposed [300, 257] float32 matrix in bands of a few rows: each band is 257 runs of the storage."""
    arr = np.arange(300 * 257, dtype=np.float32).reshape(300, 257)
    meta, reader, stored = permuted_checkpoint(arr, [[], []], [(1, 0)])
    _, out = run(meta, reader, stored, buffer_bytes=4096)
    assert read_safetensors(out["model.safetensors"])["w"] == arr.tobytes()


@settings(max_examples=200, deadline=None)
@given(case=cases(), buffer_bytes=st.sampled_from([1, 8, 24, 100, 4096]), seed=st.integers(0, 2**16),
       stored_permuted=st.booleans(), cast=st.booleans())
def test_a_tensor_the_plan_transposes_is_its_chunks_put_in_place_permuted(case, buffer_bytes, seed,
                                                                          stored_permuted, cast):
    """`transforms.Transposed` (torchtitan GPT-OSS's [E, 2F, D] experts written as [E, D, 2F]): any permutation
    of any boxes, row-major or themselves stored permuted, at any buffer, with a cast: the permuted tensor, bit for
    bit, through the strided assembler, in the buffer."""
    from streamconv.execution.cast import cast_into
    from streamconv.execution.executor import choose
    from streamconv.execution.workspace import Workspace
    from streamconv.output.sink import MemorySink
    from streamconv.planning import transforms as tf
    arr, cuts = case
    if arr.ndim < 2:
        return
    rng = np.random.default_rng(seed)
    axes = tuple(rng.permutation(arr.ndim).tolist())
    orders = [tuple(rng.permutation(arr.ndim).tolist()) for _ in range(3)] if stored_permuted else [
        tuple(range(arr.ndim))]
    meta, reader, stored = permuted_checkpoint(arr.astype(np.float32), cuts, orders)
    meta = CheckpointMetadata(tensors=(tf.transposed(meta.tensors[0], axes),))
    plan, out = run(meta, reader, stored, buffer_bytes, **({"dtype": "bfloat16"} if cast else {}))
    (t,) = plan.shards[0].tensors
    assert t.axes == axes and t.shape == tuple(arr.shape[a] for a in axes) and choose(t, stored).name == "strided"
    want = np.ascontiguousarray(arr.astype(np.float32).transpose(axes)).tobytes()
    if cast:
        want = cast_into(np.frombuffer(want, np.uint8), "float32", "bfloat16").tobytes()
    assert read_safetensors(out["model.safetensors"])["w"] == want
    ws = Workspace(BlobReader(reader, stored), stored, buffer_bytes)
    sink = MemorySink(t.begin + t.nbytes)
    choose(t, stored).write(ws, t, sink)
    assert ws.buffer_nbytes <= max(buffer_bytes, 2 * 4)      # the one buffer, as for any tensor


def test_grouped_experts_transposed_plane_by_plane():
    """GPT-OSS's shape: [E, 2F, D] sharded on experts (FSDP2) and on rows (tensor parallel) to [E, D, 2F]."""
    from streamconv.planning import transforms as tf
    arr = np.arange(4 * 96 * 64, dtype=np.float32).reshape(4, 96, 64)
    meta, reader, stored = permuted_checkpoint(arr, [[1, 3], [48], []], [(0, 1, 2)])
    meta = CheckpointMetadata(tensors=(tf.transposed(meta.tensors[0], (0, 2, 1)),))
    plan, out = run(meta, reader, stored, buffer_bytes=4096)
    assert plan.shards[0].tensors[0].assembly == "transpose"
    assert read_safetensors(out["model.safetensors"])["w"] == np.ascontiguousarray(arr.transpose(0, 2, 1)).tobytes()


# -- a transposed chunk in torch's own zstd blob: decoded once when it fits the buffer (tests/execution/test_held.py)


@pytest.fixture(scope="module")
def zstd_strided(tmp_path_factory):
    pytest.importorskip("zstandard")
    from tests.support import zstd_writers
    path = tmp_path_factory.mktemp("strided") / "zstd"
    return path, zstd_writers.strided_single(path, zstd=True)


@pytest.mark.parametrize("buffer_bytes, held", [(400 << 10, True), (64 << 10, False)])
def test_a_transposed_zstd_chunk_is_decoded_once_when_it_fits_the_buffer(zstd_strided, buffer_bytes, held):
    """torch's own zstd blob of a transposed [257, 300] float32 tensor (301 KiB), in several bands either way.
    With 400 KiB of buffer it is held: decoded once, the reader's count of decoded bytes is the blob's stream up
    to the tensor's end. With 64 KiB it cannot be: each band decodes it again from its start (the bounded
    fallback), several times the bytes."""
    import streamconv
    from streamconv.runs.checkpoint import blob_reader, load, locate_chunks
    from tests.execution.test_held import layout_of, write_alone
    path, state = zstd_strided
    conversion = streamconv.plan(str(path))
    files, _ = load(str(path))
    with files:
        stored = locate_chunks(conversion, files)
        reader = blob_reader(conversion, files, stored)
        t = next(t for t in conversion.tensors if t.source_fqn == "big_t.weight")
        got, ws = write_alone(t, reader, stored, buffer_bytes)
    assert got == state["big_t.weight"].contiguous().numpy().tobytes()
    (chunk,) = t.chunks
    s = stored[chunk.location]
    assert s.stride == (1, 257) and chunk.location.transform_descriptors
    layout = layout_of(ws, t)
    assert len(list(layout.geometry.bands())) > 1 and bool(layout.held) == held
    once = s.data_offset + s.data_nbytes
    if held:
        assert (reader.decoded_bytes, reader.restarts) == (once, 0)
    else:
        assert reader.decoded_bytes > 3 * once
    assert ws.buffer_nbytes <= buffer_bytes
