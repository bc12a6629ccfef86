"""Grouped experts saved from 2-D meshes (EP x FSDP, 4 gloo ranks: torchtitan shards routed experts on dim 0 over
its EP mesh and again, on dim 0 or dim 1, over the FSDP mesh within each EP group) are chunk geometry to the
planner: each output expert is one stored chunk's plane, or pieces of several chunks. Odd sizes (E=6, F=131 over 2x2
ranks: uneven splits), converted with the torchtitan Qwen3 adapter and compared bit for bit with torch's
`unbind` of the full tensor."""
import pytest
import numpy as np

from streamconv.demo_checkpoint import run_distributed

EXPERTS, FFN, DIM = 6, 131, 71      # float32: 36 KiB an expert plane, 218 KiB a grouped tensor
PREFIX = "layers.0.moe.routed_experts.inner_experts."
# name -> placements on the (ep, fsdp) mesh
LAYOUTS = {"w1_EFD": ("Shard(0)", "Shard(1)"),     # EP on experts, FSDP on the ffn dim
           "w3_EFD": ("Shard(0)", "Shard(0)"),     # EP and FSDP both on experts (uneven: 6 over 2 then 3 over 2)
           "w2_EDF": ("Shard(0)", "Shard(2)")}     # FSDP on the last dim: every expert is pieces of two chunks


def _full(name):
    import torch
    shape = (EXPERTS, DIM, FFN) if name == "w2_EDF" else (EXPERTS, FFN, DIM)
    return torch.empty(shape).uniform_(generator=torch.Generator().manual_seed(sorted(LAYOUTS).index(name)))


def write_2d(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ep", "fsdp"))
    state = {PREFIX + name: distribute_tensor(_full(name), mesh, [eval(p, {"Shard": Shard}) for p in places])
             for name, places in LAYOUTS.items()}
    state["layers.0.moe.router.gate.weight"] = torch.ones(EXPERTS, DIM)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def two_d(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts2d")
    run_distributed(f"{__name__}:write_2d", 4, dict(out_dir=str(root / "ckpt")))
    return root / "ckpt"


@pytest.mark.parametrize("buffer", ["64KiB", "32MiB"])   # 64 KiB: a grouped tensor streams in bands
def test_experts_from_2d_meshes_unstack_bit_exact(two_d, tmp_path, buffer):
    import streamconv
    from safetensors.numpy import load_file

    out = tmp_path / "out"
    streamconv.convert(str(two_d), str(out), source_format="torchtitan-qwen3", buffer_size=buffer, no_config=True)
    got = load_file(str(out / "model.safetensors"))
    assert len(got) == 3 * EXPERTS + 1
    hf_of = {"w1_EFD": "gate_proj", "w3_EFD": "up_proj", "w2_EDF": "down_proj"}
    for name, hf in hf_of.items():
        for e, plane in enumerate(_full(name).unbind(0)):
            assert np.array_equal(got[f"model.layers.0.mlp.experts.{e}.{hf}.weight"], plane.numpy()), (name, e)
