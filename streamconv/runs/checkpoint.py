"""Opening a DCP checkpoint folder: its metadata, the reader its blobs are read through, and where each planned
chunk's bytes are. Below `api` (every verb) and the shard runners (`discover`, `shardjob`), which all open
checkpoints this one way.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from ..execution.executor import check_stored
from ..fs.fastpaths import FastPaths
from ..source.io import DirectoryReader, RangeReader
from ..model import BlobLocation, CheckpointMetadata, StoredTensor, TensorEntry
from ..planning.plan import ConversionPlan
from ..source import find_metadata_file, hf_shards, load_metadata, locate_all, zstd


def load(checkpoint_dir: str, fast: Optional[FastPaths] = None
         ) -> Tuple[RangeReader, CheckpointMetadata]:
    """(the reader its blobs are read through, its metadata); the caller closes the reader. Compressed blobs
    are read through a decoder (reader/zstd.py); per-rank HF shards have no `.metadata` (reader/hf_shards.py)."""
    shards = hf_shards.shard_files(checkpoint_dir)   # HuggingFaceStorageWriter per-rank files: no .metadata
    # find_metadata_file explains what a DCP folder looks like when it is not one
    name = None if shards else find_metadata_file(checkpoint_dir)
    reader = DirectoryReader(checkpoint_dir, fast=fast)
    try:
        meta = hf_shards.load_metadata(reader, shards) if shards else load_metadata(reader, name)
    except BaseException:
        reader.close()
        raise
    if zstd.uses_transforms(meta):   # compressed blobs are read through a decoder (reader/zstd.py)
        return zstd.DecodingReader(reader), meta
    return reader, meta


def locate_chunks(conversion: ConversionPlan, reader: RangeReader) -> Dict[BlobLocation, StoredTensor]:
    """Find every planned chunk's raw bytes and check them against the metadata, before any output exists.
    Blobs are visited in file order, each once."""
    entries = [TensorEntry(fqn=t.source_fqn, dtype=t.src_dtype, shape=t.shape, chunks=t.chunks)
               for t in conversion.tensors]
    reader.set_random_access(True)
    try:
        stored = locate_all(reader, entries)
    finally:
        reader.set_random_access(False)
    for t in conversion.tensors:
        for chunk in t.chunks:
            check_stored(t, chunk, stored[chunk.location])
    return stored
