"""runs/parallel.py: the writers of a plan's shards, here reading a torch-written checkpoint from a bucket
(memory://, the same RemoteReader as s3://) through the real reader, executor and assemblers."""
from __future__ import annotations

import threading
import uuid

import fsspec
import pytest

import streamconv
from streamconv.output.sink import MemorySink
from streamconv.runs.checkpoint import blob_reader, locate_chunks
from streamconv.runs.parallel import write_shards
from streamconv.source import remote as remote_reads
from streamconv.source.remote import RemoteReader

WAIT_S = 5.0     # how long a writer waits, at a tensor's last byte, for the next tensor's first GET


@pytest.fixture
def bucket_copy(dcp_checkpoints):
    """The fsdp2 checkpoint's files as objects under a memory:// prefix."""
    ckpt = dcp_checkpoints["fsdp2"]
    fs = fsspec.filesystem("memory")
    root = f"/parallel-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/{p.name}": p.read_bytes() for p in ckpt.iterdir() if p.is_file()})
    yield ckpt, f"memory://{root}"
    fs.rm(root, recursive=True)


def test_a_writer_has_the_next_tensors_gets_in_flight_while_it_writes_this_one(bucket_copy, tmp_path, monkeypatch):
    """A worker takes its next tensor before it writes this one, and the executor announces the next one's chunks
    behind this one's: from a bucket, the next tensor's GETs have started before this tensor's last byte is
    written (the requests never drain between two tensors). Checked at the sink: on a tensor's last write, the
    writer waits for a GET of the next tensor's chunks, which starts only if it was announced ahead. The shard is
    still the local conversion's, byte for byte."""
    ckpt, url = bucket_copy
    # (the tiny model's chunks are a few KiB: announced as big ranges, as a real model's are, not prefetched)
    monkeypatch.setattr(remote_reads, "SMALL_READ_BYTES", 256)
    plan = streamconv.plan(str(ckpt))
    reader = RemoteReader(url)
    started = {}            # (path, offset, length) -> Event set when its first GET starts
    fetch = reader.client.get

    def get(path, start, end):
        for (p, offset, length), event in started.items():
            if p == path and offset <= start < offset + length:
                event.set()
        return fetch(path, start, end)

    monkeypatch.setattr(reader.client, "get", get)
    stored = locate_chunks(plan, reader)
    blobs = blob_reader(plan, reader, stored)
    tensors = [t for s in plan.shards for t in s.tensors]
    first_read = {t.name: (c.location.relative_path, stored[c.location].data_offset, stored[c.location].data_nbytes)
                  for t in tensors for c in t.chunks[:1] if stored[c.location].data_nbytes > 256}
    for key in first_read.values():
        started[key] = threading.Event()
    # a tensor's last byte -> the next tensor's first read (both read from the bucket, one after the other)
    ends = {t.begin + t.nbytes: first_read[u.name] for t, u in zip(tensors, tensors[1:])
            if t.name in first_read and u.name in first_read and not t.is_cast}
    seen = []

    class Watching(MemorySink):
        def write_at(self, offset, data):
            super().write_at(offset, data)
            nxt = ends.get(offset + memoryview(data).nbytes)
            if nxt is not None:
                seen.append(started[nxt].wait(WAIT_S))

    sinks = {}

    def open_sink(path, nbytes):
        sinks[path] = Watching(nbytes)
        return sinks[path]

    with reader:
        write_shards(plan.shards, blobs, stored, lambda name: name, buffer_bytes=32 << 20, workers=1,
                     open_sink=open_sink, take_ahead=True)
    assert len(seen) >= 5 and all(seen), seen
    out = tmp_path / "local"
    streamconv.convert(str(ckpt), str(out))
    for shard in plan.shards:
        assert bytes(sinks[shard.filename].data) == (out / shard.filename).read_bytes()


def test_taking_a_tensor_ahead_never_leaves_a_worker_without_one(dcp_checkpoints):
    """A worker takes one more tensor while it writes one only when enough are left for every other worker: with
    as many tensors as workers, each worker writes one (side by side), none takes two while another idles."""
    import dataclasses

    from streamconv.runs.checkpoint import load

    ckpt = dcp_checkpoints["fsdp2"]
    plan = streamconv.plan(str(ckpt))
    shard = plan.shards[0]
    two = dataclasses.replace(shard, tensors=tuple(t for t in shard.tensors if not t.is_cast)[:2])
    both_writing = threading.Barrier(2)
    waited = set()

    class Meeting(MemorySink):
        def write_at(self, offset, data):
            # each worker's first write of a tensor (not the header) waits for the other's
            if offset >= len(two.header) and threading.get_ident() not in waited:
                waited.add(threading.get_ident())
                both_writing.wait(timeout=WAIT_S)       # BrokenBarrierError if the other never writes
            super().write_at(offset, data)

        def abort(self):
            pass

    reader, _ = load(str(ckpt))
    with reader:
        stored = locate_chunks(plan, reader)
        write_shards([two], blob_reader(plan, reader, stored), stored, lambda name: name,
                     buffer_bytes=32 << 20, workers=2, open_sink=lambda path, nbytes: Meeting(nbytes),
                     take_ahead=True)
    assert len(waited) == 2
