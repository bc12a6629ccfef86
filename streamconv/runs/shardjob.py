"""The unit of writing: one shard of a planned conversion, as a value that can travel, and how any process
writes it.

The driver plans once and turns every shard it has to write into a `ShardJob`; a runner (runners.py: threads
in this process; ray_runner.py: Ray tasks) writes them, and the driver checks the outcome in the resume ledger
(output/ledger.py) whoever wrote them. All runners end in the same `write_jobs`, so what it does (CRC-32 checks
of the source, fast IO paths, kill points, the shard's finished record, progress) cannot be missing from one.
A job is idempotent: a retried task rewrites its file from the start, or finds it already recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence, Tuple

from ..errors import CheckpointError
from ..fs import fastpaths
from ..model import BlobLocation, StoredTensor
from ..output.ledger import Ledger
from ..output.staging import scratch_dir_of
from ..output.upload import shard_opener
from ..planning.plan import ConversionPlan, ShardPlan
from ..source.blob_reader import BlobReader
from ..source.integrity import ChunkIntegrity
from ..fs import location
from ..fs.remote import is_url
from ..source.remote import folder_reader, reading_paths
from .checkpoint import blob_reader, locate_chunks
from .parallel import ALL_LOCATED, Gate, write_shards
from .report import peak_rss_bytes

Progress = Callable[[int], None]


@dataclass(frozen=True)
class JobContext:
    """What every shard job of one conversion shares: pickled once per conversion, not once per shard."""
    checkpoint_dir: str                 # absolute: a worker elsewhere must find the same folder
    plan: ConversionPlan
    ledger: Ledger                      # the staging folder and the fingerprints its records must name
    checkpoint_files: Mapping[str, Optional[list]]  # {file: [size, mtime_ns]} the driver planned with
    crc: bool = False                   # check each chunk's CRC-32 as it is read

    @property
    def staging_dir(self) -> str:
        return self.ledger.staging_dir


@dataclass(frozen=True)
class ShardJob:
    context: JobContext
    filename: str

    @property
    def shard(self) -> ShardPlan:
        for s in self.context.plan.shards:
            if s.filename == self.filename:
                return s
        raise KeyError(self.filename)

    @property
    def peak_bytes(self) -> int:
        """Predicted resident memory of one worker writing this shard (the plan's prediction)."""
        return self.context.plan.peak_bytes


@dataclass(frozen=True)
class CrcCount:
    """Source chunks whose CRC-32 was checked (and their bytes), and chunks whose writer recorded none."""
    chunks: int = 0
    nbytes: int = 0
    unrecorded: int = 0

    @classmethod
    def of(cls, integrity: Optional[ChunkIntegrity]) -> "CrcCount":
        if integrity is None:
            return cls()
        return cls(integrity.checked_chunks, integrity.checked_bytes, len(integrity.unrecorded))

    def __add__(self, other: "CrcCount") -> "CrcCount":
        return CrcCount(self.chunks + other.chunks, self.nbytes + other.nbytes, self.unrecorded + other.unrecorded)

    def __sub__(self, other: "CrcCount") -> "CrcCount":
        return CrcCount(self.chunks - other.chunks, self.nbytes - other.nbytes, self.unrecorded - other.unrecorded)


@dataclass(frozen=True)
class Written:
    """What a runner hands back for the jobs one process wrote together."""
    filenames: Tuple[str, ...]
    crc: CrcCount = field(default_factory=CrcCount)
    # The peak RSS of the process that wrote them when it was not the driver (a Ray task's worker, which Ray
    # may reuse: the worker's peak so far); 0 when the driver's own threads wrote them (its report has that).
    task_peak_rss_bytes: int = 0


@dataclass
class Workbench:
    """What a process needs to write shards: the open checkpoint, where each chunk's bytes are, the fast paths
    this machine offers, the CRC-32 checker, and the buffer budget shared by `workers` threads."""
    reader: BlobReader
    stored: Mapping[BlobLocation, StoredTensor]
    fast: fastpaths.FastPaths
    integrity: Optional[ChunkIntegrity]
    buffer_bytes: int
    workers: int = 1
    gate: Gate = ALL_LOCATED     # what the writers wait for while chunks are still located (runs/locating.py)


def write_jobs(jobs: Sequence[ShardJob], bench: Workbench, progress: Optional[Progress] = None) -> Written:
    """Write the jobs' shards into their staging folder, each recorded in the ledger once fsynced: the one
    place every runner writes through."""
    if not jobs:
        return Written(())
    context = jobs[0].context
    before = CrcCount.of(bench.integrity)
    write_shards([j.shard for j in jobs], bench.reader, bench.stored,
                 lambda name: location.at(context.staging_dir).join(name), buffer_bytes=bench.buffer_bytes,
                 workers=bench.workers, progress=progress, integrity=bench.integrity, fast=bench.fast,
                 on_shard_done=context.ledger.record,
                 open_sink=shard_opener(context.staging_dir, bench.fast, bench.workers), gate=bench.gate,
                 take_ahead=is_url(context.checkpoint_dir))
    return Written(tuple(j.filename for j in jobs), CrcCount.of(bench.integrity) - before)


def _check_checkpoint_unchanged(context: JobContext) -> None:
    """A worker on another machine must read the checkpoint the driver planned: same files, sizes, mtimes."""
    now = location.entries(context.checkpoint_dir, list(context.checkpoint_files))
    for name, expected in context.checkpoint_files.items():
        found = list(now[name].stamp) if now[name] is not None else None
        if found != expected:
            raise CheckpointError(
                f"{location.at(context.checkpoint_dir).join(name)}: differs from what the driver planned with "
                f"(size and mtime or ETag {found} instead of {expected}); does this worker see the same storage?")


def write_job_alone(job: ShardJob) -> Written:
    """Write one job in a process that has nothing open (a Ray task, or a test standing in for one): open the
    checkpoint, find the shard's chunks and this machine's fast paths, then `write_jobs`."""
    context, shard = job.context, job.shard
    fast = fastpaths.detect()   # once per task: this worker's own machine and filesystems decide, as in convert
    if context.ledger.recorded(shard, fast=fast):
        return Written((job.filename,))      # a retry of a task whose work was already done
    _check_checkpoint_unchanged(context)
    fast = reading_paths(fast, context.checkpoint_dir)     # a file's kernel paths, or an object's client
    with folder_reader(context.checkpoint_dir, fast) as directory:
        alone = replace(context.plan, shards=(shard,))
        stored = locate_chunks(alone, directory)
        reader = blob_reader(alone, directory, stored)
        sources = sorted({c.location.relative_path for t in shard.tensors for c in t.chunks})
        if is_url(context.staging_dir):     # uploaded from memory: no output file to copy into in-kernel
            fast = replace(fast, copy_file_range=False)
        elif sources:
            fast = fastpaths.probe_copy(fast, directory.path(sources[0]), scratch_dir_of(context.staging_dir))
        integrity = ChunkIntegrity(reader, stored, while_decoding=True) if context.crc else None
        bench = Workbench(reader, stored, fast, integrity, context.plan.options.buffer_bytes)
        return replace(write_jobs([job], bench), task_peak_rss_bytes=peak_rss_bytes())

