"""Transformed tensors stream within the buffer too: a 160 MB torchtitan-layout checkpoint whose q weight
(128 MiB, FSDP dim-0 shards) needs the RoPE row permutation and whose k weight is split along its columns
(partial rows), converted with a 4 MiB buffer. Memory is the OS's (VmHWM of a converter process that never imports
torch); the output is compared with torch's permutation of the same weights.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from streamconv.demo_checkpoint import run_distributed
from tests.support import rss

HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 64, 8, 128, 4096
Q_ROWS, K_ROWS = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM      # q: 8192 x 4096 float32 = 128 MiB


def _full(name):
    import torch
    gen = torch.Generator().manual_seed(0 if name == "wq" else 1)
    return torch.empty((Q_ROWS if name == "wq" else K_ROWS, HIDDEN)).uniform_(generator=gen)


def write_big(rank, world_size, out_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    q = _full("wq").chunk(world_size, dim=0)[rank].clone()
    k = _full("wk").chunk(world_size, dim=1)[rank].clone()
    state = {"layers.0.attention.wq.weight": DTensor.from_local(q, mesh, [Shard(0)], run_check=False),
             "layers.0.attention.wk.weight": DTensor.from_local(k, mesh, [Shard(1)], run_check=False),
             "train_state": {"step": 1}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigrope")
    run_distributed(f"{__name__}:write_big", 2, dict(out_dir=str(root / "ckpt")))
    base = root / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM}))
    return root


def convert(root, out, *args):
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(root / "ckpt"), str(out),
                           "--json", "--config-from", str(root / "base"), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_rope_gather_peak_rss_is_bounded_by_the_buffer(big, tmp_path):
    from safetensors.numpy import load_file

    buffer_mib = 4
    # --allow-unmatched: two tensors of one layer, not the whole model the config describes
    report = convert(big, tmp_path / "out", "--buffer-size", f"{buffer_mib}MiB", "--source-format",
                     "torchtitan-llama", "--allow-unmatched")
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert report["bytes_written"] > 144 * 2**20
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, hf, n in (("wq", "q_proj", HEADS), ("wk", "k_proj", KV_HEADS)):
        w = _full(name)
        want = w.view(n, HEAD_DIM // 2, 2, HIDDEN).transpose(1, 2).reshape(w.shape)
        assert np.array_equal(got[f"model.layers.0.self_attn.{hf}.weight"], want.numpy()), name
