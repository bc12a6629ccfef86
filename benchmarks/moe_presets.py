"""Mixture-of-Experts benchmark shapes: a torchtitan Qwen3-MoE model's state dict, computed without torch.

The checkpoint holds what torchtitan 0.3's `Qwen3Model` saves (`last_save_model_only`: the model's own flat
names, no `{"model": ...}` wrapper): grouped experts `layers.N.moe.routed_experts.inner_experts.w1_EFD` /
`w3_EFD` `[experts, moe_ffn, hidden]` and `w2_EDF` `[experts, hidden, moe_ffn]`, QK-norm, a router, no
load-balancing bias (`load_balance_coeff=None`). `tests/test_benchmarks.py` builds torchtitan's own model on
the meta device with the tiny preset's sizes and checks that names, shapes and order are the same.

`hf_outputs()` is the Hugging Face Qwen3-MoE state dict a conversion must write: every name mapped, and each
grouped tensor unstacked into per-expert `mlp.experts.{e}.gate_proj/up_proj/down_proj` (what `save_pretrained`
writes and the Hub holds). Expert e of a grouped tensor is elements [e*F*D, (e+1)*F*D) of it, so the expected
bytes of every output come from the generator's formula for the grouped tensor at that offset. This mapping is
written here independently of streamconv's adapter (`planning/trainers/qwen3.py`), so the benchmark checks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, List, Tuple

Shape = Tuple[int, ...]

# grouped expert tensor -> the per-expert Hugging Face projection it holds
EXPERT_PROJ = {"w1_EFD": "gate_proj", "w2_EDF": "down_proj", "w3_EFD": "up_proj"}
GROUPED_SUFFIXES = tuple(EXPERT_PROJ)


@dataclass(frozen=True)
class Qwen3MoeShape:
    """The config values that decide a Qwen3-MoE's parameter shapes (names follow Qwen3MoeConfig)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    experts: int
    moe_intermediate: int
    vocab: int

    # How the generator saves it: flat torchtitan keys (no "model." wrapper), model only.
    DCP_PREFIX: ClassVar[str] = ""
    SAVED_BY: ClassVar[str] = "torchtitan (last_save_model_only: flat model keys)"


# Qwen/Qwen3-30B-A3B config.json: 48 layers, 128 experts of 768, hidden 2048: 30.5 B parameters, 61 GB in bf16.
QWEN3_30B_A3B = Qwen3MoeShape(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=48, experts=128,
                              moe_intermediate=768, vocab=151936)

MOE_PRESETS = {
    # A few hundred KB, for tests and a smoke run of the harness. 3 experts on 4 ranks: FSDP2 leaves rank 3 an
    # empty expert chunk, and the ep layout takes torchtitan's Shard(1) branch (efsdp 2 x ep 2 > 3 experts).
    "qwen3-moe-tiny": Qwen3MoeShape(hidden=64, heads=4, kv_heads=2, head_dim=16, layers=2, experts=3,
                                    moe_intermediate=32, vocab=256),
    # Qwen3-30B-A3B's layer widths (every expert plane [768, 2048], each grouped tensor 403 MB in bf16) with
    # 2 layers and a 32000 vocabulary: 2.75 GB in bf16, 88% of it routed experts, as in the real model.
    "qwen3-moe-3gb": Qwen3MoeShape(hidden=2048, heads=32, kv_heads=4, head_dim=128, layers=2, experts=128,
                                   moe_intermediate=768, vocab=32000),
    "qwen3-30b-a3b": QWEN3_30B_A3B,
}


def tensor_specs(cfg: Qwen3MoeShape) -> List[Tuple[str, Shape]]:
    """(name, shape) of every tensor of torchtitan's Qwen3Model.state_dict(), in its order."""
    h, hd = cfg.hidden, cfg.head_dim
    specs: List[Tuple[str, Shape]] = [("tok_embeddings.weight", (cfg.vocab, h))]
    for i in range(cfg.layers):
        p = f"layers.{i}."
        specs += [
            (p + "attention.qkv_linear.wq.weight", (cfg.heads * hd, h)),
            (p + "attention.qkv_linear.wk.weight", (cfg.kv_heads * hd, h)),
            (p + "attention.qkv_linear.wv.weight", (cfg.kv_heads * hd, h)),
            (p + "attention.wo.weight", (h, cfg.heads * hd)),
            (p + "attention.q_norm.weight", (hd,)),
            (p + "attention.k_norm.weight", (hd,)),
            (p + "moe.routed_experts.inner_experts.w1_EFD", (cfg.experts, cfg.moe_intermediate, h)),
            (p + "moe.routed_experts.inner_experts.w2_EDF", (cfg.experts, h, cfg.moe_intermediate)),
            (p + "moe.routed_experts.inner_experts.w3_EFD", (cfg.experts, cfg.moe_intermediate, h)),
            (p + "moe.router.gate.weight", (cfg.experts, h)),
            (p + "attention_norm.weight", (h,)),
            (p + "ffn_norm.weight", (h,)),
        ]
    specs += [("norm.weight", (h,)), ("lm_head.weight", (cfg.vocab, h))]
    return specs


# torchtitan name (after "layers.N.") -> Hugging Face Qwen3-MoE name (after "model.layers.N.")
_LAYER_NAMES = {
    "attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
    "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
    "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"}


def hf_outputs(cfg: Qwen3MoeShape) -> List[Tuple[str, str, Shape, int]]:
    """(Hugging Face name, checkpoint name, shape, first element in the checkpoint tensor) of every tensor a
    conversion to Qwen3MoeForCausalLM writes: grouped experts unstacked, everything else renamed."""
    out: List[Tuple[str, str, Shape, int]] = []
    for name, shape in tensor_specs(cfg):
        if name in _TOP_NAMES:
            out.append((_TOP_NAMES[name], name, shape, 0))
            continue
        _, layer, rest = name.split(".", 2)
        hf = f"model.layers.{layer}."
        grouped = rest.rsplit(".", 1)[-1]
        if grouped in EXPERT_PROJ:
            plane = shape[1:]
            for e in range(shape[0]):
                out.append((f"{hf}mlp.experts.{e}.{EXPERT_PROJ[grouped]}.weight", name, plane, e * math.prod(plane)))
        else:
            out.append((hf + _LAYER_NAMES[rest], name, shape, 0))
    return out


def transformers_config(cfg: Qwen3MoeShape):
    """The equivalent transformers Qwen3MoeConfig (imports transformers): for a `--config-from` folder."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                          num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                          num_experts=cfg.experts, moe_intermediate_size=cfg.moe_intermediate,
                          num_experts_per_tok=min(8, cfg.experts), intermediate_size=3 * cfg.hidden,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
