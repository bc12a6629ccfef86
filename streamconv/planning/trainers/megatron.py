"""Megatron-Core GPT checkpoints (`torch_dist`) as Hugging Face models, as data: the `megatron-gpt` adapter.

The folder's recognition is the source flavor's (`source/flavors/megatron.py`, re-exported here for the adapter
choice); the weights' names and layouts are this module's. Sources: megatron-core 0.16 `gpt_layer_specs.py`,
`transformer_layer.py`, `transformer_block.py` (`sharded_state_dict`), `mlp.py` (`apply_swiglu_sharded_factory`),
`moe/experts.py` (`SequentialMLP` / `GroupedMLP` / `TEGroupedMLP.sharded_state_dict`), `moe/shared_experts.py`,
and its `export/` HF mappings; transformers 5.25 `qwen2`, `qwen3`, `qwen2_moe`, `qwen3_moe` models.

What `dist_checkpointing.save` writes, and what each becomes:

* Layers: stacked on a leading layer dim under `decoder.layers.*` (unstacked here, one output per layer), or,
  when the layers are not all alike (`moe_layer_freq` with dense layers, heterogeneous specs), one key per layer
  `decoder.layers.{i}.*`. Both forms map to `model.layers.{i}.*`. With `singleton_local_shards` every layer and
  routed expert has its own key (`experts.experts.{e}.linear_fc2.weight`) and each GLU `linear_fc1` is saved as
  its gate and up halves (`weight_w`, `weight_v`): renamed.
* Attention: `linear_qkv` (weight and, with `add_qkv_bias`, bias) grouped per query group [q heads; k; v], split
  GQA/MQA-aware into q/k/v_proj (q/k rows are already in HF's half-split RoPE order); `linear_proj` -> o_proj;
  QK-norm `q_layernorm`/`k_layernorm` -> `q_norm`/`k_norm` (Qwen3).
* Dense MLP: `linear_fc1` = [gate; up] -> gate_proj/up_proj; `linear_fc2` -> down_proj. Norms fused into the next
  linear layer (`*.layer_norm_weight`) or separate (`input_layernorm`, `pre_mlp_layernorm`).
* Mixture of experts: `mlp.router.weight` [E, H] -> `mlp.gate.weight`; routed experts, whatever module held them
  (`SequentialMLP` `local_experts.{e}`, `GroupedMLP`, `TEGroupedMLP` `linear_fc1.weight{e}`), are saved under one
  key with a global expert dim, `mlp.experts.experts.linear_fc1.weight` [(L,) E, 2F, H] and `linear_fc2.weight`
  [(L,) E, H, F]: unstacked per expert while streaming into `mlp.experts.{e}.gate_proj/up_proj/down_proj` (the
  layout save_pretrained writes; transformers 5.25 fuses them on load). Shared experts
  (`mlp.shared_experts.linear_fc1/linear_fc2`, `gate_weight` with `moe_shared_expert_gate`) -> Qwen2-MoE's
  `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`: the Hugging Face family with shared experts and this
  attention (DeepSeek-V3's `shared_experts` come with multi-latent attention: the megatron-mla layout,
  `megatron_mla.py`, which reuses this module's norm, MLP and expert parts). The router's `expert_bias` has no
  tensor in Qwen2-MoE / Qwen3-MoE: refused here, saying what to do.

Which HF class the names are checked against is the config's: the output must be what `--config-from`'s model
loads (hf/expected.py), else nothing is written (exit 4).
"""
from __future__ import annotations

from typing import Tuple

from ...source.flavors.megatron import COMMON_FILE, METADATA_JSON, TORCH_DIST, MegatronFolder, recognise
from .adapter import Adapter, Rule, Step

_STACKED, _PER_LAYER = r"decoder\.layers\.", r"decoder\.layers\.(\d+)\."
_HF_STACKED, _HF_PER_LAYER = "model.layers.{layer}.", r"model.layers.\1."
_Q, _K, _V = ("qkv_grouped", "q"), ("qkv_grouped", "k"), ("qkv_grouped", "v")
_GATE, _UP = ("half", "0"), ("half", "1")
VOCAB = ("vocab", "rows")   # Megatron pads the vocabulary (to a multiple of 128 x TP): rows past vocab_size dropped

# (Megatron key after the layer prefix, HF name after the layer prefix, row steps, per-expert): one layer's parts.
Part = Tuple[str, str, Tuple[Step, ...], bool]
# Attention with a fused linear_qkv (MHA, GQA, MQA), QK-norm (Qwen3).
QKV_ATTENTION: Tuple[Part, ...] = (
    (r"self_attention\.linear_qkv\.weight", "self_attn.q_proj.weight", (_Q,), False),
    (r"self_attention\.linear_qkv\.weight", "self_attn.k_proj.weight", (_K,), False),
    (r"self_attention\.linear_qkv\.weight", "self_attn.v_proj.weight", (_V,), False),
    (r"self_attention\.linear_qkv\.bias", "self_attn.q_proj.bias", (_Q,), False),
    (r"self_attention\.linear_qkv\.bias", "self_attn.k_proj.bias", (_K,), False),
    (r"self_attention\.linear_qkv\.bias", "self_attn.v_proj.bias", (_V,), False),
    (r"self_attention\.linear_proj\.weight", "self_attn.o_proj.weight", (), False),
    (r"self_attention\.q_layernorm\.weight", "self_attn.q_norm.weight", (), False),
    (r"self_attention\.k_layernorm\.weight", "self_attn.k_norm.weight", (), False),
)
# The norms, the dense MLP, the router and the routed experts: the same in every family here.
NORMS_AND_MLP: Tuple[Part, ...] = (
    (r"(?:self_attention\.linear_qkv\.layer_norm_weight|input_layernorm\.weight)", "input_layernorm.weight", (),
     False),
    (r"mlp\.linear_fc1\.weight", "mlp.gate_proj.weight", (_GATE,), False),
    (r"mlp\.linear_fc1\.weight", "mlp.up_proj.weight", (_UP,), False),
    (r"mlp\.linear_fc2\.weight", "mlp.down_proj.weight", (), False),
    (r"(?:mlp\.linear_fc1\.layer_norm_weight|pre_mlp_layernorm\.weight)", "post_attention_layernorm.weight", (),
     False),
    (r"mlp\.router\.weight", "mlp.gate.weight", (), False),
    (r"mlp\.experts\.experts\.linear_fc1\.weight", "mlp.experts.{expert}.gate_proj.weight", (_GATE,), True),
    (r"mlp\.experts\.experts\.linear_fc1\.weight", "mlp.experts.{expert}.up_proj.weight", (_UP,), True),
    (r"mlp\.experts\.experts\.linear_fc2\.weight", "mlp.experts.{expert}.down_proj.weight", (), True),
)


def shared_expert_parts(hf: str) -> Tuple[Part, ...]:
    """Megatron's shared experts under the HF module name `hf` (Qwen2-MoE `mlp.shared_expert`, DeepSeek-V3
    `mlp.shared_experts`)."""
    return ((r"mlp\.shared_experts\.linear_fc1\.weight", hf + ".gate_proj.weight", (_GATE,), False),
            (r"mlp\.shared_experts\.linear_fc1\.weight", hf + ".up_proj.weight", (_UP,), False),
            (r"mlp\.shared_experts\.linear_fc2\.weight", hf + ".down_proj.weight", (), False))


_QWEN2_MOE_SHARED = shared_expert_parts("mlp.shared_expert") + (
    (r"mlp\.shared_experts\.gate_weight", "mlp.shared_expert_gate.weight", (), False),)


def singleton_parts(shared_hf: str) -> Tuple[Tuple[str, str], ...]:
    """`singleton_local_shards` checkpoints (dist_checkpointing metadata): every layer and routed expert its own
    key, and each GLU linear_fc1 saved as its two halves `weight_w` (gate) and `weight_v` (up): plain renames."""
    return (
        (r"mlp\.linear_fc1\.weight_w", "mlp.gate_proj.weight"),
        (r"mlp\.linear_fc1\.weight_v", "mlp.up_proj.weight"),
        (r"mlp\.experts\.experts\.(\d+)\.linear_fc1\.weight_w", r"mlp.experts.\2.gate_proj.weight"),
        (r"mlp\.experts\.experts\.(\d+)\.linear_fc1\.weight_v", r"mlp.experts.\2.up_proj.weight"),
        (r"mlp\.experts\.experts\.(\d+)\.linear_fc2\.weight", r"mlp.experts.\2.down_proj.weight"),
        (r"mlp\.shared_experts\.linear_fc1\.weight_w", shared_hf + ".gate_proj.weight"),
        (r"mlp\.shared_experts\.linear_fc1\.weight_v", shared_hf + ".up_proj.weight"),
    )


def layer_rules(parts: Tuple[Part, ...], singletons: Tuple[Tuple[str, str], ...]) -> Tuple[Rule, ...]:
    """Each part in both key forms: stacked ([L, ...], one more dim unstacked) and per layer (`layers.{i}.`); then
    the singleton_local_shards keys (per layer only)."""
    rules = []
    for key, hf, steps, per_expert in parts:
        rules.append(Rule(_STACKED + key, _HF_STACKED + hf, steps, unstack=1 + per_expert))
        rules.append(Rule(_PER_LAYER + key, _HF_PER_LAYER + hf, steps, unstack=int(per_expert)))
    rules.extend(Rule(_PER_LAYER + key, _HF_PER_LAYER + hf) for key, hf in singletons)
    return tuple(rules)


def model_rules(layers: Tuple[Rule, ...]) -> Tuple[Rule, ...]:
    """The embedding, the layers' rules, the final norm and the output layer (vocabulary trimmed to the config's)."""
    return (Rule(r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight", (VOCAB,)),
            *layers,
            Rule(r"decoder\.final_layernorm\.weight", "model.norm.weight"),
            Rule(r"output_layer\.weight", "lm_head.weight", (VOCAB,)))


SKIP = ((r".*\._extra_state(?:/.*)?", "Transformer Engine extra state (FP8 metadata)"),
        (r"optimizer\..*", "optimizer state"),
        (r"rng_state.*|rerun_state_machine_state.*", "training state"))
LAYER = r"decoder\.layers\.(?:\d+\.)?"
MLA_TENSORS = (LAYER + r"self_attention\.linear_(?:q|q_down|q_up|kv_down|kv_up)_proj\..*|"
               + LAYER + r"self_attention\.kv_layernorm\..*")
# (regex, feature) of what no Megatron family here holds, refused by name.
NOT_GPT = (
    (r".*\.bias|.*\.layer_norm_bias", "biases other than the qkv bias (add_bias_linear, or LayerNorm instead of "
                                      "RMSNorm)"),
    (r"embedding\.position_embeddings\..*", "learned absolute position embeddings (GPT-2 style, not RoPE)"),
    (r"(?:encoder|vision_model|vision_projection|mtp|decoder\.layers\.(?:\d+\.)?mixer)\b.*",
     "a model other than a GPT decoder (encoder, vision, multi-token prediction or Mamba layers)"),
)
# Why the router's expert bias has no home in Qwen2-MoE / Qwen3-MoE (the megatron-mla layout maps it).
EXPERT_BIAS_REFUSED = (
    "the router's expert bias (moe_router_enable_expert_bias: Megatron adds it to the router scores when it "
    "chooses each token's experts, so once training has moved it routing depends on it; Hugging Face Qwen2-MoE / "
    "Qwen3-MoE have no such bias and would route tokens to other experts). A DeepSeek-V3-style model (sigmoid "
    "scores, multi-latent attention) converts with its bias as e_score_correction_bias; for this family, "
    "--exclude '*.mlp.router.expert_bias' only if it is all zeros (inspect shows it; the model was then never "
    "balanced by it), since routing without a trained bias is another model")

PER_EXPERT = ("per-expert mlp.experts.{e}.gate_proj/up_proj/down_proj (unstacked from Megatron's "
              "mlp.experts.experts.linear_fc1 [(L,) E, 2F, H], gate;up halves, and linear_fc2 [(L,) E, H, F]; the "
              "layout save_pretrained writes, checked against transformers 5.25)")

MEGATRON_GPT = Adapter(
    name="megatron-gpt", trainer="Megatron-Core",
    rules=model_rules(layer_rules(QKV_ATTENTION + NORMS_AND_MLP + _QWEN2_MOE_SHARED,
                                  singleton_parts("mlp.shared_expert"))),
    signature=(r"embedding\.word_embeddings\.weight", r"decoder\.layers\..+"),
    absent=(MLA_TENSORS,),      # multi-latent attention: the megatron-mla layout (megatron_mla.py)
    describes=("layers unstacked and names mapped to Hugging Face Llama / Qwen2 / Qwen3 (QK-norm, qkv bias) and "
               "Qwen3-MoE / Qwen2-MoE (router, shared expert), linear_qkv split per query group into q/k/v, "
               "linear_fc1 into gate/up (q/k rows are already in HF's RoPE order); routed experts: " + PER_EXPERT),
    skip=SKIP,
    # (regex, architecture feature): tensors of models the Hugging Face families above cannot hold. Named when
    # refused.
    unsupported=(
        (MLA_TENSORS, "multi-latent attention (MLA): a DeepSeek-V3-style model, converted by the megatron-mla "
                      "layout (--source-format megatron-mla, chosen by itself for a Megatron folder)"),
        (LAYER + r"mlp\.router\.expert_bias", EXPERT_BIAS_REFUSED),
    ) + NOT_GPT,
    family="Hugging Face Llama / Qwen2 / Qwen3 (dense), Qwen3-MoE / Qwen2-MoE (moe)",
    expert_layout=PER_EXPERT,
)

__all__ = ["COMMON_FILE", "METADATA_JSON", "TORCH_DIST", "MegatronFolder", "recognise", "MEGATRON_GPT", "Part",
           "QKV_ATTENTION", "NORMS_AND_MLP", "shared_expert_parts", "singleton_parts", "layer_rules", "model_rules",
           "SKIP", "LAYER", "MLA_TENSORS", "NOT_GPT", "PER_EXPERT"]
