"""What an adapter's output must be when the reference folder has only config.json: the `LlamaForCausalLM` that
config builds, name for name and shape for shape. Pure.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from ...errors import ReferenceMismatchError
from .adapter import Adapter
from .heads import heads_from_config


def llama_shapes(config: dict) -> Optional[Dict[str, Tuple[int, ...]]]:
    """{name: shape} of a `LlamaForCausalLM` built from `config` (lm_head included); None when the config lacks a
    size. What an adapter's output must be when the reference folder has only config.json."""
    heads = heads_from_config(config)
    sizes = [config.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")]
    if heads is None or not all(isinstance(v, int) and v > 0 for v in sizes):
        return None
    vocab, hidden, ffn, layers = sizes
    q, kv = heads.n_heads * heads.head_dim, heads.n_kv_heads * heads.head_dim
    out = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
           "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                    p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                    p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                    p + "mlp.down_proj.weight": (hidden, ffn), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    return out


def check_llama_shapes(shapes: Dict[str, Tuple[int, ...]], config: dict, adapter: Adapter) -> Optional[str]:
    """An adapter's output {name: shape} is the config's Llama, name for name and shape for shape (lm_head may be
    absent: tied). A folder that differs would load with weights missing (randomly initialised) or fail to load.
    Returns a note saying what was checked (None when the config is not a complete Llama config)."""
    if config.get("model_type") not in (None, "llama"):
        return None
    expected = llama_shapes(config)
    if expected is None:
        return None
    wrong = [f"{n} {list(s)} (config: {list(expected[n])})" for n, s in shapes.items()
             if n in expected and tuple(expected[n]) != tuple(s)]
    extra = sorted(n for n in shapes if n not in expected)
    missing = sorted((n for n in expected if n not in shapes and n != "lm_head.weight"), key=_natural)
    if not (wrong or extra or missing):
        return (f"{len(shapes)} output names and shapes are those of a LlamaForCausalLM built from config.json "
                f"({config['num_hidden_layers']} layers)")
    lines = []
    if wrong:
        lines.append(f"shapes differ: {_few(wrong)}")
    if extra or missing:
        layers = {int(n.split(".")[2]) for n in shapes if n.startswith("model.layers.")}
        parts = [] if len(layers) == config.get("num_hidden_layers") else [
            f"the checkpoint has {len(layers)} layer(s), the config num_hidden_layers={config.get('num_hidden_layers')}"]
        parts += ([f"not in the config's model: {_few(extra)}"] if extra else []) + (
            [f"missing: {_few(missing)}"] if missing else [])
        lines.append("; ".join(parts))
    vocab_hint = any(w.split(" ", 1)[0] in ("model.embed_tokens.weight", "lm_head.weight") for w in wrong)
    hint = (" If the embedding has more rows than vocab_size, the trainer padded the vocabulary (Megatron: "
            "--make-vocab-size-divisible-by): set vocab_size in config.json to its row count." if vocab_hint else "")
    if any(re.search(r"\.(?:experts|shared_experts?|gate|[qk]_norm)\.|\.bias$", n) for n in extra):
        hint += (" The checkpoint has weights a Llama has not (experts, a router, QK-norm or biases): give "
                 "--config-from the config of the model it was trained as (e.g. Qwen3-MoE, Qwen2-MoE, Qwen3, Qwen2).")
    raise ReferenceMismatchError(
        f"the {adapter.name} checkpoint does not fit the reference config (Hugging Face Llama): "
        + "; ".join(lines) + ". Is --config-from the base model of this checkpoint?" + hint)


def _few(names: List[str]) -> str:
    return ", ".join(names[:4]) + (f" ... and {len(names) - 4} more" if len(names) > 4 else "")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
