"""The `streamconv` command: the console script (`streamconv.cli:main`), `python -m streamconv` and
`python -m streamconv.cli`. The verbs are in commands.py; a failure's line and exit code in exits.py.

A Ctrl-C (or SIGTERM, SIGHUP) at any moment of start-up exits 130 with one line: importing this module imports
nothing of streamconv's but exits.py (the package's `__init__` imports nothing either), and `main` installs the
interrupt handlers before it imports the verbs, click and what a conversion needs (~0.1 s); a signal during those
imports is acted on when they are done. Before `main` runs, the interpreter is starting and a Ctrl-C is Python's
own (docs/safety.md, "Interrupted at any moment").
"""
from __future__ import annotations

import sys

from . import exits


def main():
    # For the whole process, not only inside a command: once interrupted and on the way out, more signals
    # (schedulers send several) must not turn exit 130 into "killed by signal" or a KeyboardInterrupt
    # printed during interpreter shutdown. `exits.on_signal` ignores every signal after the first.
    exits.hold_interrupts(True)     # (until the imports are done: ~0.1 s)
    exits.catch_signals()
    try:
        as_json = "--json" in sys.argv[1:]
        try:
            from . import failpoints
            failpoints.announce_start()     # (a test's cue that the handlers are in place)
            from .commands import run
        except Exception as exc:        # (a broken install: one line, as for any internal error)
            exits.internal_error(exc, as_json)
        finally:
            exits.hold_interrupts(False)
        if exits.signal_received():
            exits.interrupted_starting(as_json)
        code = run()
    finally:
        if exits.signal_received():
            exits.ignore_signals()
    sys.exit(code)


def __getattr__(name: str):
    # `from streamconv.cli import cli`: the click group, imported on first use (PEP 562) so that the console
    # script's `from streamconv.cli import main` stays the few lines above.
    if name == "cli":
        from .commands import cli
        return cli
    raise AttributeError(f"module 'streamconv.cli' has no attribute {name!r}")


if __name__ == "__main__":
    main()
