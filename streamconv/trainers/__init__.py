"""Trainer adapters: which trainer wrote a checkpoint, and how its names and row layouts become Hugging Face's.

* `adapter` — the data types (`Adapter`, `Rule`, row steps) and how a rule turns a source into outputs;
* `formats` — the adapters themselves (torchtitan, torchtune Llama), as data.

`resolve` picks one from the checkpoint's model names (or `--source-format`); pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import OptionsError
from ..transforms import Heads
from .adapter import Adapter, Rule, outputs
from .formats import ADAPTERS, MEGATRON_GPT, TORCHTITAN_LLAMA, TORCHTUNE_LLAMA

AS_IS = "hf"
SOURCE_FORMATS = ("auto", AS_IS) + tuple(a.name for a in ADAPTERS)
# Top-level entries a trainer saves beside the model, shown as evidence in the detection note.
TRAINER_ENTRIES = ("train_state", "dataloader", "lr_scheduler", "optimizer")


@dataclass(frozen=True)
class Resolution:
    adapter: Optional[Adapter]      # None: names as they are (after wrapper stripping and --rename)
    name: str                       # "hf" or the adapter's name
    note: str


def resolve(names: Sequence[str], top_keys: Iterable[str], source_format: str = "auto",
            reason: str = "") -> Resolution:
    """The adapter for a checkpoint whose model tensors have state-dict `names`; `top_keys` are its top-level
    entries (for the note). `reason`: why `source_format` was chosen when not by --source-format."""
    if source_format not in SOURCE_FORMATS:
        raise OptionsError(f"--source-format {source_format!r}: use one of {', '.join(SOURCE_FORMATS)}")
    if source_format == AS_IS:
        return Resolution(None, AS_IS, "source format: hf (forced): names kept as in the checkpoint")
    if source_format != "auto":
        adapter = next(a for a in ADAPTERS if a.name == source_format)
        why = reason or "forced by --source-format"
        return Resolution(adapter, adapter.name, f"source format: {adapter.name} ({why}); {adapter.describes}")
    names = list(names)
    found = [a for a in ADAPTERS if a.detects(names)]
    if len(found) > 1:
        raise OptionsError(f"checkpoint names fit several trainers ({', '.join(a.name for a in found)}); "
                           "choose one with --source-format")
    if not found:
        return Resolution(None, AS_IS, "")
    adapter = found[0]
    extra = sorted(k for k in set(top_keys) if k in TRAINER_ENTRIES)
    beside = f"; beside the model: {', '.join(extra)}" if extra else ""
    return Resolution(adapter, adapter.name,
                      f"source format: {adapter.name} (detected from {adapter.trainer}'s module names, e.g. "
                      f"{_example(adapter, names)}{beside}); {adapter.describes}; --source-format hf keeps them "
                      "as they are")


def _example(adapter: Adapter, names: List[str]) -> str:
    import re
    for pattern in adapter.signature[1:]:
        hit = next((n for n in names if re.fullmatch(pattern, n)), None)
        if hit:
            return hit
    return names[0] if names else "?"


def heads_from_config(data: dict) -> Optional[Heads]:
    """Attention geometry from a config.json (top level, else its `text_config`); None when it has none."""
    for scope in (data, data.get("text_config") or {}):
        n_heads = scope.get("num_attention_heads")
        if not isinstance(n_heads, int) or n_heads <= 0:
            continue
        n_kv = scope.get("num_key_value_heads") or n_heads
        head_dim = scope.get("head_dim")
        if not isinstance(head_dim, int) or head_dim <= 0:
            hidden = scope.get("hidden_size")
            if not isinstance(hidden, int) or hidden % n_heads:
                return None
            head_dim = hidden // n_heads
        return Heads(n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=head_dim)
    return None


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
        lines.append(f"the checkpoint has {len(layers)} layer(s), the config num_hidden_layers="
                     f"{config.get('num_hidden_layers')}; " + (f"not in the config's model: {_few(extra)}; " if extra else "")
                     + (f"missing: {_few(missing)}" if missing else ""))
    vocab_hint = any(w.split(" ", 1)[0] in ("model.embed_tokens.weight", "lm_head.weight") for w in wrong)
    hint = (" If the embedding has more rows than vocab_size, the trainer padded the vocabulary (Megatron: "
            "--make-vocab-size-divisible-by): set vocab_size in config.json to its row count." if vocab_hint else "")
    raise OptionsError(
        f"the {adapter.name} checkpoint does not fit the reference config (Hugging Face Llama): "
        + "; ".join(lines) + ". Is --config-from the base model of this checkpoint?" + hint)


def _few(names: List[str]) -> str:
    return ", ".join(names[:4]) + (f" ... and {len(names) - 4} more" if len(names) > 4 else "")


def _natural(name: str):
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


__all__ = ["check_llama_shapes", "llama_shapes", "Adapter", "Rule", "Resolution", "resolve", "outputs", "heads_from_config", "ADAPTERS",
           "TORCHTITAN_LLAMA", "TORCHTUNE_LLAMA", "MEGATRON_GPT", "SOURCE_FORMATS"]
