"""Write a plan's shards on a few threads, each with its own executor and share of the buffer budget.

Threads, not processes: pread/pwrite/copy_file_range and numpy's casts release the GIL, so two workers keep
the disk busy while the other casts or assembles. Each shard is independent (its plan fixes every offset),
so workers never touch the same file. Ctrl-C or an error in one worker stops the others at their next step.
"""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Callable, Mapping, Optional, Sequence

from .executor import Cancelled, Executor
from .io import RangeReader
from .model import BlobLocation, StoredTensor
from .plan import ShardPlan
from .sink import FileSink

Progress = Callable[[int], None]


def write_shards(shards: Sequence[ShardPlan], reader: RangeReader, stored: Mapping[BlobLocation, StoredTensor],
                 path_for: Callable[[str], str], *, buffer_bytes: int, workers: int = 1,
                 progress: Optional[Progress] = None) -> None:
    """Write every shard to `path_for(filename)`. The total buffer memory stays `buffer_bytes`."""
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n)

    workers = max(1, min(workers, len(shards)))
    stop = threading.Event()
    per_worker = max(1, buffer_bytes // workers)

    # Largest shards first, so the last one to finish is small and workers end together.
    queue = sorted(shards, key=lambda s: -s.nbytes)
    queue_lock = threading.Lock()

    def worker() -> None:
        executor = Executor(reader, stored, per_worker, progress=advance, stop=stop)
        while not stop.is_set():
            with queue_lock:
                if not queue:
                    return
                shard = queue.pop(0)
            executor.write_shard(shard, FileSink(path_for(shard.filename), shard.nbytes))

    if workers == 1:
        worker()
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="streamconv")
    futures = [pool.submit(worker) for _ in range(workers)]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None and not isinstance(f.exception(), Cancelled):
                raise f.exception()
        for f in futures:
            f.result()
    except BaseException:
        stop.set()          # the others stop at their next band or chunk
        raise
    finally:
        pool.shutdown(wait=True)
