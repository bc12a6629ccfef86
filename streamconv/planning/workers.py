"""How many writer threads a run uses when `--workers` is not given: a pure rule over the CPUs this process may
use (fs/cpus.py) and the plan's predicted peak memory, so the same rule is tested with any machine's numbers.

Every core is one more zstd decoder running: a compressed checkpoint is CPU-bound on decoding (issue 20: the old
fixed 2 writers took 1.7-2.1x `cp -r` on a 16-core host, 8 reached `cp` speed). A plain copy is disk-bound, but
more writers cost it only memory. The memory bounds the count: each writer takes its share of `--buffer-size`
(at least MIN_SHARE_BYTES, below which bands become many small reads) and, beyond the buffer, its IO step and, on
a compressed checkpoint, its decoders (one, or one per compressed chunk its bands read in turn: planning/streams.py;
plan.py's prediction counts them all). The count is the largest whose predicted peak, without the per-chunk
metadata, stays within --buffer-size + PEAK_ABOVE_BUFFER_BYTES: the bound every layout is held to (tests/memory).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from ..sizes import format_size
from .plan import ConversionPlan, with_writers, writers_peak_bytes

# Never fewer than two when memory allows (the old fixed default): one writer's reads overlap another's writes
# and casts even on one core.
MIN_AUTO_WORKERS = 2
# More threads than this only add contention for one disk and one GIL (pure-Python steps between the copies).
MAX_AUTO_WORKERS = 16
MIN_SHARE_BYTES = 2 * 2**20
PEAK_ABOVE_BUFFER_BYTES = 48 * 2**20


@dataclass(frozen=True)
class WorkersChoice:
    """The writer count a run uses and why (shown by `plan` and in convert's report)."""
    count: int
    auto: bool          # False: the user's --workers
    reason: str


def _cpus_text(cpus: float) -> str:
    return f"{cpus:g} CPU" + ("" if cpus == 1 else "s")


def choose_workers(requested: Optional[int], *, cpus: float, buffer_bytes: int,
                   peak_bytes_for: Callable[[int], int]) -> WorkersChoice:
    """`requested` when given (an explicit --workers wins); else one writer per CPU (at least MIN_AUTO_WORKERS,
    at most MAX_AUTO_WORKERS), as many as the buffer has MIN_SHARE_BYTES shares for and whose predicted peak
    `peak_bytes_for(count)` (without per-chunk metadata) stays within the buffer + PEAK_ABOVE_BUFFER_BYTES; at
    least one. `cpus` may be fractional (a cgroup quota of 1.5 CPUs keeps one core busy and a second half the
    time: the floor, then the minimum of two)."""
    if requested is not None:
        return WorkersChoice(requested, False, f"--workers {requested}")
    by_cpu = min(MAX_AUTO_WORKERS, max(MIN_AUTO_WORKERS, math.floor(cpus)))
    by_share = max(1, buffer_bytes // MIN_SHARE_BYTES)
    bound_bytes = buffer_bytes + PEAK_ABOVE_BUFFER_BYTES
    count = min(by_cpu, by_share)
    while count > 1 and peak_bytes_for(count) > bound_bytes:
        count -= 1
    reason = (f"auto: {_cpus_text(cpus)} allow {by_cpu}, --buffer-size {format_size(buffer_bytes)} has "
              f"{format_size(MIN_SHARE_BYTES)} shares for {by_share}; {count} keep the predicted peak "
              f"({format_size(peak_bytes_for(count))} without per-chunk metadata) within --buffer-size + "
              f"{format_size(PEAK_ABOVE_BUFFER_BYTES)}")
    return WorkersChoice(count, True, reason)


def with_workers(conversion: ConversionPlan, requested: Optional[int], cpus: float) -> ConversionPlan:
    """The plan with its writer count chosen (`choose_workers`) and its predicted peak for that count."""
    choice = choose_workers(requested, cpus=cpus, buffer_bytes=conversion.options.buffer_bytes,
                            peak_bytes_for=lambda n: writers_peak_bytes(conversion, n))
    return with_writers(conversion, choice.count, choice.reason)
