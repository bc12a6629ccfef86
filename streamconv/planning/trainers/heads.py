"""Attention geometry (heads, key/value heads, head size) from a config.json. Pure.

Its own module because both the package's public surface and `llama.py` use it: defined in `__init__`, it made
`trainers` and `trainers.llama` import each other.
"""
from __future__ import annotations

from typing import Optional

from ..transforms import Heads


def heads_from_config(data: dict) -> Optional[Heads]:
    """Attention geometry (and the vocabulary size) from a config.json (top level, else its `text_config`); None
    when it has no attention geometry."""
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
        vocab = scope.get("vocab_size")
        return Heads(n_heads=n_heads, n_kv_heads=int(n_kv), head_dim=head_dim,
                     vocab_size=vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0
                     else None)
    return None
