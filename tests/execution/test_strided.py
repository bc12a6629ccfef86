"""Chunks stored with permuted strides (`execution/strided.py`), against memory: random N-D tensors cut into random boxes,
each box stored in its own random dim order, reassembled bit for bit at any buffer size, also with a cast.
Real torch-written transposed and channels_last checkpoints: tests/source/test_zstd_strided.py."""
import numpy as np
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
