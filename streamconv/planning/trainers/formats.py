"""The adapters, as data. Sources of truth for names and the RoPE permutation:
torchtitan `torchtitan/models/llama3/state_dict_adapter.py` (`to_hf`, `_permute`) and torchtune
`torchtune/models/convert_weights.py` (`tune_to_hf`, `_permute`).
"""
from __future__ import annotations

from .adapter import Adapter, Rule

_L = r"layers\.(\d+)\."
_HF = r"model.layers.\1."

# torchtitan Llama 3: module names of `Llama3Model` (0.3 nests q/k/v under `attention.qkv_linear.`; earlier
# releases have `attention.wq`, and `output` for the head). Its fused `wqkv` is saved as wq/wk/wv already.
TORCHTITAN_LLAMA = Adapter(
    name="torchtitan-llama", trainer="torchtitan",
    rules=(
        Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wq\.weight", _HF + "self_attn.q_proj.weight", (("rope", "q"),)),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wk\.weight", _HF + "self_attn.k_proj.weight", (("rope", "kv"),)),
        Rule(_L + r"attention\.(?:qkv_linear\.)?wv\.weight", _HF + "self_attn.v_proj.weight"),
        Rule(_L + r"attention\.wo\.weight", _HF + "self_attn.o_proj.weight"),
        Rule(_L + r"feed_forward\.w1\.weight", _HF + "mlp.gate_proj.weight"),
        Rule(_L + r"feed_forward\.w2\.weight", _HF + "mlp.down_proj.weight"),
        Rule(_L + r"feed_forward\.w3\.weight", _HF + "mlp.up_proj.weight"),
        Rule(_L + r"attention_norm\.weight", _HF + "input_layernorm.weight"),
        Rule(_L + r"ffn_norm\.weight", _HF + "post_attention_layernorm.weight"),
        Rule(r"norm\.weight", "model.norm.weight"),
        Rule(r"(?:output|lm_head)\.weight", "lm_head.weight"),
    ),
    signature=(r"tok_embeddings\.weight", _L + r"attention\.(?:qkv_linear\.)?wq\.weight",
               _L + r"feed_forward\.w1\.weight"),
    # QK-norm: torchtitan's Qwen3 (`qwen3.py`); MLA: its DeepSeek-V3 (`deepseek_v3.py`), whose q may be `wq` too
    absent=(_L + r"attention\.[qk]_norm\.weight", _L + r"attention\.wkv_a\.weight"),
    skip=((r"freqs_cis|rope\.cache|.*\.rope\.cache", "RoPE table (transformers recomputes it)"),),
    describes="names mapped to Hugging Face Llama, q/k rows permuted from interleaved to half-split RoPE order",
)

# torchtune Llama (2, 3, 3.1, 3.2 text): `TransformerDecoder` names; tied models have no `output.weight`.
TORCHTUNE_LLAMA = Adapter(
    name="torchtune-llama", trainer="torchtune",
    rules=(
        Rule(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        Rule(_L + r"attn\.q_proj\.weight", _HF + "self_attn.q_proj.weight", (("rope", "q"),)),
        Rule(_L + r"attn\.k_proj\.weight", _HF + "self_attn.k_proj.weight", (("rope", "kv"),)),
        Rule(_L + r"attn\.v_proj\.weight", _HF + "self_attn.v_proj.weight"),
        Rule(_L + r"attn\.output_proj\.weight", _HF + "self_attn.o_proj.weight"),
        Rule(_L + r"mlp\.w1\.weight", _HF + "mlp.gate_proj.weight"),
        Rule(_L + r"mlp\.w2\.weight", _HF + "mlp.down_proj.weight"),
        Rule(_L + r"mlp\.w3\.weight", _HF + "mlp.up_proj.weight"),
        Rule(_L + r"sa_norm\.scale", _HF + "input_layernorm.weight"),
        Rule(_L + r"mlp_norm\.scale", _HF + "post_attention_layernorm.weight"),
        Rule(r"norm\.scale", "model.norm.weight"),
        Rule(r"output\.weight", "lm_head.weight"),
    ),
    signature=(r"tok_embeddings\.weight", _L + r"attn\.q_proj\.weight", _L + r"sa_norm\.scale"),
    describes="names mapped to Hugging Face Llama, q/k rows permuted from interleaved to half-split RoPE order",
)

ADAPTERS = (TORCHTITAN_LLAMA, TORCHTUNE_LLAMA)
