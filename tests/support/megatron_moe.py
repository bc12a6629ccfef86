"""megatron-core's own Mixture-of-Experts GPT models on CPU gloo ranks, the truth for the megatron-gpt MoE mapping.

`build_real_moe(out, spec)` runs megatron-core 0.16 (`GPTModel`, local layer specs, `dist_checkpointing.save`)
on `tp * ep` CPU gloo ranks and keeps Megatron's own logits beside the checkpoint. A spec (`MoESpec`) says which
Hugging Face family the model is shaped like:

* Qwen3-MoE: QK-norm (`qk_layernorm`), every layer MoE (the layer-stacked keys), top-k then softmax over the
  chosen experts (HF `norm_topk_prob: true`), no shared expert;
* Qwen2-MoE: qkv bias (`add_qkv_bias`), a gated shared expert (`moe_shared_expert_gate`), softmax over all
  experts then top-k (`moe_router_pre_softmax`, HF `norm_topk_prob: false`), and, with `dense_first`, a dense
  first layer (`moe_layer_freq=[0, 1, ...]`, HF `mlp_only_layers=[0]`): layers not all alike, so Megatron saves
  one key per layer (`decoder.layers.{i}.*`) instead of the stacked ones.

`singleton` saves with `singleton_local_shards` (one key per layer and expert, GLU halves apart).
`padded_vocab` builds Megatron's model with a vocabulary padded beyond the config's `vocab_size` (as Megatron-LM
does with `--make-vocab-size-divisible-by`); its logits are compared on the config's vocabulary.

CPU shims (besides those of `megatron_writers._real_rank`): the MoE router's `te_general_gemm` is missing without
Transformer Engine (set to None so the torch path runs); the `allgather` token dispatcher (the `alltoall` one
makes a CUDA stream).

`megatron_to_hf_moe` is the reference mapping with torch ops (views, chunk, index) of torch's own reconstruction
of the checkpoint (`dcp_to_torch_save`), independent of streamconv's planner.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

HIDDEN, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2


@dataclass(frozen=True)
class MoESpec:
    family: str = "qwen3_moe"           # or "qwen2_moe"; "qwen3" / "qwen2" (dense: experts=0)
    tp: int = 1
    ep: int = 1
    groups: int = 2
    experts: int = 4
    topk: int = 2
    moe_ffn: int = 32
    ffn: int = 96                       # the dense layers' (dense_first)
    shared: int = 0                     # shared expert size (qwen2_moe)
    dense_first: bool = False
    vocab: int = 256                    # the config's vocab_size
    padded_vocab: Optional[int] = None  # Megatron's (rows of the embedding and output layer), when padded
    tied: bool = False
    singleton: bool = False             # dist_checkpointing metadata singleton_local_shards

    @property
    def megatron_vocab(self) -> int:
        return self.padded_vocab or self.vocab


def _config(spec: MoESpec):
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig
    qwen2 = spec.family.startswith("qwen2")
    moe = {} if not spec.experts else dict(
        num_moe_experts=spec.experts, moe_router_topk=spec.topk, moe_ffn_hidden_size=spec.moe_ffn,
        moe_router_pre_softmax=qwen2, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_shared_expert_intermediate_size=spec.shared or None,
        moe_shared_expert_gate=bool(spec.shared), moe_layer_freq=[0] + [1] * (LAYERS - 1) if spec.dense_first else 1)
    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=spec.groups,
        ffn_hidden_size=spec.ffn, kv_channels=HEAD_DIM, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=qwen2, qk_layernorm=not qwen2,
        layernorm_epsilon=1e-6, attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
        params_dtype=torch.float32, tensor_model_parallel_size=spec.tp, expert_model_parallel_size=spec.ep, **moe)


def _noise(model, rank: int) -> None:
    """Megatron's init plus seeded noise, so norms and biases are not constants: the same on every rank for a
    replicated parameter, the rank's own for a split one (tensor parallel) or an expert-parallel one."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            split = getattr(p, "tensor_model_parallel", False) or not getattr(p, "allreduce", True)
            g = torch.Generator().manual_seed(1000 * i + (rank if split else 0))
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _real_rank(out_dir: str, spec: MoESpec) -> None:
    """One rank (env RANK, WORLD_SIZE, MASTER_PORT)."""
    import contextlib

    import torch.distributed as dist
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils
    moe_utils.te_general_gemm = None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=spec.tp,
                                             expert_model_parallel_size=spec.ep)
    torch.manual_seed(0)
    cfg = _config(spec)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                                                                  normalization="RMSNorm"),
                     vocab_size=spec.megatron_vocab, max_sequence_length=64, position_embedding_type="rope",
                     share_embeddings_and_output_weights=spec.tied, parallel_output=False)
    _noise(model, rank)
    model.eval()
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    ids = torch.randint(0, spec.vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    causal = torch.triu(torch.ones(1, 1, 16, 16), diagonal=1).bool()     # True: masked
    with torch.no_grad():
        logits = model(ids, pos, causal)[..., :spec.vocab]
    metadata = {"singleton_local_shards": True} if spec.singleton else None
    dist_checkpointing.save(model.sharded_state_dict(metadata=metadata), out_dir)
    if rank == 0:
        torch.save({"input_ids": ids, "logits": logits}, out_dir + ".logits.pt")
    dist.destroy_process_group()


def build_real_moe(out: Path, spec: MoESpec, *, timeout_s: float = 600) -> Path:
    """megatron-core's own checkpoint at `out/ckpt` (and Megatron's logits at `out/ckpt.logits.pt`)."""
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = spec.tp * spec.ep
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, __file__, str(ckpt), json.dumps(dataclasses.asdict(spec))],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = [p.communicate(timeout=timeout_s)[0].decode(errors="replace") for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("megatron-core run failed:\n" + "\n".join(log[-3000:] for log in logs))
    return ckpt


def hf_config(out: Path, spec: MoESpec) -> Path:
    """`out/base/config.json`: the Hugging Face config of the same model (Qwen3(-MoE) or Qwen2(-MoE))."""
    from transformers import Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig
    dense = dict(vocab_size=spec.vocab, hidden_size=HIDDEN, intermediate_size=spec.ffn, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, num_key_value_heads=spec.groups, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
                 tie_word_embeddings=spec.tied, max_position_embeddings=64,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, dtype="float32")
    common = dict(dense, num_experts=spec.experts, num_experts_per_tok=spec.topk, moe_intermediate_size=spec.moe_ffn,
                  mlp_only_layers=[0] if spec.dense_first else [])
    if spec.family == "qwen3":
        config = Qwen3Config(**dense)
    elif spec.family == "qwen2":
        config = Qwen2Config(**dense)
    elif spec.family == "qwen2_moe":
        config = Qwen2MoeConfig(**common, shared_expert_intermediate_size=spec.shared, norm_topk_prob=False,
                                qkv_bias=True)
    else:
        config = Qwen3MoeConfig(**common, norm_topk_prob=True)
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(base / "config.json"))
    return base


# -- Megatron -> HF with torch ops: the reference mapping -----------------------------------------------------


def _per_layer(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Stacked keys `decoder.layers.X` [L, ...] as per-layer keys `decoder.layers.{i}.X`; per-layer keys kept."""
    out = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        rest = key[len("decoder.layers."):] if key.startswith("decoder.layers.") else None
        if rest is not None and not rest.split(".", 1)[0].isdigit():
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i]
        else:
            out[key] = t
    return out


def _unsingleton(sd: Dict[str, torch.Tensor], experts: int) -> Dict[str, torch.Tensor]:
    """singleton_local_shards keys as the default ones: GLU halves `weight_w`/`weight_v` concatenated, the
    per-expert keys of a layer stacked on an expert dim."""
    out = {k: v for k, v in sd.items() if not k.endswith((".weight_w", ".weight_v"))}
    for key in [k for k in sd if k.endswith(".weight_w")]:
        out[key[:-2]] = torch.cat([sd[key], sd[key[:-1] + "v"]])
    for i in range(LAYERS):
        m = f"decoder.layers.{i}.mlp.experts.experts."
        for part in ("linear_fc1.weight", "linear_fc2.weight"):
            if m + f"0.{part}" in out:
                out[m + part] = torch.stack([out.pop(m + f"{e}.{part}") for e in range(experts)])
    return out


def _qkv(t: torch.Tensor, groups: int):
    """q, k, v of a Megatron linear_qkv weight or bias: per query group [q heads; k; v]."""
    per_group = HEADS // groups
    g = t.reshape(groups, (per_group + 2) * HEAD_DIM, *t.shape[1:])
    q, k, v = torch.split(g, [per_group * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=1)
    return [x.reshape(-1, *t.shape[1:]) for x in (q, k, v)]


def megatron_to_hf_moe(sd: Dict[str, torch.Tensor], spec: MoESpec) -> Dict[str, torch.Tensor]:
    """Megatron (stacked or per-layer keys) to Hugging Face Qwen3-MoE / Qwen2-MoE names, with torch ops."""
    sd = _unsingleton(_per_layer(sd), spec.experts)
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:spec.vocab],
           "model.norm.weight": sd["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in sd and not spec.tied:
        out["lm_head.weight"] = sd["output_layer.weight"][:spec.vocab]
    shared = "mlp.shared_expert"
    for i in range(LAYERS):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        for part, name in zip(_qkv(sd[m + "self_attention.linear_qkv.weight"], spec.groups), "qkv"):
            out[p + f"self_attn.{name}_proj.weight"] = part
        if m + "self_attention.linear_qkv.bias" in sd:
            for part, name in zip(_qkv(sd[m + "self_attention.linear_qkv.bias"], spec.groups), "qkv"):
                out[p + f"self_attn.{name}_proj.bias"] = part
        out[p + "self_attn.o_proj.weight"] = sd[m + "self_attention.linear_proj.weight"]
        for mk, hk in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
            if m + f"self_attention.{mk}.weight" in sd:
                out[p + f"self_attn.{hk}.weight"] = sd[m + f"self_attention.{mk}.weight"]
        out[p + "input_layernorm.weight"] = sd[m + "self_attention.linear_qkv.layer_norm_weight"]
        out[p + "post_attention_layernorm.weight"] = sd[m + "mlp.linear_fc1.layer_norm_weight"]
        if m + "mlp.linear_fc1.weight" in sd:       # a dense layer
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = torch.chunk(
                sd[m + "mlp.linear_fc1.weight"], 2, dim=0)
            out[p + "mlp.down_proj.weight"] = sd[m + "mlp.linear_fc2.weight"]
            continue
        out[p + "mlp.gate.weight"] = sd[m + "mlp.router.weight"]
        fc1, fc2 = sd[m + "mlp.experts.experts.linear_fc1.weight"], sd[m + "mlp.experts.experts.linear_fc2.weight"]
        for e in range(spec.experts):
            gate, up = torch.chunk(fc1[e], 2, dim=0)
            out[p + f"mlp.experts.{e}.gate_proj.weight"], out[p + f"mlp.experts.{e}.up_proj.weight"] = gate, up
            out[p + f"mlp.experts.{e}.down_proj.weight"] = fc2[e]
        if spec.shared:
            gate, up = torch.chunk(sd[m + "mlp.shared_experts.linear_fc1.weight"], 2, dim=0)
            out[p + f"{shared}.gate_proj.weight"], out[p + f"{shared}.up_proj.weight"] = gate, up
            out[p + f"{shared}.down_proj.weight"] = sd[m + "mlp.shared_experts.linear_fc2.weight"]
            out[p + "mlp.shared_expert_gate.weight"] = sd[m + "mlp.shared_experts.gate_weight"]
    return {k: v.contiguous() for k, v in out.items()}


if __name__ == "__main__":
    _real_rank(sys.argv[1], MoESpec(**json.loads(sys.argv[2])))


# -- torch's DCP writer in Megatron's expert-parallel layout (for checkpoints too big to make with megatron-core) --


def _moe_boxes(key: str, shape, rank: int, world: int):
    """[(offsets, sizes)] rank `rank` saves of `key`: routed experts split over the ranks on the expert dim (EP),
    one chunk per layer and expert, linear_fc1 as its gate and up halves (Megatron's SwiGLU factory); the rest
    whole, by rank 0."""
    if ".experts.experts." not in key:
        return [((0,) * len(shape), tuple(shape))] if rank == 0 else []
    layers, experts = shape[0], shape[1]
    mine = range(rank * experts // world, (rank + 1) * experts // world)
    halves = 2 if "linear_fc1" in key else 1
    rows = shape[2] // halves
    return [((i, e, h * rows, 0), (1, 1, rows, shape[3])) for i in range(layers) for e in mine for h in range(halves)]


def write_moe_layout(rank: int, world_size: int, out_dir: str, state_path: str) -> None:
    """Run on each gloo rank: save the tensors in `state_path` as `_moe_boxes` shards them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.load(state_path, weights_only=True, mmap=True)
    state = {}
    for key in sorted(full):
        t = full[key]
        shards = [Shard(t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].contiguous(),
                        ShardMetadata(list(offs), list(sizes), f"rank:{rank}/cpu"))
                  for offs, sizes in _moe_boxes(key, t.shape, rank, world_size)]
        state[key] = init_from_local_shards(shards, *t.shape)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir))
