"""Checkpoint metadata built by hand (no files) for planner tests: a blob location per rank, FSDP-style dim-0
chunks, and a tensor entry under the "model" subtree."""
from streamconv.model import BlobLocation, Chunk, TensorEntry


def loc(rank, offset=0, length=100):
    return BlobLocation(f"__{rank}_0.distcp", offset, length)


def dim0_chunks(rows, cols, parts):
    """FSDP-style torch.chunk split along dim 0."""
    step = -(-rows // parts)
    out, start, rank = [], 0, 0
    while start < rows:
        n = min(step, rows - start)
        out.append(Chunk((start, 0) if cols else (start,), (n, cols) if cols else (n,), loc(rank, start)))
        start += n
        rank += 1
    return tuple(out)


def tensor(fqn, shape, dtype="float32", chunks=None, path=None):
    if chunks is None:
        chunks = (Chunk(tuple(0 for _ in shape), tuple(shape), loc(0, hash(fqn) % 1000)),)
    return TensorEntry(fqn=fqn, dtype=dtype, shape=tuple(shape), chunks=chunks,
                       path=path if path is not None else ("model", fqn[len("model."):]))
