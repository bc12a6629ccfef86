"""End to end on real checkpoints written by torch's own writers: every layout, bit for bit against torch's
`dcp_to_torch_save`; plus the CLI, atomic output and errors on damaged input."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from tests.support import dcp_writers
from tests.support.outputs import read_output, same_bits
import streamconv
from streamconv.cli import cli
from streamconv.errors import CheckpointError, OutputError

LAYOUTS = sorted(dcp_writers.CHECKPOINTS)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_dcp_to_torch_save(layout, dcp_checkpoints, tmp_path):
    ckpt = dcp_checkpoints[layout]
    ref = dcp_writers.reference_state_dict(ckpt)
    plan = streamconv.plan(str(ckpt))
    out = tmp_path / "out"
    # A small shard budget so that multi-file output and the index are exercised too.
    report = streamconv.convert(str(ckpt), str(out), max_shard_size="40KB", buffer_size="64KiB")
    got = read_output(out)
    assert report.tensors == len(plan.tensors) == len(got)
    for t in plan.tensors:
        assert same_bits(got[t.name], ref[t.source_fqn]), f"{layout}: {t.name} differs from torch's reconstruction"
    # Nothing of the model is left out: every reference tensor outside optimizer state is in the output.
    model_keys = {k for k in ref if not k.startswith("optim.")}
    assert model_keys == {t.source_fqn for t in plan.tensors}


def test_layouts_really_exercise_blocks_and_copies(dcp_checkpoints):
    assembly = {}
    for layout in ("tp", "mesh2d", "dtensor_2d", "fsdp2"):
        plan = streamconv.plan(str(dcp_checkpoints[layout]))
        assembly[layout] = {t.is_row_contiguous for t in plan.tensors if len(t.chunks) > 1}
    assert False in assembly["tp"] and False in assembly["dtensor_2d"] and False in assembly["mesh2d"]
    assert assembly["fsdp2"] == {True}


def test_model_subtree_is_unwrapped_and_optimizer_skipped(dcp_checkpoints, tmp_path):
    plan = streamconv.plan(str(dcp_checkpoints["fsdp2_optim"]))
    assert plan.subtree == "model"
    assert all(not t.name.startswith("model.model.") for t in plan.tensors)
    assert "lm_head.weight" in {t.name for t in plan.tensors}
    reasons = {s.reason for s in plan.skipped}
    assert "optimizer state" in reasons and "non-tensor" in reasons


def test_gpu_fixtures_match_their_reference(shared_fixtures_dir, tmp_path):
    ckpt = shared_fixtures_dir / "fsdp2_llama_tied" / "ckpt"
    out = tmp_path / "fsdp2"
    streamconv.convert(str(ckpt), str(out))
    got = read_output(out)
    with safe_open(str(shared_fixtures_dir / "fsdp2_llama_tied" / "ref" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert same_bits(got[key], f.get_tensor(key)), key


def test_fsdp1_gpu_fixture_matches_torch(shared_fixtures_dir, tmp_path):
    ckpt = shared_fixtures_dir / "fsdp1_mllama_optim" / "ckpt"
    ref = dcp_writers.reference_state_dict(ckpt)
    plan = streamconv.plan(str(ckpt))
    streamconv.convert(str(ckpt), str(tmp_path / "out"), max_shard_size="1MB")
    got = read_output(tmp_path / "out")
    assert len(got) == len(plan.tensors) > 100
    for t in plan.tensors:
        assert same_bits(got[t.name], ref[t.source_fqn]), t.name


def test_cast_to_bfloat16_matches_torch_to(dcp_checkpoints, tmp_path):
    ckpt = dcp_checkpoints["mixed_dtypes"]
    ref = dcp_writers.reference_state_dict(ckpt)
    plan = streamconv.plan(str(ckpt), dtype="bfloat16")
    streamconv.convert(str(ckpt), str(tmp_path / "out"), dtype="bfloat16", buffer_size="64KiB")
    got = read_output(tmp_path / "out")
    for t in plan.tensors:
        src = ref[t.source_fqn]
        want = src.to(torch.bfloat16) if src.is_floating_point() else src
        assert same_bits(got[t.name], want), t.name


# -- CLI -------------------------------------------------------------------------------------------

def test_cli_convert_json_and_refuses_non_empty_output(dcp_checkpoints, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tensors"] > 0 and report["bytes_written"] > 0 and report["peak_rss_bytes"] > 0
    again = runner.invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(out)])     # a retry: nothing to do
    assert again.exit_code == 0 and "already converted" in again.output, again.output
    other = runner.invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(out), "--dtype", "bfloat16"])
    assert other.exit_code == OutputError.exit_code and "--overwrite" in other.output
    forced = runner.invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(out), "--dtype", "bfloat16",
                                 "--overwrite", "-q"])
    assert forced.exit_code == 0, forced.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no staging leftovers


def test_cli_plan_and_inspect(dcp_checkpoints):
    runner = CliRunner()
    ckpt = str(dcp_checkpoints["fsdp2_optim"])
    result = runner.invoke(cli, ["plan", ckpt, "--json", "--max-shard-size", "20KB"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert len(plan["shards"]) > 1
    # FSDP2 copies go file to file in the kernel: the predicted peak holds neither the buffer, nor numpy, nor an IO
    # step; besides the base, the chunks' metadata and, in a fresh checkout (no bytecode), what compiling
    # streamconv left behind (the same share this process counted: CliRunner plans in it).
    import sys
    from streamconv.planning.plan import BASE_RSS_BYTES, COMPILE_BYTES, IO_STEP_BYTES_PER_WRITER
    from streamconv.runs import mapping
    compiled = mapping.compiled_share(getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())
                                      if name.startswith("streamconv."))
    base = BASE_RSS_BYTES + round(compiled * COMPILE_BYTES)
    predicted = plan["predicted_peak_bytes"]
    assert base < predicted < base + IO_STEP_BYTES_PER_WRITER, (predicted, compiled)
    human = runner.invoke(cli, ["plan", ckpt])
    assert human.exit_code == 0 and "model.safetensors" in human.output
    info = runner.invoke(cli, ["inspect", ckpt, "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["model_subtree"] == "model" and data["non_tensor_entries"]
    text = runner.invoke(cli, ["inspect", str(dcp_checkpoints["tp"])])
    assert text.exit_code == 0 and "dim 1" in text.output


def test_every_command_has_help():
    runner = CliRunner()
    for command in ("convert", "plan", "inspect"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and len(result.output) > 200, command


def test_bad_size_option_is_a_usage_error(dcp_checkpoints, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(tmp_path / "o"),
                                      "--max-shard-size", "5 parsecs"])
    assert result.exit_code == 64 and "KiB" in result.output


# -- damaged input: clear error, non-zero exit, nothing left that looks finished -------------------

def damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(Path(dst))
    return dst


def test_truncated_rank_file_fails_before_any_output(dcp_checkpoints, tmp_path):
    def truncate(d):
        f = d / "__1_0.distcp"
        os.truncate(f, f.stat().st_size // 2)
    ckpt = damaged_copy(dcp_checkpoints["fsdp2"], tmp_path / "ckpt", truncate)
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(tmp_path / "out")])
    assert result.exit_code == CheckpointError.exit_code
    assert "__1_0.distcp" in result.output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_rank_file_names_the_file(dcp_checkpoints, tmp_path):
    ckpt = damaged_copy(dcp_checkpoints["tp"], tmp_path / "ckpt", lambda d: (d / "__0_0.distcp").unlink())
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(tmp_path / "out")])
    assert result.exit_code == CheckpointError.exit_code and "__0_0.distcp" in result.output
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_no_output(dcp_checkpoints, tmp_path, monkeypatch):
    from streamconv.execution import executor

    calls = {"n": 0}
    original = executor.Executor.write_tensor

    def failing(self, t, sink, **then):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, t, sink, **then)

    monkeypatch.setattr(executor.Executor, "write_tensor", failing)
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["fsdp2"]), str(tmp_path / "out")])
    assert result.exit_code == 130
    assert list(tmp_path.iterdir()) == []


def test_not_a_checkpoint_is_explained(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == CheckpointError.exit_code and ".metadata" in result.output


def test_verify_reads_back_everything(dcp_checkpoints, tmp_path):
    report = streamconv.convert(str(dcp_checkpoints["mesh2d"]), str(tmp_path / "out"), verify=True,
                                max_shard_size="30KB")
    assert report.verified_bytes == report.bytes_written


def test_verify_catches_a_corrupted_shard(dcp_checkpoints, tmp_path, monkeypatch):
    from streamconv.errors import VerificationError
    from streamconv.runs import shardjob

    original = shardjob.write_shards

    def write_then_corrupt(shards, reader, stored, path_for, **kwargs):
        original(shards, reader, stored, path_for, **kwargs)
        path = path_for(shards[-1].filename)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3)
            f.write(b"\x7f")

    monkeypatch.setattr(shardjob, "write_shards", write_then_corrupt)
    with pytest.raises(VerificationError, match="differs"):
        streamconv.convert(str(dcp_checkpoints["tp"]), str(tmp_path / "out"), verify=True)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_is_refused_before_writing(dcp_checkpoints, tmp_path, monkeypatch):
    import collections

    from streamconv.output import destination
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(destination.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(tmp_path / "out")])
    assert result.exit_code == OutputError.exit_code and "free" in result.output and "--dtype" in result.output
    assert list(tmp_path.iterdir()) == []


def test_selecting_nothing_is_explained(dcp_checkpoints):
    result = CliRunner().invoke(cli, ["plan", str(dcp_checkpoints["tp"]), "--include", "no-such-*"])
    assert result.exit_code == 64 and "no tensors selected" in result.output


def test_json_mode_reports_errors_on_stdout(dcp_checkpoints, tmp_path):
    ckpt = damaged_copy(dcp_checkpoints["tp"], tmp_path / "ckpt", lambda d: (d / "__1_0.distcp").unlink())
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(tmp_path / "out"), "--json"])
    assert result.exit_code == CheckpointError.exit_code
    report = json.loads(result.stdout)
    assert report["kind"] == "CheckpointError" and "__1_0.distcp" in report["error"]


def test_sigterm_removes_partial_output_like_ctrl_c(dcp_checkpoints, tmp_path, monkeypatch):
    import signal

    from streamconv.execution import executor

    original = executor.Executor.write_tensor

    def terminated(self, t, sink, **then):
        os.kill(os.getpid(), signal.SIGTERM)   # the handler raises in the main thread
        return original(self, t, sink, **then)

    monkeypatch.setattr(executor.Executor, "write_tensor", terminated)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["fsdp2"]), str(tmp_path / "out"),
                                      "--workers", "1"])
    assert result.exit_code == 130, result.output
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before   # the CLI restores the previous handler


def test_a_run_that_checks_crcs_predicts_an_io_step_for_every_writer(dcp_checkpoints, tmp_path):
    """FSDP2 copies go file to file in the kernel: no writer holds an IO step, until the run checks CRC-32s
    (source/integrity.py reads each chunk in 1 MiB pieces on every writer): then the prediction counts one each."""
    from streamconv.planning.plan import IO_STEP_BYTES_PER_WRITER, step_bytes_held
    ckpt = str(dcp_checkpoints["fsdp2"])
    plain = streamconv.convert(ckpt, str(tmp_path / "plain"), workers=2, no_config=True)
    checked = streamconv.convert(ckpt, str(tmp_path / "checked"), workers=2, no_config=True, crc=True)
    # A step as far as the largest tensor reaches (this tiny model's are under 1 MiB). (The same with the fast paths
    # off: each writer's plain step is counted beside it, `plan.with_plain_io`.)
    step = step_bytes_held(streamconv.plan(ckpt, no_config=True).tensors, IO_STEP_BYTES_PER_WRITER)
    assert 0 < step <= IO_STEP_BYTES_PER_WRITER
    # (within a page: the two runs' compile terms differ by the share of the modules the checked run adds)
    assert abs(checked.predicted_peak_bytes - plain.predicted_peak_bytes - 2 * step) <= 4096
