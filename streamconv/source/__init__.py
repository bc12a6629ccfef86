"""The safe reading layer: DCP `.metadata` and `.distcp` blobs decoded without importing torch.

* `flavors.detect(folder)` / `flavors.open_checkpoint(folder, ...)`: what kind of checkpoint folder it is (plain
  DCP, Megatron torch_dist, HF per-rank shards: one module each in `flavors/`) and its reader and metadata.
* `find_metadata_file(root)`: which metadata file a DCP folder has (or why it is not one).
* `load_metadata(reader, name)`: the checkpoint's tensors, chunks and blob locations (`streamconv.model`).
* `locate_tensor(reader, location, fqn=...)` / `locate_all(reader, tensors)`: where each chunk's raw bytes are
  (`located.LocatedChunks`: every located chunk as columns, a `StoredTensor` made when one is asked for).
* `blob_reader.BlobReader(files, stored)`: a chunk's bytes by its blob and an offset in the blob's bytes; a blob
  saved through a stream transform (zstd, `_extensions=[ZStandard()]`: `transforms.py`, `zstd.py`) is read as its
  decoded stream (`streamed_blob.py` locates the tensor in it).

Safetensors flavors: `safetensors_blob.py` finds chunks inside safetensors blobs (FileSystemWriter with
serialization_format=SAFETENSORS, marked by `BlobLocation.tensor_key`); `hf_shards.py` turns a folder of
HuggingFaceStorageWriter per-rank shards (no `.metadata`) into the same CheckpointMetadata.

Pickles are read with allow-listed stand-ins (`safe_pickle.py`) on a bounded pickle machine (`unpickle.py`:
depth, sizes and allocations capped, `.metadata` streamed); nothing outside the list is imported.
"""
from .blob import locate_tensor
from .located import LocatedBatches, LocatedChunks, locate_all
from .metadata import find_metadata_file, load_metadata

__all__ = ["LocatedBatches", "LocatedChunks", "find_metadata_file", "load_metadata", "locate_all", "locate_tensor"]
