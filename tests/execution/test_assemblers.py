"""The assemblers as peers: each run directly against a MemoryReader and a MemorySink with a Workspace built by
hand (no Executor), the executor's choice of assembler per layout, and the workspace's buffer as the only memory
they use. Bit-for-bit coverage at random shapes and buffers stays in test_executor, test_strided and test_gather."""
import threading

import numpy as np
import pytest

from streamconv.planning import transforms as tf
from streamconv.execution import band, copy, gather, strided
from streamconv.execution.executor import ASSEMBLERS, choose
from streamconv.execution.workspace import Cancelled, Workspace
from streamconv.planning.plan import PlanOptions, TensorPlan, build_plan
from streamconv.output.sink import MemorySink
from tests.support.memory_checkpoints import make_checkpoint, permuted_checkpoint
from streamconv.source.blob_reader import BlobReader

ARR = np.arange(24 * 16, dtype=np.float32).reshape(24, 16)


def _plan_of(meta):
    plan = build_plan(meta, PlanOptions(max_shard_bytes=10**9))
    (t,) = plan.shards[0].tensors
    return t


def _rope(arr, heads):
    """RoPE's interleaved -> half-split rows, the gather case (see test_gather.torch_rope)."""
    return arr.reshape(heads, -1, 2, arr.shape[1]).transpose(0, 2, 1, 3).reshape(arr.shape)


def _rope_case(cuts=((8,), ())):
    meta, reader, stored = make_checkpoint({"w": ARR}, {"w": list(cuts)})
    chunks = meta.tensors[0].chunks
    takes = tf.takes_from_rows("w", ARR.shape, tf.rope_half_split(ARR.shape[0], 2))
    groups = tf.cut_all(takes, {"w": (ARR.shape, chunks)})
    pieces = tf.flatten(groups)
    t = TensorPlan(name="w", source_fqn="w", src_dtype="float32", dst_dtype="float32", shape=ARR.shape,
                   chunks=tf.distinct_chunks(pieces), begin=0, nbytes=ARR.nbytes, pieces=pieces)
    return t, reader, stored, _rope(ARR, 2)


def _layouts():
    """(name, tensor plan, reader, stored map, expected array), one per assembler."""
    meta, reader, stored = make_checkpoint({"w": ARR}, {"w": [[5, 11], []]})       # FSDP: dim-0 row blocks
    yield "copy", _plan_of(meta), reader, stored, ARR
    meta, reader, stored = make_checkpoint({"w": ARR}, {"w": [[], [3, 9]]})        # tensor parallel: columns
    yield "band", _plan_of(meta), reader, stored, ARR
    meta, reader, stored = permuted_checkpoint(ARR, [[10], [7]], [(1, 0), (0, 1)])  # some boxes transposed
    yield "strided", _plan_of(meta), reader, stored, ARR
    t, reader, stored, want = _rope_case()
    yield "gather", t, reader, stored, want


LAYOUTS = {case[0]: case[1:] for case in _layouts()}
MODULES = {"copy": copy, "band": band, "strided": strided, "gather": gather}


def test_there_is_one_assembler_per_module_and_band_comes_last():
    assert [a.name for a in ASSEMBLERS] == ["copy", "gather", "strided", "band"]
    assert all(MODULES[a.name].ASSEMBLER is a for a in ASSEMBLERS)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_the_executor_picks_the_assembler_made_for_each_layout(name):
    t, reader, stored, _ = LAYOUTS[name]
    assert choose(t, stored).name == name
    assert [a.name for a in ASSEMBLERS if a.accepts(t, stored)] in ([name], [name, "band"])


@pytest.mark.parametrize("buffer_bytes", [1, 100, 1 << 20])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_assembler_writes_the_tensor_from_a_hand_built_workspace(name, buffer_bytes):
    t, reader, stored, want = LAYOUTS[name]
    written = []
    ws = Workspace(BlobReader(reader, stored), stored, buffer_bytes, progress=written.append)
    sink = MemorySink(t.begin + t.nbytes)     # begin: after the shard's header
    MODULES[name].write(ws, t, sink)
    assert bytes(sink.data[t.begin:]) == want.tobytes()
    assert sum(written) == t.nbytes         # every byte counted as progress exactly once
    # The workspace's one buffer is all the memory it used: the budget, or two elements when that is smaller.
    assert ws.buffer_nbytes <= max(buffer_bytes, 2 * 4)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_assembler_casts_through_the_workspace(name):
    import dataclasses

    from streamconv.execution.cast import cast_into  # bit-exact vs torch, see test_cast.py
    t, reader, stored, want = LAYOUTS[name]
    t = dataclasses.replace(t, dst_dtype="bfloat16", nbytes=want.size * 2)
    ws = Workspace(BlobReader(reader, stored), stored, 64)
    sink = MemorySink(t.begin + t.nbytes)     # begin: after the shard's header
    MODULES[name].write(ws, t, sink)
    want_bytes = cast_into(np.frombuffer(want.tobytes(), np.uint8), "float32", "bfloat16").tobytes()
    assert bytes(sink.data[t.begin:]) == want_bytes
    assert ws.buffer_nbytes <= 64


class StopAfterWrites:
    """A MemorySink that sets the run's stop event after `n` writes, as a failing peer worker would."""

    def __init__(self, nbytes, stop, n):
        self.sink, self.stop, self.left = MemorySink(nbytes), stop, n
        self.writes = 0

    def write_at(self, offset, data):
        self.writes += 1
        self.sink.write_at(offset, data)
        self.left -= 1
        if self.left == 0:
            self.stop.set()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_assembler_stops_between_steps_when_the_run_is_abandoned(name):
    import dataclasses
    t, reader, stored, _ = LAYOUTS[name]
    t = dataclasses.replace(t, dst_dtype="bfloat16", nbytes=t.nbytes // 2)   # a cast: copy steps through the buffer
    stop = threading.Event()
    ws = Workspace(BlobReader(reader, stored), stored, 64, stop=stop)
    sink = StopAfterWrites(t.begin + t.nbytes, stop, 1)
    with pytest.raises(Cancelled):
        MODULES[name].write(ws, t, sink)
    assert sink.writes == 1


def test_an_uncast_copy_stops_between_chunks_when_the_run_is_abandoned():
    """Copied whole (in-kernel on a real file), a chunk is one step: the run is checked between chunks, not only
    between tensors (an 11B embedding's chunks went on being copied for 0.65 s after a Ctrl-C)."""
    t, reader, stored, _ = LAYOUTS["copy"]
    assert len(t.chunks) == 3 and not t.is_cast
    stop = threading.Event()
    sink = StopAfterWrites(t.begin + t.nbytes, stop, 1)
    with pytest.raises(Cancelled):
        copy.write(Workspace(BlobReader(reader, stored), stored, 64, stop=stop), t, sink)
    assert sink.writes == 1


class RecordingIntegrity:
    def __init__(self):
        self.checked = []

    def check(self, fqn, chunk):
        self.checked.append((fqn, chunk))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_each_assembler_checks_every_chunk_through_the_workspace(name):
    t, reader, stored, _ = LAYOUTS[name]
    integrity = RecordingIntegrity()
    ws = Workspace(BlobReader(reader, stored), stored, 1 << 20, integrity=integrity)
    MODULES[name].write(ws, t, MemorySink(t.begin + t.nbytes))
    assert {c for _, c in integrity.checked} == set(t.chunks)
    assert {fqn for fqn, _ in integrity.checked} == {t.source_fqn}


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_unstacked_pieces_reach_the_sink_with_their_crc32_so_the_shard_is_not_read_back(tmp_path, copy_file_range):
    """An expert's plane is part of a grouped chunk, so no recorded CRC-32 covers it: the copy assembler takes it
    while copying (on the writer), and the shard's CRC-32 never reads the output back. Seen by changing the output
    file behind the sink's back: the CRC is still that of the bytes the assembler wrote."""
    import zlib

    from streamconv.fs.fastpaths import FastPaths
    from streamconv.output.sink import FileSink
    from streamconv.source.io import DirectoryReader

    grouped = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)      # [experts, ffn, dim]
    meta, memory, stored = make_checkpoint({"w": grouped}, {"w": [[2], [], []]})    # experts 0-1 | 2-3
    chunks = meta.tensors[0].chunks
    for name in {c.location.relative_path for c in chunks}:        # the same files, on disk
        (tmp_path / name).write_bytes(memory.read(name, 0, memory.size(name)))
    fast = FastPaths(copy_file_range=copy_file_range)
    reader = DirectoryReader(str(tmp_path), fast=fast)
    pieces = tf.flatten(tf.cut_all(tf.whole("w", grouped.shape, lead=(3,)), {"w": (grouped.shape, chunks)}))
    t = TensorPlan(name="experts.3", source_fqn="w", src_dtype="float32", dst_dtype="float32", shape=(6, 8),
                   chunks=tf.distinct_chunks(pieces), begin=16, nbytes=6 * 8 * 4, pieces=pieces)
    assert choose(t, stored).name == "copy"
    sink = FileSink(str(tmp_path / "out.safetensors"), t.begin + t.nbytes, fast=fast)
    sink.write_at(0, b"h" * t.begin)
    copy.write(Workspace(BlobReader(reader, stored), stored, 64), t, sink)
    with open(tmp_path / "out.safetensors", "r+b") as f:
        assert f.read()[t.begin:] == grouped[3].tobytes()
        f.seek(t.begin)
        f.write(b"\0" * t.nbytes)        # what a read-back would now see
    assert sink.crc32() == zlib.crc32(b"h" * t.begin + grouped[3].tobytes())
    sink.close()
