"""Real DCP checkpoints written by torch's own writers, in CPU gloo process groups, for the tests.

Every checkpoint is `dcp.save(state, storage_writer=FileSystemWriter(path))` run by several ranks, the way a
training job saves. Checkpoints are built in three launches, one per world size (a launch costs ~0.2 s after
the forkserver imported torch once, see `streamconv.demo_checkpoint.run_distributed`):

| group   | ranks | checkpoints |
|---------|-------|-------------|
| ranks3  | 3     | fsdp2, fsdp2_optim, fsdp2_multifile, fsdp2_threads, mixed_dtypes, exotic_dtypes, fsdp1 |
| ranks2  | 2     | tp, dtensor_1d |
| ranks4  | 4     | mesh2d, dtensor_2d |

Layout: `out_dir/<name>/` is the checkpoint folder (only `.metadata` and `*.distcp`);
`out_dir/<name>.expected.pt` holds the full tensors by flat DCP key ("model.lm_head.weight",
"optim.state.lm_head.weight.exp_avg"), computed without DCP: from the seeded weights before sharding where no
step was taken, else gathered from the live DTensor/ShardedTensor shards. `reference_state_dict` gives torch's
own reconstruction (`dcp_to_torch_save`) for comparison.

Sizes are odd on purpose: vocab 1003, hidden 64 (22/22/20 over 3 ranks), MLP 171 (86/85 over 2 ranks), and a
size-1 `attn_gate` per block (one real chunk plus an empty one under FSDP2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F

from streamconv.demo_checkpoint import run_distributed

VOCAB, HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 1003, 64, 4, 2, 171, 2
HEAD_DIM = HIDDEN // HEADS
LR = 1e-2  # large, so one step visibly moves every weight

# name -> (group, one-line description). The group says which launch writes it.
CHECKPOINTS: Dict[str, tuple] = {
    "fsdp2": ("ranks3", "TinyLlama, fully_shard per block + root, get_model_state_dict, {'model': sd}"),
    "fsdp2_optim": ("ranks3", "as fsdp2 after one AdamW step, plus get_optimizer_state_dict under 'optim'"),
    "fsdp2_multifile": ("ranks3", "fsdp2_optim's state saved with single_file_per_rank=False (one file per item)"),
    "fsdp2_threads": ("ranks3", "fsdp2's state saved with thread_count=2 (__R_0 and __R_1 files per rank)"),
    "mixed_dtypes": ("ranks3", "FSDP2 module with f32/bf16/f16 params, int64/bool/f32 buffers, sharded int64/bool/f16"),
    "exotic_dtypes": ("ranks3", "DTensor.from_local shards of f64, f8_e4m3fn, f8_e5m2, i32, i16, i8, u8, u16; 0-d; empty"),
    "fsdp1": ("ranks3", "FSDP1 SHARDED_STATE_DICT FULL_SHARD, one AdamW step, FSDP.optim_state_dict under 'optim'"),
    "tp": ("ranks2", "TinyLlama with parallelize_module: Colwise Shard(0), Rowwise Shard(1), embedding Shard(0)"),
    "dtensor_1d": ("ranks2", "distribute_tensor: Shard(0), Shard(1), 3-D Shard(1)/Shard(2), Replicate, 1-row Shard(0)"),
    "mesh2d": ("ranks4", "TinyLlama, TP on mesh['tp'] then fully_shard on mesh['dp'] (2x2): _StridedShard + Shard"),
    "dtensor_2d": ("ranks4", "distribute_tensor on a 2x2 mesh: [S0,S1], [S1,S0], [S0,S0], [R,S1], [S0,R], [R,R]"),
}
GROUPS = {"ranks3": ("write_ranks3", 3), "ranks2": ("write_ranks2", 2), "ranks4": ("write_ranks4", 4)}


# --------------------------------------------------------------------------------------------------------------
# launching and reading back


def spawn(fn_name: str, world_size: int, out_dir, *, timeout_s: float = 300.0, **kwargs) -> List:
    """Run `fn_name(rank, world_size, out_dir=..., **kwargs)` of this module in `world_size` gloo ranks."""
    return run_distributed(f"{__name__}:{fn_name}", world_size, dict(out_dir=str(out_dir), **kwargs),
                           timeout_s=timeout_s)


def build(out_dir, names: Optional[Iterable[str]] = None) -> Dict[str, Path]:
    """Write the named checkpoints (default: all) into `out_dir`, one launch per group needed."""
    out = Path(out_dir)
    names = list(CHECKPOINTS) if names is None else list(names)
    unknown = sorted(set(names) - set(CHECKPOINTS))
    if unknown:
        raise ValueError(f"unknown checkpoints {unknown}; known: {sorted(CHECKPOINTS)}")
    for group in dict.fromkeys(CHECKPOINTS[n][0] for n in names):
        fn_name, world_size = GROUPS[group]
        spawn(fn_name, world_size, out)
    return {n: out / n for n in names}


def expected_path(ckpt_dir) -> Path:
    ckpt_dir = Path(ckpt_dir)
    return ckpt_dir.with_name(ckpt_dir.name + ".expected.pt")


def load_expected(ckpt_dir) -> Dict[str, torch.Tensor]:
    """The full tensors the writer recorded for `ckpt_dir`, by flat DCP key."""
    return torch.load(expected_path(ckpt_dir), weights_only=True)


def reference_state_dict(ckpt_dir) -> Dict[str, torch.Tensor]:
    """torch's own reconstruction, flattened the way DCP flattens: the state dict `dcp_to_torch_save` builds (its
    very calls: `_load_state_dict` with the empty-state-dict planner, no process group), taken before it is saved,
    so the bytes do not make a round trip through a .pt file (256 MiB written and read back for the memory tests)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    nested: Dict = {}
    _load_state_dict(nested, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    flat, _ = flatten_state_dict(nested)
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------------------------------------------
# the tiny model


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=True)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=True)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (z.repeat_interleave(HEADS // KV_HEADS, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.attn_gate = nn.Parameter(torch.zeros(1))  # size-1, like Mllama's cross-attention gates
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.mlp = MLP()

    def forward(self, x):
        x = x + torch.tanh(self.attn_gate) * self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)


class TinyLlama(nn.Module):
    """Names as in HF LlamaForCausalLM (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    def __init__(self):
        super().__init__()
        self.model = Decoder()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def tiny_llama(seed: int = 0) -> TinyLlama:
    """Deterministic weights, distinct everywhere (norms and gates too) so a misplaced chunk shows."""
    model = TinyLlama()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("attn_gate"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)
    return model


def _train_step(model, optim, rank: int) -> None:
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own micro-batch
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    optim.step()
    optim.zero_grad()


def _tp_plan(prefix: str = "") -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        plan[f"model.layers.*.{name}"] = ColwiseParallel()
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        plan[f"model.layers.*.{name}"] = RowwiseParallel()
    return {prefix + k: v for k, v in plan.items()}


# --------------------------------------------------------------------------------------------------------------
# saving and recording expectations


def _clone_full(state: dict, prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone() for k, v in state.items()}


def _gather_full(state: dict) -> Dict[str, torch.Tensor]:
    """Flatten like DCP and gather every DTensor / ShardedTensor to a full tensor. Collective: all ranks."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.tensor import DTensor

    flat, _ = flatten_state_dict(state)
    out = {}
    for key, value in flat.items():
        if isinstance(value, DTensor):
            out[key] = value.full_tensor().detach().clone()
        elif isinstance(value, ShardedTensor):
            out[key] = _gather_sharded_tensor(value)
        elif isinstance(value, torch.Tensor):
            out[key] = value.detach().clone()
    return out


def _gather_sharded_tensor(st) -> torch.Tensor:
    """FSDP1's ShardedTensor to a full tensor, from each rank's (offsets, data); checks exact coverage."""
    pieces = [(tuple(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in st.local_shards()]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    meta = st.metadata()
    full = torch.empty(tuple(meta.size), dtype=meta.tensor_properties.dtype)
    hits = torch.zeros(tuple(meta.size), dtype=torch.int32)
    for rank_pieces in gathered:
        for offsets, data in rank_pieces:
            box = tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))
            full[box] = data
            hits[box] += 1
    assert bool((hits == 1).all()), "ShardedTensor shards do not cover the tensor exactly once"
    return full


def _save(out_dir, name: str, state: dict, expected: Optional[Dict[str, torch.Tensor]] = None, **writer_kwargs):
    """dcp.save `state` into out_dir/name; rank 0 records the expected full tensors beside it.

    `expected` defaults to gathering the live shards (use it when weights moved since init).
    """
    path = Path(out_dir) / name
    writer_kwargs.setdefault("sync_files", False)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path, **writer_kwargs))
    full = _gather_full(state) if expected is None else expected
    if dist.get_rank() == 0:
        torch.save(full, expected_path(path))
    dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# workers: one per group, each writes several checkpoints


def write_ranks3(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))

    # FSDP2: every parameter Shard(0) with torch.chunk sizes (64 -> 22/22/20, 1003 -> 335/335/333).
    model = tiny_llama(seed=0)
    init = _clone_full(model.state_dict(), "model.")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": get_model_state_dict(model)}
    _save(out_dir, "fsdp2", state, expected=init)
    _save(out_dir, "fsdp2_threads", state, expected=init, thread_count=2)

    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    _train_step(model, optim, rank)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    _save(out_dir, "fsdp2_optim", state)
    _save(out_dir, "fsdp2_multifile", state, single_file_per_rank=False)

    _write_mixed_dtypes(out_dir, mesh)
    _write_exotic_dtypes(out_dir, mesh)
    _write_fsdp1(out_dir, rank)
    return [n for n, (g, _) in CHECKPOINTS.items() if g == "ranks3"]


class MixedDtypes(nn.Module):
    """Parameters in three float dtypes (one FSDP2 group per dtype) and int64/bool/float buffers."""

    def __init__(self):
        super().__init__()
        self.proj_fp32 = nn.Linear(HIDDEN, FFN)
        self.proj_bf16 = nn.Linear(FFN, HIDDEN).to(torch.bfloat16)
        self.embed_fp16 = nn.Embedding(VOCAB, 24).to(torch.float16)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("position_ids", torch.arange(97).unsqueeze(0))
        self.register_buffer("causal_mask", torch.ones(13, 13, dtype=torch.bool).tril())
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        self.register_buffer("not_saved", torch.zeros(3), persistent=False)


def _write_mixed_dtypes(out_dir, mesh) -> None:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(1)
    module = MixedDtypes()
    with torch.no_grad():
        module.scale.fill_(0.75)
    init = _clone_full(module.state_dict(), "model.")
    fully_shard(module.proj_bf16, mesh=mesh)
    fully_shard(module.embed_fp16, mesh=mesh)
    fully_shard(module, mesh=mesh)
    sd = get_model_state_dict(module)
    # FSDP2 never shards buffers; add sharded non-float tensors the way a custom state dict would hold them.
    gen = torch.Generator().manual_seed(2)
    extra = {
        "sharded_int64": (torch.randint(-2**40, 2**40, (101, 3), generator=gen), Shard(0)),
        "sharded_bool": (torch.rand(5, 37, generator=gen) > 0.5, Shard(1)),
        "sharded_fp16": (torch.randn(41, generator=gen).half(), Shard(0)),
    }
    for key, (full, placement) in extra.items():
        sd[key] = distribute_tensor(full, mesh, [placement])
        init["model." + key] = full
    _save(out_dir, "mixed_dtypes", {"model": sd}, expected=init)


def _write_exotic_dtypes(out_dir, mesh) -> None:
    """Dtypes gloo cannot move, sharded without communication via DTensor.from_local; plus 0-d and empty."""
    from torch.distributed.tensor import DTensor, Shard

    gen = torch.Generator().manual_seed(3)
    fulls = {
        "float64": torch.randn(7, 5, generator=gen, dtype=torch.float64),
        "float8_e4m3fn": torch.randn(11, 4, generator=gen).to(torch.float8_e4m3fn),
        "float8_e5m2": torch.randn(11, 4, generator=gen).to(torch.float8_e5m2),
        "int32": torch.randint(-2**31, 2**31 - 1, (9,), generator=gen, dtype=torch.int32),
        "int16": torch.randint(-2**15, 2**15 - 1, (4, 9), generator=gen, dtype=torch.int16),
        "int8": torch.randint(-128, 127, (10,), generator=gen, dtype=torch.int8),
        "uint8": torch.randint(0, 255, (10, 3), generator=gen, dtype=torch.uint8),
        "uint16": torch.randint(0, 2**16 - 1, (8,), generator=gen, dtype=torch.int32).to(torch.uint16),
    }
    rank, world = mesh.get_local_rank(), mesh.size()
    sd = {}
    for dtype_name, full in fulls.items():
        pieces = full.chunk(world, dim=0)  # DTensor's Shard(0) rule; from_local trusts us to follow it
        local = pieces[rank] if rank < len(pieces) else full[full.shape[0]:]
        sd[f"{dtype_name}.weight"] = DTensor.from_local(local.clone(), mesh, [Shard(0)], run_check=False,
                                                        shape=full.shape, stride=full.stride())
    expected = {f"model.{k}.weight": v for k, v in fulls.items()}
    sd["scalar_float32"] = torch.tensor(2.5)
    sd["empty_float32"] = torch.zeros(0, 5)
    expected["model.scalar_float32"] = sd["scalar_float32"].clone()
    expected["model.empty_float32"] = sd["empty_float32"].clone()
    _save(out_dir, "exotic_dtypes", {"model": sd}, expected=expected)


def _write_fsdp1(out_dir, rank: int) -> None:
    """FSDP1 the llama-recipes way: SHARDED_STATE_DICT, FULL_SHARD, auto-wrap per block, optimizer sharded."""
    import warnings

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy, StateDictType
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    with warnings.catch_warnings():
        # FSDP1 deprecation notices and "_get_pg_default_device will be deprecated" from its own internals
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        model = FSDP(tiny_llama(seed=0), auto_wrap_policy=ModuleWrapPolicy({Block}),
                     sharding_strategy=ShardingStrategy.FULL_SHARD, device_id=torch.device("cpu"))
        optim = torch.optim.AdamW(model.parameters(), lr=LR)
        _train_step(model, optim, rank)
        with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
            state = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, optim)}
        _save(out_dir, "fsdp1", state)


def write_ranks2(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    model = tiny_llama(seed=0)
    init = _clone_full(model.state_dict(), "model.")
    parallelize_module(model, mesh, _tp_plan())
    _save(out_dir, "tp", {"model": get_model_state_dict(model)}, expected=init)

    gen = torch.Generator().manual_seed(4)
    tensors = {
        "rows.weight": (torch.randn(FFN, 10, generator=gen), Shard(0)),
        "cols.weight": (torch.randn(10, FFN, generator=gen), Shard(1)),
        "cube_dim1.weight": (torch.randn(3, FFN, 5, generator=gen), Shard(1)),
        "cube_dim2.weight": (torch.randn(3, 5, FFN, generator=gen), Shard(2)),
        "replicated.weight": (torch.randn(7, 9, generator=gen), Replicate()),
        "one_row.weight": (torch.randn(1, 4, generator=gen), Shard(0)),  # rank 1 holds an empty chunk
    }
    sd = {k: distribute_tensor(t, mesh, [p]) for k, (t, p) in tensors.items()}
    _save(out_dir, "dtensor_1d", {"model": sd}, expected={"model." + k: t for k, (t, _) in tensors.items()})
    return [n for n, (g, _) in CHECKPOINTS.items() if g == "ranks2"]


def write_ranks4(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import parallelize_module

    assert world_size == 4, "the 2-D writers need a 2x2 mesh"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tiny_llama(seed=0)
    init = _clone_full(model.state_dict(), "model.")
    parallelize_module(model, mesh["tp"], _tp_plan())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    _save(out_dir, "mesh2d", {"model": get_model_state_dict(model)}, expected=init)

    gen = torch.Generator().manual_seed(5)
    tensors = {
        "grid.weight": (torch.randn(10, FFN, generator=gen), [Shard(0), Shard(1)]),
        "grid_t.weight": (torch.randn(FFN, 10, generator=gen), [Shard(1), Shard(0)]),
        "nested.weight": (torch.randn(13, 6, generator=gen), [Shard(0), Shard(0)]),
        "dp_replicated.weight": (torch.randn(9, FFN, generator=gen), [Replicate(), Shard(1)]),
        "tp_replicated.weight": (torch.randn(FFN, 9, generator=gen), [Shard(0), Replicate()]),
        "replicated.bias": (torch.randn(11, generator=gen), [Replicate(), Replicate()]),
    }
    sd = {k: distribute_tensor(t, mesh, p) for k, (t, p) in tensors.items()}
    _save(out_dir, "dtensor_2d", {"model": sd}, expected={"model." + k: t for k, (t, _) in tensors.items()})
    return [n for n, (g, _) in CHECKPOINTS.items() if g == "ranks4"]


# --------------------------------------------------------------------------------------------------------------
# workers that misbehave, for testing the launcher itself


def fail_on_rank(rank: int, world_size: int, out_dir: str, bad_rank: int = 1) -> int:
    dist.barrier()
    if rank == bad_rank:
        raise ValueError(f"boom on rank {rank}")
    dist.barrier()  # the healthy ranks wait here for the dead one
    return rank


def hang_on_rank(rank: int, world_size: int, out_dir: str, bad_rank: int = 1) -> int:
    import time

    if rank == bad_rank:
        time.sleep(600)
    return rank
