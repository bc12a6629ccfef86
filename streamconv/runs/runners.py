"""Runners: who writes a conversion's shard jobs (shardjob.py). The driver hands every runner the same jobs
and checks the same ledger afterwards, so a runner decides only where and how many at a time:

- `ThreadRunner`: threads of this process, on the checkpoint the driver has open (the default);
- `SeparateRunner`: one job after another, each as a process of its own would run it (pickled, the checkpoint
  opened again): what a Ray task does, without Ray (tests, debugging);
- `ray_runner.RayRunner`: one Ray task per job.

A runner writes every job or raises; `progress(tensor bytes)` as bytes move (or as jobs finish); it returns
what each process wrote (`Written`: file names and the source chunks it checked).
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence

from .shardjob import Progress, ShardJob, Workbench, Written, write_job_alone, write_jobs


class Runner(Protocol):
    def run(self, jobs: Sequence[ShardJob], progress: Optional[Progress] = None) -> List[Written]:
        ...


class ThreadRunner:
    """`bench.workers` threads of this process share the driver's open checkpoint and the buffer budget; they
    fill the shards tensor by tensor (parallel.py), so one large shard still gets every thread."""

    def __init__(self, bench: Workbench):
        self.bench = bench

    def run(self, jobs: Sequence[ShardJob], progress: Optional[Progress] = None) -> List[Written]:
        return [write_jobs(jobs, self.bench, progress)]


class SeparateRunner:
    """Each job as a remote task runs it: pickled and unpickled (what would travel), written by
    `write_job_alone`, which opens the checkpoint itself; progress as each job finishes."""

    def run(self, jobs: Sequence[ShardJob], progress: Optional[Progress] = None) -> List[Written]:
        import pickle   # (here: the local runner, every conversion's, needs none)
        results = []
        for job in jobs:
            results.append(write_job_alone(pickle.loads(pickle.dumps(job))))
            if progress is not None:
                progress(job.shard.data_nbytes)
        return results
