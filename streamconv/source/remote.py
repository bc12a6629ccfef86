"""The RangeReader of a checkpoint in object storage: ranged GETs, never a whole-object download.

The GETs go through one `ObjectClient` (`object_clients.py`: obstore for s3:// when the run's FastPaths allow it,
fsspec otherwise), chosen once by `folder_reader` from the run's FastPaths and passed to the reader.

A read is split into requests of at most `REQUEST_BYTES`; up to `max_requests` of them are in flight at once
across every thread sharing the reader. Each request's bytes are held only until they are copied into the caller's
buffer, so the memory this reader adds is at most max_requests x REQUEST_BYTES, which `for_budget` takes out of
the run's --buffer-size. The kernel fast paths of `DirectoryReader` (copy_file_range, preadv, fadvise) do not
exist here: `copy_to` reads and writes.

Transient failures (a reset connection, a 5xx, throttling) are retried by `fs.remote.with_retries`; a short
answer is a CheckpointError, never a shorter tensor.
"""
from __future__ import annotations

import posixpath
import sys
import threading
from contextlib import nullcontext
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Deque, Dict, Optional, Sequence, Tuple

from ..errors import CheckpointError
from ..fs import fastpaths, objects, remote
from ..fs.fastpaths import NONE, FastPaths
from .io import DirectoryReader, RangeReader
from .object_clients import OBSTORE, ObjectClient, open_client, uses_obstore

REQUEST_BYTES = 4 << 20     # one ranged GET at most: latency small next to transfer; 8 MiB cost 24 MiB more peak RSS
DEFAULT_MAX_REQUESTS = 6    # in flight or waiting to be written, across threads (6 x 4 MiB)
# Small reads (zip headers while locating chunks, .metadata, CRC records) are answered from aligned blocks of
# BLOCK_BYTES, the last CACHED_BLOCKS of them kept: a checkpoint's headers sit beside its chunks, and one GET per
# 4 KiB header costs a round trip each (the demo checkpoint: 108 GETs before, 8 after).
SMALL_READ_BYTES = 64 << 10
BLOCK_BYTES = 1 << 20
CACHED_BLOCKS = 4
# Small ranges announced by `prefetch` (locating chunks hints every blob's 4 KiB head and tail, in file order) are
# fetched exactly, up to PREFETCH_AHEAD of them ahead of the reads that take them: locating hundreds of blobs
# costs round trips in parallel, not one after another, and no 1 MiB block per 4 KiB header.
PREFETCH_AHEAD = 64
# Two announced small ranges at most MERGE_GAP_BYTES apart are one request of at most MERGED_READ_BYTES (the gap's
# bytes too): one blob's tail and the next one's head, a run of small blobs (norms, biases) whole. (On the 2 GB
# preset this saves 19 of 583 GETs: its blobs are contiguous, so a tail and the next head touch anyway.)
MERGE_GAP_BYTES = 32 << 10
MERGED_READ_BYTES = 64 << 10
# ...on a pool of their own, up to SMALL_REQUESTS at once (beside max_requests: they hold 64 KiB, not 4 MiB): a
# round trip is latency, not bandwidth, and hundreds of them in a row were most of a 2 GB conversion's time.
# 64 ahead and 32 at once located the 2 GB preset's 886 blobs in 0.85-1.0 s against 1.6-1.7 s with 32 and 16
# (local server, load 15-20).
SMALL_REQUESTS = 32
# A chunk smaller than max_requests x REQUEST_BYTES is still split into max_requests requests of at least
# MIN_PIECE_BYTES, so one writer keeps several requests in flight whatever its chunks' sizes.
MIN_PIECE_BYTES = 1 << 20
# Big ranges announced (`announce`: a tensor's chunks and the next tensor's, before they are copied) are queued per
# thread, at most LOOKAHEAD_RANGES of them (what bounds the search of `announce` for a range queued already), and
# their GETs are started as slots free up, so the requests of the next chunk, and of the next tensor, are in flight
# while this one is written instead of the pipeline draining at every chunk. They hold slots like any request:
# memory stays max_requests x REQUEST_BYTES.
LOOKAHEAD_RANGES = 64
# What a default reader holds at most beside the callers' buffers: its requests in flight, its cached blocks and
# its prefetched small ranges.
INFLIGHT_BYTES = (DEFAULT_MAX_REQUESTS * REQUEST_BYTES + CACHED_BLOCKS * BLOCK_BYTES
                  + PREFETCH_AHEAD * MERGED_READ_BYTES)
MIN_MAX_REQUESTS = 2

def client_rss_bytes(url: str, obstore: bool) -> int:
    """What the client stack reading `url` holds beside the requests above (fs/remote.py's measurements; a run
    whose output is a bucket of the same kind counts it once, with output/upload.py's term). `obstore`: its GETs
    go through obstore; s3fs counts all the same once something imported it, e.g. finding a run folder's
    checkpoint."""
    if remote.scheme(url) in ("s3", "s3a") and obstore and "s3fs" not in sys.modules:
        return remote.OBSTORE_RSS_BYTES
    return objects.fsspec_rss_bytes(url, default=remote.S3FS_RSS_BYTES)


def folder_reader(folder: str, fast: FastPaths = NONE) -> RangeReader:
    """The reader of a checkpoint folder's files: ranged GETs for a URL (through obstore when `fast.obstore`
    allows it, `object_clients.open_client`), else `DirectoryReader` (with the fast paths `fast` allows)."""
    if remote.is_url(folder):
        return RemoteReader(folder, client=open_client(folder.rstrip("/"), fast))
    return DirectoryReader(folder, fast=fast)


def reading_paths(fast: FastPaths, folder: str) -> FastPaths:
    """The fast paths reading `folder` uses, decided once before it is opened: a file's kernel paths, or for a URL
    whether its GETs go through obstore (`object_clients.uses_obstore`); what a run reports as `fast_paths`."""
    fast = fastpaths.for_source(fast, remote.is_url(folder))
    return replace(fast, obstore=uses_obstore(folder.rstrip("/"), fast)) if fast.obstore else fast


def max_requests_for(buffer_bytes: int, workers: int = 1) -> int:
    """Requests in flight that fit the budget: what is left of --buffer-size after each worker's own buffer is
    counted once more (the reader's transient copies), at most DEFAULT_MAX_REQUESTS, at least MIN_MAX_REQUESTS."""
    spare = max(0, int(buffer_bytes)) // max(1, workers)
    return max(MIN_MAX_REQUESTS, min(DEFAULT_MAX_REQUESTS, spare // REQUEST_BYTES))


_MMAP_THRESHOLD_SET = []


def _return_big_buffers_to_the_os() -> None:
    """Once per process: glibc serves allocations of at least 1 MiB with mmap and unmaps them when freed.

    By default glibc raises that threshold after the first big free (up to 32 MiB), after which each thread's arena
    keeps the answers it freed: the ~24 threads of a remote read (GETs, small GETs, the client's runtime) then held
    ~40 MiB of dead answers (a 2 GB conversion's peak RSS 148 MiB against 112 MiB with the threshold fixed). The
    answers are a few MiB each, so the cost is one mmap and munmap per answer. Elsewhere than glibc: nothing."""
    if _MMAP_THRESHOLD_SET:
        return
    _MMAP_THRESHOLD_SET.append(True)
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-3, MIN_PIECE_BYTES)     # M_MMAP_THRESHOLD (glibc's malloc.h)
    except (OSError, AttributeError, TypeError):
        pass


class RemoteReader:
    """Reads byte ranges of the files under `url` (the URL of the checkpoint folder) through `client` (default:
    fsspec's)."""

    fast = NONE     # no kernel fast path reads an object

    def __init__(self, url: str, max_requests: int = DEFAULT_MAX_REQUESTS, request_bytes: int = REQUEST_BYTES,
                 client: Optional[ObjectClient] = None):
        self.root = url.rstrip("/")
        self.client = client if client is not None else open_client(self.root)
        _return_big_buffers_to_the_os()
        self.request_bytes = max(1, int(request_bytes))
        self.max_requests = max(1, int(max_requests))
        self._slots = threading.BoundedSemaphore(self.max_requests)
        # Two pools of max_requests threads: GETs whose slot is taken already (copy_to's) never queue behind
        # read_into's, which wait for a slot on their thread (else those could hold every thread while waiting
        # for slots held by GETs queued behind them).
        self._pool: Optional[ThreadPoolExecutor] = None
        self._slotted_pool: Optional[ThreadPoolExecutor] = None
        self._small_pool: Optional[ThreadPoolExecutor] = None
        self._small_slots = threading.BoundedSemaphore(SMALL_REQUESTS)
        self._lock = threading.Lock()
        self._sizes: Dict[str, int] = {}
        self._blocks: "OrderedDict[Tuple[str, int], bytes]" = OrderedDict()
        self._hints: Deque[list] = deque()      # announced, not yet asked for: [path, offset, length, hints]
        # asked for, not yet taken: [its future, how many hints it still serves]
        self._ahead: "OrderedDict[Tuple[str, int, int], list]" = OrderedDict()
        self._streams = threading.local()       # each thread's _Stream: its announced big ranges and their GETs

    def __getstate__(self):    # a separate process (SeparateRunner, Ray) opens its own client of the same kind
        return {"root": self.root, "max_requests": self.max_requests, "request_bytes": self.request_bytes,
                "client": self.client.name}

    def __setstate__(self, state):
        fast = FastPaths(obstore=state.get("client") == OBSTORE)
        self.__init__(state["root"], state["max_requests"], state["request_bytes"], open_client(state["root"], fast))

    @property
    def inflight_bytes(self) -> int:
        """The most memory this reader's own requests hold at once (beside the callers' buffers)."""
        return self.max_requests * self.request_bytes

    def path(self, relative_path: str) -> str:
        """The URL of a file of the checkpoint (what messages name), as `DirectoryReader.path` gives a path."""
        return self.url(relative_path)

    def url(self, relative_path: str) -> str:
        # relative_path comes from untrusted metadata: never a name that leaves the checkpoint's prefix.
        if not isinstance(relative_path, str) or not relative_path or "\x00" in relative_path:
            raise CheckpointError(f"metadata names an invalid data file {relative_path!r}")
        norm = posixpath.normpath(relative_path)
        if norm.startswith("/") or norm == ".." or norm.startswith("../") or "\\" in norm:
            raise CheckpointError(f"metadata names a file outside the checkpoint folder: {relative_path!r}")
        return posixpath.join(self.root, norm)

    @staticmethod
    def _key(relative_path: str) -> str:
        return posixpath.normpath(relative_path)    # (after `url` checked it stays inside the prefix)

    def size(self, relative_path: str) -> int:
        with self._lock:
            known = self._sizes.get(relative_path)
        if known is not None:
            return known
        url, key = self.url(relative_path), self._key(relative_path)
        try:
            size = remote.with_retries(f"{url}: status", lambda: self.client.head(key), CheckpointError)
        except FileNotFoundError:
            raise CheckpointError(f"{url}: file named in .metadata is missing (incomplete upload of the "
                                  "checkpoint?)") from None
        with self._lock:
            self._sizes[relative_path] = size
        return size

    def _get(self, relative_path: str, offset: int, length: int, small: bool = False, slotted: bool = False):
        """One ranged GET of exactly `length` bytes, as bytes or a buffer (retried while it fails transiently).
        `small` (a prefetched range of at most MERGED_READ_BYTES) takes one of the SMALL_REQUESTS slots instead;
        `slotted`: the caller holds a slot already (copy_to, until the answer is written)."""
        url, key = self.url(relative_path), self._key(relative_path)
        what = f"{url}: read of bytes {offset:,}..{offset + length:,}"
        with (nullcontext() if slotted else self._small_slots if small else self._slots):
            try:
                data = remote.with_retries(
                    what, lambda: self.client.get(key, offset, offset + length), CheckpointError)
            except FileNotFoundError:
                raise CheckpointError(f"{url}: file named in .metadata is missing (deleted during the run, or "
                                      "an incomplete upload of the checkpoint?)") from None
        if len(data) != length:
            raise CheckpointError(f"{url}: wanted {length} bytes at offset {offset}, got {len(data)} "
                                  "(truncated checkpoint, or the object changed during the run?)")
        return data

    def _check_range(self, relative_path: str, offset: int, length: int) -> None:
        size = self.size(relative_path)
        if offset < 0 or length < 0 or offset + length > size:
            raise CheckpointError(
                f"{self.url(relative_path)}: wanted {length} bytes at offset {offset}, file has {size} bytes "
                "(truncated checkpoint?)")

    def read(self, relative_path: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        self._check_range(relative_path, offset, length)
        if length <= SMALL_READ_BYTES:
            return self._small(relative_path, offset, length)
        self._drop(self._stream())      # (below) never wait for a slot while this thread holds some for later
        if length <= self.request_bytes:
            return bytes(self._get(relative_path, offset, length))     # (obstore answers a buffer)
        out = bytearray(length)
        self.read_into(relative_path, offset, [memoryview(out)])
        return bytes(out)

    def _small(self, relative_path: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset`: from a prefetched range holding them, else from the cached aligned block(s)."""
        ahead = self._take_prefetched(relative_path, offset, length)
        if ahead is not None:
            return ahead
        parts = []
        end = offset + length
        first = offset - offset % BLOCK_BYTES
        for start in range(first, end, BLOCK_BYTES):
            block = self._block(relative_path, start)
            parts.append(block[max(offset, start) - start:min(end, start + BLOCK_BYTES) - start])
        return b"".join(parts)

    def _block(self, relative_path: str, start: int) -> bytes:
        key = (relative_path, start)
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
                return block
        self._drop(self._stream())
        block = self._get(relative_path, start, min(BLOCK_BYTES, self.size(relative_path) - start))
        with self._lock:
            self._blocks[key] = block
            while len(self._blocks) > CACHED_BLOCKS:
                self._blocks.popitem(last=False)
        return block

    def read_into(self, relative_path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        if total == 0:
            return
        self._check_range(relative_path, offset, total)
        if len(views) == 1 and total <= SMALL_READ_BYTES:
            views[0][:] = self._small(relative_path, offset, total)
            return
        self._drop(self._stream())      # its GETs wait for slots, maybe on the pool's threads
        # Requests never straddle two buffers, so each answer is copied once, straight into place.
        pieces = []
        pos = offset
        step = self._piece_bytes(total)
        for view in views:
            for start in range(0, len(view), step):
                part = view[start:start + step]
                pieces.append((pos, part))
                pos += len(part)
        if len(pieces) == 1:
            pieces[0][1][:] = self._get(relative_path, pieces[0][0], len(pieces[0][1]))
            return

        def fetch(piece) -> None:
            at, part = piece
            part[:] = self._get(relative_path, at, len(part))

        for _ in self._executor().map(fetch, pieces):
            pass

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_requests, thread_name_prefix="streamconv-get")
            return self._pool

    def _slotted_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._slotted_pool is None:
                self._slotted_pool = ThreadPoolExecutor(self.max_requests, thread_name_prefix="streamconv-get-ahead")
            return self._slotted_pool

    def copy_to(self, sink, relative_path: str, offset: int, dst_offset: int, length: int) -> None:
        """GETs ahead, written to the sink in order from this thread (sinks are not shared between threads), each
        answer dropped once written; max_requests of them at most, in flight or waiting, across all threads. The
        GETs of the ranges this thread announced (`announce`) follow this range's without a pause."""
        if length == 0:
            return
        self._check_range(relative_path, offset, length)
        if length <= SMALL_READ_BYTES:
            sink.write_at(dst_offset, self._small(relative_path, offset, length))
            return
        key = (relative_path, offset, length)
        stream = self._stream()
        if stream.head() != key:        # not what this thread announced next: forget the announcements
            self._drop(stream)
            stream.plan.appendleft([key, 0, self._piece_bytes(length)])
        pool = self._slotted_executor()
        try:
            while stream.head() == key:
                # A slot is a piece's memory until it is written, not only while its GET runs: answers waiting
                # for their turn count against max_requests too, whichever thread holds them. Wait for one only
                # when none of this thread's is in flight (then it holds none: no thread waits on another).
                while stream.plan and self._slots.acquire(blocking=not stream.ahead):
                    stream.submit_next(pool, self._get)
                if stream.ahead and stream.ahead[0][0] == key:
                    self._write_first(sink, dst_offset - offset, stream.ahead)
        except BaseException:
            self._drop(stream)
            raise

    def _write_first(self, sink, shift: int, ahead: Deque) -> None:
        _, at, _, future = ahead.popleft()
        try:
            sink.write_at(shift + at, future.result())
        finally:
            self._slots.release()

    def _stream(self) -> "_Stream":
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = self._streams.stream = _Stream()
        return stream

    def _drop(self, stream: "_Stream") -> None:
        """Forget this thread's announced ranges; their GETs' slots come free as each one ends. Called before this
        thread waits for a slot other than in `copy_to`: a thread never waits while it holds slots for later (two
        threads doing so would wait for each other forever)."""
        stream.plan.clear()
        while stream.ahead:
            future = stream.ahead.popleft()[3]
            if future.cancel():
                self._slots.release()
            else:
                future.add_done_callback(lambda _: self._slots.release())

    def _piece_bytes(self, length: int) -> int:
        """The size of the requests a read of `length` bytes is split into: REQUEST_BYTES, or smaller (down to
        MIN_PIECE_BYTES) so that even a chunk of a few MiB is max_requests requests in flight."""
        even = -(-length // self.max_requests)
        return max(1, min(self.request_bytes, max(MIN_PIECE_BYTES, even)))

    def _even_pieces(self, length: int) -> int:
        """The size of the requests an announced range is split into: as few as REQUEST_BYTES allows, evenly (the
        ranges announced after it keep the requests in flight)."""
        return -(-length // -(-length // self.request_bytes))

    def announce(self, relative_path: str, offset: int, length: int) -> None:
        """A chunk this thread copies next: a big one joins the thread's queue, its GETs started once the ranges
        before it have theirs (`copy_to`), on slots like every request; a small one is prefetched. A range this
        thread announced already and has not read yet is not announced again: the executor announces a tensor
        before it writes it whether or not it was announced ahead (a read the announcements did not foresee
        forgets them all, `_drop`)."""
        key = (relative_path, offset, length)
        if length <= SMALL_READ_BYTES:
            with self._lock:
                known = any(path == relative_path and at <= offset and offset + length <= at + n
                            for path, at, n in [h[:3] for h in self._hints] + list(self._ahead))
            if not known:
                self.prefetch(relative_path, offset, length)
            return
        stream = self._stream()
        if len(stream.plan) < LOOKAHEAD_RANGES and not stream.holds(key):
            stream.plan.append([key, 0, self._even_pieces(length)])

    def prefetch(self, relative_path: str, offset: int, length: int) -> None:
        """Small ranges (a blob's head and tail while locating, a small chunk) are fetched ahead, PREFETCH_AHEAD
        at most, in the order announced, from the first read on; a big range is not (`announce` is how a copy
        asks for it ahead). Ranges at most MERGE_GAP_BYTES apart are one request: one blob's tail and the next
        one's head (half the round trips), a run of small blobs."""
        if not 0 < length <= SMALL_READ_BYTES:
            return
        with self._lock:
            last = self._hints[-1] if self._hints else None
            if last is not None and last[0] == relative_path \
                    and last[1] <= offset <= last[1] + last[2] + MERGE_GAP_BYTES \
                    and max(last[1] + last[2], offset + length) - last[1] <= MERGED_READ_BYTES:
                last[2] = max(last[1] + last[2], offset + length) - last[1]
                last[3] += 1
            else:
                self._hints.append([relative_path, offset, length, 1])

    def _top_up(self) -> None:
        with self._lock:
            if not self._hints or len(self._ahead) >= PREFETCH_AHEAD:
                return
            if self._small_pool is None:
                self._small_pool = ThreadPoolExecutor(SMALL_REQUESTS, thread_name_prefix="streamconv-get-small")
            while self._hints and len(self._ahead) < PREFETCH_AHEAD:
                path, start, length, hints = self._hints.popleft()
                key = (path, start, length)
                if key not in self._ahead:
                    self._ahead[key] = [self._small_pool.submit(self._get, *key, small=True), hints]

    def _take_prefetched(self, relative_path: str, offset: int, length: int) -> Optional[bytes]:
        """The bytes of a prefetched range holding [offset, offset + length) (then forgotten), or None."""
        self._top_up()
        with self._lock:
            if not self._ahead:
                return None
            key = next(((path, at, n) for path, at, n in self._ahead
                        if path == relative_path and at <= offset and offset + length <= at + n), None)
            if key is None:
                return None
            entry = self._ahead[key]
            future = entry[0]
            entry[1] -= 1       # a merged range serves each hint it holds once, then is forgotten
            if entry[1] <= 0:
                del self._ahead[key]
        self._top_up()
        data = future.result()      # its error, if it failed, is this read's error
        return bytes(data[offset - key[1]:offset - key[1] + length])

    def set_random_access(self, random_access: bool) -> None:
        pass

    def check_while_reading(self, location, record_offset: int, record_nbytes: int, verdict) -> bool:
        return False    # stored as is: the caller sums the bytes

    def close(self) -> None:
        with self._lock:
            pools = (self._pool, self._slotted_pool, self._small_pool)
            self._pool, self._slotted_pool, self._small_pool = None, None, None
            self._blocks.clear()
            self._hints.clear()
            ahead, self._ahead = list(self._ahead.values()), OrderedDict()
        for future, _ in ahead:
            future.cancel()
        for pool in pools:
            if pool is not None:
                pool.shutdown(wait=True)

    def __enter__(self) -> "RemoteReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stream:
    """One thread's reads ahead: `plan`, the ranges it announced whose GETs have not all started ([(path, offset,
    length), bytes started, piece size]), and `ahead`, the GETs started and not yet written ((that range, offset,
    length, future)), both in the order the thread will read them."""

    __slots__ = ("plan", "ahead")

    def __init__(self):
        self.plan: Deque[list] = deque()
        self.ahead: Deque[tuple] = deque()

    def holds(self, key: Tuple[str, int, int]) -> bool:
        """Whether the range is announced and not yet read (all its GETs started or not)."""
        return any(entry[0] == key for entry in self.plan) or any(a[0] == key for a in self.ahead)

    def head(self) -> Optional[Tuple[str, int, int]]:
        """The range this thread reads next, as announced."""
        return self.ahead[0][0] if self.ahead else self.plan[0][0] if self.plan else None

    def submit_next(self, pool: ThreadPoolExecutor, get) -> None:
        """Start the next piece's GET (the caller holds a slot for it)."""
        entry = self.plan[0]
        (path, offset, length), started, step = entry
        n = min(step, length - started)
        self.ahead.append((entry[0], offset + started, n, pool.submit(get, path, offset + started, n, slotted=True)))
        entry[1] += n
        if entry[1] >= length:
            self.plan.popleft()
