"""A planned conversion as a value that can travel, and the function that writes one of its shards anywhere.

The driver plans once (`api.convert` with a `shard_runner`), then hands each worker a `ShardJob`: the checkpoint
folder, the staging folder, the plan, and the fingerprints that tie them together. A worker that sees the same
storage writes its shard into the staging folder and leaves the same resume record a local run leaves
(`staging.record_shard`), so the driver recognises it as done with `StagingDir.shard_recorded` and commits.
Writing a shard is idempotent: a retried task rewrites the file from the start, or finds it recorded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from ..fs import fastpaths
from .checkpoint import locate_chunks
from ..errors import CheckpointError
from ..source.io import DirectoryReader
from .parallel import write_shards
from ..planning.plan import ConversionPlan, ShardPlan
from ..source import transforms
from ..source.integrity import ChunkIntegrity
from ..output.staging import record_shard, scratch_dir_of, shard_recorded


@dataclass(frozen=True)
class ShardJob:
    checkpoint_dir: str
    staging_dir: str
    plan: ConversionPlan
    plan_fingerprint: str               # plan_record()["plan"]: what the staging folder's records must name
    checkpoint_files: Dict[str, Optional[list]]     # {file: [size, mtime_ns]} of `.metadata` and data files
    shard_fingerprints: Dict[str, str]
    crc: bool = False                   # check each chunk's CRC-32 as it is read

    def shard(self, filename: str) -> ShardPlan:
        for s in self.plan.shards:
            if s.filename == filename:
                return s
        raise KeyError(filename)

    @property
    def peak_bytes(self) -> int:
        """Predicted resident memory of one worker writing one shard (the plan's prediction)."""
        return self.plan.peak_bytes


def _check_checkpoint_unchanged(job: ShardJob) -> None:
    """A worker on another machine must read the checkpoint the driver planned: same files, sizes, mtimes."""
    for name, expected in job.checkpoint_files.items():
        try:
            st = os.stat(os.path.join(job.checkpoint_dir, name))
            found = [st.st_size, st.st_mtime_ns]
        except OSError:
            found = None
        if found != expected:
            raise CheckpointError(
                f"{os.path.join(job.checkpoint_dir, name)}: differs from what the driver planned with "
                f"(size and mtime {found} instead of {expected}); does this worker see the same storage?")


def write_shard(job: ShardJob, filename: str) -> int:
    """Write one shard of `job` into its staging folder and record it; returns its size in bytes."""
    shard = job.shard(filename)
    fingerprint = job.shard_fingerprints[filename]
    fast = fastpaths.detect()   # once per task: this worker's own machine and filesystems decide, as in api.convert
    if shard_recorded(job.staging_dir, job.plan_fingerprint, filename, shard.nbytes, fingerprint, fast=fast):
        return shard.nbytes      # a retry of a task whose work was already done
    _check_checkpoint_unchanged(job)
    with DirectoryReader(job.checkpoint_dir, fast=fast) as directory:
        reader = transforms.reader_for(directory, (c.location for t in shard.tensors for c in t.chunks))
        one = replace(job.plan, shards=(shard,))
        stored = locate_chunks(one, reader)
        sources = sorted({c.location.relative_path for t in shard.tensors for c in t.chunks})
        if sources:
            fast = fastpaths.probe_copy(fast, directory.path(sources[0]), scratch_dir_of(job.staging_dir))
        integrity = ChunkIntegrity(reader, stored, while_decoding=True) if job.crc else None
        write_shards([shard], reader, stored, lambda name: os.path.join(job.staging_dir, name),
                     buffer_bytes=job.plan.options.buffer_bytes, workers=1, integrity=integrity, fast=fast,
                     on_shard_done=lambda s, crc: record_shard(job.staging_dir, job.plan_fingerprint, s.filename,
                                                               s.nbytes, fingerprint, crc))
    return shard.nbytes


def write_shards_here(job: ShardJob, filenames: List[str], progress=None) -> None:
    """The simplest shard runner: write them one after another in this process (tests, debugging)."""
    for name in filenames:
        write_shard(job, name)
        if progress is not None:
            progress(job.shard(name).data_nbytes)
