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
