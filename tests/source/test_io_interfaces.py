"""Issue 18.6: honest IO interfaces. No raw file descriptor crosses an interface between modules: a reader lends
a sink the open file for one copy (`fs.infiles.OpenFile`: read at an offset, copy a range in-kernel), never its
descriptor. Descriptors stay inside the module that opened them (the fs/ layer wraps the OS calls)."""
import ast
import pathlib
import re

import streamconv

PACKAGE = pathlib.Path(streamconv.__file__).parent


def _fd_parameters(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            private = node.name.startswith("_") and node.name != "__init__"
            names = [a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs]
            bad = [n for n in names if n == "fd" or n.endswith("_fd")]
            if bad and not private:
                found.append(f"{path.relative_to(PACKAGE)}: {node.name}({', '.join(bad)})")
    return found


def test_no_public_function_takes_a_file_descriptor():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += _fd_parameters(path)
    assert found == [
        "fs/infiles.py: __init__(fd)",          # OpenFile wraps the descriptor its lender opened
        "runs/batch_job.py: command(progress_fd)",   # a pipe's number on a child's command line, not a file
        "source/io.py: __init__(fd)",           # the descriptor cache's own private handle class
    ], found


def test_the_check_sees_a_descriptor_parameter(tmp_path):
    bad = PACKAGE / "output" / "sink.py"
    text = bad.read_text().replace("def copy_from(self, src: OpenFile,", "def copy_from(self, src_fd: int,", 1)
    probe = tmp_path / "sink.py"
    probe.write_text(text)
    assert any("copy_from(src_fd)" in f for f in _fd_parameters_at(probe))


def _fd_parameters_at(path):
    tree = ast.parse(path.read_text())
    return [f"{node.name}({a.arg})" for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for a in node.args.args if a.arg == "fd" or a.arg.endswith("_fd")]


def test_fast_paths_are_detected_once_per_run_and_passed():
    """Only the places a run starts choose fast paths (`runs.conversion`, `runs.verifying`, a shard job on its own
    machine); everything below takes them as given, plain fallbacks when given none."""
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if ("detect()" in line or "FastPaths()" in line) and not line.lstrip().startswith(("#", '"', "`")):
                calls.append(f"{path.relative_to(PACKAGE)}: {line.split('=')[0].strip()}")
    assert sorted(calls) == ["fs/fastpaths.py: NONE", "runs/conversion.py: self.fast", "runs/shardjob.py: fast",
                            "runs/verifying.py: fast"], calls


def test_every_reader_implements_the_whole_reader_interface_and_nothing_is_forwarded():
    """Every RangeReader implements the whole protocol (no method a caller must feature-test), and nothing is
    forwarded by name (`__getattr__`). The protocol is about files only: a decoded stream is not a file."""
    from streamconv.source.io import DirectoryReader, MemoryReader, RangeReader
    verbs = [n for n, v in vars(RangeReader).items() if callable(v) and not n.startswith("_")]
    assert "copy_to" in verbs and "check_while_reading" not in verbs
    for cls in (MemoryReader, DirectoryReader):
        assert "__getattr__" not in vars(cls), cls
        assert [v for v in verbs if not callable(getattr(cls, v, None))] == [], cls


def _feature_tests(package):
    """Calls of getattr/hasattr on a reader, stream or sink object in the modules that read chunks."""
    found = []
    for folder in ("source", "execution", "runs", "verification"):
        for path in sorted((package / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("getattr", "hasattr") and node.args
                        and {"reader", "inner", "files", "stream", "sink"} & set(
                            re.split(r"[^a-z]+", ast.unparse(node.args[0]).lower()))):
                    found.append(f"{path.relative_to(package)}: {ast.unparse(node)}")
    return found


def test_nothing_feature_tests_a_reader():
    """No reader method is optional: the modules that read chunks never ask a reader whether it has one
    (`getattr(self.inner, "prefetch", None)` was how the zstd reader forwarded hints)."""
    assert _feature_tests(PACKAGE) == []


def test_the_feature_test_check_sees_one(tmp_path):
    probe = tmp_path / "source"
    probe.mkdir()
    (probe / "m.py").write_text("def f(inner):\n    return getattr(inner, 'prefetch', None)\n")
    assert _feature_tests(tmp_path) == ["source/m.py: getattr(inner, 'prefetch', None)"]
