"""Megatron-Core `torch_dist` checkpoints for the tests, made two ways.

1. `build_layout` — torch's own DCP writer (`dcp.save` + `FileSystemWriter`) on gloo ranks, with the tensors
   sharded the way `megatron.core.dist_checkpointing` shards them and handed to torch as `ShardedTensor`s built from
   local shards (what megatron-core's `strategies/torch.py` does with its own ShardedTensors):

   | key (global shape)                                   | chunks                                              |
   |------------------------------------------------------|-----------------------------------------------------|
   | `embedding.word_embeddings.weight` [V, H]             | vocab-parallel: dim 0 split over TP ranks           |
   | `output_layer.weight` [V, H] (absent when tied)       | dim 0 split over TP ranks                           |
   | `decoder.final_layernorm.weight` [H]                  | replicated: saved once, by rank 0                   |
   | `decoder.layers.self_attention.linear_qkv.weight`     | one chunk per layer and TP rank: [1, QKV/tp, H]     |
   |   [L, (heads + 2 groups) * head_dim, H]               |   (each rank holds whole query groups)              |
   | `decoder.layers.self_attention.linear_proj.weight`    | per layer, last dim split over TP ranks             |
   | `decoder.layers.mlp.linear_fc1.weight` [L, 2F, H]     | per layer and rank: its gate rows at r*F/tp and its |
   |                                                       |   up rows at F + r*F/tp (two chunks per rank)       |
   | `decoder.layers.mlp.linear_fc2.weight` [L, H, F]      | per layer, last dim split over TP ranks             |
   | `decoder.layers.*.layer_norm_weight` [L, H]           | replicated: one chunk per layer, by rank 0          |
   | `decoder.layers.*._extra_state/shard_i_L`             | bytes entries (Transformer Engine's FP8 state)      |

   With `pp=True` the layers are split between the ranks instead (pipeline parallel: rank r writes its layers'
   chunks whole), which is how a query-group count below the TP degree (MQA) is sharded across ranks at all:
   Megatron requires the TP degree to divide the number of query groups.
   Beside them: `metadata.json` as Megatron writes it, and a `common.pt` that would create a marker file if it
   were ever unpickled.

2. `build_real` — megatron-core itself (`GPTModel`, local layer spec, `dist_checkpointing.save`) on CPU gloo
   ranks, when it is installed (`pip install megatron-core`; 0.16.1 runs on CPU with three shims, see
   `_real_rank`). Also returns Megatron's own logits. Slow (~25 s a run): `make test-megatron`.

What could not be made on CPU: Transformer Engine layer specs (TE needs CUDA), FP8 extra state. (MoE and MLA
models are made by megatron-core itself in `megatron_moe.py` and `megatron_mla.py`.)
"""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from streamconv.demo_checkpoint import run_distributed

QKV = "decoder.layers.self_attention.linear_qkv.weight"
PROJ = "decoder.layers.self_attention.linear_proj.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"
FC2 = "decoder.layers.mlp.linear_fc2.weight"
NORM1 = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
NORM2 = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL = "decoder.final_layernorm.weight"
METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}


class _Tripwire:
    """Unpickling this creates `path`: proof that nobody unpickled common.pt."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_side_files(ckpt: Path) -> Path:
    """metadata.json as Megatron writes it; common.pt holding a tripwire. Returns the marker path."""
    (ckpt / "metadata.json").write_text(json.dumps(METADATA_JSON))
    marker = ckpt.parent / f"{ckpt.name}.common-pt-was-unpickled"
    with open(ckpt / "common.pt", "wb") as f:
        pickle.dump({"args": _Tripwire(str(marker)), "iteration": 1}, f)
    return marker


# -- megatron -> HF with torch ops: the reference mapping ---------------------------------------------------


def megatron_to_hf(sd: Dict[str, torch.Tensor], n_heads: int, n_kv: int, head_dim: int) -> Dict[str, torch.Tensor]:
    """Megatron GPT (stacked layers) to LlamaForCausalLM names with torch ops, as Megatron's HF exporters do:
    view linear_qkv per query group, split each group [q heads, k, v]; chunk linear_fc1 into gate, up."""
    out = {"model.embed_tokens.weight": sd[EMBED], "model.norm.weight": sd[FINAL]}
    if OUTPUT in sd:
        out["lm_head.weight"] = sd[OUTPUT]
    per_group = n_heads // n_kv
    for i in range(sd[QKV].shape[0]):
        p = f"model.layers.{i}."
        hidden = sd[QKV].shape[-1]
        groups = sd[QKV][i].view(n_kv, (per_group + 2) * head_dim, hidden)
        q, k, v = torch.split(groups, [per_group * head_dim, head_dim, head_dim], dim=1)
        out[p + "self_attn.q_proj.weight"] = q.reshape(-1, hidden)
        out[p + "self_attn.k_proj.weight"] = k.reshape(-1, hidden)
        out[p + "self_attn.v_proj.weight"] = v.reshape(-1, hidden)
        out[p + "self_attn.o_proj.weight"] = sd[PROJ][i]
        gate, up = torch.chunk(sd[FC1][i], 2, dim=0)
        out[p + "mlp.gate_proj.weight"] = gate
        out[p + "mlp.up_proj.weight"] = up
        out[p + "mlp.down_proj.weight"] = sd[FC2][i]
        out[p + "input_layernorm.weight"] = sd[NORM1][i]
        out[p + "post_attention_layernorm.weight"] = sd[NORM2][i]
    return {k: v.contiguous() for k, v in out.items()}


def random_megatron(*, layers: int, hidden: int, heads: int, kv: int, head_dim: int, ffn: int, vocab: int,
                    tied: bool, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    sd = {EMBED: r(vocab, hidden, scale=0.5), FINAL: 1 + r(hidden),
          QKV: r(layers, (heads + 2 * kv) * head_dim, hidden, scale=0.2), PROJ: r(layers, hidden, heads * head_dim),
          FC1: r(layers, 2 * ffn, hidden, scale=0.2), FC2: r(layers, hidden, ffn),
          NORM1: 1 + r(layers, hidden), NORM2: 1 + r(layers, hidden)}
    if not tied:
        sd[OUTPUT] = r(vocab, hidden, scale=0.2)
    return sd


# -- 1. torch's DCP writer, Megatron's sharding ---------------------------------------------------------------


def _boxes(key: str, shape, rank: int, tp: int, groups: int, pp: bool, world: int):
    """[(offsets, sizes)] of the chunks rank `rank` saves of `key` (see the module docstring)."""
    if key in (EMBED, OUTPUT):
        if pp:
            return [((0, 0), tuple(shape))] if rank == 0 else []
        rows = shape[0] // tp
        return [((rank * rows, 0), (rows, shape[1]))]
    if key == FINAL or (len(shape) == 1):
        return [((0,), tuple(shape))] if rank == 0 else []
    layers = shape[0]
    mine = [i for i in range(layers) if (i * world // layers == rank if pp else True)]
    out = []
    for i in mine:
        if pp or key in (NORM1, NORM2):
            if pp or rank == 0:
                out.append(((i,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])))
            continue
        if key == QKV:
            rows = shape[1] // tp                       # groups/tp whole query groups per rank
            out.append(((i, rank * rows, 0), (1, rows, shape[2])))
        elif key == FC1:
            f = shape[1] // 2 // tp
            out.append(((i, rank * f, 0), (1, f, shape[2])))
            out.append(((i, shape[1] // 2 + rank * f, 0), (1, f, shape[2])))
        elif key in (PROJ, FC2):
            cols = shape[2] // tp
            out.append(((i, 0, rank * cols), (1, shape[1], cols)))
        else:
            raise KeyError(key)
    return out


def write_layout(rank: int, world_size: int, out_dir: str, state_path: str, groups: int, pp: bool = False,
                 extra_keys: Optional[Dict[str, list]] = None) -> None:
    """Run on each gloo rank: save the full tensors in `state_path` sharded Megatron's way (TP over all ranks, or
    PP when `pp`). `extra_keys`: {key: shape} of more tensors (rank 0 saves them whole), e.g. MoE experts."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.load(state_path, weights_only=True, mmap=True)
    state = {}
    for key in sorted(full):
        t = full[key]
        shards = [Shard(t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].contiguous(),
                        ShardMetadata(list(offs), list(sizes), f"rank:{rank}/cpu"))
                  for offs, sizes in _boxes(key, t.shape, rank, world_size, groups, pp, world_size)]
        state[key] = init_from_local_shards(shards, *t.shape)
    for key, shape in (extra_keys or {}).items():
        t = torch.ones(shape)
        shards = [Shard(t, ShardMetadata([0] * len(shape), list(shape), "rank:0/cpu"))] if rank == 0 else []
        state[key] = init_from_local_shards(shards, *shape)
    if rank == 0:   # Transformer Engine's extra state: one bytes entry per layer
        for i in range(full[QKV].shape[0]):
            state[f"decoder.layers.self_attention.linear_qkv._extra_state/shard_{i}_{full[QKV].shape[0]}"] = \
                io.BytesIO(b"\x80\x04N.")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir))


def build_layout(out: Path, state: Dict[str, torch.Tensor], *, groups: int, world_size: int = 2, pp: bool = False,
                 extra_keys: Optional[Dict[str, list]] = None) -> Path:
    """A Megatron-layout checkpoint of `state` at `out/ckpt`, with its side files. Returns the folder."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / "full.pt")
    ckpt = out / "ckpt"
    run_distributed(f"{__name__}:write_layout", world_size,
                    dict(out_dir=str(ckpt), state_path=str(out / "full.pt"), groups=groups, pp=pp,
                         extra_keys=extra_keys))
    write_side_files(ckpt)
    return ckpt


def hf_config(out: Path, *, layers, hidden, heads, kv, head_dim, ffn, vocab, tied) -> Path:
    """A `base/` folder holding only the equivalent LlamaConfig's config.json (as the GPU fixture has)."""
    from transformers import LlamaConfig
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, rms_norm_eps=1e-5,
                tie_word_embeddings=tied, max_position_embeddings=64, dtype="float32").to_json_file(
        str(base / "config.json"))
    return base


# -- 2. megatron-core itself on CPU ---------------------------------------------------------------------------


def megatron_available() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("megatron.core") is not None    # found, not imported (slow, noisy)
    except ImportError:
        return False


def _real_rank(out_dir: str, groups: int, tied: bool) -> None:
    """One rank of a megatron-core run (env RANK, WORLD_SIZE, MASTER_PORT). CPU shims: megatron's saver calls
    torch.cuda.synchronize and puts a flag on torch.cuda.current_device(); attention dropout forks the CUDA RNG
    tracker (dropout is 0 here). Weights: megatron's init plus seeded noise (the same on every rank for
    replicated parameters), so the norms are not all ones."""
    import contextlib

    import torch.distributed as dist
    import torch.nn.functional as F
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.transformer_config import TransformerConfig
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=groups,
                            ffn_hidden_size=128, kv_channels=16, normalization="RMSNorm", gated_linear_unit=True,
                            activation_func=F.silu, add_bias_linear=False, layernorm_epsilon=1e-5,
                            attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True,
                            params_dtype=torch.float32)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=256, max_sequence_length=64, position_embedding_type="rope",
                     share_embeddings_and_output_weights=tied, parallel_output=False)
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            split = getattr(p, "tensor_model_parallel", False)
            g = torch.Generator().manual_seed(1000 * i + (rank if split else 0))
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(16).unsqueeze(0).expand(2, 16)
    causal = torch.triu(torch.ones(1, 1, 16, 16), diagonal=1).bool()     # True: masked
    with torch.no_grad():
        logits = model(ids, pos, causal)
    dist_checkpointing.save(model.sharded_state_dict(), out_dir)
    if rank == 0:
        torch.save({"input_ids": ids, "logits": logits}, out_dir + ".logits.pt")
    dist.destroy_process_group()


def build_real(out: Path, *, tp: int, groups: int, tied: bool = False, timeout_s: float = 600) -> Path:
    """megatron-core's own checkpoint at `out/ckpt` (and Megatron's logits at `out/ckpt.logits.pt`)."""
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, __file__, str(ckpt), str(groups), str(int(tied))],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(tp)]
    logs = [p.communicate(timeout=timeout_s)[0].decode(errors="replace") for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("megatron-core run failed:\n" + "\n".join(log[-3000:] for log in logs))
    return ckpt


if __name__ == "__main__":
    _real_rank(sys.argv[1], int(sys.argv[2]), bool(int(sys.argv[3])))
