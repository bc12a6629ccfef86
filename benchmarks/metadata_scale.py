"""Write the `.metadata` of a DeepSeek-V3-scale torchtitan checkpoint (671B parameters, 512 ranks), with sparse
data files, so that `streamconv plan` can be timed and measured at that scale without 1.3 TB of disk.

    python -m benchmarks.metadata_scale --out /tmp/dsv3-meta [--with-optim]

* **torch's own classes, pickled as torch pickles them.** `Metadata`, `TensorStorageMetadata`, `TensorProperties`,
  `ChunkStorageMetadata`, `MetadataIndex` and `_StorageInfo` from torch.distributed.checkpoint, dumped with
  `pickle.dump(metadata, f)` as `FileSystemWriter.finish` does (version "1.0.0", a `StorageMeta`, planner_data
  `{fqn: path}` as DefaultSavePlanner leaves it). No process group is started: the chunk boxes are computed here,
  as DTensor lays them out.
* **Shapes of DeepSeek-V3** (`DeepseekV3Config` of deepseek-ai/DeepSeek-V3), in torchtitan 0.3's names: 61 layers,
  the first 3 dense (intermediate 18432), then MoE (256 routed experts of intermediate 2048, one shared expert, a
  router and its load-balancing bias `expert_bias_E`), multi-latent attention with q LoRA (q rank 1536, kv rank
  512, rope head 64, nope head 128, v head 128, 128 heads), vocabulary 129280, hidden 7168. 1,025 tensors,
  671,026,419,200 parameters (DeepSeek-V3's 671B without its multi-token-prediction layer).
* **Layout: EP 64 x FSDP 8** (512 ranks) as torchtitan shards it: every non-expert parameter `Shard(0)` over the
  512 ranks (torch.chunk sizes; a rank whose share is empty writes no chunk), routed experts `Shard(0)` over 64
  expert-parallel ranks (4 experts each) and, since 4 experts cannot be split 8 ways, `Shard(1)` over the 8
  FSDP ranks of each group: 512 chunks of [4, 256, 7168] or [4, 896, 2048] per grouped expert weight. 481,438
  chunks; `--with-optim` adds AdamW's `exp_avg` and `exp_avg_sq` (float32, same boxes) and a 0-d `step` per
  parameter under `optimizer.state.<fqn>.`: 3x the chunks, plus 1,025.
* **Data files** `__<rank>_0.distcp` are sparse (truncated to their size, nothing written): each chunk's blob is
  its bytes plus torch.save's zip overhead. Nothing here can be converted; `plan` reads only `.metadata`.

`--layers`, `--experts`, `--ep`, `--fsdp` scale it down (tests/test_benchmarks.py runs a small one).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

# torch.save of one tensor: the zip's local headers, data.pkl, byteorder, version and the central directory,
# with the data record aligned to 64 bytes. 1,529 bytes for a small tensor with torch 2.13 (measured); a blob
# length equal to the tensor's bytes would read as the safetensors-serialized flavor.
BLOB_OVERHEAD_BYTES = 1536
ITEMSIZE = {"bfloat16": 2, "float32": 4}


def dsv3_tensors(layers: int = 61, dense_layers: int = 3, experts: int = 256, hidden: int = 7168,
                 vocab: int = 129280) -> List[Tuple[str, Tuple[int, ...], str, bool]]:
    """(torchtitan name, shape, dtype, is a grouped expert weight) of DeepSeek-V3, in the model's order."""
    heads, q_rank, kv_rank, rope, nope, v_head = 128, 1536, 512, 64, 128, 128
    dense_ffn, moe_ffn = 18432, 2048
    out = [("tok_embeddings.weight", (vocab, hidden), "bfloat16", False)]
    for i in range(layers):
        a, p = f"layers.{i}.attention.", f"layers.{i}."
        out += [(a + "wq_a.weight", (q_rank, hidden), "bfloat16", False),
                (a + "q_norm.weight", (q_rank,), "bfloat16", False),
                (a + "wq_b.weight", (heads * (nope + rope), q_rank), "bfloat16", False),
                (a + "wkv_a.weight", (kv_rank + rope, hidden), "bfloat16", False),
                (a + "kv_norm.weight", (kv_rank,), "bfloat16", False),
                (a + "wkv_b.weight", (heads * (nope + v_head), kv_rank), "bfloat16", False),
                (a + "wo.weight", (hidden, heads * v_head), "bfloat16", False),
                (p + "attention_norm.weight", (hidden,), "bfloat16", False),
                (p + "ffn_norm.weight", (hidden,), "bfloat16", False)]
        if i < dense_layers:
            out += [(p + "feed_forward.w1.weight", (dense_ffn, hidden), "bfloat16", False),
                    (p + "feed_forward.w2.weight", (hidden, dense_ffn), "bfloat16", False),
                    (p + "feed_forward.w3.weight", (dense_ffn, hidden), "bfloat16", False)]
            continue
        m = p + "moe."
        out += [(m + "router.gate.weight", (experts, hidden), "bfloat16", False),
                (m + "expert_bias_E", (experts,), "float32", False),
                (m + "shared_experts.w1.weight", (moe_ffn, hidden), "bfloat16", False),
                (m + "shared_experts.w2.weight", (hidden, moe_ffn), "bfloat16", False),
                (m + "shared_experts.w3.weight", (moe_ffn, hidden), "bfloat16", False),
                (m + "routed_experts.inner_experts.w1_EFD", (experts, moe_ffn, hidden), "bfloat16", True),
                (m + "routed_experts.inner_experts.w2_EDF", (experts, hidden, moe_ffn), "bfloat16", True),
                (m + "routed_experts.inner_experts.w3_EFD", (experts, moe_ffn, hidden), "bfloat16", True)]
    out += [("norm.weight", (hidden,), "bfloat16", False),
            ("output.weight", (vocab, hidden), "bfloat16", False)]
    return out


def _split(n: int, parts: int) -> List[Tuple[int, int]]:
    """torch.chunk's (offset, size) of each part of n; parts past the end are empty (size 0)."""
    step = -(-n // parts)
    return [(min(i * step, n), max(0, min(step, n - i * step))) for i in range(parts)]


def boxes(shape: Tuple[int, ...], expert: bool, ep: int, fsdp: int) -> Iterator[Tuple[int, Tuple, Tuple]]:
    """(rank, offsets, sizes) of every non-empty chunk, rank order."""
    if not expert:
        for rank, (off, size) in enumerate(_split(shape[0], ep * fsdp)):
            if size:
                yield rank, (off,) + (0,) * (len(shape) - 1), (size,) + tuple(shape[1:])
        return
    for group, (e_off, e_size) in enumerate(_split(shape[0], ep)):
        for member, (off, size) in enumerate(_split(shape[1], fsdp)):
            if e_size and size:
                yield group * fsdp + member, (e_off, off, 0), (e_size, size, shape[2])


def build_metadata(out: Path, tensors, ep: int, fsdp: int, with_optim: bool):
    """torch's `Metadata` for `tensors` laid out over ep x fsdp ranks, and each rank's data file size in bytes."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    ranks = ep * fsdp
    file_bytes = [0] * ranks
    # One name object per file, as torch's writer hands every _StorageInfo of a file the same string (the pickle
    # then refers back to it instead of repeating it).
    file_names = [f"__{rank}_0.distcp" for rank in range(ranks)]
    sdm, storage, planner = {}, {}, {}
    dtype_of = {"bfloat16": torch.bfloat16, "float32": torch.float32}

    def add(fqn: str, shape, dtype: str, chunks, path):
        metas = []
        for index, (rank, offsets, sizes) in enumerate(chunks):
            nbytes = ITEMSIZE[dtype]
            for s in sizes:
                nbytes *= s
            metas.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            length = nbytes + BLOB_OVERHEAD_BYTES
            storage[MetadataIndex(fqn, torch.Size(offsets), index)] = _StorageInfo(
                file_names[rank], file_bytes[rank], length)
            file_bytes[rank] += length
        sdm[fqn] = TensorStorageMetadata(TensorProperties(dtype=dtype_of[dtype]), torch.Size(shape), metas)
        planner[fqn] = path

    for name, shape, dtype, expert in tensors:
        add(name, shape, dtype, list(boxes(shape, expert, ep, fsdp)), (name,))
    if with_optim:
        for name, shape, _, expert in tensors:
            for state in ("exp_avg", "exp_avg_sq"):
                fqn = f"optimizer.state.{name}.{state}"
                add(fqn, shape, "float32", list(boxes(shape, expert, ep, fsdp)), ("optimizer", "state", name, state))
            # AdamW's step: a 0-d float32 tensor, replicated (rank 0 saves it).
            fqn = f"optimizer.state.{name}.step"
            add(fqn, (), "float32", [(0, (), ())], ("optimizer", "state", name, "step"))
    metadata = Metadata(state_dict_metadata=sdm, planner_data=planner, storage_data=storage,
                        storage_meta=StorageMeta(checkpoint_id=out, save_id=str(uuid.uuid4())), version="1.0.0")
    return metadata, file_bytes


def write(out: Path, *, layers: int = 61, dense_layers: int = 3, experts: int = 256, ep: int = 64, fsdp: int = 8,
          with_optim: bool = False) -> Dict[str, int]:
    """Write `.metadata` and the sparse data files into a new folder `out`; returns the counts written."""
    tensors = dsv3_tensors(layers=layers, dense_layers=dense_layers, experts=experts)
    out.mkdir(parents=True)
    metadata, file_bytes = build_metadata(out, tensors, ep, fsdp, with_optim)
    for rank, size in enumerate(file_bytes):
        with open(out / f"__{rank}_0.distcp", "wb") as f:
            f.truncate(size)          # sparse: no data blocks are allocated
    tmp = out / ".metadata.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(metadata, f)      # as FileSystemWriter.finish
    os.rename(tmp, out / ".metadata")
    chunks = sum(len(t.chunks) for t in metadata.state_dict_metadata.values())
    params = 0
    for _, shape, _, _ in tensors:
        n = 1
        for s in shape:
            n *= s
        params += n
    return {"tensors": len(metadata.state_dict_metadata), "model_tensors": len(tensors), "parameters": params,
            "chunks": chunks, "ranks": ep * fsdp, "metadata_bytes": (out / ".metadata").stat().st_size,
            "data_bytes": sum(file_bytes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="new folder to write (must not exist)")
    parser.add_argument("--with-optim", action="store_true", help="add AdamW exp_avg, exp_avg_sq and step")
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--dense-layers", type=int, default=3)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--ep", type=int, default=64, help="expert-parallel ranks")
    parser.add_argument("--fsdp", type=int, default=8, help="FSDP ranks per expert-parallel group")
    args = parser.parse_args(argv)
    if args.out.exists():
        parser.error(f"{args.out} exists; pass a new folder")
    started = time.perf_counter()
    counts = write(args.out, layers=args.layers, dense_layers=args.dense_layers, experts=args.experts, ep=args.ep,
                   fsdp=args.fsdp, with_optim=args.with_optim)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
