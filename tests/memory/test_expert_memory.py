"""Unstacking grouped experts streams within the buffer: a 128 MiB torchtitan-layout MoE checkpoint whose grouped
expert tensors (64 MiB each; every expert plane 8 MiB) are larger than a 4 MiB buffer, converted into per-expert
Hugging Face tensors. `w1_EFD` is FSDP-sharded on the expert dim (each expert inside one stored chunk); `w2_EDF` is
split along its dim dim (every expert is pieces of both ranks' chunks, as with tensor-parallel experts). Memory is
the OS's (VmHWM of a converter process that never imports torch); the output is compared with torch's `unbind`.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from streamconv.demo_checkpoint import run_distributed
from tests.support import rss

EXPERTS, FFN, DIM = 8, 1024, 2048          # [8, 1024, 2048] float32 = 64 MiB per grouped tensor
PREFIX = "layers.0.moe.routed_experts.inner_experts."


def _full(name):
    import torch
    shape = (EXPERTS, FFN, DIM) if name == "w1_EFD" else (EXPERTS, DIM, FFN)
    return torch.empty(shape).uniform_(generator=torch.Generator().manual_seed(0 if name == "w1_EFD" else 1))


def write_experts(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    w1 = _full("w1_EFD").chunk(world_size, dim=0)[rank].clone()
    w2 = _full("w2_EDF").chunk(world_size, dim=1)[rank].clone()
    state = {PREFIX + "w1_EFD": DTensor.from_local(w1, mesh, [Shard(0)], run_check=False),
             PREFIX + "w2_EDF": DTensor.from_local(w2, mesh, [Shard(1)], run_check=False),
             "layers.0.moe.router.gate.weight": torch.ones(EXPERTS, DIM), "train_state": {"step": 1}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigexperts")
    run_distributed("tests.memory.test_expert_memory:write_experts", 2, dict(out_dir=str(root / "ckpt")))
    return root


def test_expert_unstack_peak_rss_is_bounded_by_the_buffer(big, tmp_path):
    from safetensors.numpy import load_file

    buffer_mib = 4
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(big / "ckpt"),
                           str(tmp_path / "out"), "--json", "--buffer-size", f"{buffer_mib}MiB",
                           "--source-format", "torchtitan-qwen3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert report["bytes_written"] > 128 * 2**20
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert len(got) == 2 * EXPERTS + 1
    for name, hf in (("w1_EFD", "gate_proj"), ("w2_EDF", "down_proj")):
        for e, plane in enumerate(_full(name).unbind(0)):
            assert np.array_equal(got[f"model.layers.0.mlp.experts.{e}.{hf}.weight"], plane.numpy()), (name, e)


# GPT-OSS: the grouped expert weights are transposed, not unstacked ([E, 2F, D] -> [E, D, 2F]); 64 MiB each again.
GPT_OSS_PREFIX = "layers.0.moe.routed_experts.inner_experts."


def _gpt_oss_full(name):
    import torch
    shape = (EXPERTS, FFN, DIM) if name == "mlp1_weight_EGD" else (EXPERTS, DIM, FFN)
    return torch.empty(shape).uniform_(generator=torch.Generator().manual_seed(2 if name == "mlp1_weight_EGD" else 3))


def write_gpt_oss_experts(rank, world_size, out_dir):
    """`mlp1_weight_EGD` FSDP-sharded on the expert dim, `mlp2_weight_EDF` on its dim dim (each output row of the
    transpose then comes from both ranks' chunks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    w1 = _gpt_oss_full("mlp1_weight_EGD").chunk(world_size, dim=0)[rank].clone()
    w2 = _gpt_oss_full("mlp2_weight_EDF").chunk(world_size, dim=1)[rank].clone()
    state = {GPT_OSS_PREFIX + "mlp1_weight_EGD": DTensor.from_local(w1, mesh, [Shard(0)], run_check=False),
             GPT_OSS_PREFIX + "mlp2_weight_EDF": DTensor.from_local(w2, mesh, [Shard(1)], run_check=False)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


def test_gpt_oss_expert_transpose_peak_rss_is_bounded_by_the_buffer(tmp_path):
    from safetensors.numpy import load_file

    run_distributed("tests.memory.test_expert_memory:write_gpt_oss_experts", 2, dict(out_dir=str(tmp_path / "ckpt")))
    buffer_mib = 4
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(tmp_path / "ckpt"),
                           str(tmp_path / "out"), "--json", "--buffer-size", f"{buffer_mib}MiB",
                           "--source-format", "torchtitan-gpt-oss"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert report["bytes_written"] >= 128 * 2**20
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, hf in (("mlp1_weight_EGD", "gate_up_proj"), ("mlp2_weight_EDF", "down_proj")):
        want = _gpt_oss_full(name).transpose(1, 2).numpy()
        assert np.array_equal(got[f"model.layers.0.mlp.experts.{hf}"], want), name
