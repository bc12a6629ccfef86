"""The predicted peak counts numpy as this process maps it (runs/mapping.py, plan.with_numpy_bytes), not as the
worst page cache would: the same numpy maps 11.4 MiB or 15.0 depending on how its files sit in the page cache."""
import importlib
import importlib.util
import subprocess
import sys

from streamconv.model import CheckpointMetadata
from streamconv.planning import plan as p
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.runs import mapping
from tests.planning.test_plan import column_chunks, dim0_chunks, tensor

_MEASURE = """
import sys
from streamconv.runs import mapping
assert "numpy" not in sys.modules
first = mapping.numpy_import_bytes()
print(first, mapping.numpy_import_bytes(), "numpy" in sys.modules)
"""


def test_the_import_is_measured_once_in_a_process_that_had_not_imported_numpy():
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, check=True, timeout=120)
    first, again, imported = out.stdout.split()
    # numpy 2.4 with its OpenBLAS maps 11-18 MiB in this VM's used venvs, and up to 20.3 MiB right after a fresh
    # install (a fresh-clone CI run, 2026-12-07: the page cache's large folios of files just written); whatever it
    # measures is what the prediction counts (`with_numpy_bytes`). A second call (a batch driver's next
    # checkpoint) gets the same measurement.
    assert 4 * 2**20 < int(first) < 2 * p.NUMPY_RSS_BYTES, first
    assert (again, imported) == (first, "True")


def test_numpy_already_imported_by_the_caller_leaves_the_assumed_term(monkeypatch):
    importlib.import_module("numpy")    # as a caller that imported torch would have
    monkeypatch.setattr(mapping, "_measured_numpy_bytes", None)
    assert mapping.numpy_import_bytes() is None


def test_the_measured_import_replaces_the_assumed_term_only_when_the_run_imports_numpy():
    copies = CheckpointMetadata(tensors=(tensor("model.a", (64, 1024), chunks=dim0_chunks(64, 1024, 4)),),
                                byte_entries=())
    blocks = CheckpointMetadata(tensors=(tensor("model.b", (64, 1024), chunks=column_chunks(64, 1024, 4)),),
                                byte_entries=())
    plain = build_plan(copies)
    assert not p.uses_numpy(plain)
    assert p.with_numpy_bytes(plain, 11 * 2**20).peak_bytes == plain.peak_bytes
    assembled = build_plan(blocks, PlanOptions(buffer_bytes=2**20))
    assert p.uses_numpy(assembled)
    measured = p.with_numpy_bytes(assembled, 11 * 2**20)
    assert measured.numpy_bytes == 11 * 2**20 + p.NUMPY_IN_USE_BYTES
    assert measured.peak_bytes == assembled.peak_bytes - p.NUMPY_RSS_BYTES + measured.numpy_bytes
    # The writer count is chosen, and a permuted chunk counted, with the measured term kept.
    assert p.with_writers(measured, 1).peak_bytes == measured.peak_bytes
    assert p.writers_peak_bytes(measured, 1) < p.writers_peak_bytes(assembled, 1)


def test_modules_compiled_from_source_at_this_start_are_told_apart(tmp_path):
    import os
    import py_compile
    old, new, bare = (tmp_path / f"{n}.py" for n in ("old", "new", "bare"))
    for f in (old, new, bare):
        f.write_text("x = 1\n")
    py_compile.compile(str(old))
    started = os.stat("/proc/self").st_ctime
    pyc = importlib.util.cache_from_source(str(old))
    os.utime(old, (started - 120, started - 120))
    os.utime(pyc, (started - 60, started - 60))             # bytecode from an earlier start, newer than its source
    assert mapping.compiled_share([str(old), "built_in_module.so"]) == 0
    py_compile.compile(str(new))                            # bytecode written by this process
    assert mapping.compiled_share([str(old), str(new)]) == 0.5
    assert mapping.compiled_share([str(old), str(bare)]) == 0.5     # none at all (PYTHONDONTWRITEBYTECODE)
    os.utime(old, (started - 30, started - 30))             # edited since it was compiled: stale, compiled again
    assert mapping.compiled_share([str(old)]) == 1
    base = build_plan(CheckpointMetadata(tensors=(tensor("model.a", (8, 8)),), byte_entries=()))
    assert p.with_compiled_source(base, 1.0).peak_bytes == base.peak_bytes + p.COMPILE_BYTES
    assert p.with_compiled_source(base, 0.25).peak_bytes == base.peak_bytes + p.COMPILE_BYTES // 4
