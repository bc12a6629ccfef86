"""Model shapes for the benchmark checkpoints: the tensor names and shapes of an Mllama
(Llama 3.2 Vision) model exactly as transformers 5's `MllamaForConditionalGeneration.state_dict()`
lists them, computed from a handful of config values without importing torch or transformers.

`python -m benchmarks.presets --check` instantiates each Mllama preset on the meta device with
transformers and asserts that names, shapes and order agree with `tensor_specs()`.

The Mixture-of-Experts presets (torchtitan Qwen3-MoE names, grouped experts) are in `moe_presets.py`;
`PRESETS` holds both kinds and `tensor_specs()` answers for either.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Tuple, Union

from . import moe_presets
from .moe_presets import Qwen3MoeShape

Shape = Tuple[int, ...]

# MllamaVisionConfig.supported_aspect_ratios for max_num_tiles=4 has 8 entries; the aspect-ratio
# embeddings have max_aspect_ratio_id + 1 = 9 rows.
_ASPECT_RATIO_ROWS = 9


@dataclass(frozen=True)
class MllamaShape:
    """The config values that decide Mllama's parameter shapes (names follow MllamaConfig)."""

    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    text_layers: int
    cross_attention_layers: Tuple[int, ...]
    vocab: int                    # the embedding has vocab + 8 rows, lm_head has vocab
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    vision_layers: int
    vision_global_layers: int
    image_size: int
    patch_size: int
    max_num_tiles: int
    intermediate_layers_indices: Tuple[int, ...]

    # How the generator saves it: llama-cookbook's {"model": ..., "optim": ...}, so DCP keys are "model.<name>".
    DCP_PREFIX: ClassVar[str] = "model."
    SAVED_BY: ClassVar[str] = "llama-cookbook {'model': ..., 'optim': ...}"

    @property
    def vision_output_dim(self) -> int:
        # the vision model concatenates the final state with one per intermediate layer
        return self.vision_hidden * (len(self.intermediate_layers_indices) + 1)


# Llama 3.2 11B Vision (meta-llama/Llama-3.2-11B-Vision config.json).
LLAMA_32_11B_VISION = MllamaShape(
    text_hidden=4096, text_intermediate=14336, text_heads=32, text_kv_heads=8, text_layers=40,
    cross_attention_layers=(3, 8, 13, 18, 23, 28, 33, 38), vocab=128256,
    vision_hidden=1280, vision_intermediate=5120, vision_heads=16, vision_layers=32, vision_global_layers=8,
    image_size=560, patch_size=14, max_num_tiles=4, intermediate_layers_indices=(3, 7, 15, 23, 30),
)


def _scaled(text_layers: int, vision_layers: int) -> MllamaShape:
    """A narrower Llama-3.2-Vision-like model (hidden 2048, vocab 32000) for quick runs."""
    return MllamaShape(
        text_hidden=2048, text_intermediate=8192, text_heads=16, text_kv_heads=4, text_layers=text_layers,
        cross_attention_layers=tuple(range(3, text_layers, 5)), vocab=32000,
        vision_hidden=768, vision_intermediate=3072, vision_heads=12, vision_layers=vision_layers,
        vision_global_layers=2, image_size=224, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=(1, 3),
    )


# A few hundred KB, for tests and a smoke run of the harness.
TINY = MllamaShape(
    text_hidden=64, text_intermediate=128, text_heads=4, text_kv_heads=2, text_layers=5,
    cross_attention_layers=(3,), vocab=256,
    vision_hidden=32, vision_intermediate=64, vision_heads=2, vision_layers=2, vision_global_layers=1,
    image_size=28, patch_size=14, max_num_tiles=4, intermediate_layers_indices=(0,),
)

Preset = Union[MllamaShape, Qwen3MoeShape]

# name -> shape; the scaled names are the size in bfloat16 (GB = 10**9 bytes), fp32 is twice that.
PRESETS: Dict[str, Preset] = {
    "tiny": TINY,
    "1gb": _scaled(text_layers=6, vision_layers=4),
    "2gb": _scaled(text_layers=14, vision_layers=4),
    "4gb": _scaled(text_layers=30, vision_layers=8),
    "llama-3.2-11b-vision": LLAMA_32_11B_VISION,
    **moe_presets.MOE_PRESETS,
}


def tensor_specs(cfg: Preset) -> List[Tuple[str, Shape]]:
    """(name, shape) of every tensor the preset's checkpoint holds, in its state dict's order: for an Mllama
    preset MllamaForConditionalGeneration.state_dict(), for a MoE preset torchtitan's Qwen3Model.state_dict()."""
    if isinstance(cfg, Qwen3MoeShape):
        return moe_presets.tensor_specs(cfg)
    specs: List[Tuple[str, Shape]] = []

    def add(name: str, *shape: int) -> None:
        specs.append((name, tuple(shape)))

    hv, iv = cfg.vision_hidden, cfg.vision_intermediate
    patches = (cfg.image_size // cfg.patch_size) ** 2 + 1
    v = "model.vision_model"
    add(f"{v}.class_embedding", hv)
    add(f"{v}.patch_embedding.weight", hv, 3, cfg.patch_size, cfg.patch_size)
    add(f"{v}.gated_positional_embedding.gate", 1)
    add(f"{v}.gated_positional_embedding.embedding", patches, hv)
    add(f"{v}.gated_positional_embedding.tile_embedding.weight", _ASPECT_RATIO_ROWS, cfg.max_num_tiles * patches * hv)
    for tile in ("pre_tile_positional_embedding", "post_tile_positional_embedding"):
        add(f"{v}.{tile}.gate", 1)
        add(f"{v}.{tile}.embedding.weight", _ASPECT_RATIO_ROWS, cfg.max_num_tiles * hv)
    for norm in ("layernorm_pre", "layernorm_post"):
        add(f"{v}.{norm}.weight", hv)
        add(f"{v}.{norm}.bias", hv)
    for encoder, count, gated in (("transformer", cfg.vision_layers, False),
                                  ("global_transformer", cfg.vision_global_layers, True)):
        for i in range(count):
            p = f"{v}.{encoder}.layers.{i}"
            if gated:  # a module's own parameters come before its children's
                add(f"{p}.gate_attn", 1)
                add(f"{p}.gate_ffn", 1)
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                add(f"{p}.self_attn.{proj}.weight", hv, hv)
            add(f"{p}.mlp.fc1.weight", iv, hv)
            add(f"{p}.mlp.fc1.bias", iv)
            add(f"{p}.mlp.fc2.weight", hv, iv)
            add(f"{p}.mlp.fc2.bias", hv)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                add(f"{p}.{norm}.weight", hv)
                add(f"{p}.{norm}.bias", hv)

    h, inter = cfg.text_hidden, cfg.text_intermediate
    head_dim = h // cfg.text_heads
    q_out, kv_out = cfg.text_heads * head_dim, cfg.text_kv_heads * head_dim
    t = "model.language_model"
    add(f"{t}.embed_tokens.weight", cfg.vocab + 8, h)
    for i in range(cfg.text_layers):
        p = f"{t}.layers.{i}"
        if i in cfg.cross_attention_layers:
            add(f"{p}.cross_attn_attn_gate", 1)
            add(f"{p}.cross_attn_mlp_gate", 1)
            attn = "cross_attn"
        else:
            attn = "self_attn"
        add(f"{p}.{attn}.q_proj.weight", q_out, h)
        add(f"{p}.{attn}.k_proj.weight", kv_out, h)
        add(f"{p}.{attn}.v_proj.weight", kv_out, h)
        add(f"{p}.{attn}.o_proj.weight", h, q_out)
        if attn == "cross_attn":
            add(f"{p}.cross_attn.q_norm.weight", head_dim)
            add(f"{p}.cross_attn.k_norm.weight", head_dim)
            add(f"{p}.input_layernorm.weight", h)
            mlp_then_norms = ("mlp", "post_attention_layernorm")
        else:
            mlp_then_norms = ("mlp", "input_layernorm", "post_attention_layernorm")
        for part in mlp_then_norms:
            if part == "mlp":
                add(f"{p}.mlp.gate_proj.weight", inter, h)
                add(f"{p}.mlp.up_proj.weight", inter, h)
                add(f"{p}.mlp.down_proj.weight", h, inter)
            else:
                add(f"{p}.{part}.weight", h)
    add(f"{t}.norm.weight", h)
    add("model.multi_modal_projector.weight", h, cfg.vision_output_dim)
    add("model.multi_modal_projector.bias", h)
    add("lm_head.weight", cfg.vocab, h)
    return specs


def num_params(cfg: Preset) -> int:
    return sum(math.prod(shape) for _, shape in tensor_specs(cfg))


def output_specs(cfg: Preset, naming: str) -> List[Tuple[str, str, Shape, int]]:
    """(output name, checkpoint name, shape, first element in the checkpoint tensor) of what a conversion writes.
    naming "stored": the checkpoint's own names, each tensor whole (a conversion with --source-format hf, the
    baselines); "hf": Hugging Face's (a MoE preset's experts unstacked; an Mllama preset already has HF names)."""
    if naming == "hf" and isinstance(cfg, Qwen3MoeShape):
        return moe_presets.hf_outputs(cfg)
    if naming not in ("hf", "stored"):
        raise ValueError(f"unknown naming {naming!r} (hf or stored)")
    return [(name, name, shape, 0) for name, shape in tensor_specs(cfg)]


def transformers_config(cfg: MllamaShape):
    """The equivalent transformers MllamaConfig (imports transformers)."""
    from transformers import MllamaConfig

    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads,
                num_hidden_layers=cfg.text_layers, cross_attention_layers=list(cfg.cross_attention_layers),
                vocab_size=cfg.vocab, tie_word_embeddings=False,
                # the real config's special token ids (128000+) do not fit a scaled-down vocabulary
                pad_token_id=min(128004, cfg.vocab - 1), bos_token_id=min(128000, cfg.vocab - 1),
                eos_token_id=min(128001, cfg.vocab - 1))
    vision = dict(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                  attention_heads=cfg.vision_heads, num_hidden_layers=cfg.vision_layers,
                  num_global_layers=cfg.vision_global_layers, image_size=cfg.image_size,
                  patch_size=cfg.patch_size, max_num_tiles=cfg.max_num_tiles,
                  intermediate_layers_indices=list(cfg.intermediate_layers_indices),
                  vision_output_dim=cfg.vision_output_dim)
    return MllamaConfig(text_config=text, vision_config=vision)


def check_against_transformers(name: str) -> str:
    """Build the preset on the meta device with transformers; raise if any name/shape/order differs."""
    import torch
    from transformers import MllamaForConditionalGeneration

    cfg = PRESETS[name]
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(transformers_config(cfg))
    theirs = [(k, tuple(t.shape)) for k, t in model.state_dict().items()]
    ours = tensor_specs(cfg)
    if theirs != ours:
        only_theirs = [x for x in theirs if x not in ours][:5]
        only_ours = [x for x in ours if x not in theirs][:5]
        raise AssertionError(f"{name}: transformers has {only_theirs} not in ours; ours has {only_ours} not in theirs"
                             + ("" if only_theirs or only_ours else " (same entries, different order)"))
    return f"{name}: {len(ours)} tensors, {num_params(cfg):,} parameters - matches transformers"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.presets", description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="compare every Mllama preset with transformers' meta-device model")
    args = parser.parse_args(argv)
    for name, cfg in PRESETS.items():
        n = num_params(cfg)
        print(f"{name:22s} {len(tensor_specs(cfg)):5d} tensors {n:>15,d} params "
              f"bf16 {2 * n / 1e9:6.2f} GB  fp32 {4 * n / 1e9:6.2f} GB")
    if args.check:   # the MoE presets are checked against torchtitan's own model by tests/test_benchmarks.py
        for name, cfg in PRESETS.items():
            if isinstance(cfg, MllamaShape):
                print(check_against_transformers(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
