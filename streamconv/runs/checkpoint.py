"""Opening a DCP checkpoint folder: its metadata, the reader its blobs are read through, and where each planned
chunk's bytes are. Below `api` (every verb) and the shard runners (`discover`, `shardjob`), which all open
checkpoints this one way.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from ..execution.executor import check_stored
from ..fs.fastpaths import NONE, FastPaths
from ..source.io import RangeReader
from ..source.remote import folder_reader
from ..model import NOTHING_LEFT_OUT, CheckpointMetadata, LeftOut, TensorEntry
from ..planning.plan import ConversionPlan, TensorPlan
from ..source import LocatedBatches, LocatedChunks, flavors, locate_all
from ..source.blob_reader import BlobReader


def load(checkpoint_dir: str, fast: FastPaths = NONE, left_out: LeftOut = NOTHING_LEFT_OUT
         ) -> Tuple[RangeReader, CheckpointMetadata]:
    """(the reader its blobs are read through, its metadata); the caller closes the reader. Which kind of folder
    it is (plain DCP, Megatron, HF per-rank shards...) and how its blobs are read is its flavor's business
    (`source/flavors/`). `left_out`: tensors whose chunk locations may stay undecoded (`model.LeftOut`)."""
    _, reader, meta = flavors.open_checkpoint(checkpoint_dir, lambda folder: folder_reader(folder, fast),
                                              left_out=left_out)
    return reader, meta


def locate_chunks(conversion: ConversionPlan, reader: RangeReader) -> LocatedChunks:
    """Find every planned chunk's raw bytes and check them against the metadata, all at once (a shard job in a
    process of its own; `convert` locates in batches: runs/locating.py). Blobs are visited in file order, each
    once; what is found is kept as columns (`source.located`)."""
    reader.set_random_access(True)
    try:
        return locate_tensors(conversion.tensors, reader)
    finally:
        reader.set_random_access(False)


def locate_tensors(tensors: Sequence[TensorPlan], reader: RangeReader, known: Optional[LocatedBatches] = None,
                   check_stop: Callable[[], None] = lambda: None) -> LocatedChunks:
    """`locate_chunks` of some planned tensors, but for the blobs `known` already holds (located with an earlier
    batch, `runs/locating.py`); each chunk is checked against the plan, as the executor will read it."""
    entries = [TensorEntry(t.source_fqn, t.src_dtype, *t.as_stored()) for t in tensors]
    stored = locate_all(reader, entries, known, check_stop)
    for t in tensors:
        for chunk in t.chunks:
            location = chunk.location
            check_stored(t, chunk, stored[location] if known is None or location in stored else known[location])
    return stored


def blob_reader(conversion: ConversionPlan, reader: RangeReader, stored: "LocatedChunks | LocatedBatches"
                ) -> BlobReader:
    """What the chunks located by `locate_chunks` are read through: each by its blob and an offset in the blob's
    bytes (decoded, for a transformed blob). Messages about a transformed blob name its tensor."""
    return BlobReader(reader, stored, stored.names())
