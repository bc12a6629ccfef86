"""First byte of `streamconv convert`: the wall seconds from starting the command to opening its first shard, and
the CPU seconds it spent by then, with the checkpoint's pages in the page cache (warm) or dropped from it (cold:
`posix_fadvise(DONTNEED)` on the checkpoint's own files, never the machine's whole cache).

    .venv/bin/python -m benchmarks.first_byte CKPT [--runs 5] [--cold] [--tree OTHER_CHECKOUT ...]

Each run is a real `streamconv convert` (the CLI's main) in a process of its own that exits when the first shard
file is opened, before any byte of it is written, so nothing needs the output's disk space (the free-space check
is skipped). With `--tree`, the runs alternate between this checkout and the others (e.g. a `git archive` of main),
so a before/after pair shares the machine's load; CPU seconds are the figure to compare on a shared machine. The
load average is printed beside each median. Compile each tree's bytecode first (`python -m compileall`), as an
install does.

`--steps` also prints where the time went, step by step (CPU and wall medians): the interpreter, the imports, the
`.metadata` decode, the HF side, the plan, the fingerprints, the first located batch, the staging folder; each
timed around the function that does it (no profiler: its overhead would distort the small steps).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent

# The child: the CLI as a user runs it, stopped where the first shard file is opened. With steps, each step's CPU
# and wall seconds too ("STEP label cpu wall"), timed around the function that does it.
_CHILD = """
import os, sys, time
now = lambda: (time.process_time(), time.perf_counter())
steps, started = {}, now()
def add(label, a, b):
    cpu, wall = steps.get(label, (0.0, 0.0))
    steps[label] = (cpu + b[0] - a[0], wall + b[1] - a[1])
steps["interpreter (CPU before the first line)"] = (started[0], 0.0)
try:
    import streamconv.commands          # the verbs: click, the API and what it plans with (where cli.py is the entry)
except ImportError:
    import streamconv.cli               # (an older tree: one module for the entry and the verbs)
add("imports: the verbs", started, now())
at = now()
from streamconv.runs import conversion, parallel, preparing
add("imports: the conversion's modules", at, now())
import streamconv.cli as cli
conversion.check_free_space = lambda *args, **kwargs: None
def timed(owner, name, label):
    fn = getattr(owner, name)
    def run(*args, **kwargs):
        at = now()
        try:
            return fn(*args, **kwargs)
        finally:
            add(label, at, now())
    setattr(owner, name, run)
if os.environ.get("FIRST_BYTE_STEPS"):
    for owner, name, label in [
            (preparing, "load", ".metadata read and decoded"), (preparing.hf, "prepare", "hf.prepare: names, config"),
            (conversion, "checked_plan", "the plan"), (conversion, "shard_fingerprints", "shard fingerprints"),
            (conversion.Locating, "first", "the first tensors' chunks located"),
            (conversion.Conversion, "staging_dir", "the staging folder"), (conversion.Conversion, "stage", "stage")]:
        timed(owner, name, label)
import threading
first = threading.Lock()
def first_shard(self):
    at = now()
    first.acquire()         # (two writers may open their shards at once: the first one reports, then all exit)
    print(f"FIRST-BYTE {time.monotonic():.6f} {at[0]:.4f}", flush=True)
    for label, (cpu, wall) in steps.items():
        print(f"STEP {cpu:.6f} {wall:.6f} {label}", flush=True)
    print(f"STEP {at[0]:.6f} {at[1] - started[1]:.6f} total (wall from the first line)", flush=True)
    os._exit(0)
parallel._OpenShard.open = first_shard
sys.argv = ["streamconv", "convert"] + sys.argv[1:]
cli.main()
"""


TOTAL = "total (wall from the first line)"


def drop_from_page_cache(folder: Path) -> None:
    """The folder's files out of the page cache (written back first, so every page can go)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def first_byte(tree: Path, ckpt: Path, cold: bool, steps: Optional[Dict[str, Tuple[float, float]]] = None
               ) -> Tuple[float, float]:
    """(wall seconds, CPU seconds) from starting `convert` to its first shard's opening; `steps` (a dict) gets
    {step: (CPU seconds, wall seconds)}."""
    with tempfile.TemporaryDirectory(prefix="first-byte-") as scratch:
        if cold:
            drop_from_page_cache(ckpt)
        env = dict(os.environ, PYTHONPATH=str(tree), FIRST_BYTE_STEPS="1" if steps is not None else "")
        started = time.monotonic()
        # (in the scratch folder: `-c` puts the current folder first on sys.path, which would pick its streamconv)
        done = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt.resolve()), str(Path(scratch) / "out")],
                              env=env, cwd=scratch, capture_output=True, text=True)
        found = re.search(r"FIRST-BYTE ([0-9.]+) ([0-9.]+)", done.stdout)
        if found is None:
            raise SystemExit(f"{tree}: no first byte (exit {done.returncode}): {done.stderr[-2000:]}")
        if steps is not None:
            steps.update((m.group(3), (float(m.group(1)), float(m.group(2))))
                         for m in re.finditer(r"STEP ([0-9.]+) ([0-9.]+) (.+)", done.stdout))
        return float(found.group(1)) - started, float(found.group(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the checkpoint's pages before each run")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout to compare (its folder holding streamconv/)")
    parser.add_argument("--steps", action="store_true", help="also where the time went, step by step")
    args = parser.parse_args(argv)
    trees = [HERE.parent] + [tree.resolve() for tree in args.tree]
    runs: Dict[Path, List[Tuple[float, float, float]]] = {tree: [] for tree in trees}
    steps: Dict[Path, List[Dict[str, Tuple[float, float]]]] = {tree: [] for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            load = os.getloadavg()[0]
            steps[tree].append({})
            wall, cpu = first_byte(tree, args.ckpt, args.cold, steps[tree][-1] if args.steps else None)
            runs[tree].append((wall, cpu, load))
    print(f"first byte of {args.ckpt} ({'cold' if args.cold else 'warm'} page cache), median of {args.runs}:")
    for tree, measured in runs.items():
        wall, cpu, load = (statistics.median(m[i] for m in measured) for i in range(3))
        print(f"  {tree}: {wall:.3f} s wall, {cpu:.3f} CPU s (load average {load:.1f})")
        for label in steps[tree][0] if args.steps else ():
            step_cpu, step_wall = (statistics.median(s[label][i] for s in steps[tree] if label in s) for i in (0, 1))
            print(f"    {step_cpu * 1000:7.1f} ms CPU {step_wall * 1000:7.1f} ms wall  {label}")
        if args.steps:      # what no step above times: click, the checks and notes between the steps, the writers
            rest = [s[TOTAL][0] - sum(cpu for label, (cpu, _) in s.items() if label != TOTAL) for s in steps[tree]]
            print(f"    {statistics.median(rest) * 1000:7.1f} ms CPU               the rest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
