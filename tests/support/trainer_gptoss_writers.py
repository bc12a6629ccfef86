"""torchtitan 0.3 GPT-OSS checkpoints written by torchtitan's own model code (marker `trainers`).

`build(out_dir)` runs torchtitan's `GptOssModel` (a tiny GPT-OSS: attention sinks, biases on every linear layer,
4 routed experts as `mlp1_weight_EGD` [E, 2F, D] with gate/up rows interleaved and `mlp2_weight_EDF` [E, D, F],
a top-2 softmax router with a bias) on 2 gloo ranks, FSDP2 per layer + root, trains one AdamW step and saves what
torchtitan's CheckpointManager saves with `last_save_model_only` (`ModelWrapper(model).state_dict()`) by
`dcp.save`, as `trainer_moe_writers` does for Qwen3-MoE; with `expert_parallel=2`, sharded by torchtitan's own
`parallelize_gptoss` instead (experts split on dim 0 over the EP mesh, the rest FSDP), as the Qwen3-MoE EP case.

Rank 0 also writes `base/config.json` (the Hugging Face `GptOssConfig` of the same model), `trained.pt` (the
gathered state dict in torchtitan's names), `hf_export.pt` (torchtitan's own `GptOssStateDictAdapter.to_hf`: in
0.3.0 it has no routed-expert tensor, its map says `mlp1_weight`) and `logits.pt` (the torchtitan model's own
logits on `trainer_moe_writers.ids()`, in fp32).

CPU shims beyond `trainer_writers.shim_torchtitan` (training uses SDPA, which ignores the sinks; only the weights
matter there): for the logits, the experts run in fp32 (`fp32_experts`: torchtitan casts expert math to bf16) and
attention is computed eagerly with its log-sum-exp handed to the model's own sink hook (`eager_attention`: what
flex attention returns on GPU).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.support import trainer_moe_writers as mw
from tests.support import trainer_writers as tw
from streamconv.demo_checkpoint import run_distributed

GPT_OSS = dict(vocab_size=101, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
               max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 150000.0})


def gpt_oss_config():
    """The tiny GPT-OSS in torchtitan's own config classes (`_build_gptoss_layers`, as its `debugmodel`; plain
    RoPE instead of YaRN, no load-balancing bias)."""
    tw.shim_torchtitan()
    from torchtitan.models import gpt_oss as G
    from torchtitan.models.common import attention
    from torchtitan.models.common.rope import CosSinRoPE
    G.get_attention_config = lambda backend: attention.ScaledDotProductAttention.Config()
    c = GPT_OSS
    dim, vocab, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    layers = G._build_gptoss_layers(
        fuse_qkv=True, dim=dim, n_layers=c["num_hidden_layers"], hidden_dim=c["intermediate_size"],
        num_experts=c["num_local_experts"], top_k=c["num_experts_per_tok"], load_balance_coeff=None,
        attn_backend="sdpa", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=hd, max_seq_len=64, theta=c["rope_parameters"]["rope_theta"]))
    rope = layers[0].attention.rope
    for i, layer in enumerate(layers):     # the builder takes the 20B's head geometry: the tiny one's instead
        layer.attention = G._make_gptoss_attn_config(
            dim=dim, layer_id=i, attn_backend="sdpa", n_heads=c["num_attention_heads"],
            n_kv_heads=c["num_key_value_heads"], head_dim=hd, fuse_qkv=True, rope=rope,
            sliding_window_size=layer.attention.sliding_window_size)
    return G.GptOssModel.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=G.Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=G._EMBEDDING_INIT),
        norm=G.RMSNorm.Config(normalized_shape=dim, param_init=G._NORM_INIT),
        lm_head=G.Linear.Config(in_features=dim, out_features=vocab, param_init=G._output_linear_init(dim)),
        layers=layers)


def fp32_experts(self, x_RD, num_tokens_per_expert_E):
    """torchtitan's `GptOssGroupedExperts.forward` (its own `swiglu` on the interleaved gate/up rows, biases) per
    expert over its token run, in fp32 instead of bf16; rows past the routed tokens (padding) stay zero."""
    from torchtitan.models.gpt_oss.moe import swiglu
    w1, b1, w2, b2 = (w.to_local() if hasattr(w, "to_local") else w
                      for w in (self.mlp1_weight_EGD, self.mlp1_bias_EG, self.mlp2_weight_EDF, self.mlp2_bias_ED))
    out, start = torch.zeros(x_RD.shape[0], w2.shape[1], dtype=torch.float32), 0
    for e, n in enumerate(num_tokens_per_expert_E.tolist()):
        x = x_RD[start:start + n].float()
        h = swiglu(x @ w1[e].float().T + b1[e].float(), limit=self.swiglu_limit)
        out[start:start + n] = h @ w2[e].float().T + b2[e].float()
        start += n
    return out.type_as(x_RD)


def eager_attention(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, scale=None, enable_gqa=False,
                    is_causal=True, out_transform=None, **kwargs):
    """Causal attention computed eagerly, its log-sum-exp handed to `out_transform` (GPT-OSS's sink rescale) as
    flex attention hands it on GPU."""
    q, k, v = (t.transpose(1, 2).float() for t in (q_BLNH, k_BLNH, v_BLNH))
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    length = q.shape[2]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).type_as(q_BLNH)
    return out if out_transform is None else out_transform(out, scores.logsumexp(-1).transpose(1, 2))


class _Patched:
    """GPT-OSS experts in fp32 and, with `attention=True`, eager attention with sinks."""

    def __init__(self, attention: bool):
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.gpt_oss.moe import GptOssGroupedExperts
        self.patches = [(GptOssGroupedExperts, "forward", fp32_experts)]
        if attention:
            self.patches.append((ScaledDotProductAttention, "forward", eager_attention))

    def __enter__(self):
        self.saved = [(cls, name, getattr(cls, name)) for cls, name, _ in self.patches]
        for cls, name, fn in self.patches:
            setattr(cls, name, fn)

    def __exit__(self, *exc):
        for cls, name, fn in self.saved:
            setattr(cls, name, fn)


def fp32_logits(state) -> torch.Tensor:
    model = gpt_oss_config().build()
    model.load_state_dict(state, strict=True)
    with _Patched(attention=True), torch.no_grad():
        return model.eval()(mw.ids()).float()


def write_gpt_oss(rank: int, world_size: int, out_dir: str, export_dtype: str = "float32",
                  expert_parallel: int = 1) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpointer.base import ModelWrapper
    torch.set_num_threads(1)
    out = Path(out_dir)
    config = gpt_oss_config()
    from torchtitan.models.gpt_oss import GptOssStateDictAdapter
    from transformers import GptOssConfig
    if expert_parallel > 1:     # what GptOssModel.Config.update_from_config does for an EP job
        from torchtitan.models.gpt_oss.sharding import set_gpt_oss_sharding_config
        set_gpt_oss_sharding_config(config, enable_sp=False, enable_ep=True)
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    if rank == 0:
        GptOssConfig(**GPT_OSS).save_pretrained(out / "base")
    if expert_parallel > 1:
        from torchtitan.models.gpt_oss.parallelize import parallelize_gptoss
        mw._expert_parallel(model, config, world_size, expert_parallel, parallelize=parallelize_gptoss)
    else:
        mw._fsdp2(model, world_size)
    optim = torch.optim.AdamW(model.parameters(), lr=mw.LR)
    tokens = torch.randint(0, GPT_OSS["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(100 + rank))
    with _Patched(attention=False):
        model(tokens).float().logsumexp(-1).mean().backward()
    optim.step()
    dtype = getattr(torch, export_dtype)
    states = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
              for k, v in ModelWrapper(model).state_dict().items()}
    dcp.save(states, checkpoint_id=str(out / "ckpt"))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    if rank == 0:
        exported = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        torch.save(exported, out / "trained.pt")
        torch.save(GptOssStateDictAdapter(config, None).to_hf(exported), out / "hf_export.pt")
        torch.save(fp32_logits({k: v.float() for k, v in exported.items()}), out / "logits.pt")
    dist.barrier()


RENAME = {"attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
          "attention.sinks": "self_attn.sinks", "attention_norm.weight": "input_layernorm.weight",
          "ffn_norm.weight": "post_attention_layernorm.weight", "moe.router.gate.weight": "mlp.router.weight",
          "moe.router.gate.bias": "mlp.router.bias",
          "moe.routed_experts.inner_experts.mlp1_bias_EG": "mlp.experts.gate_up_proj_bias",
          "moe.routed_experts.inner_experts.mlp2_bias_ED": "mlp.experts.down_proj_bias",
          **{f"attention.qkv_linear.w{p}.{kind}": f"self_attn.{p}_proj.{kind}"
             for p in "qkv" for kind in ("weight", "bias")}}


def to_hf(state):
    """The gathered torchtitan state dict in Hugging Face GPT-OSS names, with torch ops (the test's own mapping):
    the grouped expert weights transposed to transformers' [E, in, out] (`gate_up_proj` [E, D, 2F] keeps the
    gate/up interleave on its last dim, as `GptOssExperts._apply_gate` reads it), everything else renamed."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(GPT_OSS["num_hidden_layers"]):
        for src, dst in RENAME.items():
            out[f"model.layers.{i}.{dst}"] = state[f"layers.{i}.{src}"]
        experts = f"layers.{i}.moe.routed_experts.inner_experts."
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = state[experts + "mlp1_weight_EGD"].transpose(1, 2).contiguous()
        out[f"model.layers.{i}.mlp.experts.down_proj"] = state[experts + "mlp2_weight_EDF"].transpose(1, 2).contiguous()
    return out


def build(out_dir, *, export_dtype: str = "float32", world_size: int = 2, expert_parallel: int = 1) -> Path:
    out = Path(out_dir)
    run_distributed(f"{__name__}:write_gpt_oss", world_size, {"out_dir": str(out), "export_dtype": export_dtype,
                                                               "expert_parallel": expert_parallel},
                    timeout_s=600)
    return out
