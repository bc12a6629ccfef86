"""The weights a config.json's model loads, as data, for the families we know: no torch, no transformers needed.

A table lists the model's weight names and each shape as sizes named after the config (`vocab`, `hidden`, `q` =
heads x head_dim...). It applies only to a config it describes completely: its model_type, its class (or none
named), every size present or defaulted as the config class defaults it, and no field set that it does not model
(then transformers decides, `meta_probe`).
Each table says which transformers release it was checked against; tests/hf/test_expected.py compares it with
that release's meta-device model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

Shape = Tuple[int, ...]
Entry = Tuple[str, Tuple[str, ...]]     # (name, shape as size names); `{i}` in a per-layer name is the layer


@dataclass(frozen=True)
class Table:
    model_type: str
    model_class: str
    checked_with: str                    # the transformers release whose meta-device model it equals
    weights: Tuple[Entry, ...]           # once per model
    per_layer: Tuple[Entry, ...]         # once per layer, `{i}` the layer index
    # config flag -> per-layer entries present when the flag is true
    flagged: Tuple[Tuple[str, Tuple[Entry, ...]], ...] = ()
    tied: Tuple[str, ...] = ()           # absent from the file when tie_word_embeddings (transformers rebuilds)
    tie_default: bool = False            # the config class's default for tie_word_embeddings
    # config fields that change the weights in ways the table does not model: their presence with another value
    # than this sends the config to transformers
    unmodelled: Tuple[Tuple[str, object], ...] = ()
    # the config class's defaults for the sizes a config.json may leave out
    defaults: Tuple[Tuple[str, int], ...] = ()


_LLAMA_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", ("hidden",)),
    ("model.layers.{i}.self_attn.q_proj.weight", ("q", "hidden")),
    ("model.layers.{i}.self_attn.k_proj.weight", ("kv", "hidden")),
    ("model.layers.{i}.self_attn.v_proj.weight", ("kv", "hidden")),
    ("model.layers.{i}.self_attn.o_proj.weight", ("hidden", "q")),
    ("model.layers.{i}.post_attention_layernorm.weight", ("hidden",)),
    ("model.layers.{i}.mlp.gate_proj.weight", ("ffn", "hidden")),
    ("model.layers.{i}.mlp.up_proj.weight", ("ffn", "hidden")),
    ("model.layers.{i}.mlp.down_proj.weight", ("hidden", "ffn")),
)

LLAMA = Table(
    model_type="llama", model_class="LlamaForCausalLM", checked_with="5.25.0",
    weights=(("model.embed_tokens.weight", ("vocab", "hidden")), ("model.norm.weight", ("hidden",)),
             ("lm_head.weight", ("vocab", "hidden"))),
    per_layer=_LLAMA_LAYER,
    flagged=(("attention_bias", (("model.layers.{i}.self_attn.q_proj.bias", ("q",)),
                                 ("model.layers.{i}.self_attn.k_proj.bias", ("kv",)),
                                 ("model.layers.{i}.self_attn.v_proj.bias", ("kv",)),
                                 ("model.layers.{i}.self_attn.o_proj.bias", ("hidden",)))),
             ("mlp_bias", (("model.layers.{i}.mlp.gate_proj.bias", ("ffn",)),
                           ("model.layers.{i}.mlp.up_proj.bias", ("ffn",)),
                           ("model.layers.{i}.mlp.down_proj.bias", ("hidden",))))),
    tied=("lm_head.weight",), tie_default=False,
    unmodelled=(("quantization_config", None), ("auto_map", None)),
    defaults=(("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 11008), ("num_hidden_layers", 32),
              ("num_attention_heads", 32)),
)

TABLES: Tuple[Table, ...] = (LLAMA,)


def _sizes(config: dict, defaults: Tuple[Tuple[str, int], ...] = ()) -> Optional[Dict[str, int]]:
    """The named sizes (`defaults` for those the config leaves out), or None when one is missing or not a positive
    int."""
    given = dict(defaults, **config)
    need = {k: given.get(k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in need.values()):
        return None
    heads = need["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else kv_heads
    head_dim = config.get("head_dim")
    if head_dim is None:
        if need["hidden_size"] % heads:
            return None
        head_dim = need["hidden_size"] // heads
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (kv_heads, head_dim)):
        return None
    return {"vocab": need["vocab_size"], "hidden": need["hidden_size"], "ffn": need["intermediate_size"],
            "layers": need["num_hidden_layers"], "q": heads * head_dim, "kv": kv_heads * head_dim}


def table_for(config: dict) -> Optional[Table]:
    """The table that describes `config` completely, else None."""
    archs = config.get("architectures")
    for table in TABLES:
        if config.get("model_type") != table.model_type:
            continue
        if archs not in (None, [table.model_class]):
            continue
        if any(config.get(field, value) != value for field, value in table.unmodelled):
            continue
        if any(not isinstance(config.get(flag, False), bool) for flag, _ in table.flagged):
            continue
        if _sizes(config, table.defaults) is not None:
            return table
    return None


def expected_weights(table: Table, config: dict) -> Tuple[Dict[str, Shape], frozenset]:
    """({name: shape} the model loads, names that may be absent) for a config `table_for` accepted."""
    sizes = _sizes(config, table.defaults)
    assert sizes is not None, "table_for accepts only complete configs"
    entries = list(table.weights)
    layer_entries = list(table.per_layer) + [e for flag, more in table.flagged if config.get(flag) for e in more]
    out: Dict[str, Shape] = {name: tuple(sizes[d] for d in dims) for name, dims in entries}
    for i in range(sizes["layers"]):
        for name, dims in layer_entries:
            out[name.format(i=i)] = tuple(sizes[d] for d in dims)
    tie = config.get("tie_word_embeddings", table.tie_default)
    optional = frozenset(table.tied) if tie else frozenset()
    return out, optional
