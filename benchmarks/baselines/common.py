"""Shared by the baseline scripts and the harness: which DCP entries are model weights, and a
sharded safetensors writer in the usual Hugging Face layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9   # "5GB", as transformers and streamconv default to


class ModelTensor(NamedTuple):
    fqn: str                 # flat DCP key, e.g. "model.model.language_model.norm.weight"
    name: str                # output name, e.g. "model.language_model.norm.weight"
    shape: Tuple[int, ...]
    dtype: str               # torch dtype name without "torch."


def model_tensors(metadata) -> List[ModelTensor]:
    """Model weights of a DCP `Metadata`, in its order.

    llama-cookbook and accelerate save `{"model": state_dict, "optim": ...}`, so a weight's
    planner path is ("model", "<name>"): keep those and name them by the inner key. A checkpoint
    without a "model" entry (torchtitan-style flat keys) is all model: keep every tensor.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner_data = metadata.planner_data or {}
    tensors = [(fqn, md) for fqn, md in metadata.state_dict_metadata.items() if isinstance(md, TensorStorageMetadata)]
    nested = [(fqn, md) for fqn, md in tensors if tuple(planner_data.get(fqn, (fqn,)))[:1] == ("model",)]
    out = []
    for fqn, md in nested or tensors:
        path = tuple(planner_data.get(fqn, (fqn,)))
        name = ".".join(str(p) for p in path[1:]) if nested else fqn
        out.append(ModelTensor(fqn, name, tuple(md.size), str(md.properties.dtype).replace("torch.", "")))
    return out


def select_model_state_dict(state_dict: dict) -> dict:
    """From a loaded (nested) checkpoint state dict, the flat dict of model weights."""
    import torch

    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def save_sharded(state_dict: Dict[str, "object"], out_dir: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Greedy in state-dict order: a shard is closed when the next tensor would overflow it.
    One shard is written as `model.safetensors`; several get `model.safetensors.index.json`."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: List[List[str]] = [[]]
    size = 0
    for name, t in state_dict.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    if len(shards) == 1:
        save_file({n: state_dict[n].contiguous() for n in shards[0]}, str(out_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state_dict[n].contiguous() for n in names}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
