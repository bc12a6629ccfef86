"""Decode one hostile input in a fresh process and report what happened, for `tests/hostile/test_hostile.py` and
`tests/support/hostile_report.py`: `python -m tests.support.hostile_child (folder|blob) PATH` prints one JSON line with the
error type, the message's length and start, the wall time and this process's peak RSS (VmHWM).

A separate process because the inputs used to crash CPython (segfault), and because peak RSS must be
measured without pytest's and torch's memory.
"""
from __future__ import annotations

import json
import os
import sys
import time

from streamconv.errors import StreamconvError
from streamconv.source.io import DirectoryReader
from streamconv.model import BlobLocation
from streamconv.source import find_metadata_file, load_metadata, locate_tensor


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    kind, path = sys.argv[1], sys.argv[2]
    base = peak_rss_bytes()
    start = time.perf_counter()
    result = {"error": None, "message": "", "message_chars": 0}
    try:
        if kind == "folder":
            name = find_metadata_file(path)
            with DirectoryReader(path) as reader:
                md = load_metadata(reader, name)
            result["tensors"] = len(md.tensors)
            result["chunks"] = sum(len(t.chunks) for t in md.tensors)
        else:
            size = os.path.getsize(path)
            with DirectoryReader(os.path.dirname(path)) as reader:
                locate_tensor(reader, BlobLocation(os.path.basename(path), 0, size), fqn="t")
    except StreamconvError as exc:
        message = str(exc)
        result.update(error=type(exc).__name__, message=message[:400], message_chars=len(message))
    result.update(seconds=time.perf_counter() - start, peak_rss_bytes=peak_rss_bytes(), base_rss_bytes=base)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
