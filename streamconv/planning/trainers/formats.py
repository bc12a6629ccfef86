"""The adapters, as data. Sources of truth for names and the RoPE permutation:
torchtitan `torchtitan/models/llama3/state_dict_adapter.py` (`to_hf`, `_permute`) and torchtune
`torchtune/models/convert_weights.py` (`tune_to_hf`, `_permute`).
"""
from __future__ import annotations

from typing import Dict

from .adapter import Adapter, Rule

_L = r"layers\.(\d+)\."
_HF = r"model.layers.\1."

# Hugging Face Llama, role by role: the output name and the steps on the source's rows. Every Llama trainer saves
# q/k rows in the interleaved RoPE order (HF's is half-split), so the permutation is part of the role, not the
# trainer. A trainer adapter names its own module for each role (`_llama`); the order is the rules' order.
_LLAMA_ROLES = (
    ("embed", "model.embed_tokens.weight", ()),
    ("q", _HF + "self_attn.q_proj.weight", (("rope", "q"),)),
    ("k", _HF + "self_attn.k_proj.weight", (("rope", "kv"),)),
    ("v", _HF + "self_attn.v_proj.weight", ()),
    ("o", _HF + "self_attn.o_proj.weight", ()),
    ("gate", _HF + "mlp.gate_proj.weight", ()),
    ("down", _HF + "mlp.down_proj.weight", ()),
    ("up", _HF + "mlp.up_proj.weight", ()),
    ("attention_norm", _HF + "input_layernorm.weight", ()),
    ("ffn_norm", _HF + "post_attention_layernorm.weight", ()),
    ("final_norm", "model.norm.weight", ()),
    ("head", "lm_head.weight", ()),
)


def _llama(name: str, trainer: str, modules: Dict[str, str], **adapter_fields) -> Adapter:
    """A Llama adapter from the trainer's module-name regex for every role of `_LLAMA_ROLES` (all required)."""
    if sorted(modules) != sorted(role for role, _, _ in _LLAMA_ROLES):
        raise ValueError(f"{name}: Llama roles {sorted(modules)} are not {[r for r, _, _ in _LLAMA_ROLES]}")
    rules = tuple(Rule(modules[role], target, steps) for role, target, steps in _LLAMA_ROLES)
    return Adapter(name=name, trainer=trainer, rules=rules, **adapter_fields)


# torchtitan Llama 3: module names of `Llama3Model` (0.3 nests q/k/v under `attention.qkv_linear.`; earlier
# releases have `attention.wq`, and `output` for the head). Its fused `wqkv` is saved as wq/wk/wv already.
TORCHTITAN_LLAMA = _llama(
    "torchtitan-llama", "torchtitan", {
        "embed": r"tok_embeddings\.weight",
        "q": _L + r"attention\.(?:qkv_linear\.)?wq\.weight",
        "k": _L + r"attention\.(?:qkv_linear\.)?wk\.weight",
        "v": _L + r"attention\.(?:qkv_linear\.)?wv\.weight",
        "o": _L + r"attention\.wo\.weight",
        "gate": _L + r"feed_forward\.w1\.weight",
        "down": _L + r"feed_forward\.w2\.weight",
        "up": _L + r"feed_forward\.w3\.weight",
        "attention_norm": _L + r"attention_norm\.weight",
        "ffn_norm": _L + r"ffn_norm\.weight",
        "final_norm": r"norm\.weight",
        "head": r"(?:output|lm_head)\.weight",
    },
    signature=(r"tok_embeddings\.weight", _L + r"attention\.(?:qkv_linear\.)?wq\.weight",
               _L + r"feed_forward\.w1\.weight"),
    # QK-norm: torchtitan's Qwen3 (`qwen3.py`); MLA: its DeepSeek-V3 (`deepseek_v3.py`), whose q may be `wq` too
    absent=(_L + r"attention\.[qk]_norm\.weight", _L + r"attention\.wkv_a\.weight"),
    skip=((r"freqs_cis|rope\.cache|.*\.rope\.cache", "RoPE table (transformers recomputes it)"),),
)

# torchtune Llama (2, 3, 3.1, 3.2 text): `TransformerDecoder` names; tied models have no `output.weight`.
TORCHTUNE_LLAMA = _llama(
    "torchtune-llama", "torchtune", {
        "embed": r"tok_embeddings\.weight",
        "q": _L + r"attn\.q_proj\.weight",
        "k": _L + r"attn\.k_proj\.weight",
        "v": _L + r"attn\.v_proj\.weight",
        "o": _L + r"attn\.output_proj\.weight",
        "gate": _L + r"mlp\.w1\.weight",
        "down": _L + r"mlp\.w2\.weight",
        "up": _L + r"mlp\.w3\.weight",
        "attention_norm": _L + r"sa_norm\.scale",
        "ffn_norm": _L + r"mlp_norm\.scale",
        "final_norm": r"norm\.scale",
        "head": r"output\.weight",
    },
    signature=(r"tok_embeddings\.weight", _L + r"attn\.q_proj\.weight", _L + r"sa_norm\.scale"),
)

ADAPTERS = (TORCHTITAN_LLAMA, TORCHTUNE_LLAMA)

# Megatron-Core GPT (Llama family: RMSNorm, SwiGLU, RoPE, GQA/MQA), as `dist_checkpointing.save` writes it in the
# `torch_dist` format: `decoder.layers.*` stacked on a leading layer dim (unstacked here, one output per layer);
# `linear_qkv` grouped per query group (GQA- and MQA-aware split); `linear_fc1` = [gate; up]. q/k rows are already
# in the half-split RoPE order Hugging Face uses (checked against Megatron's own logits in tests/producers/test_megatron.py).
# The norms are fused into the next linear layer (`*.layer_norm_weight`, Transformer Engine and local specs) or
# separate modules (`input_layernorm`, `pre_mlp_layernorm`). Sources: megatron-core 0.16 `gpt_layer_specs.py`,
# `transformer_layer.py`, `mlp.py` (`apply_swiglu_sharded_factory`), and its `export/` HF mappings.
_M = r"decoder\.layers\."
_ML = "model.layers.{layer}."
MEGATRON_GPT = Adapter(
    name="megatron-gpt", trainer="Megatron-Core",
    rules=(
        Rule(r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_M + r"self_attention\.linear_qkv\.weight", _ML + "self_attn.q_proj.weight", (("qkv_grouped", "q"),),
             unstack=True),
        Rule(_M + r"self_attention\.linear_qkv\.weight", _ML + "self_attn.k_proj.weight", (("qkv_grouped", "k"),),
             unstack=True),
        Rule(_M + r"self_attention\.linear_qkv\.weight", _ML + "self_attn.v_proj.weight", (("qkv_grouped", "v"),),
             unstack=True),
        Rule(_M + r"self_attention\.linear_proj\.weight", _ML + "self_attn.o_proj.weight", unstack=True),
        Rule(_M + r"(?:self_attention\.linear_qkv\.layer_norm_weight|input_layernorm\.weight)",
             _ML + "input_layernorm.weight", unstack=True),
        Rule(_M + r"mlp\.linear_fc1\.weight", _ML + "mlp.gate_proj.weight", (("half", "0"),), unstack=True),
        Rule(_M + r"mlp\.linear_fc1\.weight", _ML + "mlp.up_proj.weight", (("half", "1"),), unstack=True),
        Rule(_M + r"mlp\.linear_fc2\.weight", _ML + "mlp.down_proj.weight", unstack=True),
        Rule(_M + r"(?:mlp\.linear_fc1\.layer_norm_weight|pre_mlp_layernorm\.weight)",
             _ML + "post_attention_layernorm.weight", unstack=True),
        Rule(r"decoder\.final_layernorm\.weight", "model.norm.weight"),
        Rule(r"output_layer\.weight", "lm_head.weight"),
    ),
    signature=(r"embedding\.word_embeddings\.weight", r"decoder\.layers\..+"),
    describes=("layers unstacked and names mapped to Hugging Face Llama, linear_qkv split per query group into "
               "q/k/v, linear_fc1 into gate/up (q/k rows are already in HF's RoPE order)"),
    skip=((r".*\._extra_state(?:/.*)?", "Transformer Engine extra state (FP8 metadata)"),
          (r"optimizer\..*", "optimizer state"),
          (r"rng_state.*|rerun_state_machine_state.*", "training state")),
    # (regex, architecture feature): tensors of models LlamaForCausalLM cannot hold. Named when refused.
    unsupported=(
        (_M + r"mlp\.(?:experts|router|shared_experts)\..*", "mixture of experts (MoE)"),
        (_M + r"self_attention\.linear_(?:q_down|q_up|kv_down|kv_up)_proj\..*|"
         + _M + r"self_attention\.kv_layernorm\..*", "multi-latent attention (MLA)"),
        (_M + r"self_attention\.(?:q|k)_layernorm\..*", "query/key layer norm (QK-norm)"),
        (r".*\.bias|.*\.layer_norm_bias", "biases (add_bias_linear, qkv bias or LayerNorm instead of RMSNorm)"),
        (r"embedding\.position_embeddings\..*", "learned absolute position embeddings (GPT-2 style, not RoPE)"),
        (r"(?:decoder|encoder)\.layers\.\d+\..*", "per-layer (unstacked) names of a legacy checkpoint"),
        (r"(?:encoder|vision_model|vision_projection|mtp|decoder\.layers\.mixer)\b.*",
         "a model other than a GPT decoder (encoder, vision, multi-token prediction or Mamba layers)"),
    ),
)

ADAPTERS = ADAPTERS + (MEGATRON_GPT,)
