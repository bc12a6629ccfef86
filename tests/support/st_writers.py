"""Checkpoints in the safetensors flavors of torch's DCP writers, written by torch itself in gloo process groups.

| flavor | writer |
|---|---|
| `st_*` | `dcp.save(state, storage_writer=FileSystemWriter(path, serialization_format=SerializationFormat.SAFETENSORS))` |
| `hf_*` | `dcp.save(model_sd, storage_writer=HuggingFaceStorageWriter(path, save_distributed=True, ...))` |

torch's own FileSystemReader cannot read the `st_*` folders back (it unpickles the safetensors bytes), so each
checkpoint's source tensors are recorded beside it (`<name>.expected.pt`, full tensors by the key streamconv
writes): the seeded weights before sharding, or the live shards gathered when a step moved them. The `hf_*`
folders are also compared with torch's `consolidate_safetensors_files` in the tests.

Layout: `out_dir/<name>/` is the checkpoint folder; `hf_consolidated/` holds torch's consolidated model and its
`sharded/` folder (enable_consolidation=True); `hf_clobbered/` is what save_distributed=False makes of a sharded
state dict (each rank writes the same file name; one rank's pieces survive).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tests.support.dcp_writers import LR, _clone_full, _gather_full, _tp_plan, _train_step, expected_path, tiny_llama
from streamconv.demo_checkpoint import run_distributed

CHECKPOINTS: Dict[str, tuple] = {
    "st_fsdp2_optim": ("ranks2", "FSDP2 TinyLlama after one AdamW step, {'model', 'optim'}: bytes items, then one "
                                 "safetensors blob per file"),
    "st_multifile": ("ranks2", "st_fsdp2_optim's state with single_file_per_rank=False (one file per item)"),
    "st_threads": ("ranks2", "st_fsdp2_optim's state with thread_count=2"),
    "st_tp": ("ranks2", "TinyLlama tensor parallel: Colwise Shard(0), Rowwise Shard(1)"),
    "st_dtypes": ("ranks2", "DTensor.from_local bf16/f16/f8/i64/i32/u8/bool on Shard(0)/Shard(1), 0-d, empty chunk"),
    "hf_fsdp2": ("ranks2", "FSDP2 TinyLlama state dict (HF names), one file per rank"),
    "hf_tp": ("ranks2", "TinyLlama tensor parallel (Shard(0), Shard(1))"),
    "hf_map": ("ranks2", "FSDP2 TinyLlama with fqn_to_index_mapping: 3 files per rank"),
    "hf_dtypes": ("ranks2", "as st_dtypes, without the 0-d tensor (torch's HF writer needs a shape)"),
    "hf_consolidated": ("ranks2", "FSDP2 TinyLlama, enable_consolidation=True: consolidated model + sharded/"),
    "hf_clobbered": ("ranks2", "FSDP2 TinyLlama, save_distributed=False: every rank writes its pieces under the same "
                               "file name, the last one wins (a broken save torch allows)"),
    "st_mesh2d": ("ranks4", "TinyLlama TP on mesh['tp'] then FSDP2 on mesh['dp'] (2x2): _StridedShard + Shard"),
    "hf_mesh2d": ("ranks4", "as st_mesh2d, HuggingFaceStorageWriter per-rank shards"),
}
GROUPS = {"ranks2": ("write_ranks2", 2), "ranks4": ("write_ranks4", 4)}


def build(out_dir, names=None) -> Dict[str, Path]:
    out = Path(out_dir)
    names = list(CHECKPOINTS) if names is None else list(names)
    for group in dict.fromkeys(CHECKPOINTS[n][0] for n in names):
        fn_name, world_size = GROUPS[group]
        run_distributed(f"{__name__}:{fn_name}", world_size, dict(out_dir=str(out)), timeout_s=300.0)
    return {n: out / n for n in names}


def load_expected(ckpt_dir) -> Dict[str, torch.Tensor]:
    return torch.load(expected_path(ckpt_dir), weights_only=True)


def _record(path: Path, expected: Dict[str, torch.Tensor]) -> None:
    if dist.get_rank() == 0:
        torch.save(expected, expected_path(path))
    dist.barrier()


def _save_st(out_dir, name: str, state: dict, expected: Dict[str, torch.Tensor], **kwargs) -> None:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    path = Path(out_dir) / name
    dcp.save(state, storage_writer=dcp.FileSystemWriter(
        path, serialization_format=SerializationFormat.SAFETENSORS, sync_files=False, **kwargs))
    _record(path, expected)


def _save_hf(out_dir, name: str, sd: dict, expected: Dict[str, torch.Tensor], **kwargs) -> None:
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(out_dir) / name
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(path), **kwargs))
    _record(path, expected)


def _dtype_tensors(mesh, *, scalar: bool) -> Dict[str, tuple]:
    """{name: (DTensor or tensor, full tensor)}: dtypes gloo cannot move, sharded without communication."""
    from torch.distributed.tensor import DTensor, Shard

    gen = torch.Generator().manual_seed(7)
    fulls = {
        "bf16_rows.weight": (torch.randn(9, 6, generator=gen).to(torch.bfloat16), 0),
        "f16_cols.weight": (torch.randn(4, 11, generator=gen).half(), 1),
        "f8.weight": (torch.randn(5, 4, generator=gen).to(torch.float8_e4m3fn), 0),
        "i64.weight": (torch.randint(-2**40, 2**40, (7, 3), generator=gen), 1),
        "i32.weight": (torch.randint(-2**31, 2**31 - 1, (6,), generator=gen, dtype=torch.int32), 0),
        "u8.weight": (torch.randint(0, 255, (3, 5), generator=gen, dtype=torch.uint8), 0),
        "bool.weight": (torch.rand(3, 8, generator=gen) > 0.5, 1),
        "one_row.weight": (torch.randn(1, 4, generator=gen), 0),   # rank 1 holds an empty chunk
    }
    rank, world = mesh.get_local_rank(), mesh.size()
    out = {}
    for key, (full, dim) in fulls.items():
        pieces = full.chunk(world, dim=dim)   # DTensor's Shard rule; from_local trusts us to follow it
        local = pieces[rank] if rank < len(pieces) else full.narrow(dim, full.shape[dim], 0)
        out[key] = (DTensor.from_local(local.clone(), mesh, [Shard(dim)], run_check=False, shape=full.shape,
                                       stride=full.stride()), full)
    if scalar:
        out["scalar"] = (torch.tensor(2.5), torch.tensor(2.5))
    return out


def write_ranks2(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world_size,))
    model = tiny_llama(seed=0)
    init = _clone_full(model.state_dict(), "")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sd = get_model_state_dict(model)
    _save_hf(out_dir, "hf_fsdp2", sd, init, save_distributed=True)
    names = list(init)
    mapping = {k: 1 + (i % 3) for i, k in enumerate(names)}
    _save_hf(out_dir, "hf_map", sd, init, save_distributed=True, fqn_to_index_mapping=mapping)
    _save_hf(out_dir, "hf_consolidated", sd, init, save_distributed=True, enable_consolidation=True,
             fqn_to_index_mapping={k: 1 for k in names})
    _save_hf(out_dir, "hf_clobbered", sd, init, save_distributed=False)

    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    _train_step(model, optim, rank)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    trained = _gather_full(state)
    _save_st(out_dir, "st_fsdp2_optim", state, trained)
    _save_st(out_dir, "st_multifile", state, trained, single_file_per_rank=False)
    _save_st(out_dir, "st_threads", state, trained, thread_count=2)

    model = tiny_llama(seed=0)
    parallelize_module(model, mesh, _tp_plan())
    _save_st(out_dir, "st_tp", {"model": get_model_state_dict(model)}, {"model." + k: v for k, v in init.items()})
    _save_hf(out_dir, "hf_tp", get_model_state_dict(model), init, save_distributed=True)

    tensors = _dtype_tensors(mesh, scalar=True)
    _save_st(out_dir, "st_dtypes", {"model": {k: v for k, (v, _) in tensors.items()}},
             {"model." + k: full for k, (_, full) in tensors.items()})
    tensors = _dtype_tensors(mesh, scalar=False)
    _save_hf(out_dir, "hf_dtypes", {k: v for k, (v, _) in tensors.items()},
             {k: full for k, (_, full) in tensors.items()}, save_distributed=True)
    return [n for n, (g, _) in CHECKPOINTS.items() if g == "ranks2"]


def write_ranks4(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    assert world_size == 4, "the 2-D writers need a 2x2 mesh"
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tiny_llama(seed=0)
    init = _clone_full(model.state_dict(), "")
    parallelize_module(model, mesh["tp"], _tp_plan())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    sd = get_model_state_dict(model)
    _save_st(out_dir, "st_mesh2d", {"model": sd}, {"model." + k: v for k, v in init.items()})
    _save_hf(out_dir, "hf_mesh2d", sd, init, save_distributed=True)
    return [n for n, (g, _) in CHECKPOINTS.items() if g == "ranks4"]



BIG_ROWS, BIG_COLS = 4096, 2048      # 32 MiB of float32 per tensor


def write_big(rank: int, world_size: int, out_dir: str) -> int:
    """Two 32 MiB tensors, Shard(0) and Shard(1), in both flavors; each rank builds only its own pieces."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    rows = torch.empty(BIG_ROWS // world_size, BIG_COLS).uniform_(generator=gen)
    cols = torch.empty(BIG_ROWS, BIG_COLS // world_size).uniform_(generator=gen)
    sd = {"embed.weight": DTensor.from_local(rows, mesh, [Shard(0)], run_check=False),
          "down_proj.weight": DTensor.from_local(cols, mesh, [Shard(1)], run_check=False)}
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(str(Path(out_dir) / "hf"), save_distributed=True))
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(
        Path(out_dir) / "st", serialization_format=SerializationFormat.SAFETENSORS, sync_files=False))
    return 0
