"""Fuzz the readers with mutations of real torch-written `.metadata` pickles and tensor blobs.

The fuzzing runs in a subprocess (`tests/support/fuzz_child.py`, no torch imported) so that a crash fails this test
instead of killing pytest, and so that the peak RSS it reports is streamconv's own. `make test` runs
FUZZ_EXAMPLES (default 150) cases; `make fuzz` runs thousands (STREAMCONV_FUZZ_EXAMPLES).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

REPO_ROOT = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES = int(os.environ.get("STREAMCONV_FUZZ_EXAMPLES", "150"))
MiB = 1 << 20


def write_corpus(root: Path) -> Path:
    """Real inputs: the .metadata of a few torch-written checkpoints and torch.save blobs of several dtypes."""
    corpus = root / "corpus"
    corpus.mkdir()
    torch.manual_seed(0)
    states = {
        "small": {"model": {"w": torch.randn(4, 3), "b": torch.zeros(3).bfloat16()},
                  "optim": {"state": {"w": {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1}]}},
        "odd": {"f8": torch.randn(4).to(torch.float8_e4m3fn), "u16": torch.arange(3).to(torch.uint16),
                "t": torch.randn(3, 2).t(), "s": torch.tensor(1.5), "e": torch.empty(0, 2)},
    }
    for name, state in states.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(state, storage_writer=FileSystemWriter(str(root / name)), no_dist=True)
        (corpus / f"{name}.metadata").write_bytes((root / name / ".metadata").read_bytes())
    for i, t in enumerate([torch.ones(8), torch.arange(6).reshape(2, 3), torch.randn(2).to(torch.float8_e5m2)]):
        buf = io.BytesIO()
        torch.save(t, buf)
        (corpus / f"t{i}.blob").write_bytes(buf.getvalue())
    return corpus


def test_fuzzed_metadata_and_blobs_end_in_streamconv_errors_within_bounds(tmp_path):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "fuzz.json"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FUZZ_DERANDOMIZE": "" if os.environ.get("STREAMCONV_FUZZ_EXAMPLES") else "1"}
    result = subprocess.run([sys.executable, "-m", "tests.support.fuzz_child", str(corpus), str(FUZZ_EXAMPLES), str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    case = out.with_suffix(".case")
    assert result.returncode == 0, (
        f"fuzz worker died ({result.returncode}); input being decoded: "
        f"{case.read_bytes()[:2000].hex() if case.exists() else '?'}\n{result.stderr[-3000:]}")
    stats = json.loads(out.read_text())
    print(f"fuzz: {stats['cases']} cases, {stats['ok']} decoded, {stats['errors']} StreamconvErrors, slowest "
          f"{stats['slowest_s']:.3f} s, peak RSS {stats['peak_rss_bytes'] / MiB:.0f} MiB, largest growth in one "
          f"case {stats['max_case_growth_bytes'] / MiB:.1f} MiB")
    assert stats["failures"] == [], stats["failures"][:3]
    assert stats["cases"] >= min(FUZZ_EXAMPLES, 50)
    assert stats["errors"] > stats["cases"] // 4          # the mutations do reach the decoders' checks
    # Inputs are a few KB: no case adds more than 10x its size + a few MiB, and the whole run, interpreter
    # and hypothesis included, stays under 64 MiB + 10x (hypothesis's own bookkeeping grows in long runs).
    assert stats["max_case_growth_bytes"] <= 4 * MiB + 10 * stats["largest_input"], stats
    if FUZZ_EXAMPLES <= 1000:
        assert stats["peak_rss_bytes"] <= 64 * MiB + 10 * stats["largest_input"], stats
