"""How the command line ends: a signal turned into an interrupt, a failure into one line and its exit code.

The verbs (commands.py) and the entry (cli.py) share this, and cli.py needs it before anything else is imported:
so it imports only the standard library's `signal` and `sys` (json when a failure is reported with --json), and
writes with `print`, not click. Nothing here is library code: only the command line installs handlers or exits.
"""
from __future__ import annotations

import signal
import sys

# SIGTERM (job schedulers) and SIGHUP (a closed terminal or ssh session) end a run like Ctrl-C does.
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
INTERRUPTED_EXIT_CODE = 130     # 128 + SIGINT, what a shell shows for a process Ctrl-C ended
_received = {"signal": None, "held": False}

INTERNAL_ERROR_HINT = "this is a bug in streamconv; please report it with the command you ran and this line"


def on_signal(signum, frame):
    # Only the first signal interrupts: schedulers often send several (SIGTERM then SIGINT, or one per
    # process group member), and a second KeyboardInterrupt would break the cleanup the first one started.
    if _received["signal"] is None:
        _received["signal"] = signum
        if not _received["held"]:
            raise KeyboardInterrupt


def hold_interrupts(held: bool) -> None:
    """While held, a signal is only recorded (`signal_received`), for the caller to act on once it releases
    them: the entry holds them while it imports the verbs. A KeyboardInterrupt raised inside an import can be
    lost or disguised there (Python 3.11 wraps one raised in a class body's `__set_name__` in a RuntimeError, and
    ignores one raised in the import lock's weakref callback), and half-imported modules are of no use anyway."""
    _received["held"] = held


def catch_signals() -> dict:
    """Every interrupt signal to `on_signal`, from now on; {signal: the handler it replaced}."""
    return {s: signal.signal(s, on_signal) for s in INTERRUPT_SIGNALS}


def forget_signal() -> None:
    """A new command starts with no signal received (a caller may run several in one process)."""
    _received["signal"] = None


def signal_received() -> bool:
    return _received["signal"] is not None


def ignore_signals() -> None:
    """Once interrupted and on the way out: Python resets its handlers to the default while shutting down, and a
    further signal would turn exit 130 into "killed by signal" or a KeyboardInterrupt printed during shutdown."""
    for s in INTERRUPT_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    # CPython (seen on 3.11) marks a KeyboardInterrupt that leaves code run by exec() of a string as unhandled even
    # when a caller catches it, and `python -m` then ends by sending itself SIGINT instead of exiting 130.
    # dataclasses create their methods with exec(): an interrupt during a lazy import (the conversion's modules
    # are imported once the command line is parsed) leaves that mark. An exec() that completes clears it.
    exec("")


def emit_failure(message: str, kind: str, exit_code: int, as_json: bool) -> None:
    """The one line on stderr; with --json the same failure as one JSON object on stdout."""
    # backslashreplace: a path or name holding a lone surrogate must not turn the message into a traceback
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    print(message if message.startswith(("error:", "interrupted", "streamconv:")) else f"error: {message}",
          file=sys.stderr, flush=True)
    if as_json:
        import json     # (here: the entry imports this module before anything else)
        # Scripts reading --json get every failure on stdout too, in the same shape every time.
        print(json.dumps({"error": message, "kind": kind, "exit_code": exit_code}), flush=True)


def internal_error(exc: BaseException, as_json: bool) -> None:
    """Last resort: one line, exit 1, never a traceback. (Does not return.)"""
    detail = " ".join(str(exc).split())[:300]
    emit_failure(f"streamconv: internal error ({type(exc).__name__}: {detail}); {INTERNAL_ERROR_HINT}",
                 "InternalError", 1, as_json)
    sys.exit(1)


def interrupted(as_json: bool, resume: bool, batch: bool = False) -> None:
    kept = ("the staging folder is kept: run the same command with --resume to continue" if resume
            else "nothing was committed and the partial output was removed")
    if batch:
        kept = "finished checkpoints are committed, the others' staging folders kept: run the same command to continue"
    emit_failure(f"interrupted: {kept}", "Interrupted", INTERRUPTED_EXIT_CODE, as_json)
    sys.exit(INTERRUPTED_EXIT_CODE)


def interrupted_starting(as_json: bool) -> None:
    """Interrupted while the command's modules were being imported: no verb had started."""
    emit_failure("interrupted while starting: nothing was read or written", "Interrupted", INTERRUPTED_EXIT_CODE,
                 as_json)
    sys.exit(INTERRUPTED_EXIT_CODE)
