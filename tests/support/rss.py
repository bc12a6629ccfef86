"""What this machine's libraries cost to map, for the memory tests that hold `plan`'s prediction to 10%.

The prediction counts numpy and the interpreter with streamconv as a freshly installed venv maps them
(`plan.NUMPY_RSS_BYTES`: 16.8-17.1 MiB measured; `plan.BASE_RSS_BYTES` less `RUN_STATE_BYTES`): the kernel maps a
just-written library file in larger pieces than one whose pages were read back long after it was installed (11.7
MiB for the same numpy, 21.2 for the interpreter with `streamconv.cli`, here). The prediction takes the larger, so
it stays a bound on a fresh install (CI); a test on an older venv allows for the difference, measured once per
session.
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
print(before, rss() - before)
"""


@functools.lru_cache(maxsize=None)
def _measured() -> tuple:
    """(RSS after `import streamconv.cli`, what importing numpy adds) in a fresh interpreter of this venv."""
    result = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, timeout=300, check=True)
    interpreter, numpy = result.stdout.split()
    return int(interpreter), int(numpy)


def numpy_mapping_slack_bytes() -> int:
    """How much less than `plan.NUMPY_RSS_BYTES` importing numpy costs in this venv (0 when it costs as much)."""
    from streamconv.planning.plan import NUMPY_RSS_BYTES
    return max(0, NUMPY_RSS_BYTES - _measured()[1])


def mapping_slack_bytes() -> int:
    """How much less than the prediction counts the interpreter with streamconv and numpy cost in this venv."""
    from streamconv.planning.plan import BASE_RSS_BYTES, RUN_STATE_BYTES
    return numpy_mapping_slack_bytes() + max(0, BASE_RSS_BYTES - RUN_STATE_BYTES - _measured()[0])
