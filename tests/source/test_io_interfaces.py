"""Issue 18.6: honest IO interfaces. No raw file descriptor crosses an interface between modules: a reader lends
a sink the open file for one copy (`fs.infiles.OpenFile`: read at an offset, copy a range in-kernel), never its
descriptor. Descriptors stay inside the module that opened them (the fs/ layer wraps the OS calls)."""
import ast
import pathlib

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
    """A decoded zstd stream is read through the same interface as a plain file: no attribute is forwarded by
    name (`__getattr__`), and the CRC checker's offer to sum a record while decoding is part of the interface."""
    from streamconv.source.io import DirectoryReader, MemoryReader, RangeReader
    from streamconv.source.zstd import DecodingReader
    verbs = [n for n, v in vars(RangeReader).items() if callable(v) and not n.startswith("_")]
    assert "check_while_reading" in verbs and "copy_to" in verbs
    for cls in (MemoryReader, DirectoryReader, DecodingReader):
        assert "__getattr__" not in vars(cls), cls
        assert [v for v in verbs if not callable(getattr(cls, v, None))] == [], cls
    assert MemoryReader({}).check_while_reading(None, 0, 1, lambda *a: None) is False
