"""Plain DCP: a folder written by `FileSystemWriter` holding `.metadata` (or `__<rank>.metadata` per rank with
use_collectives=False) and `.distcp` data files. Its blobs are `torch.save` archives, zstd streams of them
(`_extensions=[ZStandard()]`) or one safetensors blob per file (`serialization_format=SAFETENSORS`):
`source.metadata` records which in each BlobLocation."""
from __future__ import annotations

from ...fs import location
from ...model import CheckpointMetadata, LeftOut
from ..io import RangeReader
from ..metadata import METADATA_NAME, RANK_METADATA, find_metadata_file, load_metadata
from .base import ReadsBlobsAsStored


class DcpFolder(ReadsBlobsAsStored):
    name = "dcp"

    def detect(self, folder: str) -> bool:
        """`.metadata` or a `__<rank>.metadata` is there (whatever its kind: `find_metadata_file` explains a
        FIFO, a directory or missing ranks when the metadata is loaded)."""
        where = location.at(folder)
        try:
            if where.entry(METADATA_NAME) is not None:
                return True
            return any(RANK_METADATA.fullmatch(name) for name in where.names())
        except OSError:
            return False

    def load_metadata(self, reader: RangeReader, folder: str, left_out: LeftOut) -> CheckpointMetadata:
        return load_metadata(reader, find_metadata_file(folder), left_out)


FLAVOR = DcpFolder()
