"""A Megatron-layout MoE checkpoint of ~210 MB (2 layers, 8 experts of FFN 1024 on hidden 1024, Qwen3-MoE
shaped), expert parallel 2 as megatron-core shards it (one chunk per layer, expert and linear_fc1 half), written by
torch's DCP writer on 2 gloo ranks, converted with a 4 MiB buffer: each expert (an 8 MiB linear_fc1 plane of the
stacked [L, E, 2F, H] tensor) is unstacked within the buffer. Memory is the OS's (VmHWM of a converter process that
never imports torch); the output is compared bit for bit with the torch-op mapping of the same weights.
"""
import json
import subprocess
import sys

import torch

from streamconv.demo_checkpoint import run_distributed
from tests.support import megatron_moe as mm
from tests.support import megatron_writers as mw
from tests.support import rss

LAYERS, HIDDEN, EXPERTS, FFN, VOCAB = 2, 1024, 8, 1024, 1024
SPEC = mm.MoESpec(experts=EXPERTS, moe_ffn=FFN, vocab=VOCAB)


def _state():
    g = torch.Generator().manual_seed(11)
    qkv = (mm.HEADS + 2 * SPEC.groups) * mm.HEAD_DIM

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return {"embedding.word_embeddings.weight": r(VOCAB, HIDDEN), "output_layer.weight": r(VOCAB, HIDDEN),
            "decoder.final_layernorm.weight": r(HIDDEN),
            "decoder.layers.self_attention.linear_qkv.weight": r(LAYERS, qkv, HIDDEN),
            "decoder.layers.self_attention.linear_proj.weight": r(LAYERS, HIDDEN, mm.HEADS * mm.HEAD_DIM),
            "decoder.layers.self_attention.q_layernorm.weight": r(LAYERS, mm.HEAD_DIM),
            "decoder.layers.self_attention.k_layernorm.weight": r(LAYERS, mm.HEAD_DIM),
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight": r(LAYERS, HIDDEN),
            "decoder.layers.mlp.linear_fc1.layer_norm_weight": r(LAYERS, HIDDEN),
            "decoder.layers.mlp.router.weight": r(LAYERS, EXPERTS, HIDDEN),
            "decoder.layers.mlp.experts.experts.linear_fc1.weight": r(LAYERS, EXPERTS, 2 * FFN, HIDDEN),
            "decoder.layers.mlp.experts.experts.linear_fc2.weight": r(LAYERS, EXPERTS, HIDDEN, FFN)}


def _base(root):
    from transformers import Qwen3MoeConfig
    base = root / "base"
    base.mkdir()
    Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                   num_attention_heads=mm.HEADS, num_key_value_heads=SPEC.groups, head_dim=mm.HEAD_DIM,
                   num_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=FFN, mlp_only_layers=[],
                   norm_topk_prob=True, dtype="float32").to_json_file(str(base / "config.json"))
    return base


def test_megatron_moe_ep2_peak_rss_is_bounded_by_the_buffer(tmp_path):
    from safetensors import safe_open

    state = _state()
    torch.save(state, tmp_path / "full.pt")
    ckpt = tmp_path / "ckpt"
    run_distributed("tests.support.megatron_moe:write_moe_layout", 2,
                    dict(out_dir=str(ckpt), state_path=str(tmp_path / "full.pt")))
    mw.write_side_files(ckpt)
    buffer_mib = 4     # peak must stay within buffer + 48 MiB, the bound every layout is held to
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(ckpt), str(out), "--json",
                           "--config-from", str(_base(tmp_path)), "--buffer-size", f"{buffer_mib}MiB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    peak_mib = report["peak_rss_bytes"] / 2**20
    print(f"megatron MoE EP2 {report['bytes_written'] / 2**20:.0f} MiB, buffer {buffer_mib} MiB: peak RSS "
          f"{peak_mib:.1f} MiB (predicted {report['predicted_peak_bytes'] / 2**20:.1f})")
    assert report["bytes_written"] > 190 * 2**20
    assert peak_mib < 48 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    rss.assert_within_prediction(report)
    expected = mm.megatron_to_hf_moe(state, SPEC)
    got = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            got.update({k: s.get_tensor(k) for k in s.keys()})
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert torch.equal(got[name], want), name
