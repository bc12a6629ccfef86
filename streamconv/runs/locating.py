"""Locating a conversion's chunks in batches, in the order the writers need them: the first batch (the first
tensors the writers take) before the first byte, the rest on one thread while those are written.

Locating reads every blob's head and tail and decodes its records: ~55 us of CPU a blob, 0.2 s for the 3,554
blobs of an 11B checkpoint, where the first tensors need a few. Every check still runs before anything is
published: a writer takes a tensor only once its batch is located and checked (`tensor_ready`), the first
failure stops the writers and is the run's error (same message, same exit code), and the conversion settles
every batch (`rest`) before a shard's finished record, the source fingerprint or the commit
(runs/conversion.py). Batches grow four-fold (each at least `GROWTH` times the chunks located before it), so
the writers never wait long and the located chunks are a handful of tables (`source.located.LocatedBatches`).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

from ..execution.workspace import Cancelled
from ..planning.plan import ConversionPlan, TensorPlan
from ..source import LocatedBatches
from ..source.io import RangeReader
from .checkpoint import locate_tensors

GROWTH = 4
MIN_BATCH_CHUNKS = 16
WAIT_STEP_S = 0.05      # how often a waiting writer looks at its own stop flag


class _Stopped(Exception):
    """The conversion ended (an error elsewhere, Ctrl-C) while a batch was being located."""


def write_order(conversion: ConversionPlan, everything: ConversionPlan) -> List[TensorPlan]:
    """`everything`'s tensors in the order `conversion`'s writers take them (shard by shard, each shard's tensors
    in file order: runs/parallel.py), then the tensors no shard holds (tied heads checked after the writing)."""
    order = [t for shard in conversion.shards for t in shard.tensors]
    taken = {t.name for t in order}
    return order + [t for t in everything.tensors if t.name not in taken]


def batches(tensors: Sequence[TensorPlan], first_tensors: int) -> List[List[TensorPlan]]:
    """The first `first_tensors` tensors, then batches of at least GROWTH times the chunks before them."""
    out: List[List[TensorPlan]] = [list(tensors[:first_tensors])]
    located = sum(len(t.chunks) for t in out[0])
    batch: List[TensorPlan] = []
    batch_chunks = 0
    for t in tensors[first_tensors:]:
        batch.append(t)
        batch_chunks += len(t.chunks)
        if batch_chunks >= max(MIN_BATCH_CHUNKS, GROWTH * located):
            out.append(batch)
            located += batch_chunks
            batch, batch_chunks = [], 0
    if batch:
        out.append(batch)
    return out


class Locating:
    """Where `conversion`'s planned chunks are, batch by batch in `order` (`write_order`); `stored` grows as
    batches are located. `first()` locates the first batch here; `start()` the others on a thread; `rest()`
    waits for (or, without a thread, locates) every batch and raises the first error; `close()` stops the
    thread. Writers call `tensor_ready(t, stop)` before a tensor."""

    def __init__(self, order: Sequence[TensorPlan], reader: RangeReader, first_tensors: int):
        self.reader = reader
        self.stored = LocatedBatches()
        self._batches = batches(order, max(1, first_tensors))
        self._batch_of: Dict[str, int] = {t.name: i for i, batch in enumerate(self._batches) for t in batch}
        self._located = 0                     # batches located and checked, in order
        self._error: Optional[BaseException] = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def complete(self) -> bool:
        return self._located == len(self._batches)

    def first(self) -> None:
        """The first batch, here (small scattered reads: readahead off meanwhile)."""
        self.reader.set_random_access(True)
        try:
            self._locate_next()
        finally:
            self.reader.set_random_access(False)

    def start(self) -> None:
        """The batches left, on a thread (none left: nothing to start)."""
        if self._thread is None and not self.complete:
            self._thread = threading.Thread(target=self._run, name="streamconv-locate", daemon=True)
            self._thread.start()

    def rest(self) -> LocatedBatches:
        """Every chunk located and checked; the first error raised (whichever thread met it)."""
        if self._thread is None:      # (before any writer: readahead off, as for the first batch)
            self.reader.set_random_access(True)
            try:
                while not self.complete:
                    self._locate_next()
            finally:
                self.reader.set_random_access(False)
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if not self.complete:       # (closed meanwhile: the run is ending)
            raise Cancelled()
        return self.stored

    def tensor_ready(self, t: TensorPlan, stop: threading.Event) -> None:
        """Wait until `t`'s chunks are located and checked. Raises locating's error once there is one (the
        writers stop at their next tensor), Cancelled once `stop` is set."""
        index = self._batch_of[t.name]
        with self._changed:
            while self._error is None and self._located <= index:
                if stop.is_set():
                    raise Cancelled()
                self._changed.wait(WAIT_STEP_S)
            if self._error is not None:
                raise self._error

    def close(self) -> None:
        """Stop the thread (after the blob it is locating) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        try:
            while not self.complete:
                self._locate_next()
        except _Stopped:
            pass
        except BaseException as exc:     # (raised to the writers and by rest(): the run's error)
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def _locate_next(self) -> None:
        table = locate_tensors(self._batches[self._located], self.reader, self.stored, self._check_stop)
        with self._changed:
            self.stored.add(table)
            self._located += 1
            self._changed.notify_all()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()
