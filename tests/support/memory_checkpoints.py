"""Checkpoints laid out in memory for the execution tests (no files, no blob parsing: the `stored` map is built
directly): random N-D arrays cut into grid boxes, optionally each box stored with permuted strides; running the
executor over a plan into memory sinks; reading the safetensors bytes back."""
import itertools
import json

import numpy as np
from hypothesis import strategies as st

from streamconv.execution.executor import Executor
from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, StoredTensor, TensorEntry
from streamconv.output.sink import MemorySink
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.source.blob_reader import BlobReader
from streamconv.source.io import MemoryReader


NP = {"float32": np.float32, "int64": np.int64, "float16": np.float16, "int8": np.int8}


def make_checkpoint(arrays, cuts_by_name, n_files=3, pad=5):
    """Lay each array's grid boxes into `n_files` in-memory files; return metadata, files and stored map."""
    files = {f"__{r}_0.distcp": bytearray() for r in range(n_files)}
    stored, entries = {}, []
    counter = itertools.count()
    for name, arr in arrays.items():
        bounds = [[0] + sorted(set(c)) + [s] for c, s in zip(cuts_by_name[name], arr.shape)]
        ranges = [[(lo, hi) for lo, hi in zip(b, b[1:]) if hi > lo] for b in bounds]
        chunks = []
        for box in itertools.product(*ranges):
            piece = arr[tuple(slice(lo, hi) for lo, hi in box)].copy(order="C")
            rel = f"__{next(counter) % n_files}_0.distcp"
            buf = files[rel]
            buf.extend(b"\xee" * pad)          # junk between items, like zip headers
            offset = len(buf)
            buf.extend(piece.tobytes())
            location = BlobLocation(rel, offset - pad, piece.nbytes + pad)
            chunks.append(Chunk(tuple(lo for lo, _ in box), tuple(hi - lo for lo, hi in box), location))
            stored[location] = StoredTensor(dtype=str(arr.dtype), shape=piece.shape,
                                            stride=tuple(s // arr.itemsize for s in piece.strides) or (),
                                            data_offset=offset, data_nbytes=piece.nbytes)
        entries.append(TensorEntry(fqn=name, dtype=str(arr.dtype), shape=arr.shape, chunks=tuple(chunks),
                                   path=(name,)))
    meta = CheckpointMetadata(tensors=tuple(entries))
    return meta, MemoryReader({k: bytes(v) for k, v in files.items()}), stored


def run(meta, reader, stored, buffer_bytes, **opts):
    plan = build_plan(meta, PlanOptions(max_shard_bytes=opts.pop("max_shard_bytes", 10**9), **opts))
    executor = Executor(BlobReader(reader, stored), stored, buffer_bytes)
    out = {}
    for shard in plan.shards:
        sink = MemorySink(shard.nbytes)
        executor.write_shard(shard, sink)
        out[shard.filename] = bytes(sink.data)
    return plan, out


def read_safetensors(blob):
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    data = blob[8 + n:]
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items()}


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.integers(1, 7)) for _ in range(ndim))
    cuts = [draw(st.lists(st.integers(1, max(1, s - 1)), max_size=2)) if s > 1 else [] for s in shape]
    dtype = draw(st.sampled_from(sorted(NP)))
    seed = draw(st.integers(0, 2**16))
    arr = (np.random.default_rng(seed).standard_normal(shape) * 100).astype(NP[dtype])
    return arr, cuts


def permuted_checkpoint(arr, cuts, orders, zstd=False):
    """Like `make_checkpoint`, but box i is stored in dim order orders[i % len(orders)] (outermost
    first), i.e. as `box.transpose(order)` laid out row-major, with the strides torch.save would record.
    `zstd`: each blob (3 filler bytes, then the box) is zstd-compressed, as `_extensions=[ZStandard()]` stores
    it, its offsets those of its decoded stream."""
    bounds = [[0] + sorted(set(c)) + [s] for c, s in zip(cuts, arr.shape)]
    ranges = [[(lo, hi) for lo, hi in zip(b, b[1:]) if hi > lo] for b in bounds]
    data, chunks, stored = bytearray(), [], {}
    for i, box in enumerate(itertools.product(*ranges)):
        piece = arr[tuple(slice(lo, hi) for lo, hi in box)]
        order = orders[i % len(orders)]
        storage = np.ascontiguousarray(piece.transpose(order))
        stride = [0] * arr.ndim
        acc = 1
        for dim in reversed(order):
            stride[dim] = acc
            acc *= piece.shape[dim]
        blob = b"\xee" * 3 + storage.tobytes()
        if zstd:
            import zstandard
            blob = zstandard.ZstdCompressor().compress(blob)
            location = BlobLocation("__0_0.distcp", len(data), len(blob), ("stream.zstd/1",))
            stored[location] = StoredTensor(str(arr.dtype), piece.shape, tuple(stride), 3, storage.nbytes, 3,
                                            storage.nbytes, transforms=location.transform_descriptors)
        else:
            location = BlobLocation("__0_0.distcp", len(data), len(blob))
            stored[location] = StoredTensor(str(arr.dtype), piece.shape, tuple(stride), len(data) + 3, storage.nbytes)
        data.extend(blob)
        chunks.append(Chunk(tuple(lo for lo, _ in box), tuple(hi - lo for lo, hi in box), location))
    meta = CheckpointMetadata(tensors=(TensorEntry("w", str(arr.dtype), arr.shape, tuple(chunks), ("w",)),))
    return meta, MemoryReader({"__0_0.distcp": bytes(data)}), stored
