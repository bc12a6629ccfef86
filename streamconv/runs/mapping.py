"""What this process's libraries cost it, measured where the prediction would otherwise assume it: numpy's import,
and whether streamconv's own modules were compiled from source at this start.

numpy's import maps its libraries, and how much of them the kernel maps depends on how their pages sit in the page
cache (planning/plan.py, NUMPY_RSS_BYTES): up to 4 MiB more right after an install than once the files were
evicted and read back. A converter that passes tensors through the buffer imports numpy anyway; importing it
while planning, and counting what the import added to this process's resident set, makes the predicted peak the
machine's real term rather than a margin for the worst page cache.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Iterable, Optional


def resident_bytes() -> Optional[int]:
    """This process's resident set now (file-backed pages included, as the OS's peak counts them); None where
    /proc is not there."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# What the import measured, once per process: a batch driver plans many checkpoints and imports numpy for the first.
_measured_numpy_bytes: Optional[int] = None


def numpy_import_bytes() -> Optional[int]:
    """Import numpy, run the kinds of operation the executor runs on a few small arrays (so the code they fault in
    is counted too: in a fresh install each first call maps a large folio), and return what that added to the
    resident set; None when it cannot be told (numpy imported already by the caller, or no /proc). Measured once:
    later calls in the process return the first measurement."""
    global _measured_numpy_bytes
    if _measured_numpy_bytes is not None or "numpy" in sys.modules:
        return _measured_numpy_bytes
    before = resident_bytes()
    if before is None:
        return None
    _first_use(importlib.import_module("numpy"))
    after = resident_bytes()
    if after is not None:
        _measured_numpy_bytes = max(0, after - before)
    return _measured_numpy_bytes


def _first_use(np) -> None:
    """A band assembled from strided blocks, a cast and the NaN check, on 8 KiB (execution/band.py, cast.py)."""
    band = np.empty((16, 64), dtype=np.uint16)
    blocks = np.arange(1024, dtype=np.uint16).reshape(64, 16)
    np.copyto(band[:, :16], blocks[:16].T)
    wide = band.view(np.uint16).astype(np.uint32) << 16
    np.isnan(wide.view(np.float32)).any()
    np.concatenate([band.ravel(), np.full(8, 1, dtype=np.uint16)]).take(np.flatnonzero(band.ravel()[:64]))


def compiled_share(module_files: Iterable[str]) -> float:
    """The share of these modules (`__file__`s) this process compiled from source: no bytecode beside them (a
    checkout under PYTHONDONTWRITEBYTECODE, or read-only), bytecode older than its source, or bytecode written since
    this process started (a first start). Compiling all of streamconv leaves the interpreter 0.5-1 MiB larger
    (planning/plan.py, COMPILE_BYTES); a few edited modules, a share of that."""
    try:
        started = os.stat("/proc/self").st_ctime
    except OSError:
        return 0.0
    compiled = total = 0
    for path in module_files:
        if not path.endswith(".py"):
            continue
        try:
            written = os.stat(importlib.util.cache_from_source(path)).st_mtime
            stale = written >= started or written < os.stat(path).st_mtime
        except FileNotFoundError:
            stale = True
        except (OSError, ValueError, NotImplementedError):
            continue
        total += 1
        compiled += stale
    return compiled / total if total else 0.0
