"""Every fenced command block of README.md (and docs/*.md) runs as written (issue 17.3).

Blocks are found by parsing the Markdown, never by position, so a block added tomorrow is run tomorrow:

* a block tagged `python` runs as a script with this interpreter;
* any other block (untagged, `sh`, `bash`, `console`) runs in bash with `set -e`, `streamconv` on PATH;
* a block naming `s3://my-bucket/` runs with `ckpt/` uploaded there, on a local S3 server (the `s3_server`
  fixture) whose endpoint and credentials are in its environment, as a user's AWS_* variables would be; one naming
  `gs://my-bucket/` likewise on the local GCS server (`gcs_server`: STORAGE_EMULATOR_HOST, anonymous);
* a block that must not run carries, on the line just before its opening fence,
  `<!-- doctest: skip (why) -->`; the reason is required (an empty one fails this test);
* a shell command line ending in a comment `# exit N` must end with exit status N (the block goes on); when it
  has `--json` (and no redirection), its stdout must be exactly one JSON object whose `exit_code` is N. So the
  exit codes the docs promise are run, not only listed.

Each block runs in a fresh folder laid out as the README implies: `ckpt/` (the demo checkpoint: a real 4-rank
FSDP2 DCP written by torch), `runs/{a,b}/checkpoint-{1,2}/` (two runs, each with two checkpoints) and `list.txt`
naming two of them. The install block (`pip install .` ...) runs in a copy of the sources with a fresh venv's
`bin/` first on PATH (its `pip` installs into that venv), so the `streamconv` it then runs is the installed one; it
builds twice (~30 s), so it runs in `make test-slow`, and tests/test_packaging.py installs the wheel in `make test`.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"^<!--\s*doctest:\s*skip\s*\((.*)\)\s*-->\s*$")
SHELL_TAGS = {"", "sh", "bash", "shell", "console"}
# `cmd  # exit N ...`: the command (no `#` in it) and the status it must end with.
EXPECT = re.compile(r"^(?P<cmd>[^#\n]*?\S)[ \t]+#[ \t]*exit (?P<code>\d+)\b.*$", re.M)

# Blocks known to fail for a reason another branch is fixing: {text the block contains: (reason, what its failure
# must say)}. Strict: when the block passes, this entry must go.
KNOWN_FAILURES: dict = {}     # "text in the block": (reason, regex its failure must match)


class Block(NamedTuple):
    doc: Path
    line: int           # of the opening fence, 1-based
    tag: str
    text: str
    skip: Optional[str]  # the reason, when marked

    @property
    def id(self) -> str:
        first = next((l for l in self.text.splitlines() if l.strip()), "")
        return f"{self.doc.name}:{self.line}:{first[:40]}"


def blocks() -> List[Block]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.match(before.strip())
            found.append(Block(doc, line, m.group(1).lower(), m.group(2), skip.group(1).strip() if skip else None))
    return found


class BlockFailed(AssertionError):
    pass


class KnownFailure(Exception):
    """The block failed exactly as a KNOWN_FAILURES entry says it still does."""


def _known(block: Block):
    return next((v for k, v in KNOWN_FAILURES.items() if k in block.text), None)


def _installs_from_a_clone(block: Block) -> bool:
    return re.search(r"^\s*pip install \.", block.text, re.M) is not None


def _params():
    out = []
    for b in blocks():
        known = _known(b)
        marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=known[0])] if known else []
        if _installs_from_a_clone(b):
            # Two isolated builds and two installs (~30 s): `make test-slow`. In `make test`,
            # tests/test_packaging.py builds the wheel, installs it in a fresh venv and converts with its script.
            marks.append(pytest.mark.slow)
        out.append(pytest.param(b, id=b.id, marks=marks))
    return out


@pytest.fixture(scope="module")
def layout(demo_checkpoint, tmp_path_factory) -> Path:
    """The folder the README's commands assume, built once and copied for every block."""
    root = tmp_path_factory.mktemp("readme-layout")
    shutil.copytree(demo_checkpoint.ckpt_dir, root / "ckpt")
    for run in ("a", "b"):
        for step in (1, 2):
            shutil.copytree(demo_checkpoint.ckpt_dir, root / "runs" / run / f"checkpoint-{step}")
    (root / "list.txt").write_text("# checkpoints to convert, one a line\nruns/a/checkpoint-1\nruns/b/checkpoint-2\n")
    return root


def _env(path_first: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{path_first}{os.pathsep}{env.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1",
               HF_HUB_OFFLINE="1")
    return env


def _install_venv(where: Path) -> Path:
    """A venv without pip (seconds instead of a minute) whose `bin/pip` is this interpreter's pip aimed at it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=300)
    pip = where / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pip --python "{where / "bin" / "python"}" "$@"\n')
    pip.chmod(0o755)
    return where / "bin"


# Defined before a shell block that has `# exit N` lines; each such line becomes `__expect N 'cmd'`.
EXPECT_PRELUDE = r"""
__expect() {
  local want=$1 got=0
  ( eval "$2" ) > "$DOCTEST_STDOUT" || got=$?
  cat "$DOCTEST_STDOUT"
  if [ "$got" != "$want" ]; then echo "doctest: \`$2\` exited $got; the block says $want" >&2; exit 1; fi
  case "$2" in *">"*) ;; *--json*) "$DOCTEST_PYTHON" -c '
import json, sys
doc = json.loads(open(sys.argv[2], encoding="utf-8").read())
assert isinstance(doc, dict) and doc.get("exit_code") == int(sys.argv[1]), ("--json", sys.argv[1], doc)' \
    "$want" "$DOCTEST_STDOUT" || { echo "doctest: \`$2\`: stdout is not one JSON object with exit_code $want" >&2; exit 1; };;
  esac
}
"""


def with_expectations(text: str) -> str:
    """The block's shell text with every `cmd  # exit N` line made to check that `cmd` exits N."""
    if not EXPECT.search(text):
        return text
    return EXPECT_PRELUDE + EXPECT.sub(lambda m: f"__expect {m.group('code')} {shlex.quote(m.group('cmd'))}", text)


def _run(block: Block, layout: Path, tmp_path: Path, extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    work = tmp_path / "work"
    shutil.copytree(layout, work, symlinks=True)
    if _installs_from_a_clone(block):       # "from a clone": the sources, in a fresh venv
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy(REPO / name, work / name)
        shutil.copytree(REPO / "streamconv", work / "streamconv", ignore=shutil.ignore_patterns("__pycache__"))
        env = _env(_install_venv(tmp_path / "venv"))
        env.pop("PYTHONPATH", None)         # the installed copy must be the one that runs
    else:
        env = _env(Path(sys.executable).parent)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    env.update(DOCTEST_STDOUT=str(tmp_path / "doctest-stdout"), DOCTEST_PYTHON=sys.executable)
    if block.tag in ("python", "py"):
        argv = [sys.executable, "-c", block.text]
    else:
        argv = ["bash", "-e", "-o", "pipefail", "-c", with_expectations(block.text)]
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=900)


def test_blocks_are_found_and_markers_are_well_formed():
    found = blocks()
    assert len(found) >= 8, [b.id for b in found]
    for b in found:
        assert b.skip is None or b.skip, f"{b.id}: a doctest skip needs a reason in its parentheses"
        assert b.tag in SHELL_TAGS | {"python", "py"}, f"{b.id}: unknown block tag {b.tag!r}"
    for doc in DOCS:            # a marker that is not right before a fence marks nothing: refuse it
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "doctest:" in line:
                assert SKIP.match(line.strip()), f"{doc.name}:{i + 1}: malformed doctest marker {line!r}"
                assert i + 1 < len(lines) and lines[i + 1].startswith("```"), \
                    f"{doc.name}:{i + 1}: a doctest marker must be the line just before a block's opening fence"
    for text in KNOWN_FAILURES:
        assert any(text in b.text for b in found), f"KNOWN_FAILURES entry {text!r} matches no block: remove it"


@pytest.mark.parametrize("block", _params())
def test_block_runs_as_written(block: Block, layout, tmp_path, request):
    if block.skip:
        pytest.skip(f"marked in {block.doc.name}: {block.skip}")
    extra_env = None
    if "s3://my-bucket/" in block.text:     # the bucket: `ckpt/` uploaded to a local S3 server (s3_server)
        server = request.getfixturevalue("s3_server")
        server.upload(layout / "ckpt", "my-bucket", "ckpt")
        extra_env = server.env
    if "gs://my-bucket/" in block.text:     # the same on the local GCS server (gcs_server)
        server = request.getfixturevalue("gcs_server")
        server.upload(layout / "ckpt", "my-bucket", "ckpt")
        extra_env = server.env
    result = _run(block, layout, tmp_path, extra_env)
    if result.returncode != 0:
        known = _known(block)
        if known and known[1].search(result.stderr + result.stdout):
            raise KnownFailure(f"{known[0]}: {result.stderr[-500:]}")
        raise BlockFailed(f"{block.doc.name} line {block.line}: exit {result.returncode}\n--- block\n{block.text}"
                          f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")


@pytest.mark.parametrize("text, passes", [
    ("sh -c 'exit 3'   # exit 3: as the block says\necho after\n", True),
    ("true   # exit 2\n", False),                                # exits 0, the block says 2
    ("sh -c 'exit 4'   # exit 3\n", False),
    (r"""sh -c 'echo {\"exit_code\": 2}; exit 2' --json  # exit 2""", True),
    (r"""sh -c 'echo {\"exit_code\": 0}; exit 2' --json  # exit 2""", False),    # the JSON says otherwise
    ("sh -c 'echo {} {}; exit 2' --json  # exit 2\n", False),     # not one object
])
def test_exit_expectations_are_checked(text, passes, tmp_path):
    """The `# exit N` check itself can fail: a wrong status, or a --json stdout that is not one object saying N."""
    (tmp_path / "layout").mkdir()
    result = _run(Block(REPO / "README.md", 1, "", text, None), tmp_path / "layout", tmp_path)
    assert (result.returncode == 0) == passes, (result.returncode, result.stdout, result.stderr)
    if passes and "after" in text:
        assert "after" in result.stdout


# Codes no doc block can produce on the demo layout, and the test that produces each instead.
EXIT_CODES_TESTED_ELSEWHERE = {
    71: "tests/end_to_end/test_inputs.py (a checkpoint of more files than `ulimit -n` allows)",
}


def test_the_exit_code_table_is_the_error_classes_and_each_code_is_run():
    """README's exit-code table lists exactly the codes the CLI uses (0, 130 for an interrupt, and every error
    class's `exit_code`), and each one is produced by some `# exit N` line of a doc block run above."""
    import streamconv.errors as errors

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Exit codes", 1)[1].split("\n\n", 2)[1]
    listed = {int(row.split("|")[1]) for row in table.splitlines() if re.match(r"^\| \d+ \|", row)}
    classes = {c.exit_code for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.StreamconvError)}
    assert listed == {0, 130} | classes, listed ^ ({0, 130} | classes)
    run = {int(m.group("code")) for b in blocks() if not b.skip and b.tag in SHELL_TAGS for m in EXPECT.finditer(b.text)}
    assert listed - {0} - run == set(EXIT_CODES_TESTED_ELSEWHERE), listed - {0} - run
    assert all((REPO / where.split()[0]).exists() for where in EXIT_CODES_TESTED_ELSEWHERE.values())
    # `streamconv --help` lists the same codes, one a line under its "Exit codes" heading
    from click.testing import CliRunner
    from streamconv.cli import cli
    help_text = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    in_help = {int(c) for c in re.findall(r"^ +(\d+)  \S", help_text.split("Exit codes", 1)[1].split("\n\n")[0], re.M)}
    assert in_help == listed, in_help ^ listed


def test_readme_names_every_extra():
    """Each extra of pyproject.toml is named in README as `pip install` takes it (`.[zstd]`): an extra a user
    cannot find is a feature they cannot install."""
    tomllib = pytest.importorskip("tomllib")     # 3.11+; the suite's own venv is 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    named = set(re.findall(r"`\.\[(\w+)\]`", (REPO / "README.md").read_text(encoding="utf-8")))
    assert set(extras) <= named, set(extras) - named
