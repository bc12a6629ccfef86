"""Checkpoints in trainers' own layouts (torchtitan, torchtune Llama), written by torch's DCP writer on CPU gloo.

Running the trainers themselves is not practical in the test budget (see the README "Trainers" section): torchtitan
0.3 needs spmd_types / torch_checkpointing and a triton stub; torchtune 0.6's recipes need `datasets` (pyarrow)
and CUDA memory stats. So each checkpoint is built the way the trainer saves it, from a tiny Hugging Face Llama:

1. `base/`: the HF model's `save_pretrained` folder (config.json + model.safetensors): what `--config-from` gets.
2. its weights moved into the trainer's names and interleaved RoPE rows with torch ops (torchtitan's
   `_reverse_permute`, torchtune's `hf_to_tune`); for `torchtune-real` into torchtune's own `llama3` model class;
3. sharded (FSDP2 `fully_shard` per layer + root, 2 ranks; or DTensor tensor-parallel placements), one AdamW step
   on a fixed loss, saved as the trainer saves: torchtitan puts model keys at the top level beside `optimizer`,
   `lr_scheduler`, `dataloader`, `train_state`; torchtune saves `{"model": ..., "optimizer": ...}` one file per
   item (`single_file_per_rank=False`);
4. rank 0 writes `trained.pt`: the gathered trainer-layout weights, to build the reference with torch ops.
"""
from __future__ import annotations

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


def torchtune_available() -> bool:
    try:
        shim_torchtune()
        from torchtune.models.llama3 import llama3  # noqa: F401
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
    preload = ("transformers", "transformers.models.llama.modeling_llama", __name__)
    run_distributed(f"{__name__}:write", world_size, {"out_dir": str(out), "kind": kind, "layout": layout},
                    timeout_s=300, preload=preload)
    return out
