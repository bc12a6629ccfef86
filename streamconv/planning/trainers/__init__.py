"""Trainer adapters: which trainer wrote a checkpoint, and how its names and row layouts become Hugging Face's.

* `adapter` — the data types (`Adapter`, `Rule`, row steps) and how a rule turns a source into outputs;
* `formats` — the adapters themselves (torchtitan, torchtune Llama), as data; `megatron` — Megatron-Core GPT,
  dense and MoE (`megatron-gpt`); `megatron_mla` — Megatron-Core with multi-latent attention as DeepSeek-V3
  (`megatron-mla`); `qwen3` — torchtitan Qwen3 and
  Qwen3-MoE (grouped experts unstacked per expert); `deepseek_v3` — torchtitan DeepSeek-V3 (MLA, shared experts);
  `gpt_oss` — torchtitan GPT-OSS (sinks, biases, expert weights transposed while streaming);
* `heads` — attention geometry from a config.json; `llama` — the Llama a config.json builds.

`resolve` picks one from the checkpoint's model names (or `--source-format`); pure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from ...errors import OptionsError
from .adapter import EXPERT_LAYOUTS, Adapter, Rule, joined, outputs, vocab_trims
from .heads import heads_from_config
from .llama import check_llama_shapes, llama_shapes
from .formats import ADAPTERS as _LLAMA_FAMILY, TORCHTITAN_LLAMA, TORCHTUNE_LLAMA
from .megatron import MEGATRON_GPT
from .megatron_mla import MEGATRON_MLA
from .qwen3 import TORCHTITAN_QWEN3
from .deepseek_v3 import TORCHTITAN_DEEPSEEK_V3
from .gpt_oss import TORCHTITAN_GPT_OSS

# The registry: one line per adapter module.
ADAPTERS = _LLAMA_FAMILY + (MEGATRON_GPT, MEGATRON_MLA, TORCHTITAN_QWEN3, TORCHTITAN_DEEPSEEK_V3,
                            TORCHTITAN_GPT_OSS)
# A Megatron-Core folder is read with one of these (never names as they are): the one its names fit, else the first.
MEGATRON_ADAPTERS = (MEGATRON_GPT, MEGATRON_MLA)

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
            reason: str = "", expert_layout: str = "per-expert") -> Resolution:
    """The adapter for a checkpoint whose model tensors have state-dict `names`; `top_keys` are its top-level
    entries (for the note). `reason`: why `source_format` was chosen when not by --source-format.
    `expert_layout`: how the adapter writes routed experts (`adapter.EXPERT_LAYOUTS`)."""
    if source_format not in SOURCE_FORMATS:
        raise OptionsError(f"--source-format {source_format!r}: use one of {', '.join(SOURCE_FORMATS)}")
    if source_format == AS_IS:
        return Resolution(None, AS_IS, "source format: hf (forced): names kept as in the checkpoint")
    if source_format != "auto":
        adapter = next(a for a in ADAPTERS if a.name == source_format).with_expert_layout(expert_layout)
        why = reason or "forced by --source-format"
        return Resolution(adapter, adapter.name, f"source format: {adapter.name} ({why}); {adapter.describes}")
    names = list(names)
    found = [a for a in ADAPTERS if a.detects(names)]
    if len(found) > 1:
        raise OptionsError(f"checkpoint names fit several trainers ({', '.join(a.name for a in found)}); "
                           "choose one with --source-format")
    if not found:
        return Resolution(None, AS_IS, "")
    adapter = found[0].with_expert_layout(expert_layout)
    extra = sorted(k for k in set(top_keys) if k in TRAINER_ENTRIES)
    beside = f"; beside the model: {', '.join(extra)}" if extra else ""
    return Resolution(adapter, adapter.name,
                      f"source format: {adapter.name} (detected from {adapter.trainer}'s module names, e.g. "
                      f"{_example(adapter, names)}{beside}); {adapter.describes}; --source-format hf keeps them "
                      "as they are")


def megatron_adapter(names: Iterable[str]) -> Adapter:
    """The Megatron-Core layout for a Megatron folder's tensor `names`: multi-latent attention or GPT."""
    names = list(names)
    return next((a for a in MEGATRON_ADAPTERS[1:] if a.detects(names)), MEGATRON_ADAPTERS[0])


def _example(adapter: Adapter, names: List[str]) -> str:
    import re
    for pattern in adapter.signature[1:]:
        hit = next((n for n in names if re.fullmatch(pattern, n)), None)
        if hit:
            return hit
    return names[0] if names else "?"


__all__ = ["check_llama_shapes", "llama_shapes", "Adapter", "Rule", "Resolution", "resolve", "outputs", "joined",
           "vocab_trims", "EXPERT_LAYOUTS", "heads_from_config", "ADAPTERS", "TORCHTITAN_LLAMA", "TORCHTUNE_LLAMA",
           "MEGATRON_GPT", "MEGATRON_MLA", "MEGATRON_ADAPTERS", "megatron_adapter", "TORCHTITAN_QWEN3", "TORCHTITAN_DEEPSEEK_V3", "TORCHTITAN_GPT_OSS", "SOURCE_FORMATS"]
