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
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent

# The child: the CLI as a user runs it, stopped where the first shard file is opened.
_CHILD = """
import os, sys, time
import streamconv.cli as cli
from streamconv.runs import conversion, parallel
conversion.check_free_space = lambda *args, **kwargs: None
def first_shard(self):
    print(f"FIRST-BYTE {time.monotonic():.6f} {time.process_time():.4f}", flush=True)
    os._exit(0)
parallel._OpenShard.open = first_shard
sys.argv = ["streamconv", "convert"] + sys.argv[1:]
cli.main()
"""


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


def first_byte(tree: Path, ckpt: Path, cold: bool) -> Tuple[float, float]:
    """(wall seconds, CPU seconds) from starting `convert` to its first shard's opening."""
    with tempfile.TemporaryDirectory(prefix="first-byte-") as scratch:
        if cold:
            drop_from_page_cache(ckpt)
        env = dict(os.environ, PYTHONPATH=str(tree))
        started = time.monotonic()
        # (in the scratch folder: `-c` puts the current folder first on sys.path, which would pick its streamconv)
        done = subprocess.run([sys.executable, "-c", _CHILD, str(ckpt.resolve()), str(Path(scratch) / "out")],
                              env=env, cwd=scratch, capture_output=True, text=True)
        found = re.search(r"FIRST-BYTE ([0-9.]+) ([0-9.]+)", done.stdout)
        if found is None:
            raise SystemExit(f"{tree}: no first byte (exit {done.returncode}): {done.stderr[-2000:]}")
        return float(found.group(1)) - started, float(found.group(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the checkpoint's pages before each run")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout to compare (its folder holding streamconv/)")
    args = parser.parse_args(argv)
    trees = [HERE.parent] + [tree.resolve() for tree in args.tree]
    runs: Dict[Path, List[Tuple[float, float, float]]] = {tree: [] for tree in trees}
    for _ in range(args.runs):
        for tree in trees:
            load = os.getloadavg()[0]
            wall, cpu = first_byte(tree, args.ckpt, args.cold)
            runs[tree].append((wall, cpu, load))
    print(f"first byte of {args.ckpt} ({'cold' if args.cold else 'warm'} page cache), median of {args.runs}:")
    for tree, measured in runs.items():
        wall, cpu, load = (statistics.median(m[i] for m in measured) for i in range(3))
        print(f"  {tree}: {wall:.3f} s wall, {cpu:.3f} CPU s (load average {load:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
