"""Checkpoints in trainers' own layouts (torchtitan, torchtune Llama), written by torch's DCP writer on CPU gloo.

Two kinds, both real DCP folders from `torch.distributed.checkpoint.save` on 2 gloo ranks:

* the trainers' own model classes (`make test-trainers`, marker `trainers`): torchtitan 0.3's `Llama3Model`
  (built from its own config classes, fused qkv, `init_weights`) and torchtune 0.6's `llama3`, sharded with FSDP2
  per layer + root, trained one AdamW step on tokens through their own forward, saved in the layout the trainer
  writes; the reference is the trainer's own HF conversion (`Llama3StateDictAdapter.to_hf`, `tune_to_hf`). Their
  training loops and checkpoint managers are not run: torchtitan's Trainer wants its dataset/tokenizer stack and
  flex attention, torchtune's recipes CUDA memory stats and `datasets`. CPU shims, documented where applied:
  torchtitan's MoE triton kernels module stubbed and SDPA instead of flex attention (`shim_torchtitan`);
  torchtune's `datasets` import stubbed (`shim_torchtune`).
* name-only trees for `make test` (fast, no trainer package): a tiny Hugging Face Llama moved into the trainer's
  names with torch ops (torchtitan's `_reverse_permute`, torchtune's `hf_to_tune`), sharded with FSDP2 (one AdamW
  step on a fixed functional of every weight) or with DTensor tensor-parallel placements (q split along its
  columns, so RoPE pieces are partial rows).

torchtitan layout: model keys at the top level beside `optimizer`, `lr_scheduler`, `dataloader`, `train_state`;
torchtune: `{"model": ..., "optimizer": ...}`, one file per item (`single_file_per_rank=False`). Rank 0 writes
`base/` (what --config-from gets) and `trained.pt` (the gathered trainer-layout weights).
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

from streamconv.demo_checkpoint import run_distributed

LLAMA = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
             tie_word_embeddings=False)
N_HEADS, N_KV, HEAD_DIM = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], LLAMA["head_dim"]
LR = 1e-2

TITAN = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
         "lm_head.weight": "output.weight"}
TITAN_LAYER = {"self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
               "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
               "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
               "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
               "post_attention_layernorm.weight": "ffn_norm.weight"}
TUNE = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.scale",
        "lm_head.weight": "output.weight"}
TUNE_LAYER = {"self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
              "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.output_proj.weight",
              "mlp.gate_proj.weight": "mlp.w1.weight", "mlp.down_proj.weight": "mlp.w2.weight",
              "mlp.up_proj.weight": "mlp.w3.weight", "input_layernorm.weight": "sa_norm.scale",
              "post_attention_layernorm.weight": "mlp_norm.scale"}


def name_map(kind: str) -> Dict[str, str]:
    """HF name -> trainer name."""
    top, layer = (TITAN, TITAN_LAYER) if kind.startswith("torchtitan") else (TUNE, TUNE_LAYER)
    out = dict(top)
    for i in range(LLAMA["num_hidden_layers"]):
        out.update({f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in layer.items()})
    return out


def permute(w, n_heads):            # interleaved -> half-split: torchtitan `_permute`, torchtune `tune_to_hf`
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def reverse_permute(w, n_heads):    # half-split -> interleaved: torchtitan `_reverse_permute`, `hf_to_tune`
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_trainer(kind: str, hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for hf_name, name in name_map(kind).items():
        w = hf[hf_name]
        if hf_name.endswith("q_proj.weight"):
            w = reverse_permute(w, N_HEADS)
        elif hf_name.endswith("k_proj.weight"):
            w = reverse_permute(w, N_KV)
        out[name] = w.contiguous()
    return out


def trainer_to_hf(kind: str, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The trainer's own HF export, with torch ops (torchtune's real `tune_to_hf` when it is importable)."""
    if kind == "torchtune-real":
        from torchtune.models.convert_weights import tune_to_hf
        return tune_to_hf(sd, num_heads=N_HEADS, num_kv_heads=N_KV, dim=LLAMA["hidden_size"], head_dim=HEAD_DIM)
    out = {}
    for hf_name, name in name_map(kind).items():
        w = sd[name]
        if hf_name.endswith("q_proj.weight"):
            w = permute(w, N_HEADS)
        elif hf_name.endswith("k_proj.weight"):
            w = permute(w, N_KV)
        out[hf_name] = w
    return out


def shim_torchtune() -> None:
    """torchtune 0.6 imports `datasets` (pyarrow, pandas) at import time for its data modules; the model classes
    need none of it."""
    class _Any(types.ModuleType):
        __path__: list = []

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})
    for n in ("datasets", "datasets.distributed", "kagglehub", "blobfile"):
        sys.modules.setdefault(n, _Any(n))


def shim_torchtitan():
    """torchtitan 0.3 on CPU: its expert-parallel triton kernels (MoE only) are replaced by a stub module, and the
    attention backend by SDPA (flex attention wants a compiler; `sdpa` is refused by name for language models).
    Returns the `torchtitan.models.llama3` module."""
    class _Any(types.ModuleType):
        __path__: list = []

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})
    sys.modules.setdefault("torchtitan.distributed.minimal_async_ep.kernels", _Any("kernels"))
    from torchtitan.models import llama3
    from torchtitan.models.common import attention
    llama3.get_attention_config = lambda backend: attention.ScaledDotProductAttention.Config()
    return llama3


def torchtitan_config():
    """A tiny Llama 3 in torchtitan's own config classes, built like its `debugmodel` (fused qkv)."""
    L = shim_torchtitan()
    from torchtitan.models.common.rope import ComplexRoPE
    dim, vocab = LLAMA["hidden_size"], LLAMA["vocab_size"]
    return L.Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=L.Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=L._EMBEDDING_INIT),
        norm=L.RMSNorm.Config(normalized_shape=dim, param_init=L._NORM_INIT),
        lm_head=L.Linear.Config(in_features=dim, out_features=vocab, param_init=L._output_linear_init(dim)),
        layers=L._build_llama3_layers(
            fuse_qkv=True, n_layers=LLAMA["num_hidden_layers"], dim=dim, n_heads=N_HEADS, n_kv_heads=N_KV,
            hidden_dim=LLAMA["intermediate_size"], attn_backend="sdpa",
            rope=ComplexRoPE.Config(dim=HEAD_DIM, max_seq_len=64, theta=500000)))


def write_torchtitan_real(rank: int, world_size: int, out_dir: str) -> None:
    """torchtitan's own `Llama3Model` (0.3, fused qkv), FSDP2 per layer + root, one AdamW step on tokens, saved
    as its CheckpointManager lays out a full checkpoint (model keys at the top level beside optimizer,
    lr_scheduler, dataloader, train_state). Rank 0 also writes the trainer's own HF export of the initial weights
    (`base/`, what --config-from gets) and of the trained ones (`hf_export.pt`), both by `Llama3StateDictAdapter.to_hf`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(1)
    out = Path(out_dir)
    L = shim_torchtitan()
    config = torchtitan_config()
    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    adapter = L.Llama3StateDictAdapter(config, None)
    if rank == 0:
        hf = LlamaForCausalLM(LlamaConfig(**dict(LLAMA, rope_theta=500000.0)))
        hf.load_state_dict(adapter.to_hf({k: v.detach() for k, v in model.state_dict().items()}), strict=True)
        hf.save_pretrained(out / "base")
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = torch.randint(0, LLAMA["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(100 + rank))
    model(tokens).float().logsumexp(-1).mean().backward()
    optim.step()
    # model.state_dict(): the fused qkv's save hook splits it into wq/wk/wv (get_model_state_dict cannot map those
    # names back to parameters); optimizer state keyed by parameter name, flattened as torchtitan saves it.
    model_sd = model.state_dict()
    optim_sd = {f"state.{n}.{k}": v for n, p in model.named_parameters() for k, v in optim.state[p].items()}
    dcp.save({**model_sd, "optimizer": optim_sd, "lr_scheduler": {"last_epoch": 1}, "dataloader": {"rank": rank},
              "train_state": {"step": 1}},
             storage_writer=dcp.FileSystemWriter(out / "ckpt", sync_files=False))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model_sd.items()}
    if rank == 0:
        torch.save(full, out / "trained.pt")
        torch.save(adapter.to_hf(full), out / "hf_export.pt")
    dist.barrier()


def torchtitan_available() -> bool:
    try:
        importlib.import_module("torchtitan")
        importlib.import_module("spmd_types")
        return True
    except Exception:
        return False


def torchtune_available() -> bool:
    try:
        shim_torchtune()
        importlib.import_module("torchtune.models.llama3").llama3
        return True
    except Exception:
        return False


def _module_with(state: Dict[str, torch.Tensor]) -> nn.Module:
    """A module tree whose parameter names are exactly `state`'s keys (layers.N submodules to shard)."""
    root = nn.Module()
    for name, value in state.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(value.clone()))
    return root


def _trainer_model(kind: str, state):
    if kind == "torchtune-real":
        shim_torchtune()
        from torchtune.models.llama3 import llama3
        model = llama3(vocab_size=LLAMA["vocab_size"], num_layers=LLAMA["num_hidden_layers"], num_heads=N_HEADS,
                       num_kv_heads=N_KV, embed_dim=LLAMA["hidden_size"], max_seq_len=64,
                       intermediate_dim=LLAMA["intermediate_size"], norm_eps=LLAMA["rms_norm_eps"])
        model.load_state_dict(state, strict=True)
        return model
    return _module_with(state)


def _step(kind: str, model, rank: int) -> None:
    """One AdamW step. The real torchtune model trains on tokens; the name-only trees on a fixed functional of
    every weight (enough to move each one, which is all a layout test needs)."""
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(100 + rank)
    if kind == "torchtune-real":
        tokens = torch.randint(0, LLAMA["vocab_size"], (2, 8), generator=gen)
        loss = model(tokens).float().logsumexp(-1).mean()
    else:
        loss = sum((p.full_tensor() if hasattr(p, "full_tensor") else p).pow(2).sum() * (1 + i)
                   for i, p in enumerate(model.parameters()))
    loss.backward()
    optim.step()
    optim.zero_grad()
    return optim


def _hf_base(out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA))
    with torch.no_grad():   # norms away from 1, so a wrong norm mapping shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return hf


def write(rank: int, world_size: int, out_dir: str, kind: str, layout: str = "fsdp2") -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    out = Path(out_dir)
    hf = _hf_base(out)
    if rank == 0:
        hf.save_pretrained(out / "base")
    state = hf_to_trainer(kind, {k: v.detach() for k, v in hf.state_dict().items()})
    mesh = init_device_mesh("cpu", (world_size,))
    writer = dcp.FileSystemWriter(out / "ckpt", sync_files=False,
                                  single_file_per_rank=not kind.startswith("torchtune"))
    if layout == "tp":
        # Tensor-parallel placements as torchtitan's plan gives them (colwise Shard(0), rowwise Shard(1)), and q
        # split along its columns too, so RoPE pieces are partial rows.
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor
        placements = {"wq": Shard(1), "wk": Shard(0), "wv": Shard(0), "wo": Shard(1), "w1": Shard(0),
                      "w2": Shard(1), "w3": Shard(0), "tok_embeddings": Shard(0), "output": Shard(0)}
        model_sd = {}
        for name, value in state.items():
            key = next((k for k in placements if f"{k}." in name or name.startswith(k)), None)
            model_sd[name] = distribute_tensor(value, mesh, [placements[key] if key else Replicate()])
        full = {k: v.full_tensor() for k, v in model_sd.items()}
        dcp.save({**model_sd, "train_state": {"step": 0}}, storage_writer=writer)
    else:
        from torch.distributed.fsdp import fully_shard
        model = _trainer_model(kind, state)
        for layer in model.layers.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optim = _step(kind, model, rank)
        model_sd = get_model_state_dict(model)
        optim_sd = get_optimizer_state_dict(model, optim, options=StateDictOptions(flatten_optimizer_state_dict=True))
        full = {k: v.full_tensor().detach().clone() for k, v in model_sd.items()}
        if kind.startswith("torchtitan"):
            saved = {**model_sd, "optimizer": optim_sd, "lr_scheduler": {"last_epoch": 1},
                     "dataloader": {"rank": rank}, "train_state": {"step": 1}}
        else:
            saved = {"model": model_sd, "optimizer": optim_sd, "epochs_run": 1, "seed": 0}
        dcp.save(saved, storage_writer=writer)
    if rank == 0:
        torch.save(full, out / "trained.pt")
    dist.barrier()


def build(out_dir, kind: str, layout: str = "fsdp2", world_size: int = 2) -> Path:
    out = Path(out_dir)
    if kind == "torchtitan-real":
        run_distributed(f"{__name__}:write_torchtitan_real", world_size, {"out_dir": str(out)}, timeout_s=600)
        return out
    preload = ("transformers", "transformers.models.llama.modeling_llama", __name__)
    run_distributed(f"{__name__}:write", world_size, {"out_dir": str(out), "kind": kind, "layout": layout},
                    timeout_s=300, preload=preload)
    return out
