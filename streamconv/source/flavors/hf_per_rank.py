"""Hugging Face per-rank shards (`HuggingFaceStorageWriter(save_distributed=True)`): no `.metadata`; the pieces'
places come from each file's safetensors header (`source.hf_shards`)."""
from __future__ import annotations

from ...model import CheckpointMetadata, LeftOut
from .. import hf_shards
from ..io import RangeReader
from .base import ReadsBlobsAsStored


class HfPerRankShards(ReadsBlobsAsStored):
    name = "hf-per-rank"

    def detect(self, folder: str) -> bool:
        return bool(hf_shards.shard_files(folder))

    def load_metadata(self, reader: RangeReader, folder: str, left_out: LeftOut) -> CheckpointMetadata:
        # `left_out` ignored: the shards' headers are read whole anyway (a few per rank, no per-chunk records), and
        # an HF state dict holds no optimizer state to leave out.
        return hf_shards.load_metadata(reader, hf_shards.shard_files(folder))


FLAVOR = HfPerRankShards()
