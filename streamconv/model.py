"""streamconv's own view of a DCP checkpoint: frozen dataclasses, no IO, no torch.

`.metadata` is decoded once (see `reader/metadata.py`) into these; nothing downstream sees a pickle.
dtypes are torch's names without the `torch.` prefix ("bfloat16", "float32", "int64", ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

PathElement = Union[str, int]


@dataclass(frozen=True)
class BlobLocation:
    """Where one item's serialized blob (a `torch.save` zip) lives, relative to the checkpoint folder."""

    relative_path: str
    offset: int
    length: int
    # Extension transforms (e.g. "stream.zstd/1"), in the order torch lists them. Empty for plain blobs.
    transform_descriptors: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Chunk:
    """One stored box of a tensor: global element offsets and sizes per dim, and where its bytes are."""

    offsets: Tuple[int, ...]
    sizes: Tuple[int, ...]
    location: BlobLocation

    @property
    def numel(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n


@dataclass(frozen=True)
class TensorEntry:
    fqn: str                      # flat key in the checkpoint, e.g. "model.layers.0.mlp.up_proj.weight"
    dtype: str                    # torch dtype name, e.g. "bfloat16"
    shape: Tuple[int, ...]        # global shape
    chunks: Tuple[Chunk, ...]     # as listed in the metadata (rank order, not sorted)
    path: Tuple[PathElement, ...] = ()  # planner_data path: nested dict keys, e.g. ("model", "layers.0.w")


@dataclass(frozen=True)
class BytesEntry:
    """A non-tensor item (torch.save of a python object). Never loaded; only listed."""

    fqn: str
    location: Optional[BlobLocation]
    path: Tuple[PathElement, ...] = ()


@dataclass(frozen=True)
class CheckpointMetadata:
    tensors: Tuple[TensorEntry, ...]
    byte_entries: Tuple[BytesEntry, ...] = ()
    version: Optional[str] = None           # Metadata.version ("1.0.0" from torch 2.9 on)
    # What the pickle's shape says about the writer's torch version, e.g. "2.3-2.8", ">=2.9".
    torch_version_hint: str = "unknown"
    # Files referenced by storage_data, relative to the checkpoint folder, sorted.
    files: Tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class StoredTensor:
    """What a chunk's `torch.save` blob says about its raw bytes (found without torch.load)."""

    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    data_offset: int     # absolute byte offset of the first element in the .distcp file
    data_nbytes: int     # numel * itemsize
    # CRC-32 of exactly these bytes, from the zip directory, when the tensor is its whole storage record.
    storage_crc32: Optional[int] = None

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True
