"""Megatron-Core GPT with multi-latent attention (DeepSeek-V2/V3-style) as Hugging Face `DeepseekV3ForCausalLM`, as
data: the `megatron-mla` adapter.

Sources: megatron-core 0.16 `transformer/multi_latent_attention.py` (`MLASelfAttention`), `gpt_layer_specs.py`
(`get_gpt_layer_local_spec` / `..._with_transformer_engine_spec` with `multi_latent_attention=True`),
`models/common/embeddings/rope_utils.py`, `transformer/moe/router.py`; transformers 5.25
`models/deepseek_v3/modeling_deepseek_v3.py`. Everything that is not attention is the megatron-gpt layout's
(`megatron.py`: layers stacked or per layer, dense first layers, routed experts unstacked per expert).

* Attention: `linear_q_proj` (no q LoRA) -> `q_proj`, or `linear_q_down_proj` / `q_layernorm` / `linear_q_up_proj`
  -> `q_a_proj` / `q_a_layernorm` / `q_b_proj`; `linear_kv_down_proj` / `kv_layernorm` / `linear_kv_up_proj` ->
  `kv_a_proj_with_mqa` / `kv_a_layernorm` / `kv_b_proj`; `linear_proj` -> `o_proj`. Transformer Engine specs fold
  the q/kv norms into the up-projections (`linear_q_up_proj.layer_norm_weight`, `linear_kv_up_proj.
  layer_norm_weight`): the same outputs. The row layouts are the same on both sides, so every tensor is renamed:
  q rows per head [qk_head_dim (HF qk_nope_head_dim); qk_pos_emb_head_dim (qk_rope_head_dim)], kv_up rows per
  head [k nope; v], kv_down rows [kv_lora_rank; rope]. Under tensor parallelism the up-projections are split by
  heads and the down-projections by rows: chunk geometry to the planner.
* RoPE: Megatron's MLA takes each rope slice's even then odd channels (`_apply_rotary_pos_emb_bshd`,
  `multi_latent_attention=True`) before rotating halves; transformers' DeepSeek-V3 does exactly that with
  `rope_interleave: true` (its default). So rows are copied as they are, and a config with `rope_interleave:
  false` is refused (it would rotate other channel pairs: a plausible, wrong model).
* Router: sigmoid scores with the load-balancing `expert_bias` (`moe_router_enable_expert_bias`) added only to
  choose experts: HF's `mlp.gate.e_score_correction_bias`, used the same way. Shared experts -> HF
  `mlp.shared_experts.*` (DeepSeek's plural).
* Router settings are not in the checkpoint: the config must say what Megatron did (`moe_router_num_groups` /
  `moe_router_group_topk` are `n_group` / `topk_group`, `moe_router_topk_scaling_factor` is
  `routed_scaling_factor`, `moe_layer_freq`'s dense first layers are `first_k_dense_replace`).
"""
from __future__ import annotations

from typing import Tuple

from .adapter import Adapter
from .deepseek_v3 import needs_rope_interleave
from .megatron import (LAYER, NORMS_AND_MLP, NOT_GPT, PER_EXPERT, SKIP, Part, layer_rules, model_rules,
                       shared_expert_parts, singleton_parts)

MLA_ATTENTION: Tuple[Part, ...] = (
    (r"self_attention\.linear_q_proj\.weight", "self_attn.q_proj.weight", (), False),
    (r"self_attention\.linear_q_down_proj\.weight", "self_attn.q_a_proj.weight", (), False),
    (r"self_attention\.(?:q_layernorm\.weight|linear_q_up_proj\.layer_norm_weight)",
     "self_attn.q_a_layernorm.weight", (), False),
    (r"self_attention\.linear_q_up_proj\.weight", "self_attn.q_b_proj.weight", (), False),
    (r"self_attention\.linear_kv_down_proj\.weight", "self_attn.kv_a_proj_with_mqa.weight", (), False),
    (r"self_attention\.(?:kv_layernorm\.weight|linear_kv_up_proj\.layer_norm_weight)",
     "self_attn.kv_a_layernorm.weight", (), False),
    (r"self_attention\.linear_kv_up_proj\.weight", "self_attn.kv_b_proj.weight", (), False),
    (r"self_attention\.linear_proj\.weight", "self_attn.o_proj.weight", (), False),
)
_ROUTER_BIAS: Tuple[Part, ...] = (
    (r"mlp\.router\.expert_bias", "mlp.gate.e_score_correction_bias", (), False),
)

MEGATRON_MLA = Adapter(
    name="megatron-mla", trainer="Megatron-Core",
    rules=model_rules(layer_rules(MLA_ATTENTION + NORMS_AND_MLP + _ROUTER_BIAS
                                  + shared_expert_parts("mlp.shared_experts"),
                                  singleton_parts("mlp.shared_experts"))),
    signature=(r"embedding\.word_embeddings\.weight", LAYER + r"self_attention\.linear_kv_down_proj\.weight"),
    describes=("layers unstacked and names mapped to Hugging Face DeepSeek-V3 (multi-latent attention, rows as "
               "they are: Megatron's MLA RoPE is transformers' rope_interleave; dense first layers; shared "
               "experts; router expert_bias -> e_score_correction_bias); routed experts: " + PER_EXPERT),
    skip=SKIP,
    unsupported=(
        (LAYER + r"self_attention\.linear_qkv\..*|" + LAYER + r"self_attention\.k_layernorm\..*",
         "attention with a fused linear_qkv (not multi-latent): --source-format megatron-gpt"),
        (LAYER + r"mlp\.shared_experts\.gate_weight",
         "a gated shared expert (moe_shared_expert_gate: Hugging Face DeepSeek-V3 has no shared-expert gate)"),
    ) + NOT_GPT,
    family="Hugging Face DeepseekV3ForCausalLM",
    expert_layout=PER_EXPERT,
    config_check=needs_rope_interleave("Megatron-Core's multi-latent attention takes each rope slice's even then odd "
                                       "channels (rope_utils, multi_latent_attention)"),
)

