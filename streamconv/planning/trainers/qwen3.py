"""torchtitan Qwen3 (dense and Mixture-of-Experts) as Hugging Face `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`, as data.

Sources: torchtitan 0.3 `torchtitan/models/qwen3/` (`model.py`, `__init__.py` for the module tree,
`state_dict_adapter.py` `from_hf_map`) and `models/common/moe.py` (`GroupedExperts`: `w1_EFD`, `w3_EFD` are
[experts, ffn, dim], `w2_EDF` is [experts, dim, ffn]); transformers 5.25 `models/qwen3_moe/modeling_qwen3_moe.py`
and `conversion_mapping.py` ("qwen2_moe" rules, which Qwen3-MoE uses).

* torchtitan's Qwen3 uses `CosSinRoPE`, the half-split ("rotate half") order Hugging Face uses: q/k rows are
  copied as they are, no permutation, so this adapter needs no head counts.
* Grouped experts are unstacked while streaming: expert e of `w1_EFD` is the [ffn, dim] plane at e, so
  `mlp.experts.{e}.gate_proj.weight` is a plain piece of the stored chunk holding it (FSDP2 and expert-parallel
  checkpoints shard experts on dim 0). Per-expert names are what `save_pretrained` writes and the Hub holds;
  transformers 5 fuses them into `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj` [E, D, F] on load;
  `--expert-layout fused` writes those instead (`FUSED_EXPERT_RULES`: w1 and w3 joined side by side, copied
  piece by piece like the unstack).
* The router's `gate.weight` [experts, dim] is Hugging Face's `mlp.gate.weight` as it is.
* Refused, by feature: the load-balancing bias `moe.expert_bias_E` (torchtitan's `TokenChoiceTopKRouter` adds it
  to the scores before top-k; Qwen3-MoE's router takes top-k of the softmax alone and has no tensor for it:
  tests/producers/test_trainers_moe.py shows a moved bias changes the logits, so only a zero one may be excluded)
  and shared experts (Qwen3-MoE has none).
"""
from __future__ import annotations

from .adapter import Adapter, Rule

_L = r"layers\.(\d+)\."
_HF = r"model.layers.\1."
_EXPERTS = _L + r"moe\.routed_experts\.inner_experts\."

def expert_bias_refused(family: str, model_class: str) -> str:
    """Why torchtitan's load-balancing bias has no home in `family`, and what to do about it."""
    return (f"the load-balancing expert bias moe.expert_bias_E (torchtitan's router adds it to the scores when it "
            f"picks each token's top-k experts; Hugging Face {family} picks from the scores alone and has no tensor "
            f"for it, so no {model_class} routes as this checkpoint does once training has moved the bias). If it "
            "is all zeros (load_balance_coeff unset, or its optimizer hook never ran), it changes nothing: convert "
            "with --exclude '*.moe.expert_bias_E'. If it was trained, excluding it writes a model that sends some "
            "tokens to other experts (other logits); --source-format hf keeps the checkpoint's own names instead")


# The torchtitan layer parts Qwen3 and DeepSeek-V3 share (deepseek_v3.py uses them too).
NORM_AND_DENSE_RULES = (
        Rule(_L + r"attention_norm\.weight", _HF + "input_layernorm.weight"),
        Rule(_L + r"ffn_norm\.weight", _HF + "post_attention_layernorm.weight"),
        Rule(_L + r"feed_forward\.w1\.weight", _HF + "mlp.gate_proj.weight"),
        Rule(_L + r"feed_forward\.w2\.weight", _HF + "mlp.down_proj.weight"),
        Rule(_L + r"feed_forward\.w3\.weight", _HF + "mlp.up_proj.weight"),
)
ROUTER_RULE = Rule(_L + r"moe\.router\.gate\.weight", _HF + "mlp.gate.weight")
# Grouped experts unstacked per expert, then the final norm and head.
EXPERT_AND_HEAD_RULES = (
        Rule(_EXPERTS + r"w1_EFD", _HF + "mlp.experts.{expert}.gate_proj.weight", unstack=True),
        Rule(_EXPERTS + r"w3_EFD", _HF + "mlp.experts.{expert}.up_proj.weight", unstack=True),
        Rule(_EXPERTS + r"w2_EDF", _HF + "mlp.experts.{expert}.down_proj.weight", unstack=True),
        Rule(r"norm\.weight", "model.norm.weight"),
        Rule(r"(?:output|lm_head)\.weight", "lm_head.weight"),
)

# Which layout routed experts get, and the transformers release it was checked against (tests/producers/test_trainers_moe.py
# loads the output with it and compares logits with torchtitan's own model).
PER_EXPERT = ("per-expert mlp.experts.{e}.gate_proj/up_proj/down_proj (unstacked from torchtitan's grouped "
              "[E, F, D] w1_EFD/w3_EFD and [E, D, F] w2_EDF; the layout save_pretrained writes, checked against "
              "transformers 5.25)")

# `--expert-layout fused`: transformers 5's in-memory layout, which its loader takes as it is (tests/producers/
# test_trainers_moe.py loads it and compares logits): [gate rows; up rows] side by side on the ffn dim.
FUSED = ("fused mlp.experts.gate_up_proj [E, 2F, D] (torchtitan's w1_EFD then w3_EFD along the ffn dim: gate rows, "
         "then up rows) and down_proj [E, D, F] (w2_EDF as it is); the layout transformers 5 holds in memory and "
         "loads as it is, checked against transformers 5.25")
FUSED_EXPERT_RULES = (
        Rule(_EXPERTS + r"w1_EFD", _HF + "mlp.experts.gate_up_proj", join=(1, 0, 2)),
        Rule(_EXPERTS + r"w3_EFD", _HF + "mlp.experts.gate_up_proj", join=(1, 1, 2)),
        Rule(_EXPERTS + r"w2_EDF", _HF + "mlp.experts.down_proj"),
)

TORCHTITAN_QWEN3 = Adapter(
    name="torchtitan-qwen3", trainer="torchtitan",
    rules=(
        Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wq\.weight", _HF + "self_attn.q_proj.weight"),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wk\.weight", _HF + "self_attn.k_proj.weight"),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wv\.weight", _HF + "self_attn.v_proj.weight"),
        Rule(_L + r"attention\.wo\.weight", _HF + "self_attn.o_proj.weight"),
        Rule(_L + r"attention\.q_norm\.weight", _HF + "self_attn.q_norm.weight"),
        Rule(_L + r"attention\.k_norm\.weight", _HF + "self_attn.k_norm.weight"),
        *NORM_AND_DENSE_RULES,      # (dense: Qwen3, and a Qwen3-MoE's mlp_only_layers)
        ROUTER_RULE,
        *EXPERT_AND_HEAD_RULES,
    ),
    signature=(r"tok_embeddings\.weight", _L + r"attention\.q_norm\.weight", _L + r"attention\.k_norm\.weight"),
    skip=((r"freqs_cis|rope\.cache|.*\.rope\.cache", "RoPE table (transformers recomputes it)"),),
    unsupported=(
        (_L + r"moe\.expert_bias_E", expert_bias_refused("Qwen3-MoE", "Qwen3MoeForCausalLM")),
        (_L + r"moe\.shared_experts\..*", "shared experts (Hugging Face Qwen3-MoE has none)"),
    ),
    describes=("names mapped to Hugging Face Qwen3 / Qwen3-MoE (QK-norm; q/k rows already in its RoPE order); "
               "routed experts: " + PER_EXPERT),
    family="Hugging Face Qwen3ForCausalLM (dense) / Qwen3MoeForCausalLM (moe)",
    expert_layout=PER_EXPERT,
    fused_rules=FUSED_EXPERT_RULES, fused_layout=FUSED,
)
