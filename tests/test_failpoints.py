"""The failpoints have one home (issue 18.6): only streamconv/failpoints.py reads the test and benchmark switches,
every kill point a run passes is registered there, and docs/failpoints.md names every point and switch."""
import ast
import os
import pathlib
import re
import subprocess
import sys

import streamconv
from streamconv import failpoints
from streamconv.fs import fastpaths

PACKAGE = pathlib.Path(streamconv.__file__).parent
REPO = PACKAGE.parent
DOC = REPO / "docs" / "failpoints.md"
SWITCHES = [failpoints.KILL_AT_ENV, failpoints.KILL_SIGNALS_ENV, failpoints.NO_FAST_PATHS_ENV,
            failpoints.NO_FSYNC_ENV, failpoints.NO_PDEATHSIG_ENV, failpoints.RAY_KILL_DIR_ENV,
            failpoints.STARTED_FD_ENV]
# Modules that read the environment for something that is not a failpoint, and why.
OTHER_ENVIRONMENT_READERS = {
    "demo_checkpoint.py": "torch.distributed rendezvous variables for the demo's own worker processes",
    "hf/prepare.py": "HF_HOME and friends: where the user's Hugging Face cache is, to find a config",
    "fs/s3_obstore.py": "AWS_* credentials, region and endpoint: whether obstore can read s3:// as s3fs "
                                "would, and its endpoint's scheme (allow_http)",
}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "failpoints.py" or p.parent != PACKAGE)


def _docstrings(tree) -> set:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def test_the_switches_are_spelled_only_in_failpoints():
    """A module that spells a switch's name (outside its docstring) is about to read it behind failpoints.py's
    back; it calls failpoints.py instead."""
    found = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        docs = _docstrings(tree)
        found += [f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and re.search(r"STREAMCONV_[A-Z_]+", node.value)]
    assert found == []


def _environment_uses(path: pathlib.Path) -> list:
    return [f"line {node.lineno}: os.{node.attr}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
            and node.attr in ("environ", "environb", "getenv", "getenvb", "putenv", "unsetenv")]


def test_no_other_module_reads_the_environment():
    """Only failpoints.py, and the modules named in OTHER_ENVIRONMENT_READERS for their own variables, touch
    os.environ: a new reader has to be added there, with its reason."""
    found = {str(p.relative_to(PACKAGE)): _environment_uses(p) for p in _modules()}
    assert {rel: uses for rel, uses in found.items() if uses and rel not in OTHER_ENVIRONMENT_READERS} == {}
    assert all(found[rel] for rel in OTHER_ENVIRONMENT_READERS)       # the allowance is still needed


def test_the_other_environment_readers_take_no_switch_name_from_failpoints():
    """With the two tests above, the switches cannot be read anywhere but in failpoints.py."""
    found = []
    for rel in OTHER_ENVIRONMENT_READERS:
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, ast.Attribute) and node.attr.endswith("_ENV"):
                found.append(f"{rel}:{node.lineno}: .{node.attr}")
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and any("failpoints" in a.name for a in node.names):
                found.append(f"{rel}:{node.lineno}: imports failpoints")
            elif isinstance(node, ast.ImportFrom) and "failpoints" in (node.module or ""):
                found.append(f"{rel}:{node.lineno}: imports from failpoints")
    assert found == []


def _kill_point_calls():
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            fn = node.func
            called = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if called == "kill_point" and node.args and isinstance(node.args[0], ast.Constant):
                names.setdefault(node.args[0].value, []).append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return names


def test_every_kill_point_is_registered_and_every_registered_one_is_passed():
    called = _kill_point_calls()
    assert len(called) >= 10      # the scan found the calls
    assert sorted(set(called) - set(failpoints.POINTS)) == []      # passed but not registered (nor documented)
    assert sorted(set(failpoints.POINTS) - set(called)) == []      # registered but never passed: a dead point


def test_the_doc_names_every_point_and_switch():
    text = DOC.read_text(encoding="utf-8")
    missing = [p for p in failpoints.POINTS if f"`{p}`" not in text]
    missing += [s for s in SWITCHES if f"`{s}" not in text]
    assert missing == []


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("STREAMCONV_")}
    full.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", "from streamconv import failpoints\n" + code], env=full,
                          capture_output=True, text=True, timeout=60)


def test_a_kill_point_fires_on_its_nth_pass_with_the_signals_asked_for():
    code = "for i in range(3):\n    print(i, flush=True)\n    failpoints.kill_point('index')\n"
    unset = _child(code, {})
    assert unset.returncode == 0 and unset.stdout.split() == ["0", "1", "2"]
    other = _child(code, {failpoints.KILL_AT_ENV: "after-rename"})
    assert other.returncode == 0 and other.stdout.split() == ["0", "1", "2"]
    second = _child(code, {failpoints.KILL_AT_ENV: "index@2"})
    assert second.returncode == -9 and second.stdout.split() == ["0", "1"]
    term = _child(code, {failpoints.KILL_AT_ENV: "index", failpoints.KILL_SIGNALS_ENV: "TERM"})
    assert term.returncode == -15 and term.stdout.split() == ["0"]


def test_arm_kill_sets_and_clears_the_point_for_this_process():
    code = ("failpoints.arm_kill('mid-shard'); failpoints.arm_kill(None); failpoints.kill_point('mid-shard')\n"
            "print('alive', flush=True); failpoints.arm_kill('mid-shard'); failpoints.kill_point('mid-shard')\n"
            "print('not reached')\n")
    result = _child(code, {})
    assert result.returncode == -9 and result.stdout.split() == ["alive"]


def test_the_other_switches_are_read_through_failpoints(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    assert failpoints.fsync_enabled() and failpoints.pdeathsig_enabled() and failpoints.ray_kill_dir() is None
    monkeypatch.setenv(failpoints.NO_FSYNC_ENV, "1")
    monkeypatch.setenv(failpoints.NO_PDEATHSIG_ENV, "1")
    monkeypatch.setenv(failpoints.RAY_KILL_DIR_ENV, "/nowhere")
    monkeypatch.setenv(failpoints.NO_FAST_PATHS_ENV, "all")
    assert not failpoints.fsync_enabled() and not failpoints.pdeathsig_enabled()
    assert failpoints.ray_kill_dir() == "/nowhere"
    assert fastpaths.detect() == fastpaths.NONE     # the default environment is the process's, via failpoints
    assert failpoints.no_fast_paths({}) == "" and failpoints.no_fast_paths({failpoints.NO_FAST_PATHS_ENV: "x"}) == "x"

