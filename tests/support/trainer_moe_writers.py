"""torchtitan 0.3 Mixture-of-Experts checkpoints written by torchtitan's own model code (marker `trainers`).

`build(out_dir, ...)` runs torchtitan's `Qwen3Model` (a tiny Qwen3-MoE: QK-norm, 4 routed experts as grouped
`[E, F, D]` parameters, top-2 softmax router) on 2 gloo ranks, sharded with FSDP2 per layer + root (or, with
`expert_parallel=2`, by torchtitan's own `parallelize_qwen3`: experts sharded over an EP mesh), trains one
AdamW step on tokens through its own forward, and saves what torchtitan's CheckpointManager saves at the last step
with `last_save_model_only` (its `ModelWrapper(model).state_dict()`, cast to `export_dtype`) by `dcp.save`.

Rank 0 also writes:
* `base/config.json` — the Hugging Face `Qwen3MoeConfig` of the same model (what --config-from gets; no weights);
* `trained.pt` — the gathered trained state dict in torchtitan's names (`full_tensor()` of every DTensor);
* `hf_export.pt` — torchtitan's own `Qwen3StateDictAdapter.to_hf` of it (a reference, not the oracle);
* `logits.pt` — the exported torchtitan model's own logits on `ids()`, computed in fp32: torchtitan casts expert
  math to bf16 (`GroupedExperts.forward`), so the experts run through `fp32_experts` instead (same formula).

CPU shims (see /work/shared/docs/trainers-on-cpu.md): torchtitan's MoE triton kernels module is stubbed and
SDPA replaces flex attention (`trainer_writers.shim_torchtitan`).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from tests.support import trainer_writers as tw
from streamconv.demo_checkpoint import run_distributed

QWEN3_MOE = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                 intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[])
LR = 1e-2


def ids() -> torch.Tensor:
    return torch.arange(24).reshape(2, 12) * 7 % QWEN3_MOE["vocab_size"]


def qwen3_moe_config(load_balance: bool = True):
    """The tiny Qwen3-MoE in torchtitan's own config classes (`_build_qwen3_moe_layers`, as its `debugmodel_moe`).
    `load_balance=False` builds it without the load-balancing expert bias (`load_balance_coeff=None`)."""
    tw.shim_torchtitan()
    from torchtitan.models import qwen3 as Q
    from torchtitan.models.common import attention
    from torchtitan.models.common.rope import CosSinRoPE
    Q.get_attention_config = lambda backend: attention.ScaledDotProductAttention.Config()
    c = QWEN3_MOE
    dim, vocab, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    layers = Q._build_qwen3_moe_layers(
        n_layers=c["num_hidden_layers"], dim=dim, n_heads=c["num_attention_heads"],
        n_kv_heads=c["num_key_value_heads"], head_dim=hd, moe_hidden_dim=c["moe_intermediate_size"],
        num_experts=c["num_experts"], top_k=c["num_experts_per_tok"], attn_backend="sdpa",
        moe_comm_backend="standard", rope=CosSinRoPE.Config(dim=hd, max_seq_len=64, theta=c["rope_theta"]))
    if not load_balance:
        for layer in layers:
            layer.moe.load_balance_coeff = None
    return Q.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=Q._qwen3_norm(dim), enable_weight_tying=False,
        tok_embeddings=Q.Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=Q._EMBEDDING_INIT),
        lm_head=Q.Linear.Config(in_features=dim, out_features=vocab, param_init=Q._LINEAR_INIT),
        layers=layers)


DEEPSEEK_V3 = dict(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4,
                   routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
                   qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                   norm_topk_prob=True, rope_interleave=True, max_position_embeddings=64, rms_norm_eps=1e-5,
                   tie_word_embeddings=False, rope_theta=10000.0)


def deepseek_v3_config():
    """A tiny DeepSeek-V3 in torchtitan's own config classes (`_build_dsv3_layers`, as its `debugmodel`): MLA with
    q LoRA, one dense first layer, then MoE layers with a shared expert and group-limited sigmoid routing."""
    tw.shim_torchtitan()
    from torchtitan.models import deepseek_v3 as D
    from torchtitan.models.common import attention
    from torchtitan.models.common.rope import ComplexRoPE
    D.get_attention_config = lambda backend: attention.ScaledDotProductAttention.Config()
    c = DEEPSEEK_V3
    dim, vocab = c["hidden_size"], c["vocab_size"]
    layers = D._build_dsv3_layers(
        n_layers=c["num_hidden_layers"], n_dense_layers=c["first_k_dense_replace"], dim=dim,
        n_heads=c["num_attention_heads"], q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
        qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
        mscale=1.0, dense_hidden_dim=c["intermediate_size"], moe_hidden_dim=c["moe_intermediate_size"],
        num_experts=c["n_routed_experts"], num_shared_experts=c["n_shared_experts"],
        router_top_k=c["num_experts_per_tok"], router_score_func="sigmoid", router_num_expert_groups=c["n_group"],
        router_num_limited_groups=c["topk_group"], router_route_scale=c["routed_scaling_factor"],
        router_route_norm=c["norm_topk_prob"], attn_backend="sdpa", moe_comm_backend="standard",
        non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=c["qk_rope_head_dim"], max_seq_len=64, theta=c["rope_theta"]))
    return D.DeepSeekV3Model.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=D.Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=D._EMBEDDING_INIT),
        norm=D.RMSNorm.Config(normalized_shape=dim, param_init=D._NORM_INIT),
        lm_head=D.Linear.Config(in_features=dim, out_features=vocab, param_init=D._output_linear_init(dim)),
        layers=layers)


def fp32_experts(self, x_RD, num_tokens_per_expert_E):
    """torchtitan's `GroupedExperts.forward` (silu(x w1^T) * (x w3^T)) w2^T per expert over its token run, in
    fp32 instead of bf16."""
    w1, w2, w3 = (w.to_local() if hasattr(w, "to_local") else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
    out, start = [], 0
    for e, n in enumerate(num_tokens_per_expert_E.tolist()):
        x = x_RD[start:start + n].float()
        out.append((F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T)
        start += n
    return torch.cat(out).type_as(x_RD) if out else x_RD[:0]


def fp32_logits(config, state) -> torch.Tensor:
    from torchtitan.models.common.moe import GroupedExperts
    model = config.build()
    model.load_state_dict(state, strict=True)
    original = GroupedExperts.forward
    GroupedExperts.forward = fp32_experts
    try:
        with torch.no_grad():
            return model.eval()(ids()).float()
    finally:
        GroupedExperts.forward = original


def _fsdp2(model, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values() if hasattr(model.layers, "values") else model.layers.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _expert_parallel(model, config, world_size: int, ep: int, parallelize=None) -> None:
    """torchtitan's own `parallelize_qwen3` (or the family's `parallelize`, e.g. `parallelize_gptoss`) with FSDP
    over all ranks and expert parallel `ep` (experts sharded on dim 0 over the EP mesh, all-to-all token
    dispatch). CPU shims: its mesh device type is "cpu" (it asks CUDA), the `partial_dtensor` SPMD backend, and
    plain sum reductions (gloo has no PREMUL_SUM; one step only has to move every weight)."""
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.models.qwen3.parallelize import parallelize_qwen3
    parallel_dims.device_type = "cpu"
    dist_utils.set_spmd_backend("partial_dtensor")
    parallelism = ParallelismConfig(expert_parallel_degree=ep, data_parallel_shard_degree=world_size,
                                    spmd_backend="partial_dtensor")
    dims = parallel_dims.ParallelDims.from_config(parallelism, world_size)
    dims.build_mesh()
    (parallelize or parallelize_qwen3)(model, parallel_dims=dims, training=TrainingConfig(), parallelism=parallelism,
                      compile_config=CompileConfig(), ac_config=None, dump_folder="")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)


def _family(family: str, load_balance: bool):
    """(torchtitan config, its state-dict adapter class, the Hugging Face config) of a family."""
    if family == "deepseek_v3":
        config = deepseek_v3_config()       # first: it applies the CPU shims the imports below need
        from torchtitan.models.deepseek_v3 import DeepSeekV3StateDictAdapter
        from transformers import DeepseekV3Config
        return config, DeepSeekV3StateDictAdapter, DeepseekV3Config(**DEEPSEEK_V3)
    config = qwen3_moe_config(load_balance)
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter
    from transformers import Qwen3MoeConfig
    return config, Qwen3StateDictAdapter, Qwen3MoeConfig(**QWEN3_MOE)


def write_qwen3_moe(rank: int, world_size: int, out_dir: str, export_dtype: str = "float32",
                    load_balance: bool = True, expert_parallel: int = 1, family: str = "qwen3") -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    torch.set_num_threads(1)
    out = Path(out_dir)
    config, adapter_class, hf_config = _family(family, load_balance)
    from torchtitan.components.checkpointer.base import ModelWrapper
    from torchtitan.models.qwen3.sharding import set_qwen3_sharding_config
    if expert_parallel > 1:     # what Qwen3Model.Config.update_from_config does for an EP job
        set_qwen3_sharding_config(config, enable_sp=False, enable_ep=True)
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    with torch.no_grad():   # a load-balancing bias training moved (torchtitan's optimizer hook), so routing uses it
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias_E") and family == "deepseek_v3":
                buffer.uniform_(-0.05, 0.05)
    if rank == 0:
        hf_config.save_pretrained(out / "base")
    if expert_parallel > 1:
        _expert_parallel(model, config, world_size, expert_parallel)
    else:
        _fsdp2(model, world_size)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = torch.randint(0, QWEN3_MOE["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(100 + rank))
    model(tokens).float().logsumexp(-1).mean().backward()
    optim.step()
    # CheckpointManager._save_last_step with last_save_model_only: the model wrapper's state dict, floats cast to
    # export_dtype, saved by dcp.save into step-N (here `ckpt`).
    dtype = getattr(torch, export_dtype)
    states = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype else v
              for k, v in ModelWrapper(model).state_dict().items()}
    dcp.save(states, checkpoint_id=str(out / "ckpt"))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    if rank == 0:
        exported = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        torch.save(exported, out / "trained.pt")
        torch.save(adapter_class(config, None).to_hf(exported), out / "hf_export.pt")
        # the model as exported (bf16 export: the rounded weights), run in fp32
        torch.save(fp32_logits(_family(family, load_balance)[0], {k: v.float() for k, v in exported.items()}),
                   out / "logits.pt")
    dist.barrier()


DS_RENAME = {"attention.wq_a.weight": "self_attn.q_a_proj.weight", "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
             "attention.wq_b.weight": "self_attn.q_b_proj.weight",
             "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
             "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
             "attention.wkv_b.weight": "self_attn.kv_b_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
             "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
             "feed_forward.w3.weight": "mlp.up_proj.weight", "moe.router.gate.weight": "mlp.gate.weight",
             "moe.expert_bias_E": "mlp.gate.e_score_correction_bias",
             "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
             "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
             "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight"}


def to_hf(state, family: str = "qwen3"):
    """The gathered torchtitan state dict in Hugging Face Qwen3-MoE (or DeepSeek-V3) names, with torch ops:
    grouped experts unbound per expert, everything else renamed (the test's independent mapping)."""
    rename = DS_RENAME if family == "deepseek_v3" else {"attention.qkv_linear.wq.weight": "self_attn.q_proj.weight",
              "attention.qkv_linear.wk.weight": "self_attn.k_proj.weight",
              "attention.qkv_linear.wv.weight": "self_attn.v_proj.weight",
              "attention.wo.weight": "self_attn.o_proj.weight", "attention.q_norm.weight": "self_attn.q_norm.weight",
              "attention.k_norm.weight": "self_attn.k_norm.weight", "attention_norm.weight": "input_layernorm.weight",
              "ffn_norm.weight": "post_attention_layernorm.weight", "moe.router.gate.weight": "mlp.gate.weight"}
    experts = {"w1_EFD": "gate_proj", "w3_EFD": "up_proj", "w2_EDF": "down_proj"}
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["lm_head.weight"]}
    for i in range(QWEN3_MOE["num_hidden_layers"] if family == "qwen3" else DEEPSEEK_V3["num_hidden_layers"]):
        for src, dst in rename.items():
            if f"layers.{i}.{src}" in state:
                out[f"model.layers.{i}.{dst}"] = state[f"layers.{i}.{src}"]
        for src, dst in experts.items():
            grouped = state.get(f"layers.{i}.moe.routed_experts.inner_experts.{src}")
            for e, w in enumerate(grouped.unbind(0) if grouped is not None else ()):
                out[f"model.layers.{i}.mlp.experts.{e}.{dst}.weight"] = w
    return out


def build(out_dir, *, export_dtype: str = "float32", load_balance: bool = True, expert_parallel: int = 1,
          family: str = "qwen3", world_size: int = 2) -> Path:
    out = Path(out_dir)
    run_distributed(f"{__name__}:write_qwen3_moe", world_size,
                    {"out_dir": str(out), "export_dtype": export_dtype, "load_balance": load_balance,
                     "expert_parallel": expert_parallel, "family": family},
                    timeout_s=600)
    return out
