"""exits.py: how the command line ends. A signal held while the entry imports the verbs, and an interrupt that
Python would otherwise report as "killed by SIGINT" although it was caught (the Ctrl-C runs themselves are in
tests/test_start_up.py and tests/end_to_end/test_safety.py)."""
import os
import signal
import subprocess
import sys

import pytest

from streamconv import exits

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def handlers():
    previous = exits.catch_signals()
    exits.forget_signal()
    yield
    exits.hold_interrupts(False)
    exits.forget_signal()
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_a_held_signal_is_recorded_and_raised_by_no_one(handlers):
    exits.hold_interrupts(True)
    os.kill(os.getpid(), signal.SIGTERM)
    assert exits.signal_received()        # (the handler ran: Python runs it between two bytecodes, here)
    exits.hold_interrupts(False)
    os.kill(os.getpid(), signal.SIGINT)   # a second signal never interrupts, held or not
    assert exits.signal_received()


def test_the_first_signal_interrupts_when_not_held(handlers):
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(1000):       # (delivered at the next bytecode boundary of this thread)
            pass


# A KeyboardInterrupt that left code run by exec() of a string (as dataclasses create their methods, at import) and
# was caught: without `ignore_signals` clearing CPython's mark, `python -m` ends by SIGINT instead of exit 130.
_MAIN = """import sys
from streamconv import exits
try:
    exec("raise KeyboardInterrupt")
except KeyboardInterrupt:
    if sys.argv[1:] == ["clear"]:
        exits.ignore_signals()
    sys.exit(130)
"""


@pytest.mark.parametrize("clear, returncode", [(True, 130), (False, -signal.SIGINT)])
def test_an_interrupt_caught_after_an_exec_exits_130_once_cleared(tmp_path, clear, returncode):
    (tmp_path / "interrupted_in_exec.py").write_text(_MAIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))
    result = subprocess.run([sys.executable, "-m", "interrupted_in_exec"] + (["clear"] if clear else []), env=env,
                            capture_output=True, text=True, timeout=60)
    # (the second case is CPython's own behaviour, seen on 3.11: it shows the first tests something)
    assert result.returncode == returncode, result.stderr
