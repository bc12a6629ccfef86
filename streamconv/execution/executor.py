"""The streaming executor: follows a `ShardPlan`, writing one shard file from chunk bytes.

Each tensor's chunks are checked against the metadata (`check_stored`), then the tensor goes to the first
assembler in ASSEMBLERS that accepts it; every assembler works in the executor's one `Workspace`, so memory is the
one working buffer whatever the tensor, the assembler or the model size.
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

from ..errors import CheckpointError, UnsupportedFeatureError
from ..source.blob_reader import BlobReader
from ..model import BlobLocation, Chunk, StoredTensor
from ..planning.plan import ShardPlan, TensorPlan
from ..output.sink import ShardSink
from . import band, copy, gather, strided
from .geometry import storage_order
from .workspace import Assembler, Cancelled, Progress, Workspace

# `Cancelled` is named here too: the runners catch it from the executor they run (docs/architecture.md).
__all__ = ["ASSEMBLERS", "Cancelled", "Executor", "check_stored", "choose"]

# Asked in this order; the first that accepts a tensor writes it. `band` accepts what the others leave.
ASSEMBLERS: Tuple[Assembler, ...] = (copy.ASSEMBLER, gather.ASSEMBLER, strided.ASSEMBLER, band.ASSEMBLER)


def check_stored(t: TensorPlan, chunk: Chunk, stored: StoredTensor) -> None:
    """The blob must hold exactly the chunk the metadata promises, laid out row-major or in a permuted order
    (seen in the output's dim order when the plan transposes the tensor)."""
    stored = strided.stored_view(t, stored)
    where = f"tensor {t.source_fqn!r}, chunk at offsets {list(chunk.offsets)} in {chunk.location.relative_path}"
    if stored.dtype != t.src_dtype:
        raise CheckpointError(f"{where}: stored dtype {stored.dtype} but .metadata says {t.src_dtype}")
    if tuple(stored.shape) != tuple(chunk.sizes):
        raise CheckpointError(f"{where}: stored shape {list(stored.shape)} but .metadata says {list(chunk.sizes)}")
    if not stored.is_contiguous:
        # A permutation of contiguous strides (transposed, channels_last) is read in storage order (strided.py).
        if storage_order(stored.shape, stored.stride) is None:
            raise CheckpointError(
                f"{where}: stored with strides {list(stored.stride)} for shape {list(stored.shape)}, which are not a "
                "permutation of contiguous strides (an overlapping or gapped view); streamconv reads row-major and "
                "permuted (transposed, channels_last) chunks only. Re-save after calling .contiguous() on that tensor.")
        if t.pieces:
            raise UnsupportedFeatureError(
                f"{where}: stored with permuted strides {list(stored.stride)} and mapped by a trainer layout "
                f"({t.source_fqn!r} -> {t.name!r}); streamconv does not combine the two. Convert with "
                "--source-format hf, or re-save after calling .contiguous() on that tensor.")


def choose(t: TensorPlan, stored: Mapping[BlobLocation, StoredTensor]) -> Assembler:
    return next(a for a in ASSEMBLERS if a.accepts(t, stored))


class Executor:
    """Writes shards. One instance owns one `Workspace`, so the buffer is allocated once for the whole run; it is
    used by one thread at a time (a reader's announced reads are per thread)."""

    def __init__(self, reader: BlobReader, stored: Mapping[BlobLocation, StoredTensor], buffer_bytes: int,
                 progress: Optional[Progress] = None, stop=None, integrity=None):
        self.workspace = Workspace(reader, stored, buffer_bytes, progress=progress, stop=stop, integrity=integrity)

    def write_shard(self, shard: ShardPlan, sink: ShardSink) -> None:
        try:
            sink.write_at(0, shard.header)
            for t, then in zip(shard.tensors, list(shard.tensors[1:]) + [None]):
                self.write_tensor(t, sink, then=then)
        finally:
            sink.close()

    def write_tensor(self, t: TensorPlan, sink: ShardSink, then: Optional[TensorPlan] = None) -> None:
        """Write `t`; `then`, the tensor this thread writes next if known, has its reads announced after `t`'s.
        `t`'s are announced again even when they were announced ahead: the reader ignores a range it holds
        already, and a read it did not foresee meanwhile (a small chunk's block) made it forget them."""
        ws = self.workspace
        ws.check_stop()
        assembler = self._checked(t)
        self._announce(assembler, t)
        # Only behind reads that are all announced: another read path forgets what this thread announced.
        if then is not None and assembler.reads(t, ws.stored):
            self._announce(self._checked(then), then)
        assembler.write(ws, t, sink)

    def _checked(self, t: TensorPlan) -> Assembler:
        for chunk in t.chunks:
            check_stored(t, chunk, self.workspace.stored[chunk.location])
        return choose(t, self.workspace.stored)

    def _announce(self, assembler: Assembler, t: TensorPlan) -> None:
        for location, offset, nbytes in assembler.reads(t, self.workspace.stored):
            self.workspace.reader.announce(location, offset, nbytes)
