"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota when one is set (a
container given "1.5 CPUs" on a 16-core host sees 16 cores in its mask but gets 1.5 cores' worth of time).
`--workers` defaults to a count chosen from this (planning/workers.py)."""
from __future__ import annotations

import os
from typing import Optional

# cgroup v2 names the quota in one file ("max 100000" or "150000 100000"); v1 in two.
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def parse_cpu_max(text: str) -> Optional[float]:
    """The CPUs a cgroup v2 `cpu.max` ("QUOTA PERIOD", in microseconds) grants; None for "max" (no quota) or
    anything unreadable: a quota we cannot parse must not shrink the default to a guess."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota_us, period_us = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(200)
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_quota() -> Optional[float]:
    """This process's cgroup CPU quota in CPUs (v2, then v1), None when there is none."""
    v2 = _read(CGROUP_V2_CPU_MAX)
    if v2 is not None:
        return parse_cpu_max(v2)
    quota, period = _read(CGROUP_V1_QUOTA), _read(CGROUP_V1_PERIOD)
    if quota is None or period is None:
        return None
    return parse_cpu_max(f"{quota.strip()} {period.strip()}") if quota.strip() != "-1" else None


def affinity_cpus() -> int:
    """The cores this process may run on (all of them where the platform has no affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:      # (macOS)
        return os.cpu_count() or 1


def available_cpus() -> float:
    """The CPUs this process can keep busy: its affinity mask, capped by a cgroup quota."""
    cpus: float = affinity_cpus()
    quota = cgroup_cpu_quota()
    return min(cpus, quota) if quota is not None else cpus
