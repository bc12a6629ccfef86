"""What this machine's libraries cost to map, for the memory tests that hold `plan`'s prediction to 10%.

The prediction counts numpy as a freshly installed venv maps it (`plan.NUMPY_RSS_BYTES`: 16.8-17.1 MiB measured):
the kernel maps a just-written library file in larger pieces than one whose pages were read back long after it
was installed (11.7 MiB for the same numpy, here). The prediction takes the larger, so it stays a bound on a fresh
install (CI); a test on an older venv allows for the difference, measured once per session.
"""
import functools
import subprocess
import sys

_CODE = """
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
import streamconv.cli
before = rss()
import numpy
print(rss() - before)
"""


@functools.lru_cache(maxsize=None)
def numpy_mapping_slack_bytes() -> int:
    """How much less than `plan.NUMPY_RSS_BYTES` importing numpy costs in this venv (0 when it costs as much)."""
    from streamconv.planning.plan import NUMPY_RSS_BYTES
    result = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=300, check=True)
    return max(0, NUMPY_RSS_BYTES - int(result.stdout.strip()))
