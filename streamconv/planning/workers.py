"""How many writer threads a run uses when `--workers` is not given: a pure rule over the CPUs this process may
use (fs/cpus.py) and the memory budget, so the same rule is tested with any machine's numbers.

Every core is one more zstd decoder running: a compressed checkpoint is CPU-bound on decoding (issue 20: the old
fixed 2 writers took 1.7-2.1x `cp -r` on a 16-core host, 8 reached `cp` speed). A plain copy is disk-bound, but
more writers cost it only their share of memory. The budget bounds the count: each writer takes its share of
`--buffer-size` (at least MIN_SHARE_BYTES, below which bands become many small reads) and, on a compressed
checkpoint, its decoder (plan.DECODER_BYTES_PER_WRITER), counted against the same budget so the peak above the
buffer grows no faster than the buffer does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..sizes import format_size
from .plan import DECODER_BYTES_PER_WRITER, ConversionPlan, is_compressed, with_writers

# Never fewer than two when the budget allows (the old fixed default): one writer's reads overlap another's
# writes and casts even on one core.
MIN_AUTO_WORKERS = 2
# More threads than this only add contention for one disk and one GIL (pure-Python steps between the copies).
MAX_AUTO_WORKERS = 16
MIN_SHARE_BYTES = 2 * 2**20


@dataclass(frozen=True)
class WorkersChoice:
    """The writer count a run uses and why (shown by `plan` and in convert's report)."""
    count: int
    auto: bool          # False: the user's --workers
    reason: str


def _cpus_text(cpus: float) -> str:
    return f"{cpus:g} CPU" + ("" if cpus == 1 else "s")


def choose_workers(requested: Optional[int], *, cpus: float, buffer_bytes: int, compressed: bool) -> WorkersChoice:
    """`requested` when given (an explicit --workers wins); else one writer per CPU (at least MIN_AUTO_WORKERS,
    at most MAX_AUTO_WORKERS), as many as the budget holds (at least one). `cpus` may be fractional (a cgroup
    quota of 1.5 CPUs keeps one core busy and a second half the time: the floor, then the minimum of two)."""
    if requested is not None:
        return WorkersChoice(requested, False, f"--workers {requested}")
    by_cpu = min(MAX_AUTO_WORKERS, max(MIN_AUTO_WORKERS, math.floor(cpus)))
    per_writer_bytes = MIN_SHARE_BYTES + (DECODER_BYTES_PER_WRITER if compressed else 0)
    by_memory = max(1, buffer_bytes // per_writer_bytes)
    count = min(by_cpu, by_memory)
    decoder = f" + {format_size(DECODER_BYTES_PER_WRITER)} zstd decoder" if compressed else ""
    reason = (f"auto: {_cpus_text(cpus)} allow {by_cpu}; --buffer-size {format_size(buffer_bytes)} allows "
              f"{by_memory} ({format_size(MIN_SHARE_BYTES)} share{decoder} each)")
    return WorkersChoice(count, True, reason)


def with_workers(conversion: ConversionPlan, requested: Optional[int], cpus: float) -> ConversionPlan:
    """The plan with its writer count chosen (`choose_workers`) and its predicted peak for that count."""
    choice = choose_workers(requested, cpus=cpus, buffer_bytes=conversion.options.buffer_bytes,
                            compressed=is_compressed(conversion))
    return with_writers(conversion, choice.count, choice.reason)
