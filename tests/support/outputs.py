"""Reading a converted output folder back with safetensors, and comparing tensors bit for bit (NaNs and signed
zeros included), for the end-to-end suites."""
import json
from pathlib import Path

import torch
from safetensors import safe_open


def read_output(out_dir):
    """{name: tensor} of every safetensors file in out_dir, checked against the index when there is one."""
    out_dir = Path(out_dir)
    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    tensors, where = {}, {}
    for name in files:
        with safe_open(str(out_dir / name), framework="pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} written twice"
                tensors[key] = f.get_tensor(key)
                where[key] = name
    index_path = out_dir / "model.safetensors.index.json"
    if len(files) > 1:
        index = json.loads(index_path.read_text())
        assert index["weight_map"] == where
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert files == ["model.safetensors"] and not index_path.exists()
    return tensors


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)) if a.numel() else True
