"""Issue 18.2's last gap: chunk bytes are addressed honestly. The executor asks `source.blob_reader.BlobReader`
for (blob location, offset in the blob's bytes): a plain blob's offsets are file offsets inside the blob, a zstd
blob's are offsets in its decoded stream, and no decoded byte is given an address in (or past the end of) a file.
Checkpoints written by torch's own FileSystemWriter, with and without `_extensions=[ZStandard()]`."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

import streamconv
from streamconv.errors import CheckpointError
from streamconv.model import BlobLocation
from streamconv.runs.checkpoint import blob_reader, load, locate_chunks
from streamconv.source.blob_reader import BlobReader
from streamconv.source.io import MemoryReader
from streamconv.source.streamed_blob import DESCRIPTOR_BYTES
from tests.end_to_end.test_convert import read_output

pytest.importorskip("zstandard")

STATE = {
    "embed.weight": torch.randn(1024, 256, generator=torch.Generator().manual_seed(0)),   # copy path, many blocks
    "proj_t.weight": torch.randn(96, 40, generator=torch.Generator().manual_seed(1)).t(),  # strided path
    "norm.weight": torch.ones(64, dtype=torch.bfloat16),
}


def _save(path, zstd: bool):
    from torch.distributed.checkpoint._extension import ZStandard
    extensions = {"_extensions": [ZStandard()]} if zstd else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # "torch.distributed is disabled ... assuming a single process"
        dcp.save(STATE, storage_writer=dcp.FileSystemWriter(str(path), sync_files=False, **extensions), no_dist=True)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    return {"plain": _save(root / "plain", zstd=False), "zstd": _save(root / "zstd", zstd=True)}


class _Recorder:
    """Every (reader, location, offset, length) the assemblers and the CRC-32 checker ask a BlobReader for."""

    def __init__(self, monkeypatch):
        self.asked = []
        read_into, copy_to, prefetch = BlobReader.read_into, BlobReader.copy_to, BlobReader.prefetch

        def spy_read_into(reader, location, offset, buffers):
            self.asked.append((reader, location, offset, sum(len(b) for b in buffers)))
            return read_into(reader, location, offset, buffers)

        def spy_copy_to(reader, sink, location, offset, dst_offset, length):
            self.asked.append((reader, location, offset, length))
            return copy_to(reader, sink, location, offset, dst_offset, length)

        def spy_prefetch(reader, location, offset, length):
            self.asked.append((reader, location, offset, length))
            return prefetch(reader, location, offset, length)

        monkeypatch.setattr(BlobReader, "read_into", spy_read_into)
        monkeypatch.setattr(BlobReader, "copy_to", spy_copy_to)
        monkeypatch.setattr(BlobReader, "prefetch", spy_prefetch)


@pytest.mark.parametrize("kind", ["plain", "zstd"])
def test_every_address_the_executor_asks_for_lies_in_its_blob(checkpoints, tmp_path, monkeypatch, kind):
    """Plain: a file offset inside the blob's [offset, offset + length) (so inside the file). zstd: an offset in
    the blob's decoded stream, at most its storage record and the data descriptor after it; the blob's stored
    range is inside the file. Before, a zstd chunk was read at `file size + the blobs decoded before it`."""
    ckpt = checkpoints[kind]
    recorder = _Recorder(monkeypatch)
    streamconv.convert(str(ckpt), str(tmp_path / "out"), crc=True, buffer_size="64KiB", workers=2)
    got = read_output(tmp_path / "out")
    assert all(torch.equal(got[k], v) for k, v in STATE.items())
    sizes = {name: os.path.getsize(ckpt / name) for name in os.listdir(ckpt)}
    assert recorder.asked
    for reader, location, offset, length in recorder.asked:
        assert location.offset + location.length <= sizes[location.relative_path]
        if not location.transform_descriptors:
            assert location.offset <= offset and offset + length <= location.offset + location.length, location
        else:
            stored = reader.stored[location]
            end = stored.record_offset + stored.record_nbytes + DESCRIPTOR_BYTES
            assert 0 <= offset and offset + length <= end, (location, offset, length)
    assert {bool(loc.transform_descriptors) for _, loc, _, _ in recorder.asked} == {kind == "zstd"}


def test_a_zstd_blob_read_in_order_is_decoded_once_and_its_streams_are_let_go(checkpoints):
    """The copy path reads each blob front to back: one stream per blob, no restart, and none kept afterwards
    (each holds zstd's window)."""
    ckpt = str(checkpoints["zstd"])
    conversion = streamconv.plan(ckpt)
    files, _ = load(ckpt)
    with files:
        stored = locate_chunks(conversion, files)
        reader = blob_reader(conversion, files, stored)
        t = next(t for t in conversion.tensors if t.source_fqn == "embed.weight")
        (chunk,) = t.chunks
        s = stored[chunk.location]
        out = bytearray(s.data_nbytes)
        half = s.data_nbytes // 2
        reader.read_into(chunk.location, s.data_offset, [memoryview(out)[:half]])
        reader.read_into(chunk.location, s.data_offset + half, [memoryview(out)[half:]])
        assert bytes(out) == STATE["embed.weight"].numpy().tobytes()
        assert reader.restarts == 0 and reader.decoded_bytes == s.data_offset + s.data_nbytes
        assert reader.kept_streams() == 0       # past the record: let go
        # Reading the first half again starts the blob's stream again (never wrong, counted).
        again = bytearray(half)
        reader.read_into(chunk.location, s.data_offset, [memoryview(again)])
        assert bytes(again) == bytes(out[:half]) and reader.restarts == 0   # (a fresh stream: the old one was let go)


def test_a_plain_read_outside_its_blob_is_refused():
    """The reader refuses an address outside the blob it names (what a synthetic address would be)."""
    files = MemoryReader({"f": bytes(100)})
    location = BlobLocation("f", 10, 20)
    reader = BlobReader(files, {})
    reader.read_into(location, 10, [memoryview(bytearray(20))])
    for offset, length in ((5, 10), (25, 10), (100, 4)):
        with pytest.raises(CheckpointError, match=r"lie outside the blob at \[10, 30\)"):
            reader.read_into(location, offset, [memoryview(bytearray(length))])
    with pytest.raises(CheckpointError, match="outside the blob"):
        reader.copy_to(None, location, 0, 0, 4)


def test_the_executor_reads_through_a_blob_reader_only():
    from streamconv.execution.workspace import Workspace
    with pytest.raises(TypeError, match="BlobReader"):
        Workspace(MemoryReader({}), {}, 1024)


def test_a_cut_zstd_stream_fails_naming_the_file_blob_and_tensor(checkpoints, tmp_path):
    """A blob whose head decodes but whose tensor bytes end early (.metadata cuts it two thirds in): `convert`
    stops while copying, with exit 2 and a message naming the file, the blob and the tensor; nothing is written."""
    import json
    import pickle
    import shutil
    import subprocess
    import sys

    ckpt = tmp_path / "ck"
    shutil.copytree(checkpoints["zstd"], ckpt)
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    index = next(i for i in md.storage_data if i.fqn == "embed.weight")
    info = md.storage_data[index]
    info.length = info.length * 2 // 3          # .metadata now ends the blob two thirds in
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "streamconv", "convert", str(ckpt), str(out), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout, result.stderr)
    error = json.loads(result.stdout)["error"]
    assert info.relative_path in error and f"blob at offset {info.offset}" in error, error
    assert "'embed.weight'" in error and "stream ends after" in error and "Traceback" not in result.stderr, error
    assert not out.exists()


def test_a_threads_zstd_streams_share_one_decompression_context(monkeypatch):
    """A stream done with (past its record, let go, replaced, or its tensor written) gives its decompression
    context to the thread's next stream: eight blobs read one after the other make one context; two kept and read
    in turn make two (a context decodes one stream at a time). The bytes are exact either way."""
    import numpy as np
    import zstandard

    from tests.support.memory_checkpoints import permuted_checkpoint
    made = []
    real = zstandard.ZstdDecompressor
    monkeypatch.setattr(zstandard, "ZstdDecompressor", lambda **kwargs: made.append(1) or real(**kwargs))
    arr = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    meta, files, stored = permuted_checkpoint(arr, [list(range(8, 64, 8)), []], [(0, 1)], zstd=True)
    chunks = meta.tensors[0].chunks
    reader = BlobReader(files, stored)
    for chunk in chunks:
        out = bytearray(stored[chunk.location].data_nbytes)
        reader.read_into(chunk.location, 3, [memoryview(out)])
        assert bytes(out) == arr[chunk.offsets[0]:chunk.offsets[0] + 8].tobytes()
    assert len(made) == 1 and reader.restarts == 0
    made.clear()
    reader = BlobReader(files, stored)
    halves = {c.location: bytearray(stored[c.location].data_nbytes) for c in chunks[:2]}
    with reader.keeping(2):
        for first in (True, False):
            for chunk in chunks[:2]:
                out = memoryview(halves[chunk.location])
                half = len(out) // 2
                reader.read_into(chunk.location, 3 if first else 3 + half, [out[:half] if first else out[half:]])
    assert [bytes(halves[c.location]) for c in chunks[:2]] == [arr[0:8].tobytes(), arr[8:16].tobytes()]
    assert len(made) == 2 and reader.restarts == 0
