"""Issue 21's write bound: a conversion INTO a bucket peaks within `--buffer-size` + 64 MiB + the client stack's own
resident memory, and within convert's predicted peak, measured by the OS (VmHWM of a real `streamconv convert`
subprocess, reported in --json) writing the 256 MiB checkpoint into the session's S3-protocol server (moto,
tests/support/s3_server.py) through the real client stack, 2 workers and a 32 MiB buffer as in the issue.

Before the fix it peaked 176-184 MiB against a prediction of 127: the client copied each 8 MiB part two or three
times while sending it, and malloc's arenas kept the freed parts (docs/remote.md, "Writing into a bucket").
Timing is not asserted here: speed lives in benchmarks/.
"""
import json
import subprocess
import sys

import pytest

from tests.support import s3_server as s3

BUCKET = "upmem"
BUFFER_MIB = 32

# What the client stack costs in this venv, measured as the conversion meets it: after the interpreter with
# streamconv and numpy, a multipart upload started and a part sent through s3fs, and the output prefix listed
# (through obstore, as convert lists it).
_CLIENT_COST = """
import sys
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096
import numpy
import streamconv.commands     # (the verbs and all they import: what a run has loaded before it uploads)
from streamconv.errors import OutputError
before = rss()
from streamconv.fs import location, objects
upload = objects.start_upload(sys.argv[1] + "/probe")
upload.put_part(1, bytearray(1024))
upload.abort()
try:
    location.at(sys.argv[1], OutputError).names()
except FileNotFoundError:
    pass
print(rss() - before)
"""


def _run(env, *args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def env(s3_server):
    s3_server.bucket(BUCKET)
    return s3.env_for(s3_server)


@pytest.mark.slow      # ~10 s against moto here; its fast sibling: tests/output/test_upload.py's no-copies test
def test_a_conversion_into_s3_stays_within_the_buffer_64_mib_and_the_client_and_the_prediction(big_checkpoint, env):
    client_bytes = int(_run(env, "-c", _CLIENT_COST, f"s3://{BUCKET}/probe"))
    report = json.loads(_run(env, "-m", "streamconv", "convert", str(big_checkpoint), f"s3://{BUCKET}/big",
                             "--no-config", "--buffer-size", f"{BUFFER_MIB}MiB", "--workers", "2", "--json"))
    assert report["bytes_written"] > 256 * 2**20
    peak, predicted = report["peak_rss_bytes"], report["predicted_peak_bytes"]
    bound = (BUFFER_MIB + 64) * 2**20 + client_bytes
    mib = 2**20
    assert peak <= bound, (f"peak RSS {peak / mib:.1f} MiB above the issue's bound {bound / mib:.1f} MiB "
                           f"({BUFFER_MIB} MiB buffer + 64 MiB + {client_bytes / mib:.1f} MiB for the client stack)")
    assert peak <= predicted, f"peak RSS {peak / mib:.1f} MiB above the predicted {predicted / mib:.1f} MiB"
