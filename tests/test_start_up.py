"""What start-up imports: `import streamconv.cli` (every verb, --help) and a local `convert` up to its first shard.

Start-up is most of a small conversion's time to first byte (docs/benchmarks.md), so each verb imports what it
uses when it uses it: numpy when a tensor goes through the buffer, tqdm for a progress bar, the object-store
clients for a URL, zstandard for a zstd checkpoint, transformers (in a child process) for a config-only base
model, batch's and verify's machinery for those verbs. These tests list the modules, in a fresh interpreter, and
fail when one of those creeps back into start-up. (A module set, not a timing: timings go in benchmarks/.)
"""
import json
import subprocess
import sys

import pytest

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


def test_importing_the_cli_imports_click_and_streamconv_only():
    found = _run("import streamconv.cli\nprint(json.dumps(imported()))")
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
    found = _run("import numpy, streamconv.cli\nprint(json.dumps(imported()))")
    assert "numpy" in _third_party(found)
