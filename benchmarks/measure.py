"""Measure one command: wall time, peak RSS of its whole process tree, bytes read/written, exit status.

* Peak RSS: a thread samples the RSS of the process and all its descendants every ~20 ms (from
  /proc/<pid>/statm) and keeps the largest sum; `wait4` adds the kernel's `ru_maxrss` (largest single
  process of the tree, exact, no sampling gap). "anon" is RSS minus file-backed/shmem pages: memory
  the kernel cannot drop, as opposed to page cache that a process merely has mapped.
* Bytes: the kernel adds a reaped child's I/O counters to its parent's, so the launcher's
  `/proc/self/io` difference across `wait4` is the whole tree's I/O (grandchildren reaped inside too).
  `read_bytes`/`write_bytes` are storage-level (a read served by the page cache costs 0);
  `rchar`/`wchar` count read()/write() syscalls (mmap access costs 0).
* First byte: the first sample at which anything under `watch_dir` has allocated blocks.
* Memory safety: the child gets `oom_score_adj=1000` so the kernel's OOM killer picks it first, and
  the sampler kills the tree (SIGKILL) when its anonymous memory exceeds `mem_limit_bytes`.
* The command runs under a tiny launcher (see `_LAUNCHER`), which is not counted.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import psutil

SAMPLE_PERIOD_S = 0.02


def _allocated_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> List[int]:
    """Direct children of pid from /proc/<pid>/task/*/children (cheap: no scan of every process)."""
    kids: List[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return kids


def _descendants(pid: int) -> List[int]:
    out, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def _pss(pid: int) -> int:
    """Proportional set size: shared pages divided among their users (costlier to read than statm)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _statm(pid: int):
    """(rss, anon) bytes: resident pages, and resident minus file-backed/shmem pages."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        resident, shared = int(fields[1]), int(fields[2])
        return resident * _PAGE, (resident - shared) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0, 0


_HAVE_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


class TreeSampler(threading.Thread):
    """Samples the RSS of `pid`'s descendants (and `pid` itself if include_root) until stopped or gone.

    Reads /proc directly (children lists and statm): psutil's children() scans every process on
    the machine, and at 50 samples/s that costs enough CPU on 2 cores to slow the contender.
    """

    def __init__(self, pid: int, *, include_root: bool = True, period_s: float = SAMPLE_PERIOD_S,
                 watch_dir: Optional[Path] = None, mem_limit_bytes: Optional[int] = None,
                 on_limit=None, pss: bool = False):
        super().__init__(daemon=True)
        self.pss = pss
        self.peak_pss = 0
        self.pid, self.include_root, self.period_s = pid, include_root, period_s
        self.watch_dir, self.mem_limit_bytes, self.on_limit = watch_dir, mem_limit_bytes, on_limit
        self.peak_rss = 0
        self.peak_anon = 0
        self.samples = 0
        self.first_byte_s: Optional[float] = None
        self.limit_hit = False
        self._stop_event = threading.Event()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def _tree(self) -> List[int]:
        if _HAVE_PROC_CHILDREN:
            pids = _descendants(self.pid)
        else:  # kernels without CONFIG_PROC_CHILDREN
            try:
                pids = [p.pid for p in psutil.Process(self.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = []
        return pids + [self.pid] if self.include_root else pids

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = anon = pss = 0
            for pid in self._tree():
                r, a = _statm(pid)
                rss += r
                anon += a
                if self.pss:
                    pss += _pss(pid)
            self.samples += 1
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            if self.watch_dir is not None and self.first_byte_s is None and _allocated_bytes(self.watch_dir) > 0:
                self.first_byte_s = time.perf_counter() - self._t0
            if self.mem_limit_bytes and anon > self.mem_limit_bytes and not self.limit_hit:
                self.limit_hit = True
                if self.on_limit:
                    self.on_limit()
            self._stop_event.wait(self.period_s)


@dataclass
class Measurement:
    argv: List[str]
    status: str                    # finished | failed | OOM | timeout
    exit_code: Optional[int]
    signal: Optional[int]
    wall_s: float
    first_byte_s: Optional[float]
    peak_rss_bytes: int            # max(sampled tree sum, ru_maxrss)
    sampled_peak_rss_bytes: int
    sampled_peak_anon_bytes: int
    ru_maxrss_bytes: int           # largest single process; has a floor of the launcher's ~7 MiB
    user_s: float
    sys_s: float
    io: Dict[str, int] = field(default_factory=dict)   # deltas of /proc/self/io
    samples: int = 0
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# The contender is started by this tiny launcher (python -I -S, ~7 MB) rather than forked from the
# harness: Linux's ru_maxrss counts the memory a process had *before* exec, i.e. its parent's RSS at
# fork time, so forking from a harness that has imported torch would add ~200 MB to every number.
# The launcher also reports the exact I/O of the tree (its /proc/self/io delta across wait4) and
# makes the contender the OOM killer's first choice (oom_score_adj 1000).
_LAUNCHER = r"""
import os, sys
def io():
    try:
        with open('/proc/self/io') as f:
            return dict((k.strip(), int(v)) for k, v in (line.split(':') for line in f))
    except OSError:
        return {}
result, argv = sys.argv[1], sys.argv[2:]
try:
    with open('/proc/self/oom_score_adj', 'w') as f:
        f.write('1000')
except OSError:
    pass
def rss_kb():
    with open('/proc/self/status') as f:
        return int(next(line for line in f if line.startswith('VmRSS:')).split()[1])
before, own_kb = io(), rss_kb()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
after = io()
with open(result, 'w') as f:
    f.write(repr({'status': status, 'maxrss_kb': ru.ru_maxrss, 'launcher_rss_kb': own_kb, 'utime': ru.ru_utime, 'stime': ru.ru_stime,
                  'io': {k: after.get(k, 0) - before.get(k, 0) for k in after}}))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def _looks_like_oom(stderr_path: Optional[Path]) -> bool:
    if stderr_path is None or not stderr_path.exists():
        return False
    with open(stderr_path, "rb") as f:
        f.seek(max(0, stderr_path.stat().st_size - 65536))
        tail = f.read().decode(errors="replace")
    return any(s in tail for s in ("MemoryError", "Cannot allocate memory", "std::bad_alloc",
                                   "DefaultCPUAllocator: can't allocate memory"))


def run_measured(argv: Sequence[str], *, watch_dir: Optional[Path] = None, timeout_s: Optional[float] = None,
                 mem_limit_bytes: Optional[int] = None, stdout_path: Optional[Path] = None,
                 stderr_path: Optional[Path] = None, env: Optional[dict] = None,
                 cwd: Optional[Path] = None) -> Measurement:
    """Run argv (through the launcher) and measure it (see the module docstring)."""
    import ast
    import sys
    import tempfile

    stdout = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL
    stderr = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
    fd, result_path = tempfile.mkstemp(prefix="bench-launch-", suffix=".txt")
    os.close(fd)
    killed_for: List[str] = []

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, result_path, *argv],
                            stdout=stdout, stderr=stderr, env=env, cwd=cwd, start_new_session=True)

    def kill(reason: str) -> None:
        # Kill the contender's tree but not the launcher, which then still reports rusage and I/O.
        killed_for.append(reason)
        for pid in _descendants(proc.pid) if _HAVE_PROC_CHILDREN else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not _HAVE_PROC_CHILDREN:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    sampler = TreeSampler(proc.pid, include_root=False, watch_dir=watch_dir, mem_limit_bytes=mem_limit_bytes,
                          on_limit=lambda: kill("memory limit"))
    sampler._t0 = t0
    sampler.start()
    timer = threading.Timer(timeout_s, kill, args=("timeout",)) if timeout_s else None
    if timer:
        timer.start()
    proc.wait()
    wall = time.perf_counter() - t0
    if timer:
        timer.cancel()
    sampler.stop()
    # Descendants left behind in the session (daemonised helpers) would skew the next run.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for f in (stdout, stderr):
        if hasattr(f, "close"):
            f.close()
    try:
        launched = ast.literal_eval(Path(result_path).read_text() or "None")
    except (OSError, ValueError, SyntaxError):
        launched = None
    finally:
        os.unlink(result_path)

    if launched is None:   # the launcher itself was killed (timeout / memory limit / OOM killer)
        code = proc.returncode
        launched = {"maxrss_kb": 0, "utime": 0.0, "stime": 0.0, "io": {}}
    else:
        code = os.waitstatus_to_exitcode(launched["status"])
    sig = -code if code < 0 else None
    note = ""
    if code == 0:
        state = "finished"
    elif "timeout" in killed_for:
        state, note = "timeout", f"killed after {timeout_s:.0f} s"
    elif "memory limit" in killed_for:
        state, note = "OOM", f"killed by the harness: anonymous RSS above {mem_limit_bytes / 2**30:.1f} GiB"
    elif sig == signal.SIGKILL:
        state, note = "OOM", "killed by SIGKILL (kernel OOM killer)"
    elif _looks_like_oom(stderr_path):
        state, note = "OOM", "out-of-memory error in stderr"
    else:
        state = "failed"
    maxrss = launched["maxrss_kb"] * 1024  # kB on Linux
    # A ru_maxrss no larger than the launcher's own RSS at fork only measures the launcher (see above).
    # A value above physical RAM is implausible (no swap here); seen once on this VM's kernel.
    informative = (launched["maxrss_kb"] > launched.get("launcher_rss_kb", 0) + 1024
                   and maxrss <= psutil.virtual_memory().total)
    return Measurement(
        argv=list(argv), status=state, exit_code=code if code >= 0 else None, signal=sig,
        wall_s=round(wall, 3),
        first_byte_s=None if sampler.first_byte_s is None else round(sampler.first_byte_s, 3),
        # a run shorter than one sample has only ru_maxrss, an upper bound that includes the launcher
        peak_rss_bytes=max(sampler.peak_rss, maxrss if informative or not sampler.peak_rss else 0),
        sampled_peak_rss_bytes=sampler.peak_rss,
        sampled_peak_anon_bytes=sampler.peak_anon, ru_maxrss_bytes=maxrss,
        user_s=round(launched["utime"], 2), sys_s=round(launched["stime"], 2),
        io=launched["io"], samples=sampler.samples, note=note)
