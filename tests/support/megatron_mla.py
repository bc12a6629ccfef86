"""megatron-core's own DeepSeek-V3-like models (multi-latent attention, sigmoid routing with an expert bias, shared
experts) on CPU gloo ranks: the truth for the megatron-mla mapping.

`build_real_mla(out, spec)` runs megatron-core 0.16 (`GPTModel`, `MLATransformerConfig`, the local layer specs with
`multi_latent_attention=True`, `dist_checkpointing.save`) on `tp * ep` CPU gloo ranks and keeps Megatron's own
logits beside the checkpoint. `hf_config` writes the Hugging Face DeepSeek-V3 config of the same model (config
only, from code); `mla_to_hf` is the reference mapping with torch ops of torch's own reconstruction
(`dcp_to_torch_save`).

CPU shims, besides those of `megatron_moe._real_rank` (`torch.cuda.synchronize`, `current_device`, the router's
`te_general_gemm`, the CUDA RNG fork): megatron-core's MLA module believes Transformer Engine is there when its
extension module imports (without TE it does, with `TELinear = None`), so `HAVE_TE` is set False; and the local
`DotProductAttention` takes no `k_channels` / `v_channels` (MLA's keys are qk_head_dim + qk_pos_emb_head_dim wide,
its values v_head_dim): `_MLACoreAttention` accepts and drops them, with `kv_channels = v_head_dim` so the local
attention's output width is the values'. Its math is megatron-core's own (baddbmm, masked softmax, bmm), which
handles keys wider than values as they are.

What cannot be made on CPU: the Transformer Engine MLA spec (its names fold q/kv_layernorm into the up-projections'
`layer_norm_weight`); tests/producers/test_megatron_mla.py re-saves a real checkpoint under those names with
torch's DCP writer instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

from tests.support import megatron_moe as mm

HIDDEN, HEADS, LAYERS, VOCAB = 64, 4, 2, 256
Q_LORA, KV_LORA, NOPE, ROPE, V_DIM = 24, 16, 16, 8, 12
EXPERTS, TOPK, MOE_FFN, FFN = 4, 2, 32, 96


@dataclass(frozen=True)
class MLASpec:
    tp: int = 1
    ep: int = 1
    q_lora: bool = True                 # linear_q_down_proj / q_layernorm / linear_q_up_proj, else linear_q_proj
    dense_first: bool = True            # moe_layer_freq [0, 1]: per-layer keys; else every layer MoE (stacked keys)


def _config(spec: MLASpec):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import MLATransformerConfig
    return MLATransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        kv_channels=V_DIM, q_lora_rank=Q_LORA if spec.q_lora else None, kv_lora_rank=KV_LORA, qk_head_dim=NOPE,
        qk_pos_emb_head_dim=ROPE, v_head_dim=V_DIM, rope_type="rope", rotary_base=10000, rotary_scaling_factor=1.0,
        apply_rope_fusion=False, normalization="RMSNorm", qk_layernorm=True, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, layernorm_epsilon=1e-6, attention_dropout=0.0,
        hidden_dropout=0.0, use_cpu_initialization=True, params_dtype=torch.float32,
        tensor_model_parallel_size=spec.tp, expert_model_parallel_size=spec.ep,
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=MOE_FFN,
        moe_shared_expert_intermediate_size=MOE_FFN, moe_layer_freq=[0] + [1] * (LAYERS - 1) if spec.dense_first else 1,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
        moe_router_group_topk=1, moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)


def _mla_spec(cfg):
    """The local decoder block spec with MLA, its core attention the CPU one (`_MLACoreAttention`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class _MLACoreAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            assert v_channels in (None, cfg.kv_channels), (v_channels, cfg.kv_channels)
            super().__init__(*args, **kwargs)

    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    for layer in block.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = _MLACoreAttention
    return block


def _real_rank(out_dir: str, spec: MLASpec) -> None:
    """One rank (env RANK, WORLD_SIZE, MASTER_PORT)."""
    import torch.distributed as dist
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.moe import moe_utils
    moe_utils.te_general_gemm = None
    multi_latent_attention.HAVE_TE = False
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=spec.tp, expert_model_parallel_size=spec.ep)
    torch.manual_seed(0)
    cfg = _config(spec)
    model = GPTModel(config=cfg, transformer_layer_spec=_mla_spec(cfg), vocab_size=VOCAB, max_sequence_length=64,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False,
                     parallel_output=False)
    mm._noise(model, rank)
    with torch.no_grad():   # a trained expert bias (replicated: the same on every rank), so routing depends on it
        for i, (name, buf) in enumerate(n for n in model.named_buffers() if n[0].endswith("expert_bias")):
            buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(77 + i)) * 0.1)
    model.eval()
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    causal = torch.triu(torch.ones(1, 1, 16, 16), diagonal=1).bool()     # True: masked
    with torch.no_grad():
        logits = model(ids, pos, causal)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if rank == 0:
        torch.save({"input_ids": ids, "logits": logits}, out_dir + ".logits.pt")
    dist.destroy_process_group()


def build_real_mla(out: Path, spec: MLASpec, *, timeout_s: float = 600) -> Path:
    """megatron-core's own checkpoint at `out/ckpt` (and Megatron's logits at `out/ckpt.logits.pt`)."""
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(spec.tp * spec.ep), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, __file__, str(ckpt), json.dumps(dataclasses.asdict(spec))],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(spec.tp * spec.ep)]
    logs = [p.communicate(timeout=timeout_s)[0].decode(errors="replace") for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("megatron-core run failed:\n" + "\n".join(log[-3000:] for log in logs))
    return ckpt


def hf_config(out: Path, spec: MLASpec, **changes) -> Path:
    """`out/base/config.json`: the Hugging Face DeepSeek-V3 config of the same model (from code, no hub)."""
    from transformers import DeepseekV3Config
    config = DeepseekV3Config(**{**dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, moe_intermediate_size=MOE_FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS, n_shared_experts=1,
        n_routed_experts=EXPERTS, num_experts_per_tok=TOPK, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1 if spec.dense_first else 0,
        q_lora_rank=Q_LORA if spec.q_lora else None, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, v_head_dim=V_DIM, rope_interleave=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position_embeddings=64, tie_word_embeddings=False, attention_bias=False), **changes})
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(base / "config.json"))
    return base


_ATTENTION = (("linear_q_proj.weight", "q_proj.weight"), ("linear_q_down_proj.weight", "q_a_proj.weight"),
              ("q_layernorm.weight", "q_a_layernorm.weight"), ("linear_q_up_proj.weight", "q_b_proj.weight"),
              ("linear_kv_down_proj.weight", "kv_a_proj_with_mqa.weight"),
              ("kv_layernorm.weight", "kv_a_layernorm.weight"), ("linear_kv_up_proj.weight", "kv_b_proj.weight"),
              ("linear_proj.weight", "o_proj.weight"))


def mla_to_hf(sd: Dict[str, torch.Tensor], spec: MLASpec) -> Dict[str, torch.Tensor]:
    """Megatron MLA (stacked or per-layer keys, local-spec names) to Hugging Face DeepSeek-V3 names, torch ops."""
    sd = mm._per_layer(sd)
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:VOCAB],
           "model.norm.weight": sd["decoder.final_layernorm.weight"],
           "lm_head.weight": sd["output_layer.weight"][:VOCAB]}
    for i in range(LAYERS):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for mk, hk in _ATTENTION:
            if m + "self_attention." + mk in sd:
                out[p + "self_attn." + hk] = sd[m + "self_attention." + mk]
        out[p + "input_layernorm.weight"] = sd[m + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[m + "pre_mlp_layernorm.weight"]
        if m + "mlp.linear_fc1.weight" in sd:       # a dense layer
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = torch.chunk(
                sd[m + "mlp.linear_fc1.weight"], 2, dim=0)
            out[p + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
            continue
        out[p + "mlp.gate.weight"] = sd[m + "mlp.router.weight"]
        out[p + "mlp.gate.e_score_correction_bias"] = sd[m + "mlp.router.expert_bias"]
        fc1, fc2 = sd[m + "mlp.experts.experts.linear_fc1.weight"], sd[m + "mlp.experts.experts.linear_fc2.weight"]
        for e in range(EXPERTS):
            gate, up = torch.chunk(fc1[e], 2, dim=0)
            out[p + f"mlp.experts.{e}.gate_proj.weight"], out[p + f"mlp.experts.{e}.up_proj.weight"] = gate, up
            out[p + f"mlp.experts.{e}.down_proj.weight"] = fc2[e]
        gate, up = torch.chunk(sd[m + "mlp.shared_experts.linear_fc1.weight"], 2, dim=0)
        out[p + "mlp.shared_experts.gate_proj.weight"], out[p + "mlp.shared_experts.up_proj.weight"] = gate, up
        out[p + "mlp.shared_experts.down_proj.weight"] = sd[m + "mlp.shared_experts.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


if __name__ == "__main__":
    _real_rank(sys.argv[1], MLASpec(**json.loads(sys.argv[2])))
