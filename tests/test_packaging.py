"""What a user installing streamconv meets: the wheel, its dependencies, its interpreters, its manners in a shell.

* The built wheel, installed into a fresh venv that has no torch, safetensors or psutil, converts a real DCP
  checkpoint with `python -m streamconv` and with the `streamconv` script (numpy/click/tqdm come from pip's index;
  pip's cache keeps this a few seconds), and verifies there: `convert --verify`, `verify`, `batch --verify`
  pass a good output and `verify` fails a flipped byte, with no safetensors package. Also on Python 3.9, the oldest version claimed, when such an interpreter
  is found (python3.9 on PATH, pyenv, or STREAMCONV_TEST_PYTHON39); the source is always parsed with 3.9's grammar.
* pyproject tells the truth: core dependencies are exactly what the conversion imports; the `test` extra covers
  every third-party import of tests/ and benchmarks/; build requirement, LICENSE, version.
* `import streamconv` works where POSIX-only modules and os functions are missing (Windows, simulated).
* Casts honour the byte order their arrays declare (simulated big-endian host).
* Shell manners: closed stdout pipe -> quiet exit 0; `--json` output is one JSON document; progress bar only
  on a TTY or with --progress.
"""
from __future__ import annotations

import ast
import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import streamconv
from streamconv.execution import cast

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "streamconv"
CORE_DISTS = {"numpy", "click", "tqdm"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # 3.11+; the suite's own venv is 3.11
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _clean_env(**extra) -> dict:
    """No PYTHONPATH: a venv under test must import its installed copy, not this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


# --- pyproject ---------------------------------------------------------------------------------------------

def test_build_requirements_license_and_version():
    meta = _pyproject()
    # setuptools reads the SPDX `license = "Apache-2.0"` string (PEP 639) only from version 77 on.
    assert "setuptools>=77" in meta["build-system"]["requires"]
    assert meta["project"]["license"] == "Apache-2.0"
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "streamconv.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", streamconv.__version__)


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_makefile_takes_torch_from_TORCH_INDEX_URL_when_set(tmp_path):
    def install_commands(*variables):
        r = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}", *variables], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stdout.splitlines() if "torch==" in line]

    (default,) = install_commands()
    assert "index-url" not in default          # empty by default: pip's own configuration decides
    (cpu,) = install_commands("TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in cpu


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_install_keeps_setuptools_editable_notice_out_of_make_demo(tmp_path):
    """`make demo` starts with `make install`: the editable install's multi-line setuptools notice (shown by
    pip >= 24 at -q) looked like a warning about the demo. -qq hides it; pip's errors still show."""
    r = subprocess.run(["make", "-n", "install", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=60)
    (editable,) = [line for line in r.stdout.splitlines() if " -e " in line]
    assert " -qq " in editable, editable


def test_core_dependencies_are_exactly_what_a_conversion_imports(dcp_checkpoints, tmp_path):
    """Run a conversion (cast, progress bar, summary) and list the distributions it imported."""
    declared = {_dist_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert declared == CORE_DISTS
    script = (
        "import sys\n"
        "at_start = set(sys.modules)  # e.g. setuptools' _distutils_hack, loaded by a .pth file\n"
        "import json, importlib.metadata as md\n"
        "from streamconv.cli import main\n"
        "sys.argv = ['streamconv', 'convert', sys.argv[1], sys.argv[2], '--dtype', 'bfloat16', '--progress']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "owners = md.packages_distributions()\n"
        "top = {m.split('.')[0] for m in set(sys.modules) - at_start} - set(sys.stdlib_module_names)\n"
        "print(json.dumps(sorted({d.lower() for m in top for d in owners.get(m, [])})), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", script, str(dcp_checkpoints["fsdp2_optim"]), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 0, r.stderr
    imported = set(json.loads(r.stderr.strip().splitlines()[-1])) - {"streamconv"}
    assert imported == CORE_DISTS, f"conversion imported {sorted(imported)}; pyproject declares {sorted(declared)}"


def _third_party_imports(paths) -> set:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"streamconv", "benchmarks", "conftest", "tests"}      # (tests/ is a package: tests.support.*)
    return names - set(sys.stdlib_module_names) - local - {"__future__"}


def test_test_extra_covers_every_import_of_tests_and_benchmarks():
    meta = _pyproject()["project"]
    extras = meta["optional-dependencies"]
    # The trainer packages are imported only by marker-gated tests (`make test-trainers`, `make test-megatron`),
    # which install their own extras.
    gated = [r for name in ("trainers", "megatron") for r in extras.get(name, [])]
    provided = {_dist_name(r) for r in meta["dependencies"] + extras["test"] + gated}
    owners = importlib.metadata.packages_distributions()
    files = (glob.glob(str(REPO_ROOT / "tests/**/*.py"), recursive=True)
             + glob.glob(str(REPO_ROOT / "benchmarks/**/*.py"), recursive=True))
    assert len(files) > 60      # every test module and helper, in every folder of tests/
    modules = _third_party_imports(files) | {"PIL"}  # PIL: transformers' Mllama image processor, tests/support/hf_writers.py
    modules |= {"yaml"}  # streamconv/demo_checkpoint.py, the tests' demo fixture
    missing = {}
    for module in sorted(modules):
        dists = {d.lower() for d in owners.get(module, [])}
        if not dists and any(_dist_name(r).replace("-", "_").startswith(module) for r in gated):
            continue    # a marker-gated test's package, installed by its own make target only
        assert dists, f"{module} is imported by tests/benchmarks but not installed here"
        if not dists & provided:
            missing[module] = sorted(dists)
    assert not missing, f"imported by tests/ or benchmarks/ but not in the test extra: {missing}"


# --- Python versions -----------------------------------------------------------------------------------------

_RUNTIME_UNION_TYPES = {"int", "str", "float", "bool", "bytes", "list", "dict", "tuple", "set", "type", "object"}


def _runtime_unions(tree: ast.AST) -> list:
    """`X | Y` type unions outside annotations (isinstance(x, int | str), aliases): 3.10+ at run time."""
    annotations = set()
    for node in ast.walk(tree):
        for ann in ([node.annotation] if isinstance(node, (ast.AnnAssign, ast.arg)) and node.annotation else []) + \
                ([node.returns] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns else []):
            annotations.update(id(n) for n in ast.walk(ann))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in annotations:
            sides = (node.left, node.right)
            if any(isinstance(s, ast.Constant) and s.value is None for s in sides) or \
                    any(isinstance(s, ast.Name) and s.id in _RUNTIME_UNION_TYPES for s in sides) or \
                    any(isinstance(s, ast.Subscript) for s in sides):
                found.append(node.lineno)
    return sorted(found)


def _parenthesized_withs(tree: ast.AST, source: str) -> list:
    """`with (a as x, b as y):` -- 3.10+, yet ast.parse(feature_version=(3, 9)) accepts it."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            head = lines[node.lineno - 1][node.col_offset:]
            if not re.match(r"(async\s+)?with\s*\(", head):
                continue
            last = node.items[-1].optional_vars or node.items[-1].context_expr
            after = lines[last.end_lineno - 1][last.end_col_offset:].lstrip()
            if len(node.items) > 1 or (node.items[0].optional_vars is not None and after.startswith(")")):
                found.append(node.lineno)
    return sorted(found)


def test_package_source_is_python_3_9():
    """requires-python says >=3.9: every module parses with 3.9's grammar (no `match`, no parenthesized context
    managers, no `except*`), annotations are not evaluated (PEP 563), and no `A | B` union runs outside them."""
    assert _pyproject()["project"]["requires-python"] == ">=3.9"
    problems = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        source = path.read_text()
        try:
            tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(REPO_ROOT)}:{exc.lineno}: not 3.9 grammar: {exc.msg}")
            continue
        has_future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                         any(a.name == "annotations" for a in n.names) for n in tree.body)
        if not has_future and any(isinstance(n, (ast.AnnAssign, ast.FunctionDef)) for n in ast.walk(tree)) \
                and "|" in source:
            problems.append(f"{path.relative_to(REPO_ROOT)}: annotations evaluated at run time; add "
                            "`from __future__ import annotations`")
        problems += [f"{path.relative_to(REPO_ROOT)}:{line}: `X | Y` union at run time" for line in _runtime_unions(tree)]
        problems += [f"{path.relative_to(REPO_ROOT)}:{line}: parenthesized context managers (3.10+)"
                     for line in _parenthesized_withs(tree, source)]
    assert not problems, "\n".join(problems)


def test_grammar_check_catches_3_10_syntax():
    """The check above can fail: 3.10+ code is rejected."""
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))
    for src in ("with (open('a') as a, open('b') as b):\n    pass\n", "with (open('a') as a):\n    pass\n"):
        assert _parenthesized_withs(ast.parse(src), src) == [1], src
    for src in ("with (open('a')) as a:\n    pass\n", "with open('a') as a, open('b'):\n    pass\n"):
        assert _parenthesized_withs(ast.parse(src), src) == [], src
    assert _runtime_unions(ast.parse("isinstance(x, int | None)\nT = str | bytes\n")) == [1, 2]
    assert _runtime_unions(ast.parse("def f(x: int | None) -> str | None: pass\nflags = a | b\n")) == []


def _python39():
    """An interpreter that really is 3.9, or None."""
    candidates = [os.environ.get("STREAMCONV_TEST_PYTHON39"), shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
                                 capture_output=True, text=True, timeout=30, env=_clean_env())
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return exe
    return None


def test_package_byte_compiles_on_python_3_9(tmp_path):
    """The real 3.9 compiler, when one is here: catches what the grammar check above cannot."""
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter found; test_package_source_is_python_3_9 checks the grammar")
    shutil.copytree(PACKAGE_DIR, tmp_path / "streamconv", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([python, "-m", "compileall", "-q", str(tmp_path / "streamconv")], capture_output=True,
                       text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr


# --- the wheel in a fresh venv --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources (setuptools writes build/ and *.egg-info beside them)."""
    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, src / name)
    shutil.copytree(PACKAGE_DIR, src / "streamconv", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("streamconv-*.whl")
    return whl


def _oldest_core_dependencies() -> list:
    """numpy>=1.22 -> numpy==1.22: the floors pyproject promises, to be installed and tried."""
    return [r.replace(">=", "==") for r in _pyproject()["project"]["dependencies"]]


def _venv_with(python: str, whl: Path, where: Path, *pins: str) -> Path:
    # Same interpreter: no pip in the venv (seconds saved), this pip installs into it (`pip --python`, pip>=22.3).
    own = python == sys.executable
    r = subprocess.run([python, "-m", "venv", *(["--without-pip"] if own else []), str(where)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    vpy = where / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(vpy)] if own else [str(vpy), "-m", "pip"]
    r = subprocess.run(pip + ["install", "-q", str(whl), *pins], capture_output=True, text=True,
                       timeout=600, env=_clean_env(), cwd=where)
    assert r.returncode == 0, r.stdout + r.stderr
    return vpy


def _load_output(out_dir: Path) -> dict:
    """Every tensor of the output through safetensors' own loader (numpy has no bfloat16: torch)."""
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        assert set(tensors) == set(json.loads(index.read_text())["weight_map"])
    return tensors


# 3.9 with the oldest dependencies installs them with pip (~25 s): `make test-slow`. `make test` keeps the wheel on
# this interpreter, the 3.9 grammar check and the real 3.9 byte-compile above.
@pytest.mark.parametrize("interpreter", ["current", pytest.param("3.9", marks=pytest.mark.slow)])
def test_wheel_installs_without_torch_and_converts(interpreter, wheel, dcp_checkpoints, model_families, tmp_path):
    """On this interpreter with the newest dependencies pip picks; on 3.9 with the oldest pyproject allows."""
    python = sys.executable if interpreter == "current" else _python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter found (python3.9 on PATH, pyenv, or STREAMCONV_TEST_PYTHON39); "
                    "test_package_source_is_python_3_9 still checks the grammar")
    started = time.perf_counter()
    pins = _oldest_core_dependencies() if interpreter == "3.9" else []
    vpy = _venv_with(python, wheel, tmp_path / "venv", *pins)
    if pins:
        names = [p.split("==")[0] for p in pins]
        versions = subprocess.run([str(vpy), "-c", "import importlib.metadata as m, sys; "
                                   "print(*[m.version(n) for n in sys.argv[1:]])", *names],
                                  capture_output=True, text=True, env=_clean_env(), cwd=tmp_path).stdout.split()
        assert [v.split(".")[:2] for v in versions] == [p.split("==")[1].split(".")[:2] for p in pins], versions
    probe = subprocess.run([str(vpy), "-c", "import importlib.util as u, json; print(json.dumps("
                            "{m: u.find_spec(m) is not None for m in ('torch', 'safetensors', 'psutil', 'numpy')}))"],
                           capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert json.loads(probe.stdout) == {"torch": False, "safetensors": False, "psutil": False, "numpy": True}

    ckpt = dcp_checkpoints["fsdp2_optim"]
    ref = tmp_path / "ref"
    streamconv.convert(str(ckpt), str(ref), dtype="bfloat16")   # this checkout, in this process
    expected = {p.name: p.read_bytes() for p in ref.iterdir()}
    commands = {"module": [str(vpy), "-m", "streamconv"], "script": [str(vpy.parent / "streamconv")]}
    for how, argv in commands.items():
        out = tmp_path / f"out-{how}"
        r = subprocess.run(argv + ["convert", str(ckpt), str(out), "--dtype", "bfloat16", "--json"],
                           capture_output=True, text=True, timeout=300, env=_clean_env(), cwd=tmp_path)
        assert r.returncode == 0, f"{how}: {r.stderr}"
        report = json.loads(r.stdout)
        assert report["tensors"] > 0 and report["cast"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == expected, how
        loaded = _load_output(out)
        assert len(loaded) == report["tensors"]

    _verifies_without_safetensors(commands["script"], ckpt, tmp_path / "out-script", tmp_path)
    _checks_names_without_transformers(commands["script"], model_families, tmp_path)

    version = subprocess.run(commands["script"] + ["--version"], capture_output=True, text=True, env=_clean_env())
    assert version.returncode == 0 and version.stdout.split()[-1] == streamconv.__version__, version.stdout
    in_venv = subprocess.run([str(vpy), "-c", "import importlib.metadata as m, streamconv; "
                              "print(m.version('streamconv'), streamconv.__version__, streamconv.__file__)"],
                             capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    meta_version, module_version, module_file = in_venv.stdout.split()
    assert meta_version == module_version == streamconv.__version__
    assert module_file.startswith(str(tmp_path / "venv")), module_file   # the installed copy, not this checkout
    print(f"wheel test on {interpreter}: {time.perf_counter() - started:.1f} s")


def _verifies_without_safetensors(streamconv_cmd: list, ckpt: Path, good: Path, tmp_path: Path) -> None:
    """Issue 17.1: the lean install reads safetensors itself. `convert --verify`, `verify` and `batch --verify`
    pass a correct output (exit 0, saying what they checked); `verify` finds a flipped byte (exit 3)."""
    def run(*args):
        r = subprocess.run(streamconv_cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                           env=_clean_env(), cwd=tmp_path)
        assert "No module named" not in r.stdout + r.stderr and "Traceback" not in r.stderr, r.stdout + r.stderr
        return r

    r = run("convert", ckpt, tmp_path / "lean-verified", "--dtype", "bfloat16", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verified: " in r.stdout and " tensors equal to the checkpoint; " in r.stdout, r.stdout
    assert (tmp_path / "lean-verified" / "model.safetensors").read_bytes() == (good / "model.safetensors").read_bytes()
    r = run("verify", ckpt, good, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("verified: "), r.stdout
    r = run("batch", ckpt, "-o", tmp_path / "lean-batch" / "{name}", "--dtype", "bfloat16", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "lean-batch" / ckpt.name / "model.safetensors").read_bytes() == \
        (good / "model.safetensors").read_bytes()

    damaged = tmp_path / "lean-damaged"
    shutil.copytree(good, damaged)
    shard = damaged / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40                     # a byte of the last tensor's data
    shard.write_bytes(bytes(data))
    r = run("verify", ckpt, damaged, "--dtype", "bfloat16")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "differs: " in r.stdout and "bytes differ from the checkpoint" in r.stdout, r.stdout


def _checks_names_without_transformers(streamconv_cmd: list, families: dict, tmp_path: Path) -> None:
    """Issue 19.1 on the lean install (no torch, no transformers): a config-only base folder of a Llama is checked
    with streamconv's own table and converts; a Qwen2 one cannot be proven there: exit 4, nothing written, the
    message saying how to fix it; --allow-unmatched still writes it."""
    def run(*args):
        r = subprocess.run(streamconv_cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300,
                           env=_clean_env(), cwd=tmp_path)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    llama, qwen2 = families["llama"], families["qwen2"]
    r = run("convert", llama / "ckpt", tmp_path / "lean-llama", "--config-from", llama / "base", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert any("by streamconv's llama table" in n for n in json.loads(r.stdout)["notes"]), r.stdout
    out = tmp_path / "lean-qwen2"
    r = run("convert", qwen2 / "ckpt", out, "--config-from", qwen2 / "base")
    assert r.returncode == 4 and not out.exists(), r.stdout + r.stderr
    assert "cannot prove" in r.stderr and "model_type 'qwen2'" in r.stderr, r.stderr
    assert "pip install transformers torch" in r.stderr and "--allow-unmatched" in r.stderr, r.stderr
    r = run("convert", qwen2 / "ckpt", out, "--config-from", qwen2 / "base", "--allow-unmatched", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(n.startswith("--allow-unmatched: names not checked") for n in json.loads(r.stdout)["notes"])


# --- no POSIX-only imports at `import streamconv` ---------------------------------------------------------

def test_import_works_without_posix_only_modules():
    """What Windows lacks: `resource`, `fcntl`, `termios`, `pwd`, `grp`, and os.pread/preadv/pwrite/... ."""
    script = (
        "import importlib.abc, os, sys\n"
        "BLOCKED = {'resource', 'fcntl', 'termios', 'pwd', 'grp', 'posix'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'no module {name} on this platform')\n"
        "sys.meta_path.insert(0, Block())\n"
        "for m in list(sys.modules):\n"
        "    if m.split('.')[0] in BLOCKED - {'posix'}: del sys.modules[m]\n"
        "for f in ('pread', 'preadv', 'pwrite', 'pwritev', 'copy_file_range', 'posix_fadvise', 'sendfile',\n"
        "          'O_DIRECT', 'POSIX_FADV_WILLNEED', 'POSIX_FADV_RANDOM', 'POSIX_FADV_NORMAL', 'sched_getaffinity'):\n"
        "    if hasattr(os, f): delattr(os, f)\n"
        "import pkgutil, streamconv, streamconv.cli, streamconv.__main__\n"
        "for info in pkgutil.walk_packages(streamconv.__path__, 'streamconv.'):\n"
        "    if info.name not in ('streamconv.demo', 'streamconv.demo_checkpoint'):\n"
        "        __import__(info.name)\n"
        "from streamconv.runs.report import peak_rss_bytes\n"
        "print(peak_rss_bytes() >= 0)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


# --- byte order ------------------------------------------------------------------------------------------------

def _swap(data: bytes, itemsize: int) -> bytes:
    return np.frombuffer(data, np.dtype(f"u{itemsize}")).byteswap().tobytes() if itemsize > 1 else data


@pytest.mark.parametrize("src,dst", [(s, d) for s in cast.CAST_SOURCES for d in cast.CAST_TARGETS if s != d])
def test_casts_follow_the_declared_byte_order(src, dst, monkeypatch):
    """A big-endian host reads the file's little-endian bytes through '<' dtypes; a cast that viewed them as
    native floats would be wrong there. Simulated here the other way round: declare the data big-endian ('>',
    not this host's order), feed byte-swapped input, and the byte-swapped output must be today's result."""
    item = {n: streamconv.dtypes.BY_NAME[n].itemsize for n in (src, dst)}
    rng = np.random.default_rng(7)
    little = rng.integers(0, 256, size=4099 * item[src], dtype=np.uint8).tobytes()  # NaNs, infs, subnormals
    expected = cast.cast_into(little, src, dst).tobytes()
    monkeypatch.setattr(cast, "_BITS", {1: np.dtype("u1"), 2: np.dtype(">u2"), 4: np.dtype(">u4"),
                                        8: np.dtype(">u8")})
    big = _swap(little, item[src])
    assert _swap(cast.cast_into(big, src, dst).tobytes(), item[dst]) == expected
    if item[dst] <= item[src]:  # in place, narrowing
        buf = np.frombuffer(bytearray(big), np.uint8)
        got = cast.cast_into(buf, src, dst, out=buf).tobytes()
        assert _swap(got, item[dst]) == expected


def test_cast_data_dtypes_are_little_endian():
    """The data side of every cast is declared little-endian (the file's order), whatever the host's."""
    assert {n: d.str for n, d in cast._BITS.items()} == {1: "|u1", 2: "<u2", 4: "<u4", 8: "<u8"}


# --- shell manners -----------------------------------------------------------------------------------------

def _cli(*args, stdout=subprocess.PIPE, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "streamconv", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


def test_python_dash_m_streamconv():
    r = _cli("--help")
    assert r.returncode == 0 and "convert" in r.stdout and "inspect" in r.stdout
    r = _cli("--version")
    assert r.returncode == 0
    assert r.stdout.split()[-1] == importlib.metadata.version("streamconv")


def _closed_pipe_run(*args):
    read_end, write_end = os.pipe()
    os.close(read_end)    # the reader is gone before the first byte, like `| head -0` or a head that finished
    try:
        return _cli(*args, stdout=write_end)
    finally:
        os.close(write_end)


@pytest.mark.parametrize("args", [("inspect", "{ckpt}"), ("plan", "{ckpt}"), ("plan", "{ckpt}", "--json"),
                                  ("inspect", "{ckpt}", "--json"), ("--help",), ("--version",),
                                  ("convert", "--help")])
def test_closed_stdout_pipe_is_quiet_exit_0(args, dcp_checkpoints):
    ckpt = str(dcp_checkpoints["fsdp2_optim"])
    full = _cli(*[a.format(ckpt=ckpt) for a in args])
    assert full.returncode == 0
    r = _closed_pipe_run(*[a.format(ckpt=ckpt) for a in args])
    assert (r.returncode, r.stderr) == (0, ""), (len(full.stdout), r.stderr)


def test_closed_stdout_pipe_keeps_an_error_exit_code(tmp_path):
    """--json errors go to stdout too; a closed pipe there must not turn the failure into success."""
    r = _closed_pipe_run("inspect", str(tmp_path / "missing"), "--json")
    ok = _cli("inspect", str(tmp_path / "missing"), "--json")
    assert ok.returncode not in (0, 1) and r.returncode == ok.returncode
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_closed_stdout_pipe_while_reading_head(dcp_checkpoints):
    """The real `streamconv plan CKPT | head -3`: the reader takes a few lines, then closes."""
    p = subprocess.Popen([sys.executable, "-m", "streamconv", "plan", str(dcp_checkpoints["fsdp2_optim"])],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    head = [p.stdout.readline() for _ in range(3)]
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    assert all(head) and p.stderr.read() == b""


def test_json_stdout_is_one_document_for_every_command(dcp_checkpoints, tmp_path):
    ckpt = str(dcp_checkpoints["fsdp2_optim"])
    env = dict(os.environ, NO_COLOR="1")
    runs = {
        "inspect": _cli("inspect", ckpt, "--json", env=env),
        "plan": _cli("plan", ckpt, "--json", "--dtype", "bfloat16", env=env),
        "convert": _cli("convert", ckpt, str(tmp_path / "out"), "--json", "--dtype", "bfloat16", env=env),
        "convert --progress": _cli("convert", ckpt, str(tmp_path / "out2"), "--json", "--progress", env=env),
        "convert error": _cli("convert", ckpt, str(tmp_path / "out"), "--json", env=env),      # exists
        "plan error": _cli("plan", str(tmp_path / "nowhere"), "--json", env=env),
        "inspect error": _cli("inspect", ckpt, "--json", env=dict(env, PYTHONWARNINGS="always")),
    }
    for name, r in runs.items():
        doc = json.loads(r.stdout)   # the whole of stdout, nothing before or after
        assert isinstance(doc, dict), name
        assert "\x1b[" not in r.stdout + r.stderr, name   # no colour codes anywhere
        assert doc["exit_code"] == r.returncode, (name, r.returncode, doc)    # every outcome says how it ended
        assert (r.returncode == 0) == (doc["error"] is None), (name, r.returncode, doc)
    assert runs["convert --progress"].stderr.strip(), "--progress drew nothing on stderr"


def test_progress_bar_only_on_a_tty_or_when_asked(dcp_checkpoints, tmp_path):
    ckpt = str(dcp_checkpoints["fsdp2_optim"])
    bar = re.compile(r"\d+%\|")
    default = _cli("convert", ckpt, str(tmp_path / "a"))                      # stderr is a pipe: no bar
    forced = _cli("convert", ckpt, str(tmp_path / "b"), "--progress")
    off = _cli("convert", ckpt, str(tmp_path / "c"), "--no-progress")
    assert default.returncode == forced.returncode == off.returncode == 0
    assert not bar.search(default.stderr) and not bar.search(off.stderr)
    assert bar.search(forced.stderr), forced.stderr
    assert "wrote" in default.stdout and "wrote" in forced.stdout   # the summary is unaffected
