"""Baseline: the llama-cookbook way (`load_sharded_model_single_gpu`): allocate every model tensor,
fill them with `dcp.load(..., no_dist=True)`, save.

    python -m benchmarks.baselines.cookbook CHECKPOINT_DIR OUTPUT_DIR

The cookbook builds the model from its HF config and loads into `{"model": model.state_dict()}`;
allocating `torch.empty` tensors of the shapes in `.metadata` costs the same memory without needing
the model class.
"""
import sys

import torch
import torch.distributed.checkpoint as dcp

from .common import model_tensors, save_sharded


def main(ckpt: str, out: str) -> None:
    reader = dcp.FileSystemReader(ckpt)
    metadata = reader.read_metadata()
    planner_data = metadata.planner_data or {}
    tensors = model_tensors(metadata)
    state_dict: dict = {}
    for t in tensors:
        path = tuple(planner_data.get(t.fqn, (t.fqn,)))
        node = state_dict
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
    dcp.load(state_dict, storage_reader=reader, no_dist=True)
    model = state_dict["model"] if isinstance(state_dict.get("model"), dict) else state_dict
    save_sharded(model, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
