"""One checkpoint of a batch, converted in a fresh Python process that runs this module.

The driver (`batch.py`) starts `python -c <_BOOT>` per checkpoint, writes one JSON line on the job's stdin
(source, output, options, keywords) and reads JSON lines back from a pipe: `["progress", bytes]` a few MB at a
time, then `["done", result]`. Nothing is pickled either way.

Why a fresh interpreter and not `multiprocessing`: its spawn and forkserver start methods import the caller's
`__main__` again in every job, so `streamconv.convert_many(...)` in a plain script without an
`if __name__ == "__main__":` guard ran the script's top level in every job (which then failed), and from
`python - <<EOF` or a notebook there is no file to import at all. Fork is no better: the driver may hold threads
(a progress bar, Ray's client), which a forked child inherits in an unknown state. Starting an interpreter costs
a few hundred milliseconds per checkpoint, small beside a conversion.

A job dies with its driver, so that a `kill -9` of the driver leaves nothing converting unseen (and holding the
output's lock): on Linux the kernel sends the job SIGKILL when the driver dies (PR_SET_PDEATHSIG); everywhere a
thread reads the job's stdin, whose end of file means the driver is gone. Either way the job ends as a killed
convert does: its staging folder is kept and the next run resumes it.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from typing import Optional

from .. import failpoints
from ..errors import StreamconvError
from ..fs import remote
from ..planning.options import DEFAULT_WORKERS, ConvertOptions, RunOptions
from .conversion import convert
from .preparing import Request
from .report import Reporter

# The job's command: the streamconv the driver runs (its folder first on sys.path, not the caller's cwd, which
# may hold another `streamconv`), then main(). argv: [-c, package root, progress fd, driver pid].
_BOOT = "import sys; sys.path[0] = sys.argv[1]; from streamconv.runs.batch_job import main; main(sys.argv[2:])"
# Progress from a job is sent at most this often (bytes), so the pipe carries a few hundred messages per GB.
_PROGRESS_STEP_BYTES = 4 << 20
_PR_SET_PDEATHSIG = 1


def command(progress_fd: int) -> list:
    """The argv that starts one job writing its messages to `progress_fd`."""
    if not sys.executable:
        raise StreamconvError("cannot start a batch job: this Python does not know its own executable "
                              "(sys.executable is empty); run the batch with `streamconv batch` instead")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [sys.executable, "-c", _BOOT, root, str(progress_fd), str(os.getpid())]


def job_request(source: str, output: str, options: ConvertOptions, kwargs: dict) -> bytes:
    # (--storage-options travel on the pipe, never on a command line other users can read)
    return (json.dumps({"source": source, "output": output, "options": asdict(options), "kwargs": kwargs,
                        "storage_options": remote.StorageOptions.get()}) + "\n").encode("utf-8")


def convert_one(source: str, output: str, options: ConvertOptions, *, workers: Optional[int] = DEFAULT_WORKERS,
                crc: Optional[bool] = None, verify: bool = False, overwrite: bool = False,
                discard_partial: bool = False, reporter: Optional[Reporter] = None, shard_runner=None,
                overwrite_any: bool = False) -> dict:
    """Convert one checkpoint of a batch, resuming its staging folder (or, with `discard_partial`, deleting it
    and starting over); either way a failure keeps the new staging folder for the next run. Never raises a
    StreamconvError: the result dict says what happened (BatchItem fields)."""
    started = time.perf_counter()
    try:
        run = RunOptions(overwrite=overwrite, overwrite_any=overwrite_any, workers=workers, verify=verify, crc=crc,
                         resume=True, discard_partial=discard_partial)
        report = convert(source, output, Request(options), run, reporter, runner=shard_runner)
    except StreamconvError as exc:
        return {"status": "failed", "error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - started}
    except Exception as exc:     # one checkpoint's bug must not end the batch; reported like the CLI does
        return {"status": "failed", "error": f"internal error ({type(exc).__name__}: {exc})"[:500],
                "kind": "InternalError", "exit_code": 1, "seconds": time.perf_counter() - started}
    if report.already_converted:     # finished by another run since this batch planned
        return {"status": "skipped", "seconds": report.seconds, "notes": report.notes}
    return {"status": "resumed" if report.resumed else "converted", "bytes": report.bytes_written,
            "seconds": report.seconds, "peak_rss_bytes": report.peak_rss_bytes,
            "task_peak_rss_bytes": report.task_peak_rss_bytes, "notes": report.notes}


class _PipeReporter(Reporter):
    """Forwards the job's progress to the driver's one display, a few MB at a time."""

    def __init__(self, send):
        self.send, self.pending = send, 0

    def advance(self, n_bytes: int) -> None:
        self.pending += n_bytes
        if self.pending >= _PROGRESS_STEP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.send(["progress", self.pending])
            self.pending = 0


def _die_with(driver_pid: int) -> None:
    """End this process as soon as the driver is gone (see the module docstring)."""
    try:
        if failpoints.pdeathsig_enabled():    # a test turns it off: the stdin watch alone must end the job
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass    # not Linux: the stdin watch below still ends the job
    if os.getppid() != driver_pid:      # the driver died before the prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)

    def watch_stdin():
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader's lock aborts the
        # interpreter's shutdown ("could not acquire lock for <stdin>") when the job ends normally.
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch_stdin, name="streamconv-driver-watch", daemon=True).start()


def _read_request() -> bytes:
    """The driver's one JSON line, read from fd 0 byte-exactly (the rest of stdin is the watch's)."""
    data = b""
    while not data.endswith(b"\n"):
        piece = os.read(0, 1 << 16)
        if not piece:
            break
        data += piece
    return data


def main(argv) -> None:
    progress_fd, driver_pid = int(argv[0]), int(argv[1])
    # SIGTERM from the driver (its own interrupt) ends the job like Ctrl-C ends a convert: staging kept.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        line = _read_request()
        if not line.endswith(b"\n"):       # the driver died before it sent the whole job
            os._exit(1)
        request = json.loads(line)
        _die_with(driver_pid)
        out = os.fdopen(progress_fd, "w", encoding="utf-8")

        def send(message):
            out.write(json.dumps(message) + "\n")
            out.flush()

        reporter = _PipeReporter(send)
        remote.StorageOptions.set(request.get("storage_options"))
        result = convert_one(request["source"], request["output"], ConvertOptions(**request["options"]),
                             reporter=reporter, **request["kwargs"])
        reporter.flush()
        send(["done", result])
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group: the driver reports it, once
        os._exit(130)
    except BrokenPipeError:     # the driver is gone
        os._exit(1)
