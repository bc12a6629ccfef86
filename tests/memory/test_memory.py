"""Peak memory stays bounded by the buffer, not by the tensor: a 256 MB checkpoint whose big tensors are
tensor-parallel column blocks (Shard(1), the case that needs assembly) converts with a 4 MiB buffer.

Memory is read by the OS (VmHWM of the converter process, reported in --json), in a separate process that
never imports torch. Timing is not asserted here: speed lives in benchmarks/.
"""
import json
import subprocess
import sys

import pytest

from tests.support import rss

from streamconv.demo_checkpoint import run_distributed

# `big_checkpoint` (tests/conftest.py, support/big_checkpoint.py): 256 MiB, Shard(1) column blocks + Shard(0) rows.


def convert_in_subprocess(ckpt, out, *args):
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(ckpt), str(out), "--json", *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_peak_rss_is_bounded_by_the_buffer(big_checkpoint, tmp_path):
    buffer_mib = 4
    report = convert_in_subprocess(big_checkpoint, tmp_path / "out", "--buffer-size", f"{buffer_mib}MiB")
    assert report["bytes_written"] > 256 * 2**20
    peak_mib = report["peak_rss_bytes"] / 2**20
    # Interpreter + numpy + click is ~30 MiB; the buffer comes on top. Far below one 128 MiB tensor.
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)


def test_output_is_exact_and_cast_stays_bounded(big_checkpoint, tmp_path):
    import torch
    from safetensors import safe_open

    from tests.support import dcp_writers
    report = convert_in_subprocess(big_checkpoint, tmp_path / "bf16", "--buffer-size", "4MiB", "--dtype", "bf16")
    assert report["peak_rss_bytes"] / 2**20 < 48 + 4     # buffer + 48 MiB, the bound every layout is held to
    ref = dcp_writers.reference_state_dict(big_checkpoint)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key).view(torch.int16), ref["model." + key].to(torch.bfloat16).view(torch.int16)), key


# --- short runs: chunks whose rows are split into many small pieces of the output ---------------------------
# (name, world size, shape, dtype, placements). Each is ~16 MiB, a multiple of the 4 MiB buffer used below.
# Runs are the contiguous pieces of the output one chunk supplies: 8 bytes for the first case.
SHORT_RUN_CASES = {
    "shard2_8byte_runs": (2, (4096, 256, 4), "float32", "Shard(2)"),          # a TP conv / head-dim split
    "moe_experts_shard1": (2, (8, 1024, 512), "float32", "Shard(1)"),         # experts [E, out, in]: 1 MiB runs
    "moe_experts_shard2": (2, (8, 1024, 512), "bfloat16", "Shard(2)"),        # 512-byte runs
    "grid_trailing_dims": (4, (2048, 64, 32), "float32", "Shard(1),Shard(2)"),  # 2x2 mesh, 64-byte runs
    "strided_shard": (4, (2048, 64, 32), "float32", "_StridedShard(2),Shard(2)"),  # FSDP over TP: 32-byte runs
}


def _placement(spec):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if spec.startswith("_StridedShard"):
        return _StridedShard(int(spec[len("_StridedShard("):-1]), split_factor=2)
    return Shard(int(spec[len("Shard("):-1]))


def write_short_runs(rank, world_size, out_dir):
    """One checkpoint folder per case of this world size, each holding one tensor `model.w`."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    for name, (world, shape, dtype, placements) in SHORT_RUN_CASES.items():
        if world != world_size:
            continue
        places = [_placement(p) for p in placements.split(",")]
        mesh = init_device_mesh("cpu", (2,) * len(places))
        gen = torch.Generator().manual_seed(len(name))   # every rank builds the same full tensor
        full = torch.empty(shape).normal_(generator=gen).to(getattr(torch, dtype))
        state = {"model": {"w": distribute_tensor(full, mesh, places)}}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{out_dir}/{name}", sync_files=False))
    return 0


@pytest.fixture(scope="module")
def short_run_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("short")
    for world in sorted({case[0] for case in SHORT_RUN_CASES.values()}):
        run_distributed(f"{__name__}:write_short_runs", world, dict(out_dir=str(out)))
    return out


@pytest.mark.parametrize("name", sorted(SHORT_RUN_CASES))
def test_short_runs_stay_within_the_buffer_and_are_exact(short_run_checkpoints, tmp_path, name):
    import torch
    from safetensors.torch import load_file

    from tests.support import dcp_writers
    ckpt = short_run_checkpoints / name
    buffer_mib = 4
    report = convert_in_subprocess(ckpt, tmp_path / "out", "--buffer-size", f"{buffer_mib}MiB")
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert peak_mib <= buffer_mib + 48, f"{name}: peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    want = dcp_writers.reference_state_dict(ckpt)["model.w"]
    assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.parametrize("name,dtype", [("shard2_8byte_runs", "bfloat16"), ("moe_experts_shard2", "float32")])
def test_short_runs_with_default_buffer_and_cast(short_run_checkpoints, tmp_path, name, dtype):
    """The issue's case with the default 32 MiB buffer (it peaked at 513 MiB), narrowing and widening casts."""
    import torch
    from safetensors.torch import load_file

    from tests.support import dcp_writers
    ckpt = short_run_checkpoints / name
    report = convert_in_subprocess(ckpt, tmp_path / "out", "--dtype", dtype)
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert peak_mib <= 32 + 48, f"{name}: peak RSS {peak_mib:.1f} MiB with the default 32 MiB buffer"
    got = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    want = dcp_writers.reference_state_dict(ckpt)["model.w"].to(getattr(torch, dtype))
    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


# --- column blocks: every >= 2-D tensor Shard(last dim) over 4 ranks (`benchmarks.generate --layout shortrun`) ---
# The whole model goes through band assembly with staged short runs (1 KiB to 4 KiB rows of each block). Two
# tensors are larger than the largest buffer below, so the buffer is used to the full; a norm is Shard(0).
COLUMN_BLOCK_TENSORS = {"embed.weight": (8192, 2048), "down_proj.weight": (2048, 8192), "o_proj.weight": (512, 2048),
                        "norm.weight": (2048,)}


def write_column_blocks(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {}
    for i, (name, shape) in enumerate(COLUMN_BLOCK_TENSORS.items()):
        gen = torch.Generator().manual_seed(i)      # every rank builds the same full tensor
        full = torch.empty(shape).normal_(generator=gen).to(torch.bfloat16)
        state[name] = distribute_tensor(full, mesh, [Shard(len(shape) - 1)])
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def column_blocks(tmp_path_factory):
    out = tmp_path_factory.mktemp("column_blocks") / "ckpt"
    run_distributed(f"{__name__}:write_column_blocks", 4, dict(out_dir=str(out)))
    return out


@pytest.mark.parametrize("buffer_mib,workers", [(8, 1), (8, 2), (32, 2)])
def test_column_blocks_stay_within_the_bound_and_the_prediction(column_blocks, tmp_path, buffer_mib, workers):
    """The issue 20 layout: within buffer + 48 MiB, and `plan`'s predicted peak at or above the OS's count and
    within the tests' tolerance of it (tests/support/rss.py: 2-5% measured; it once counted the whole buffer while
    short-run bands touched half of it, and 44 MiB of base for 38)."""
    import torch
    from safetensors.torch import load_file

    from tests.support import dcp_writers
    report = convert_in_subprocess(column_blocks, tmp_path / "out", "--buffer-size", f"{buffer_mib}MiB",
                                   "--workers", str(workers))
    peak = report["peak_rss_bytes"]
    assert peak / 2**20 <= buffer_mib + 48, f"peak RSS {peak / 2**20:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = dcp_writers.reference_state_dict(column_blocks)
    for name in COLUMN_BLOCK_TENSORS:
        assert torch.equal(got[name].view(torch.uint8), ref["model." + name].contiguous().view(torch.uint8)), name


# --- --verify: the output read back after the writing --------------------------------------------------------


@pytest.mark.parametrize("name", ["fsdp2", "tp"])
def test_verify_reading_back_is_in_the_prediction(dcp_checkpoints, tmp_path, name):
    """`convert --verify` reads the staged output back through a ComparingSink, which imports numpy even when every
    tensor of the writing was copied file to file (fsdp2: plain rows; tp: some assembled in the buffer already), and
    holds its pieces: both in the predicted peak (it was 10-13 MiB short of the measured peak without them)."""
    plain = convert_in_subprocess(dcp_checkpoints[name], tmp_path / "plain", "--no-config")
    verified = convert_in_subprocess(dcp_checkpoints[name], tmp_path / "verified", "--no-config", "--verify")
    assert verified["verified_tensors"] == plain["tensors"] and verified["verified_bytes"] > 0
    rss.assert_within_prediction(plain)
    rss.assert_within_prediction(verified)
    assert verified["predicted_peak_bytes"] > plain["predicted_peak_bytes"]
