"""source/remote.py: the RangeReader of a checkpoint at an fsspec URL (memory:// here, so every path runs
in-process; tests/end_to_end/test_remote.py runs the same reader against an S3 server)."""
from __future__ import annotations

import pickle
import threading
import time
import uuid

import fsspec
import pytest

from streamconv.errors import CheckpointError
from streamconv.output.sink import MemorySink
from streamconv.source import remote as remote_reads
from streamconv.source.io import DirectoryReader
from streamconv.source.remote import RemoteReader, folder_reader

DATA = bytes(range(256)) * 4096 * 5      # 5 MiB


@pytest.fixture
def url():
    fs = fsspec.filesystem("memory")
    root = f"/reader-{uuid.uuid4().hex}"
    fs.pipe({f"{root}/__0_0.distcp": DATA, f"{root}/small": b"abc"})
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_reads_are_exact_whatever_their_size(url):
    with RemoteReader(url, request_bytes=1 << 20) as reader:
        assert reader.size("__0_0.distcp") == len(DATA)
        for offset, length in [(0, 1), (5, 4096), ((1 << 20) - 3, 10), (123, 3 << 20), (0, len(DATA))]:
            assert reader.read("__0_0.distcp", offset, length) == DATA[offset:offset + length]
        a, b = bytearray(700_000), bytearray(2_500_000)
        reader.read_into("__0_0.distcp", 11, [memoryview(a), memoryview(b)])
        assert bytes(a + b) == DATA[11:11 + len(a) + len(b)]
        sink = MemorySink(len(DATA))
        reader.copy_to(sink, "__0_0.distcp", 7, 3, len(DATA) - 7)
        assert bytes(sink.data[3:3 + len(DATA) - 7]) == DATA[7:]


def test_a_range_past_the_end_is_a_truncated_checkpoint_never_a_short_read(url):
    with RemoteReader(url) as reader:
        with pytest.raises(CheckpointError, match="truncated checkpoint"):
            reader.read("small", 1, 3)
        with pytest.raises(CheckpointError, match="truncated checkpoint"):
            reader.read_into("__0_0.distcp", len(DATA) - 2, [memoryview(bytearray(4))])
        with pytest.raises(CheckpointError, match="truncated checkpoint"):
            reader.copy_to(MemorySink(8), "__0_0.distcp", len(DATA) - 2, 0, 8)


def test_an_object_shorter_than_its_listing_is_refused(url):
    """The object shrank after its size was read (a re-upload): the answer is short, the reader says so."""
    with RemoteReader(url) as reader:
        reader.size("__0_0.distcp")
        fsspec.filesystem("memory").pipe(url[len("memory://"):] + "/__0_0.distcp", DATA[:100])
        with pytest.raises(CheckpointError, match="changed during the run"):
            reader.read("__0_0.distcp", 0, 1 << 20)


@pytest.mark.parametrize("name", ["../other/x", "/etc/passwd", "", "a\x00b", "sub/../../x"])
def test_names_from_metadata_cannot_leave_the_prefix(url, name):
    with RemoteReader(url) as reader:
        with pytest.raises(CheckpointError, match="invalid data file|outside the checkpoint folder"):
            reader.read(name, 0, 1)


def test_a_missing_data_file_is_named(url):
    with RemoteReader(url) as reader:
        with pytest.raises(CheckpointError, match=r"__9_0\.distcp: file named in \.metadata is missing"):
            reader.size("__9_0.distcp")


def test_requests_in_flight_never_exceed_the_bound(url, monkeypatch):
    """Four threads each reading 5 MiB in 256 KiB requests (through the reader's pool, and one by one
    themselves) through a reader allowed 3 at once."""
    reader = RemoteReader(url, max_requests=3, request_bytes=256 << 10)
    state = {"now": 0, "most": 0}
    lock = threading.Lock()
    fetch = reader.client.get

    def slow_cat(path, start, end):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.002)
        try:
            return fetch(path, start, end)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(reader.client, "get", slow_cat)
    results = [None] * 4

    def work(i):
        buf = bytearray(len(DATA))
        reader.read_into("__0_0.distcp", 0, [memoryview(buf)])      # split into requests on the reader's pool
        step = 256 << 10    # one request each, made by this thread itself
        pieces = [reader.read("__0_0.distcp", at, step) for at in range(0, len(DATA), step)]
        results[i] = bytes(buf) == DATA and b"".join(pieces) == DATA

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert results == [True] * 4
    assert state["most"] == 3       # the bound is reached and never passed
    assert reader.inflight_bytes == 3 * (256 << 10)


def test_small_reads_share_cached_blocks(url, monkeypatch):
    reader = RemoteReader(url)
    calls = []
    fetch = reader.client.get
    monkeypatch.setattr(reader.client, "get", lambda path, start, end: calls.append((start, end))
                        or fetch(path, start, end))
    for offset in range(0, 1 << 20, 4096):      # 256 header-sized reads inside one block
        assert reader.read("__0_0.distcp", offset, 64) == DATA[offset:offset + 64]
    assert calls == [(0, remote_reads.BLOCK_BYTES)]
    # a small read straddling two blocks is stitched from both
    edge = remote_reads.BLOCK_BYTES - 10
    assert reader.read("__0_0.distcp", edge, 20) == DATA[edge:edge + 20]
    reader.close()


def test_a_reader_pickles_to_its_url_not_its_client(url):
    """Shard jobs of a separate process (Ray, SeparateRunner) open their own client from the URL."""
    reader = RemoteReader(url, max_requests=2)
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.root == url and copy.max_requests == 2
    assert copy.read("small", 0, 3) == b"abc"


def test_folder_reader_picks_by_url(url, tmp_path):
    with folder_reader(url) as reader:
        assert isinstance(reader, RemoteReader) and reader.path("small") == f"{url}/small"
    with folder_reader(str(tmp_path)) as reader:
        assert isinstance(reader, DirectoryReader)


def test_answers_waiting_to_be_written_count_against_the_bound(url, monkeypatch):
    """copy_to holds a request's slot until its answer is written: two threads copying into slow sinks never hold
    more than max_requests answers between them (fetched or fetching), so the memory bound is the reader's, not
    max_requests per thread."""
    reader = RemoteReader(url, max_requests=3, request_bytes=256 << 10)
    state = {"held": 0, "most": 0}
    lock = threading.Lock()
    fetch = reader.client.get

    def counted_get(path, start, end):
        with lock:
            state["held"] += 1
            state["most"] = max(state["most"], state["held"])
        return fetch(path, start, end)

    class SlowSink(MemorySink):
        def write_at(self, offset, data):
            time.sleep(0.003)
            super().write_at(offset, data)
            with lock:
                state["held"] -= 1

    monkeypatch.setattr(reader.client, "get", counted_get)
    sinks = [SlowSink(len(DATA)) for _ in range(2)]
    threads = [threading.Thread(target=reader.copy_to, args=(sink, "__0_0.distcp", 0, 0, len(DATA)))
               for sink in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert all(bytes(sink.data) == DATA for sink in sinks)
    assert state["most"] == 3 and state["held"] == 0


def test_prefetched_small_ranges_are_fetched_exactly_merged_and_ahead(url, monkeypatch):
    """Locating announces each blob's 4 KiB head and tail: they are fetched on their own (a blob's tail and the
    next one's head as one request), not as 1 MiB blocks, and every read takes its bytes from them."""
    reader = RemoteReader(url)
    calls = []
    fetch = reader.client.get
    monkeypatch.setattr(reader.client, "get", lambda path, start, end: calls.append((start, end))
                        or fetch(path, start, end))
    blob = 100_000      # blobs of 100 kB back to back: head [b, b+4096), tail [b+blob-4096, b+blob)
    ranges = [(b + at, 4096) for b in range(0, 10 * blob, blob) for at in (0, blob - 4096)]
    for offset, length in ranges:
        reader.prefetch("__0_0.distcp", offset, length)
    for offset, length in ranges:
        assert reader.read("__0_0.distcp", offset, length) == DATA[offset:offset + length]
    reader.close()
    assert all(end - start <= 8192 for start, end in calls), calls      # no 1 MiB block
    assert len(calls) == 11     # the first head, 9 tail+head pairs, the last tail


def _recording(reader, monkeypatch, calls):
    fetch = reader.client.get

    def get(path, start, end):
        calls.append((start, end))
        return fetch(path, start, end)
    monkeypatch.setattr(reader.client, "get", get)


def test_announced_chunks_are_fetched_ahead_in_few_even_requests(url, monkeypatch):
    """A tensor's chunks are announced before they are copied: the next chunk's GETs start while this one is
    written (the pipeline does not drain at every chunk), each chunk in as few requests as request_bytes allows,
    split evenly, within max_requests slots; every byte lands where it belongs."""
    reader = RemoteReader(url, max_requests=3, request_bytes=256 << 10)
    calls: list = []
    _recording(reader, monkeypatch, calls)
    chunks = [(0, 600_000), (700_000, 600_000), (1_400_000, 300_000), (2_000_000, 513 << 10)]
    for offset, length in chunks:
        reader.announce("__0_0.distcp", offset, length)
    sink = MemorySink(len(DATA))
    started_ahead = []
    for offset, length in chunks:
        reader.copy_to(sink, "__0_0.distcp", offset, offset, length)
        started_ahead.append(len(reader._stream().ahead))      # GETs of the next chunk, started
    for offset, length in chunks:
        assert bytes(sink.data[offset:offset + length]) == DATA[offset:offset + length]
    assert started_ahead == [2, 2, 2, 0]    # as many of the next chunk's GETs as slots were free
    assert sorted(end - start for start, end in calls) == [150_000] * 2 + [175_104] * 3 + [200_000] * 6
    assert reader._slots._value == 3     # every slot back
    reader.close()


def test_another_read_forgets_what_was_fetched_ahead_and_gives_its_slots_back(url):
    """Threads holding slots for an announced chunk and then reading something else (a cast's read_into) let them
    go before they wait for one (a thread never waits while it holds slots); the bytes stay exact and every slot
    comes back."""
    reader = RemoteReader(url, max_requests=2, request_bytes=256 << 10)
    both = threading.Barrier(2)
    done = []

    def work(base: int):
        first, second = MemorySink(600_000), MemorySink(600_000)
        for offset in (base, base + 700_000):
            reader.announce("__0_0.distcp", offset, 600_000)
        reader.copy_to(first, "__0_0.distcp", base, 0, 600_000)     # the next chunk's first GET is ahead
        both.wait(timeout=10)
        buf = bytearray(700_000)
        reader.read_into("__0_0.distcp", 4 << 20, [memoryview(buf)])
        reader.copy_to(second, "__0_0.distcp", base + 700_000, 0, 600_000)    # announced, then forgotten
        done.append((bytes(buf), bytes(first.data), bytes(second.data)) ==
                    (DATA[4 << 20:(4 << 20) + 700_000], DATA[base:base + 600_000],
                     DATA[base + 700_000:base + 1_300_000]))

    threads = [threading.Thread(target=work, args=(base,), daemon=True) for base in (0, 2 << 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert done == [True, True]
    time.sleep(0.2)         # the dropped GETs end and give their slots back
    assert reader._slots._value == 2
    reader.close()


def test_a_range_announced_again_before_it_is_read_is_fetched_once(url, monkeypatch):
    """The executor announces a tensor's chunks before writing it even when they were announced ahead (as the
    previous tensor's next one): a big or small range already announced and not yet read is not queued again, so
    each is fetched once and no prefetched answer is left behind, holding memory and a prefetch place."""
    reader = RemoteReader(url, max_requests=3, request_bytes=256 << 10)
    calls: list = []
    _recording(reader, monkeypatch, calls)
    chunks = [(0, 600_000), (700_000, 1000), (1_400_000, 300_000)]
    for _ in range(2):
        for offset, length in chunks:
            reader.announce("__0_0.distcp", offset, length)
    sink = MemorySink(len(DATA))
    for offset, length in chunks:
        reader.copy_to(sink, "__0_0.distcp", offset, offset, length)
    for offset, length in chunks:
        assert bytes(sink.data[offset:offset + length]) == DATA[offset:offset + length]
    assert sum(end - start for start, end in calls) == sum(length for _, length in chunks)
    assert not reader._stream().plan and not reader._stream().ahead     # nothing announced is left unread
    assert not reader._ahead and not reader._hints and reader._slots._value == 3
    reader.close()
