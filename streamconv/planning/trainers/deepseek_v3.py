"""torchtitan DeepSeek-V3 as Hugging Face `DeepseekV3ForCausalLM`, as data.

Sources: torchtitan 0.3 `torchtitan/models/deepseek_v3/` (`__init__.py` `make_mla_attention_config` and
`build_mla_moe_layers` for the module tree, `state_dict_adapter.py` `from_hf_map`) and transformers 5.25
`models/deepseek_v3/modeling_deepseek_v3.py`.

* Multi-latent attention: `wq` (no q LoRA) or `wq_a` / `q_norm` / `wq_b`, then `wkv_a` / `kv_norm` / `wkv_b`, renamed.
  torchtitan's RoPE is the interleaved (complex) one and so is Hugging Face DeepSeek-V3's with `rope_interleave`
  true (its default): rows are copied as they are.
* Dense first layers (`feed_forward.*`, HF `first_k_dense_replace`), then MoE layers: router `gate.weight`, the
  load-balancing bias `expert_bias_E` -> `mlp.gate.e_score_correction_bias` (both add it to the scores only to
  choose experts), shared experts (one FFN of n_shared_experts x moe_intermediate_size rows) and routed experts
  unstacked per expert, as in `qwen3.py` (or fused with `--expert-layout fused`, as there).
* Refused by feature: multi-token-prediction layers (`mtp_layers.*`), which `DeepseekV3ForCausalLM` does not hold.
"""
from __future__ import annotations

from typing import Callable, Optional

from ...errors import ReferenceMismatchError
from .adapter import Adapter, Rule
from .qwen3 import EXPERT_AND_HEAD_RULES, FUSED, FUSED_EXPERT_RULES, NORM_AND_DENSE_RULES, PER_EXPERT, ROUTER_RULE


def needs_rope_interleave(why: str) -> Callable[[dict], Optional[str]]:
    """The config check of a trainer whose RoPE pairs channels as DeepSeek-V3's `rope_interleave: true` does
    (`why`: how the trainer does it). transformers applies another pairing to the same rows with `false`, so such
    a config is refused rather than written beside weights it would run as another model."""
    def check(config: dict) -> Optional[str]:
        value = config.get("rope_interleave", True)     # transformers' default
        if value is not True:
            raise ReferenceMismatchError(
                f"config.json sets rope_interleave to {str(value)[:20]}, but {why}: Hugging Face DeepSeek-V3 "
                "applies RoPE that way only with rope_interleave: true, so the converted model would rotate "
                "other channel pairs and give other logits; nothing was written. To fix: set "
                "\"rope_interleave\": true in the config.json --config-from gives (the weights are the same)")
        return f"rope_interleave: true in config.json: RoPE as the trainer applies it ({why})"
    return check


_L = r"layers\.(\d+)\."
_HF = r"model.layers.\1."
_A = _L + r"attention\."
_EXPERTS = _L + r"moe\.routed_experts\.inner_experts\."

TORCHTITAN_DEEPSEEK_V3 = Adapter(
    name="torchtitan-deepseek-v3", trainer="torchtitan",
    rules=(
        Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_A + r"wq\.weight", _HF + "self_attn.q_proj.weight"),
        Rule(_A + r"wq_a\.weight", _HF + "self_attn.q_a_proj.weight"),
        Rule(_A + r"q_norm\.weight", _HF + "self_attn.q_a_layernorm.weight"),
        Rule(_A + r"wq_b\.weight", _HF + "self_attn.q_b_proj.weight"),
        Rule(_A + r"wkv_a\.weight", _HF + "self_attn.kv_a_proj_with_mqa.weight"),
        Rule(_A + r"kv_norm\.weight", _HF + "self_attn.kv_a_layernorm.weight"),
        Rule(_A + r"wkv_b\.weight", _HF + "self_attn.kv_b_proj.weight"),
        Rule(_A + r"wo\.weight", _HF + "self_attn.o_proj.weight"),
        *NORM_AND_DENSE_RULES,
        ROUTER_RULE,
        Rule(_L + r"moe\.expert_bias_E", _HF + "mlp.gate.e_score_correction_bias"),
        Rule(_L + r"moe\.shared_experts\.w1\.weight", _HF + "mlp.shared_experts.gate_proj.weight"),
        Rule(_L + r"moe\.shared_experts\.w2\.weight", _HF + "mlp.shared_experts.down_proj.weight"),
        Rule(_L + r"moe\.shared_experts\.w3\.weight", _HF + "mlp.shared_experts.up_proj.weight"),
        *EXPERT_AND_HEAD_RULES,
    ),
    signature=(r"tok_embeddings\.weight", _A + r"wkv_a\.weight", _A + r"kv_norm\.weight"),
    skip=((r"freqs_cis|rope\.cache|.*\.rope\.cache", "RoPE table (transformers recomputes it)"),),
    unsupported=(
        (r"mtp_layers\..*", "multi-token-prediction layers (DeepseekV3ForCausalLM has none; --exclude "
                            "'mtp_layers.*' to convert the main model)"),
    ),
    describes=("names mapped to Hugging Face DeepSeek-V3 (multi-latent attention, rows as they are: interleaved "
               "RoPE, rope_interleave; dense first layers; shared experts; expert bias -> "
               "e_score_correction_bias); routed experts: " + PER_EXPERT),
    family="Hugging Face DeepseekV3ForCausalLM",
    expert_layout=PER_EXPERT,
    fused_rules=FUSED_EXPERT_RULES, fused_layout=FUSED,
    config_check=needs_rope_interleave("torchtitan's DeepSeek-V3 RoPE rotates adjacent channel pairs (complex "
                                       "numbers)"),
)
