"""How long a gs:// conversion takes to give up when GCS keeps failing: wall and CPU seconds to the exit code.

    python -m benchmarks.gcs_faults [--tree PATH] [--kind 503|reset] [--side input|output]

Writes the demo checkpoint (2 gloo ranks), uploads it to fake-gcs-server on localhost (tests/support/gcs_server.py)
and puts the FaultProxy of tests/support/s3_server.py in front of it, failing every data GET (`--side input`: a
gs:// checkpoint converted into a local folder, exit 2) or every part upload (`--side output`: a local checkpoint
converted into gs://, exit 73) with `--kind`. Runs `python -m streamconv convert` from `--tree` (default: this one;
another worktree to time a change before and after) under `/usr/bin/time -v` and prints the exit code, wall and
CPU seconds, peak RSS, the requests the proxy saw and failed, whether stderr held a traceback, and the load
average. docs/remote.md ("Faults on GCS") has the numbers.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(REPO))
    parser.add_argument("--kind", choices=["503", "reset"], default="503")
    parser.add_argument("--side", choices=["input", "output"], default="input")
    args = parser.parse_args()
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    sys.path.insert(0, str(REPO))
    from streamconv.demo_checkpoint import write_demo_checkpoint
    from tests.support import gcs_server
    from tests.support.s3_server import FaultProxy

    work = tempfile.mkdtemp(prefix="streamconv-gcs-faults-")
    demo = write_demo_checkpoint(os.path.join(work, "ckpt"), world_size=2)
    server = gcs_server.start()
    try:
        url = server.upload(demo.ckpt_dir, "faults-in", "ckpt")
        server.bucket("faults-out")
        if args.side == "input":
            def fault(method, path, headers):
                return args.kind if method == "GET" and ".distcp" in path and "alt=media" in path else None
            src, dst = url, os.path.join(work, "out")
        else:
            def fault(method, path, headers):
                return args.kind if method == "POST" and "uploadType=media" in path else None
            src, dst = str(demo.ckpt_dir), "gs://faults-out/hf"
        proxy = FaultProxy(server.url, fault)
        env = dict(os.environ, **server.env)
        env.update(STORAGE_EMULATOR_HOST=proxy.url, PYTHONPATH=args.tree)
        started = time.monotonic()
        result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "streamconv", "convert", src, dst,
                                 "--no-config"], env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
        proxy.stop()
    finally:
        server.stop()

    def field(name: str) -> float:
        return float(re.search(name + r": ([\d.]+)", result.stderr).group(1))
    cpu = field(r"User time \(seconds\)") + field(r"System time \(seconds\)")
    print(f"tree={args.tree} side={args.side} kind={args.kind} exit={result.returncode} wall={wall:.1f}s "
          f"cpu={cpu:.2f}s peak_rss={field(r'Maximum resident set size .kbytes.') / 1024:.0f}MiB "
          f"requests={proxy.requests} failed={proxy.faults} traceback={'Traceback' in result.stderr} "
          f"load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
