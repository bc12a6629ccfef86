"""`streamconv inspect`: what is inside a checkpoint, from `.metadata` alone (and a Megatron folder's
metadata.json); no tensor bytes are read.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

from .. import dtypes
from ..errors import OptionsError
from ..fs import location
from ..planning import names
from ..planning.naming import source_format
from ..planning.plan import PlanOptions
from ..planning.trainers import megatron
from ..source import transforms
from . import discover
from .checkpoint import load
from .preparing import checkpoint_argument


def describe_layout(shape: Sequence[int], chunks: Iterable) -> str:
    """How a tensor is split, for inspect: '3 chunks, dim 0', '4 chunks, dims 0,1', 'whole' (one chunk) or
    '2 copies' (every chunk the whole tensor: replicated)."""
    chunks = list(chunks)
    dims = sorted({d for c in chunks for d, (s, full) in enumerate(zip(c.sizes, shape)) if s != full})
    if not dims:
        return "whole" if len(chunks) == 1 else f"{len(chunks)} copies"
    return f"{len(chunks)} chunks, dim{'s' if len(dims) > 1 else ''} {','.join(map(str, dims))}"


def inspect(checkpoint_dir: str) -> dict:
    """See `streamconv.inspect` (api.py). A run folder stands for the model's DCP folder in it
    (`discover.find_checkpoint`); `found` then says which was taken."""
    checkpoint_dir, found_note = discover.find_checkpoint(checkpoint_argument(checkpoint_dir))
    megatron_folder = megatron.recognise(checkpoint_dir)
    reader, meta = load(checkpoint_dir)
    reader.close()
    tensors = []
    total = 0
    by_dtype: Dict[str, int] = {}
    for t in meta.tensors:
        n = 1
        for s in t.shape:
            n *= s
        nbytes = n * dtypes.BY_NAME[t.dtype].itemsize if t.dtype in dtypes.BY_NAME else 0
        total += nbytes
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + nbytes
        tensors.append({"name": t.fqn, "dtype": t.dtype, "shape": list(t.shape), "bytes": nbytes,
                        "chunks": len(t.chunks), "layout": describe_layout(t.shape, t.chunks)})
    top_keys: Dict[str, int] = {}
    for t in meta.tensors:
        key = str(t.path[0]) if len(t.path) >= 2 else "(top level)"
        top_keys[key] = top_keys.get(key, 0) + 1
    return {
        "checkpoint": location.absolute(checkpoint_dir),
        "torch_version_hint": meta.torch_version_hint,
        "metadata_version": meta.version,
        "files": list(meta.files),
        "tensor_count": len(meta.tensors),
        "tensor_bytes": total,
        "bytes_by_dtype": by_dtype,
        "top_level_keys": top_keys,
        "model_subtree": names.model_subtree(t.path for t in meta.tensors),
        "source_format": _trainer(meta),
        "non_tensor_entries": [b.fqn for b in meta.byte_entries],
        "tensors": tensors,
        "found": found_note,
        "format": megatron_folder.note if megatron_folder else (meta.flavor or None),
        "transform": transforms.note(meta),     # compressed blobs, and whether this install can decode them
    }


def _trainer(meta) -> dict:
    """Which trainer's names the checkpoint has, as `--source-format auto` would detect it; "ambiguous" (with
    why) rather than an error, since inspect is how a user finds out which to name."""
    try:
        detected = source_format(meta, PlanOptions())
    except OptionsError as exc:
        return {"name": "ambiguous", "note": str(exc)}
    return {"name": detected.name, "note": detected.note,
            "family": detected.adapter.family if detected.adapter else None,
            "expert_layout": (detected.adapter.expert_layout or None) if detected.adapter else None}
