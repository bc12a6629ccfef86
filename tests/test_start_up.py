"""Start-up: what it imports, and a Ctrl-C at any moment of it.

Start-up is most of a small conversion's time to first byte (docs/benchmarks.md), so each verb imports what it
uses when it uses it: numpy when a tensor goes through the buffer, tqdm for a progress bar, the object-store
clients for a URL, zstandard for a zstd checkpoint, transformers (in a child process) for a config-only base
model, batch's and verify's machinery for those verbs. These tests list the modules, in a fresh interpreter, and
fail when one of those creeps back into start-up. (A module set, not a timing: timings go in benchmarks/.)

The command line's entry (`streamconv.cli`) imports nothing but its signal handling, so that `main` can install the
interrupt handlers before the ~0.1 s of imports: the last tests send SIGINT to a real `streamconv convert` at
moments from the first line of streamconv's code that runs to the start of the conversion.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from streamconv import failpoints
from tests.support.safety import hidden

# Third-party packages no start-up imports (`click` is the one the CLI needs before any verb runs).
NEVER_AT_START_UP = {"numpy", "torch", "transformers", "safetensors", "fsspec", "s3fs", "gcsfs", "adlfs", "obstore",
                     "zstandard", "tqdm", "yaml", "ray", "psutil", "hashlib", "_hashlib", "ssl"}
# Our own modules that belong to one verb or one kind of input, not to every start-up.
ONLY_WHEN_ASKED = {"streamconv.runs.batch", "streamconv.runs.batch_job", "streamconv.runs.ray_runner",
                   "streamconv.runs.inspecting", "streamconv.runs.verifying", "streamconv.verification.compare",
                   "streamconv.hf.expected", "streamconv.hf.meta_probe", "streamconv.hf.tables",
                   "streamconv.hf.verdict", "streamconv.demo", "streamconv.demo_checkpoint"}

# Lists what the interpreter imported after `at_start` (a .pth file's own, e.g. setuptools' _distutils_hack).
_IMPORTED = ("def imported():\n"
             "    return sorted(set(sys.modules) - at_start)\n")


def _run(script: str, *args) -> dict:
    code = "import json, sys\nat_start = set(sys.modules)\n" + _IMPORTED + script
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _third_party(modules) -> set:
    return {m.split(".")[0] for m in modules} - set(sys.stdlib_module_names) - {"streamconv"}


def test_importing_the_package_or_the_entry_imports_nothing_else():
    """`import streamconv` (the API's names are looked up on first use) and the console script's
    `from streamconv.cli import main` import no module of streamconv's but the entry's signal handling, and no
    other package: the interrupt handlers are in place before anything that takes time is imported."""
    found = _run("import streamconv\nprint(json.dumps(imported()))")
    assert [m for m in found if m.startswith("streamconv")] == ["streamconv"] and _third_party(found) == set()
    found = _run("from streamconv.cli import main\nprint(json.dumps(imported()))")
    assert sorted(m for m in found if m.startswith("streamconv")) == ["streamconv", "streamconv.cli",
                                                                       "streamconv.exits"]
    assert _third_party(found) == set()
    assert set(found) - {"streamconv", "streamconv.cli", "streamconv.exits"} <= {"signal"}


def test_the_api_is_still_one_attribute_away():
    found = _run("import streamconv\nassert streamconv.convert and streamconv.VerificationError\n"
                 "print(json.dumps(imported()))")
    assert "streamconv.api" in found and "streamconv.errors" in found


def test_the_verbs_import_click_and_streamconv_only():
    found = _run("import streamconv.commands\nprint(json.dumps(imported()))")
    assert _third_party(found) == {"click"}
    assert set(found) & (NEVER_AT_START_UP | ONLY_WHEN_ASKED) == set()
    # `--help`, `plan` and `inspect` write nothing: the conversion's phases and the writers are not imported
    assert "streamconv.runs.conversion" not in found and "streamconv.runs.parallel" not in found


@pytest.fixture(scope="module")
def first_shard_modules(dcp_checkpoints, tmp_path_factory):
    """The modules a local `streamconv convert` (no config, no cast, no progress bar) has imported when it starts
    its first shard, and those it has imported once it is done."""
    script = (
        "from streamconv import cli\n"
        "from streamconv.runs import conversion\n"
        "write, seen = conversion.Conversion.write, {}\n"
        "def first_write(self, staging):\n"
        "    seen['first_shard'] = imported()\n"
        "    return write(self, staging)\n"
        "conversion.Conversion.write = first_write\n"
        "sys.argv = ['streamconv', 'convert', sys.argv[1], sys.argv[2], '--json']\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "seen['done'] = imported()\n"
        "print(json.dumps(seen))\n")
    return _run(script, dcp_checkpoints["fsdp2"], tmp_path_factory.mktemp("start_up") / "out")


def test_a_local_conversion_starts_its_first_shard_without_optional_packages(first_shard_modules):
    at_first_shard = first_shard_modules["first_shard"]
    assert _third_party(at_first_shard) == {"click"}
    assert set(at_first_shard) & (NEVER_AT_START_UP | ONLY_WHEN_ASKED) == set()


def test_the_module_lists_see_an_import_when_there_is_one(first_shard_modules):
    """The lists are real: the whole run went on to write its shards through the conversion's modules, and the
    same script sees numpy when a test imports it before the conversion starts."""
    assert "streamconv.runs.parallel" in first_shard_modules["done"]
    found = _run("import numpy, streamconv.commands\nprint(json.dumps(imported()))")
    assert "numpy" in _third_party(found)


# -- Ctrl-C during start-up ------------------------------------------------------------------------------------

# The two entries: `python -m streamconv` and what the console script runs (`streamconv.cli:main`).
ENTRIES = {"module": ["-m", "streamconv"],
           "script": ["-c", "import sys; from streamconv.cli import main; sys.exit(main())"]}


def _interrupted(ckpt, out, entry: str, delay_s, *args) -> subprocess.CompletedProcess:
    """`streamconv convert ckpt out` stopped at its first shard (STREAMCONV_TEST_KILL_AT, SIGSTOP), sent SIGINT
    `delay_s` seconds after it says its handlers are in place (STREAMCONV_TEST_STARTED_FD), then continued.
    `delay_s=None`: SIGINT once it is stopped, the conversion about to write its first byte."""
    started, tell = os.pipe()
    env = dict(os.environ, **{failpoints.STARTED_FD_ENV: str(tell), failpoints.KILL_AT_ENV: "before-first-shard",
                              failpoints.KILL_SIGNALS_ENV: "STOP"})
    proc = subprocess.Popen([sys.executable, *ENTRIES[entry], "convert", str(ckpt), str(out), *args], env=env,
                            pass_fds=(tell,), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(tell)
    try:
        with os.fdopen(started, "rb") as cue:
            assert cue.readline() == b"started\n"
        if delay_s is None:
            os.waitpid(proc.pid, os.WUNTRACED)      # (no signal sent yet: it can only stop, not exit)
        else:
            time.sleep(delay_s)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)        # (stopped at the first shard by now, or not: either way)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _check_interrupted(result: subprocess.CompletedProcess, out) -> str:
    """Exit 130, one line on stderr and no traceback, nothing finished-looking left; the line."""
    assert result.returncode == 130, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted"), result.stderr
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert not out.exists() and hidden(out) == []
    return lines[0]


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_ctrl_c_during_the_imports_exits_130_with_one_line(dcp_checkpoints, tmp_path, entry):
    """At the first moment the handlers are in place (the verbs, click and the conversion's modules not imported
    yet): the signal is held until the imports are done, then the run ends there."""
    out = tmp_path / "out"
    line = _check_interrupted(_interrupted(dcp_checkpoints["fsdp2"], out, entry, 0), out)
    assert line == "interrupted while starting: nothing was read or written"


def test_ctrl_c_as_the_conversion_starts_exits_130_with_one_line(dcp_checkpoints, tmp_path):
    out = tmp_path / "out"
    line = _check_interrupted(_interrupted(dcp_checkpoints["fsdp2"], out, "module", None), out)
    assert line == "interrupted: nothing was committed and the partial output was removed"


def test_ctrl_c_while_starting_with_json_reports_it_on_stdout(dcp_checkpoints, tmp_path):
    out = tmp_path / "out"
    result = _interrupted(dcp_checkpoints["fsdp2"], out, "module", 0, "--json")
    _check_interrupted(result, out)
    assert json.loads(result.stdout) == {"error": "interrupted while starting: nothing was read or written",
                                         "kind": "Interrupted", "exit_code": 130}


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_ctrl_c_at_any_moment_of_start_up_exits_130(dcp_checkpoints, tmp_path, entry):
    """A sweep from the first moment to the first shard: the imports (held), click, `.metadata`, the plan, the
    staging folder; whatever the machine's load makes of each delay, every run ends the same way."""
    seen = set()
    for i, delay_s in enumerate([0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.5, None]):
        out = tmp_path / f"out{i}"
        seen.add(_check_interrupted(_interrupted(dcp_checkpoints["fsdp2"], out, entry, delay_s), out))
    assert "interrupted while starting: nothing was read or written" in seen


def test_a_verb_module_that_cannot_be_imported_is_one_line_not_a_traceback():
    """A broken install (here: `streamconv.commands` made unimportable) fails as any internal error does."""
    code = "import sys\nsys.modules['streamconv.commands'] = None\nfrom streamconv.cli import main\nmain()\n"
    result = subprocess.run([sys.executable, "-c", code, "plan", "ckpt"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("streamconv: internal error (ModuleNotFoundError: import of streamconv.commands")
    assert len(result.stderr.splitlines()) == 1
