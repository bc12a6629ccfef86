"""DCP checkpoints in the flavors of issue 11 items 1 and 4, written by torch's own FileSystemWriter in gloo groups:

| launch | ranks | checkpoints |
|--------|-------|-------------|
| write_zstd_ranks3 | 3 | zstd_fsdp2 (FSDP2 TinyLlama, `_extensions=[ZStandard()]`), zstd_threads (+ 2 threads) |
| write_zstd_ranks4 | 4 | zstd_mesh2d (TP then FSDP2 on a 2x2 mesh: Shard(1) boxes, assembled in bands) |
| write_strided_ranks2 | 2 | strided_dtensor(_zstd): DTensor.from_local of transposed / channels_last shards |
| write_column_blocks | 1 | column_blocks_<n>: a float32 weight as n column blocks (Shard(1) over n ranks), 1 process |

`strided_single(path)` writes one-process checkpoints (`no_dist=True`) of tensors saved as they are: transposed,
channels_last, a 3-D permutation. Compare with `dcp_writers.reference_state_dict` (torch's `dcp_to_torch_save`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tests.support.dcp_writers import _tp_plan, tiny_llama


def _zstd_writer(path, **kwargs):
    from torch.distributed.checkpoint._extension import ZStandard
    return dcp.FileSystemWriter(path, _extensions=[ZStandard()], sync_files=False, **kwargs)


def write_zstd_ranks3(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = tiny_llama(seed=0)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": get_model_state_dict(model)}
    dcp.save(state, storage_writer=_zstd_writer(Path(out_dir) / "zstd_fsdp2"))
    dcp.save(state, storage_writer=_zstd_writer(Path(out_dir) / "zstd_threads", thread_count=2))
    return ["zstd_fsdp2", "zstd_threads"]


def write_zstd_ranks4(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = tiny_llama(seed=0)
    parallelize_module(model, mesh["tp"], _tp_plan())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dcp.save({"model": get_model_state_dict(model)}, storage_writer=_zstd_writer(Path(out_dir) / "zstd_mesh2d"))
    return ["zstd_mesh2d"]


def _strided_locals(rank: int, world_size: int) -> Dict[str, tuple]:
    """{name: (local shard as saved, placement)}: each rank's shard is a transposed or channels_last view of its
    own contiguous storage, so torch.save keeps the strides."""
    from torch.distributed.tensor import Shard
    gen = torch.Generator().manual_seed(100 + rank)
    return {
        # global [40, 2*33]: each rank holds 33 columns, stored transposed (stride (1, 40))
        "proj_t.weight": (torch.randn(33, 40, generator=gen).t(), Shard(1)),
        # global [2*5, 40]: each rank holds 5 rows of a transposed tensor (stride (1, 5))
        "rows_t.weight": (torch.randn(40, 5, generator=gen).t(), Shard(0)),
        # channels_last conv weight, output channels sharded
        "conv.weight": (torch.randn(4, 3, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last),
                        Shard(0)),
    }


def write_strided_ranks2(rank: int, world_size: int, out_dir: str) -> List[str]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))
    sd = {k: DTensor.from_local(local, mesh, [placement], run_check=False)
          for k, (local, placement) in _strided_locals(rank, world_size).items()}
    dcp.save({"model": sd}, storage_writer=dcp.FileSystemWriter(Path(out_dir) / "strided_dtensor", sync_files=False))
    dcp.save({"model": sd}, storage_writer=_zstd_writer(Path(out_dir) / "strided_dtensor_zstd"))
    dist.barrier()
    return ["strided_dtensor", "strided_dtensor_zstd"]


def strided_state(seed: int = 0) -> Dict[str, torch.Tensor]:
    """Tensors whose storage order is not their dim order (plus a plain one)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "linear_t.weight": torch.randn(96, 6, generator=gen).t(),                       # stride (1, 6)
        "conv.weight": torch.randn(9, 3, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last),
        "cube.weight": torch.randn(5, 7, 11, generator=gen).permute(2, 0, 1),          # 3-D permutation
        "big_t.weight": torch.randn(300, 257, generator=gen).t(),                       # many bands, small buffer
        "half_t.weight": torch.randn(64, 48, generator=gen).to(torch.bfloat16).t(),
        "plain.weight": torch.randn(4, 8, generator=gen),
    }


def strided_single(path, *, zstd: bool = False) -> Dict[str, torch.Tensor]:
    """dcp.save of `strided_state` in this process (no process group); returns what was saved."""
    import warnings
    state = strided_state()
    assert not state["linear_t.weight"].is_contiguous()
    writer = _zstd_writer(path) if zstd else dcp.FileSystemWriter(path, sync_files=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, storage_writer=writer, no_dist=True)
    return state




def write_column_blocks(rank: int, world_size: int, out_dir: str, columns=(16, 32), shape=(256, 2048)) -> List[str]:
    """A float32 weight of `shape` saved as n column blocks for each n in `columns` (what tensor-parallel Shard(1)
    over n ranks writes: each block in its own zstd blob), from one process: a ShardedTensor whose local shards
    are every block, so no n processes are needed. Folders `column_blocks_<n>`."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
    rows, cols = shape
    full = torch.empty(rows, cols).uniform_(generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
    names = []
    for n in columns:
        width = cols // n
        shards = [Shard(full[:, i * width:(i + 1) * width].clone(),
                        ShardMetadata([0, i * width], [rows, width], "rank:0/cpu")) for i in range(n)]
        names.append(f"column_blocks_{n}")
        dcp.save({"w": init_from_local_shards(shards, [rows, cols])},
                 storage_writer=_zstd_writer(Path(out_dir) / names[-1]))
    return names
