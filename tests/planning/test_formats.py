"""The Llama adapters (planning/trainers/formats.py), name by name: one shared table of Hugging Face roles, each
trainer's module names. End to end against the trainers' real models: tests/producers/test_trainers.py."""
from __future__ import annotations

import pytest

from streamconv.planning.trainers import formats

ROPE_Q, ROPE_KV = (("rope", "q"),), (("rope", "kv"),)
HF_LLAMA = {        # role: (output name for layer 3, row steps)
    "embed": ("model.embed_tokens.weight", ()),
    "q": ("model.layers.3.self_attn.q_proj.weight", ROPE_Q),
    "k": ("model.layers.3.self_attn.k_proj.weight", ROPE_KV),
    "v": ("model.layers.3.self_attn.v_proj.weight", ()),
    "o": ("model.layers.3.self_attn.o_proj.weight", ()),
    "gate": ("model.layers.3.mlp.gate_proj.weight", ()),
    "down": ("model.layers.3.mlp.down_proj.weight", ()),
    "up": ("model.layers.3.mlp.up_proj.weight", ()),
    "attention_norm": ("model.layers.3.input_layernorm.weight", ()),
    "ffn_norm": ("model.layers.3.post_attention_layernorm.weight", ()),
    "final_norm": ("model.norm.weight", ()),
    "head": ("lm_head.weight", ()),
}
# The trainers' own names for each role (torchtitan 0.3 `Llama3Model`, earlier torchtitan, torchtune
# `TransformerDecoder`), as their state dicts hold them.
TRAINER_NAMES = {
    formats.TORCHTITAN_LLAMA: [
        ("embed", "tok_embeddings.weight"), ("q", "layers.3.attention.qkv_linear.wq.weight"),
        ("q", "layers.3.attention.wq.weight"), ("k", "layers.3.attention.qkv_linear.wk.weight"),
        ("k", "layers.3.attention.wk.weight"), ("v", "layers.3.attention.qkv_linear.wv.weight"),
        ("v", "layers.3.attention.wv.weight"), ("o", "layers.3.attention.wo.weight"),
        ("gate", "layers.3.feed_forward.w1.weight"), ("down", "layers.3.feed_forward.w2.weight"),
        ("up", "layers.3.feed_forward.w3.weight"), ("attention_norm", "layers.3.attention_norm.weight"),
        ("ffn_norm", "layers.3.ffn_norm.weight"), ("final_norm", "norm.weight"), ("head", "output.weight"),
        ("head", "lm_head.weight")],
    formats.TORCHTUNE_LLAMA: [
        ("embed", "tok_embeddings.weight"), ("q", "layers.3.attn.q_proj.weight"),
        ("k", "layers.3.attn.k_proj.weight"), ("v", "layers.3.attn.v_proj.weight"),
        ("o", "layers.3.attn.output_proj.weight"), ("gate", "layers.3.mlp.w1.weight"),
        ("down", "layers.3.mlp.w2.weight"), ("up", "layers.3.mlp.w3.weight"),
        ("attention_norm", "layers.3.sa_norm.scale"), ("ffn_norm", "layers.3.mlp_norm.scale"),
        ("final_norm", "norm.scale"), ("head", "output.weight")],
}


@pytest.mark.parametrize("adapter", list(TRAINER_NAMES), ids=lambda a: a.name)
def test_every_trainer_name_maps_to_its_hugging_face_role(adapter):
    for role, name in TRAINER_NAMES[adapter]:
        matching = [rule for rule in adapter.rules if rule.match(name)]
        assert len(matching) == 1, (name, [r.pattern for r in matching])
        assert (rule_output(matching[0], name), matching[0].steps, matching[0].unstack) == (*HF_LLAMA[role], False)
    assert len(adapter.rules) == len(HF_LLAMA)      # one rule per role, none left over
    assert adapter.needs_heads and adapter.family == "Hugging Face Llama"


def rule_output(rule, name):
    return rule.match(name).expand(rule.target)


def test_a_llama_adapter_names_every_role_once():
    modules = {role: role for role in HF_LLAMA}
    assert len(formats._llama("x", "t", modules).rules) == len(HF_LLAMA)
    del modules["up"]
    with pytest.raises(ValueError, match="Llama roles"):
        formats._llama("x", "t", modules)
    with pytest.raises(ValueError, match="Llama roles"):
        formats._llama("x", "t", dict(modules, up="u", extra="e"))
