"""The safe reading layer: DCP `.metadata` and `.distcp` blobs decoded without importing torch.

* `find_metadata_file(root)`: which metadata file a checkpoint folder has (or why it is not one).
* `load_metadata(reader, name)`: the checkpoint's tensors, chunks and blob locations (`streamconv.model`).
* `locate_tensor(reader, location, fqn=...)` / `locate_all(reader, tensors)`: where each chunk's raw bytes are.
* `zstd.DecodingReader`: zstd-compressed blobs (`_extensions=[ZStandard()]`), decoded while streaming.

Safetensors flavors: `safetensors_blob.py` finds chunks inside safetensors blobs (FileSystemWriter with
serialization_format=SAFETENSORS, marked by `BlobLocation.tensor_key`); `hf_shards.py` turns a folder of
HuggingFaceStorageWriter per-rank shards (no `.metadata`) into the same CheckpointMetadata.

Pickles are read with allow-listed stand-ins (`safe_pickle.py`) on a bounded pickle machine (`unpickle.py`:
depth, sizes and allocations capped, `.metadata` streamed); nothing outside the list is imported.
"""
from .blob import locate_all, locate_tensor
from .metadata import find_metadata_file, load_metadata

__all__ = ["find_metadata_file", "load_metadata", "locate_all", "locate_tensor"]
