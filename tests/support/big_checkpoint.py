"""A 256 MiB checkpoint for the memory bounds (tests/memory/test_memory.py, tests/verification/test_verify.py): two
128 MiB float32 tensors saved by DCP from two gloo ranks, one as tensor-parallel column blocks (Shard(1), the
case that needs assembly) and one as row blocks (Shard(0)). No rank ever holds a whole tensor."""
from pathlib import Path

from streamconv.demo_checkpoint import run_distributed

ROWS, COLS = 4096, 8192          # 128 MiB of float32 per tensor


def write_big(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    # Build local shards directly (no full tensor on any rank), as a TP-trained model holds them.
    cols = torch.empty(ROWS, COLS // world_size).uniform_(generator=gen)
    rows = torch.empty(ROWS // world_size, COLS).uniform_(generator=gen)
    state = {"model": {
        "down_proj.weight": DTensor.from_local(cols, mesh, [Shard(1)], run_check=False),
        "embed.weight": DTensor.from_local(rows, mesh, [Shard(0)], run_check=False),
    }}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


def write(out: Path) -> Path:
    """The checkpoint, written into the folder `out`."""
    run_distributed(f"{__name__}:write_big", 2, dict(out_dir=str(out)))
    return out
