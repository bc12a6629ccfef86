"""Write a plan's shards on a few threads, each with its own executor and share of the buffer budget.

Threads, not processes: pread/pwrite/copy_file_range and numpy's casts release the GIL, so two workers keep
the disk busy while the other casts or assembles. The unit of work is one tensor: its place in its shard
file is fixed by the plan, so workers can fill the same file side by side (positioned writes need no lock)
and a model that fits one shard still gets every worker. Ctrl-C or an error in one worker stops the others
at their next step.
"""
from __future__ import annotations

import functools
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, List, Mapping, Optional, Protocol, Sequence, Tuple

from ..execution.workspace import Cancelled
from ..execution.executor import Executor
from ..source.blob_reader import BlobReader
from ..model import BlobLocation, StoredTensor
from ..planning.plan import ShardPlan, TensorPlan
from ..fs.fastpaths import NONE, FastPaths
from ..output.sink import FileSink, ShardFile
from ..failpoints import kill_point

Progress = Callable[[int], None]
# Opens one shard's output (path or URL, size in bytes): a FileSink, an upload.UploadSink.
SinkFactory = Callable[[str, int], ShardFile]


class Gate(Protocol):
    """What the writers wait for when their chunks are still being located (runs/locating.py)."""

    def tensor_ready(self, t: TensorPlan, stop: threading.Event) -> None:
        """Return once `t`'s chunks are located and checked; raise if locating failed (Cancelled once `stop`)."""

    def before_record(self) -> None:
        """Return once a shard may be recorded finished (what its record presumes is durable)."""


class AllLocated:
    """The gate when every chunk was located before the writers started: nothing to wait for."""

    def tensor_ready(self, t: TensorPlan, stop: threading.Event) -> None:
        pass

    def before_record(self) -> None:
        pass


ALL_LOCATED = AllLocated()


class _OpenShard:
    """A shard file being filled by several workers: created (with its header) by the first one to need
    it, closed by the one that writes its last tensor."""

    def __init__(self, shard: ShardPlan, path: str, on_done: Optional[Callable[[ShardPlan, int], None]],
                 open_sink: SinkFactory):
        self.shard = shard
        self.open_sink = open_sink
        self.on_done = on_done
        self.path = path
        self.remaining = len(shard.tensors)
        self.sink: Optional[ShardFile] = None
        self.lock = threading.Lock()

    def open(self) -> ShardFile:
        with self.lock:
            if self.sink is None:
                self.sink = self.open_sink(self.path, self.shard.nbytes)
                self.sink.write_at(0, self.shard.header)
            return self.sink

    def done_one(self) -> None:
        with self.lock:
            self.remaining -= 1
            if self.remaining > 0:
                kill_point("mid-shard")
                return
            if self.sink is not None:
                self.sink.close()
        self.finished()

    def finished(self) -> None:
        if self.on_done is not None and self.sink is not None:
            self.on_done(self.shard, self.sink.crc32())    # fsync + resume record, outside the lock

    def close(self) -> None:
        with self.lock:
            if self.sink is not None:
                self.sink.close()

    def abort(self) -> None:
        """A failed run: the shard is not completed (an upload is aborted, never published part-written)."""
        with self.lock:
            if self.sink is not None and self.remaining > 0:
                self.sink.abort()


def _open_shards(shards: Sequence[ShardPlan], path_for: Callable[[str], str],
                 on_shard_done: Optional[Callable[[ShardPlan, int], None]], open_sink: SinkFactory,
                 gate: Gate) -> List[_OpenShard]:
    """A shard file each, opened when first needed; a shard with no tensor (its header alone) written now. A
    shard is recorded once the gate allows."""
    def done(shard: ShardPlan, crc32: int) -> None:
        gate.before_record()
        on_shard_done(shard, crc32)

    files = [_OpenShard(s, path_for(s.filename), done if on_shard_done is not None else None, open_sink)
             for s in shards]
    for f in files:
        if not f.shard.tensors:
            f.open()
            f.close()
            f.finished()
    return files


def write_shards(shards: Sequence[ShardPlan], reader: BlobReader, stored: Mapping[BlobLocation, StoredTensor],
                 path_for: Callable[[str], str], *, buffer_bytes: int, workers: int = 1,
                 progress: Optional[Progress] = None, integrity=None,
                 on_shard_done: Optional[Callable[[ShardPlan, int], None]] = None,
                 fast: FastPaths = NONE, open_sink: Optional[SinkFactory] = None, gate: Gate = ALL_LOCATED,
                 take_ahead: bool = False) -> None:
    """Write every shard to `path_for(filename)`. The total buffer memory stays `buffer_bytes`.
    `fast`: the fast IO paths the shard files may use, as the run detected them once (default: none).
    `integrity` (a `source.integrity.ChunkIntegrity`) checks each chunk's CRC-32 before its bytes move.
    `on_shard_done(shard, crc32)` runs (on the worker that finished it) once a shard's last byte is written
    (`ledger.Ledger.record`: fsync, then the finished record).
    `open_sink(path, nbytes)` opens each shard's output (a FileSink unless told).
    `gate`: a tensor is written once its chunks are located, a shard recorded once the gate allows.
    `take_ahead`: each worker takes its next tensor before it writes this one, so that the reader is told that
    tensor's reads behind this one's (for a bucket: its GETs start meanwhile, docs/remote.md). Off for files:
    their reader does nothing with the announcements, and the tensors would only be dealt out differently."""
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    if open_sink is None:
        open_sink = functools.partial(FileSink, fast=fast)
    files = _open_shards(shards, path_for, on_shard_done, open_sink, gate)
    # Shard by shard, tensors in file order: workers move through the output roughly front to back.
    queue: List[Tuple[_OpenShard, TensorPlan]] = [(f, t) for f in files for t in f.shard.tensors]
    queue.reverse()     # pop() from the end is O(1)
    workers = max(1, min(workers, len(queue)))
    stop = threading.Event()
    per_worker = max(1, buffer_bytes // workers)
    queue_lock = threading.Lock()

    def take(ahead: bool) -> Optional[Tuple[_OpenShard, TensorPlan]]:
        """The next tensor; `ahead` (one more, while this worker has one to write): only while enough are left
        for every other worker to have one too, so that taking ahead never leaves a worker idle."""
        with queue_lock:
            enough = len(queue) >= (workers if ahead else 1) and (take_ahead or not ahead)
            return queue.pop() if enough and not stop.is_set() else None

    def worker() -> None:
        executor = Executor(reader, stored, per_worker, progress=advance, stop=stop, integrity=integrity)
        job = take(ahead=False)
        while job is not None:
            target, tensor = job
            gate.tensor_ready(tensor, stop)
            job = take(ahead=True)
            if job is not None:         # its reads are announced: they must be located first
                gate.tensor_ready(job[1], stop)
            executor.write_tensor(tensor, target.open(), then=job[1] if job is not None else None)
            target.done_one()
            if job is None:
                job = take(ahead=False)

    try:
        _run_workers(worker, workers, stop)
    except BaseException:
        for f in files:
            f.abort()
        raise


def _run_workers(worker: Callable[[], None], workers: int, stop: threading.Event) -> None:
    """Run `worker` on `workers` threads (here when one); the first error stops the others and is raised."""
    if workers == 1:
        worker()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamconv") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for f in done:
                exc = f.exception()
                if exc is not None and not isinstance(exc, Cancelled):
                    raise exc
            for f in futures:
                f.result()
        except BaseException:
            stop.set()      # the others stop at their next band, piece or tensor
            raise
