"""Real DCP checkpoints of tiny models other than Llama, for the never-a-silently-wrong-model check (hf/expected).

One launch of WORLD_SIZE gloo ranks writes, for each model below, into `out_dir/<name>/`:

* `base/`  — config.json only (`config.save_pretrained`): a base folder with no weights, so the names to expect
             come from the config (transformers on the meta device).
* `ckpt/`  — `dcp.save({"model": model.state_dict()})` under FSDP2 (per-layer `fully_shard` + root) after one
             AdamW step, as hf_writers.py saves.
* `trained.pt` — the trained weights gathered to full tensors (live names), for reference logits.

| name        | model |
|-------------|-------|
| llama       | LlamaForCausalLM, untied: its config.json is one streamconv's own table describes (no transformers needed) |
| qwen2       | Qwen2ForCausalLM: q/k/v biases, untied head, vocab 101 (uneven shards) |
| qwen3       | Qwen3ForCausalLM: QK-norm, tie_word_embeddings=True (the checkpoint holds both head and embedding) |
| titan_names | a plain module with torchtitan's own MoE names (`tok_embeddings`, `layers.0.attention.wq`, grouped `layers.0.moe.experts.w1` [E, F, D]); its base/ holds a Qwen3-MoE config.json |
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

from streamconv.demo_checkpoint import run_distributed

WORLD_SIZE = 2
LR = 1e-2
MODELS = ("llama", "qwen2", "qwen3", "titan_names")
SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, vocab_size=101, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
MOE = dict(SIZES, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
           mlp_only_layers=[])


def make_config(name: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if name == "llama":
        return LlamaConfig(**SIZES, tie_word_embeddings=False)
    if name == "qwen2":
        return Qwen2Config(**SIZES, tie_word_embeddings=False)
    if name == "qwen3":
        return Qwen3Config(**SIZES, tie_word_embeddings=True)
    if name == "titan_names":
        return Qwen3MoeConfig(**MOE, tie_word_embeddings=False)
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def model_class(name: str):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[name]


class TitanLayer(nn.Module):
    """torchtitan's module names for one MoE decoder layer (weights only: never run)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, experts: int, ffn: int):
        super().__init__()
        self.attention = nn.ModuleDict({n: nn.Linear(dim, rows, bias=False) for n, rows in (
            ("wq", heads * head_dim), ("wk", kv_heads * head_dim), ("wv", kv_heads * head_dim))})
        self.attention["wo"] = nn.Linear(heads * head_dim, dim, bias=False)
        self.attention_norm = nn.RMSNorm(dim)
        self.ffn_norm = nn.RMSNorm(dim)
        self.moe = nn.Module()
        self.moe.experts = nn.Module()
        self.moe.experts.w1 = nn.Parameter(torch.randn(experts, ffn, dim) * 0.05)
        self.moe.experts.w2 = nn.Parameter(torch.randn(experts, dim, ffn) * 0.05)
        self.moe.experts.w3 = nn.Parameter(torch.randn(experts, ffn, dim) * 0.05)
        self.moe.router = nn.Module()
        self.moe.router.gate = nn.Linear(dim, experts, bias=False)


class TitanNames(nn.Module):
    def __init__(self):
        super().__init__()
        c = MOE
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleDict({str(i): TitanLayer(c["hidden_size"], c["num_attention_heads"],
                                                        c["num_key_value_heads"], c["head_dim"], c["num_experts"],
                                                        c["moe_intermediate_size"])
                                     for i in range(c["num_hidden_layers"])})
        self.norm = nn.RMSNorm(c["hidden_size"])
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)


def make_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    if name == "titan_names":
        return TitanNames()
    return model_class(name)(make_config(name))


def inputs(seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, SIZES["vocab_size"], (2, 10), generator=gen)}


def _write_one(rank: int, name: str, out: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model = make_model(name)
    if rank == 0:
        make_config(name).save_pretrained(out / "base")     # config.json only: no weights beside it
    layers = model.layers.values() if name == "titan_names" else model.model.layers
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    if name != "titan_names":       # one step, so every weight (norms too) differs from its initial value
        optim = torch.optim.AdamW(model.parameters(), lr=LR)
        batch = inputs(seed=100 + rank)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optim.step()
        optim.zero_grad()
    state = model.state_dict()
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(out / "ckpt", sync_files=False))
    full = {k: v.full_tensor().detach().clone() for k, v in state.items()}   # collective: every rank, same order
    if rank == 0:
        torch.save(full, out / "trained.pt")
    dist.barrier()


def write_all(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for name in MODELS:
        _write_one(rank, name, Path(out_dir) / name)


def build(out_dir) -> Dict[str, Path]:
    """One launch of WORLD_SIZE ranks writes every model. {name: out_dir/name}."""
    out = Path(out_dir)
    run_distributed(f"{__name__}:write_all", WORLD_SIZE, {"out_dir": str(out)}, timeout_s=300,
                    preload=("transformers", "transformers.models.llama.modeling_llama",
                             "transformers.models.qwen2.modeling_qwen2",
                             "transformers.models.qwen3.modeling_qwen3", __name__))
    return {name: out / name for name in MODELS}
