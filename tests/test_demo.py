"""`make demo` (README's first command): write a real FSDP2 checkpoint with torch, convert it with the CLI, check
every tensor against torch's `dcp_to_torch_save`, load it with transformers, print the report and "OK".

In `make test` the demo runs on the session's demo checkpoint (writing one is the session fixture's work) without
loading the output with transformers; the whole `python -m streamconv.demo`, as `make demo` runs it, is
`make test-slow`."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamconv import demo

REPO = Path(__file__).resolve().parent.parent


def _report(output: str) -> dict:
    """The JSON report the demo prints between its step lines and its last line."""
    return json.loads(output[output.index("\n{") + 1:output.rindex("\n}") + 2])


def _session_checkpoint(demo_checkpoint):
    """A stand-in for `write_demo_checkpoint` that copies the session's demo checkpoint (written once by torch)."""
    def write(out_dir, world_size):
        shutil.copytree(demo_checkpoint.ckpt_dir, out_dir)
        return dataclasses.replace(demo_checkpoint, ckpt_dir=Path(out_dir), world_size=world_size)
    return write


@pytest.fixture
def quick_demo(demo_checkpoint, monkeypatch):
    """The demo without its two slow steps: writing the checkpoint (the session's is copied) and importing
    transformers to load the output (said as loaded; the slow test below loads it for real)."""
    monkeypatch.setattr("streamconv.demo_checkpoint.write_demo_checkpoint", _session_checkpoint(demo_checkpoint))
    monkeypatch.setattr(demo, "_load_with_transformers",
                        lambda out: f"loaded LlamaForCausalLM (stand-in), config.json: {(Path(out) / 'config.json').exists()}")


def test_the_demo_converts_and_checks_against_torch(quick_demo, tmp_path):
    result = CliRunner().invoke(demo.main, ["--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    report = _report(result.output)
    assert report["exit_code"] == 0 and report["verified_tensors"] == report["tensors"] > 0, report
    check = report["verification"]
    assert check["tensors_compared"] == report["tensors"] and not check["mismatched"] and not check["missing"]
    assert report["transformers"].endswith("config.json: True")
    assert result.output.rstrip().splitlines()[-1].startswith(f"OK: {report['tensors']} tensors")


def test_the_demo_fails_loudly_when_a_tensor_differs(quick_demo, tmp_path, monkeypatch):
    """The check can fail: a reconstruction that differs is 'verification FAILED', not OK."""
    real = demo._verify_against_torch
    monkeypatch.setattr(demo, "_verify_against_torch",
                        lambda ckpt, out: dict(real(ckpt, out), mismatched=["lm_head.weight"]))
    result = CliRunner().invoke(demo.main, ["--workdir", str(tmp_path / "demo")])
    assert result.exit_code != 0 and "verification FAILED" in str(result.exception or result.output)
    assert "OK:" not in result.output


@pytest.mark.slow   # writes the checkpoint with 4 gloo ranks and imports transformers (~20-40 s): `make test-slow`
def test_make_demo_s_command_runs_as_written(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "streamconv.demo", "--workdir", str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().splitlines()[-1].startswith("OK: ")
    report = _report(result.stdout)
    assert report["transformers"].startswith("loaded LlamaForCausalLM") and "finite=True" in report["transformers"]
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stdout + result.stderr
