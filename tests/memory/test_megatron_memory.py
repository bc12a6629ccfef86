"""A Megatron-layout checkpoint of ~310 MB (4 layers, hidden 1024, GQA 16 heads / 4 groups, FFN 2816, vocab 16000,
untied), tensor-parallel 2 as megatron-core shards it, written by torch's DCP writer on 2 gloo ranks
(`megatron_writers.build_layout`), converted with a 4 MiB buffer. Memory is the OS's (VmHWM of a converter process
that never imports torch); the output is compared bit for bit with the torch-op mapping of the same weights.
"""
import json
import subprocess
import sys

import pytest
import torch

from tests.support import megatron_writers as mw
from tests.support import rss

CFG = dict(layers=4, hidden=1024, heads=16, kv=4, head_dim=64, ffn=2816, vocab=16000, tied=False)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigmegatron")
    state = mw.random_megatron(**CFG, seed=5)
    mw.build_layout(root, state, groups=CFG["kv"], world_size=2)
    mw.hf_config(root, **CFG)
    return root


def test_megatron_tp2_peak_rss_is_bounded_by_the_buffer(big, tmp_path):
    from safetensors.torch import load_file

    buffer_mib = 4     # peak must stay within buffer + 48 MiB, the bound every layout is held to
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(big / "ckpt"), str(out), "--json",
                           "--config-from", str(big / "base"), "--buffer-size", f"{buffer_mib}MiB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    peak_mib = report["peak_rss_bytes"] / 2**20
    print(f"megatron TP2 {report['bytes_written'] / 2**20:.0f} MiB, buffer {buffer_mib} MiB: peak RSS "
          f"{peak_mib:.1f} MiB in {report['seconds']:.2f} s" if "seconds" in report else f"peak {peak_mib:.1f} MiB")
    assert report["bytes_written"] > 290 * 2**20
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    full = torch.load(big / "full.pt", weights_only=True, mmap=True)
    expected = mw.megatron_to_hf(full, n_heads=CFG["heads"], n_kv=CFG["kv"], head_dim=CFG["head_dim"])
    got = load_file(str(out / "model.safetensors")) if (out / "model.safetensors").exists() else {}
    if not got:
        from safetensors import safe_open
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as s:
                got.update({k: s.get_tensor(k) for k in s.keys()})
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
