"""torchtitan GPT-OSS as Hugging Face `GptOssForCausalLM`, as data.

Sources: torchtitan 0.3 `torchtitan/models/gpt_oss/` (`__init__.py` `_build_gptoss_layers` for the module tree,
`moe.py` `GptOssGroupedExperts`: `mlp1_weight_EGD` [experts, 2*ffn, dim] with gate and up rows interleaved (its
`swiglu` reads `x[..., ::2]` / `x[..., 1::2]`), `mlp2_weight_EDF` [experts, dim, ffn], biases `mlp1_bias_EG`,
`mlp2_bias_ED`) and transformers 5.25 `models/gpt_oss/modeling_gpt_oss.py` (`GptOssExperts`: `gate_up_proj`
[experts, dim, 2*ffn], gate/up interleaved on the last dim, `down_proj` [experts, ffn, dim], `x @ W` per expert;
transformers has no conversion mapping for gpt_oss, so these are also the names `save_pretrained` writes and
the bf16 GPT-OSS folders on the Hub hold).

* The expert weights are the trainer's [E, out, in] transposed to transformers' [E, in, out]: a strided copy
  (`Rule.transpose`), each stored chunk read as it is and put in place permuted, never loaded whole. The
  interleaved gate/up order is the same on both sides (rows there, columns here), so nothing else moves.
* Attention sinks, the q/k/v/o biases (the fused `wqkv` is saved as wq/wk/wv by torchtitan) and the router's bias
  are renamed. RoPE is `CosSinRoPE`, the half-split order transformers uses: q/k rows as they are.
* torchtitan's own `GptOssStateDictAdapter.to_hf` (0.3.0) maps `mlp1_weight`, not the parameter's name
  `mlp1_weight_EGD`, so it drops every routed expert: it is not the reference here; transformers' logits are
  (tests/producers/test_trainers_gpt_oss.py).
* Refused, by feature: the load-balancing bias `moe.expert_bias_E` (GPT-OSS's router has none) and shared
  experts.
"""
from __future__ import annotations

from .adapter import Adapter, Rule
from .qwen3 import expert_bias_refused

_L = r"layers\.(\d+)\."
_HF = r"model.layers.\1."
_A = _L + r"attention\."
_EXPERTS = _L + r"moe\.routed_experts\.inner_experts\."

# Which layout routed experts get, and the transformers release it was checked against.
FUSED_TRANSPOSED = ("fused mlp.experts.gate_up_proj [E, D, 2F] (gate/up interleaved) and down_proj [E, F, D], "
                    "transposed while streaming from torchtitan's mlp1_weight_EGD [E, 2F, D] and mlp2_weight_EDF "
                    "[E, D, F]; the layout GptOssForCausalLM loads and save_pretrained writes, checked against "
                    "transformers 5.25")

TORCHTITAN_GPT_OSS = Adapter(
    name="torchtitan-gpt-oss", trainer="torchtitan",
    rules=(
        Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_A + r"(?:qkv_linear\.)?wq\.(weight|bias)", _HF + r"self_attn.q_proj.\2"),
        Rule(_A + r"(?:qkv_linear\.)?wk\.(weight|bias)", _HF + r"self_attn.k_proj.\2"),
        Rule(_A + r"(?:qkv_linear\.)?wv\.(weight|bias)", _HF + r"self_attn.v_proj.\2"),
        Rule(_A + r"wo\.(weight|bias)", _HF + r"self_attn.o_proj.\2"),
        Rule(_A + r"sinks", _HF + "self_attn.sinks"),
        Rule(_L + r"attention_norm\.weight", _HF + "input_layernorm.weight"),
        Rule(_L + r"ffn_norm\.weight", _HF + "post_attention_layernorm.weight"),
        Rule(_L + r"moe\.router\.gate\.(weight|bias)", _HF + r"mlp.router.\2"),
        Rule(_EXPERTS + r"mlp1_weight_EGD", _HF + "mlp.experts.gate_up_proj", transpose=True),
        Rule(_EXPERTS + r"mlp1_bias_EG", _HF + "mlp.experts.gate_up_proj_bias"),
        Rule(_EXPERTS + r"mlp2_weight_EDF", _HF + "mlp.experts.down_proj", transpose=True),
        Rule(_EXPERTS + r"mlp2_bias_ED", _HF + "mlp.experts.down_proj_bias"),
        Rule(r"norm\.weight", "model.norm.weight"),
        Rule(r"(?:output|lm_head)\.weight", "lm_head.weight"),
    ),
    signature=(r"tok_embeddings\.weight", _A + r"sinks", _EXPERTS + r"mlp1_weight_EGD"),
    skip=((r"freqs_cis|rope\.cache|.*\.rope\.cache", "RoPE table (transformers recomputes it)"),),
    unsupported=(
        (_L + r"moe\.expert_bias_E", expert_bias_refused("GPT-OSS", "GptOssForCausalLM")),
        (_L + r"moe\.shared_experts\..*", "shared experts (Hugging Face GPT-OSS has none)"),
    ),
    describes=("names mapped to Hugging Face GPT-OSS (attention sinks, biases; q/k rows already in its RoPE "
               "order); routed experts: " + FUSED_TRANSPOSED),
    family="Hugging Face GptOssForCausalLM",
    expert_layout=FUSED_TRANSPOSED,
)
