"""Hostile and extreme inputs for the readers, shared by `test_hostile.py` and `hostile_report.py`.

Crafted pickles are built from raw opcodes (that is their point); realistic large `.metadata` files are
pickled from torch's own dataclasses, as FileSystemWriter writes them.
"""
from __future__ import annotations

import copyreg
import io
import pickle
import struct
import zipfile
from pathlib import Path, PurePosixPath

MiB = 1 << 20
_DCP = b"torch.distributed.checkpoint.metadata"


def deep_tuple_key_metadata(depth: int = 1_000_000) -> bytes:
    """{(((1,),),)...: 2} with the tuple `depth` deep: hashing the key made CPython's C unpickler overflow its stack."""
    return b"\x80\x04}K\x01" + b"\x85" * depth + b"K\x02s."


def deep_data_pkl(total_bytes: int = (1 << 20) - 64) -> bytes:
    """A data.pkl of just under 1 MiB (the size cap for one) that is a deeply nested tuple used as a dict key."""
    return b"\x80\x02}K\x01" + b"\x85" * (total_bytes - 10) + b"K\x02s."


def flood(unit: bytes, total_bytes: int, head: bytes = b"\x80\x04") -> bytes:
    """`head` followed by `unit` repeated to `total_bytes` (no STOP: the file ends mid-stream)."""
    return head + unit * ((total_bytes - len(head)) // len(unit))


def record_flood(total_bytes: int) -> bytes:
    """A million stand-in records: the class once, then GET class, EMPTY_TUPLE, NEWOBJ, POP... (5 bytes each)."""
    head = b"\x80\x04c" + _DCP + b"\nChunkStorageMetadata\n\x94"
    return flood(b"h\x00)\x81\x94", total_bytes, head)


def dup_appends_flood(total_bytes: int) -> bytes:
    """One list, MARK, then DUP (1 byte) as many times as fit, closed by APPENDS: millions of references built
    from one byte each, held by the stack, then by the copy APPENDS takes, then by the list."""
    return b"\x80\x04](" + b"2" * (total_bytes - 6) + b"e."


def string_flood(total_bytes: int) -> bytes:
    """64 KiB strings, each memoized: a file that is mostly payload."""
    unit = b"X" + struct.pack("<I", 65536) + b"a" * 65536 + b"\x94"
    return flood(unit, total_bytes)


def shared_nested_list(levels: int = 40) -> bytes:
    """A Metadata whose `version` is L(levels), with L0 = [1] and L(k+1) = [Lk, Lk] shared through the memo:
    2**levels leaves in a few hundred bytes. `version` must be a string, so the error has to describe it."""
    value = b"]K\x01aq\x000"                                  # L0 = [1] -> memo 0
    for i in range(levels):                                    # [Li, Li] -> memo i+1
        value += b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1]) + b"0"
    value += b"h" + bytes([levels])
    return (b"\x80\x04c" + _DCP + b"\nMetadata\n)\x81}(\x8c\x13state_dict_metadata}\x8c\x0cstorage_data}"
            b"\x8c\x07version" + value + b"ub.")


def realistic_metadata(n_chunks: int, ranks: int = 4) -> bytes:
    """The .metadata FileSystemWriter writes for an FSDP model of n_chunks // ranks 4096x4096 weights, each
    split on dim 0 over `ranks` ranks (an 11B model is ~3,500 chunks over 4 ranks)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)
    rows, blob = 4096, 4096 * 4096 * 2 // ranks + 1500
    sdm, storage, planner = {}, {}, {}
    files = [f"__{r}_0.distcp" for r in range(ranks)]
    for p in range(n_chunks // ranks):
        fqn = f"model.language_model.layers.{p // 9}.mlp.proj{p % 9}.weight"
        offsets = [torch.Size([r * rows // ranks, 0]) for r in range(ranks)]
        sdm[fqn] = TensorStorageMetadata(TensorProperties(torch.bfloat16), torch.Size([rows, 4096]),
                                         [ChunkStorageMetadata(o, torch.Size([rows // ranks, 4096])) for o in offsets])
        for r, o in enumerate(offsets):
            storage[MetadataIndex(fqn, o, 0)] = _StorageInfo(files[r], p * blob, blob)
        planner[fqn] = ("model", fqn[len("model."):])
    meta = Metadata(sdm, planner, storage, storage_meta=StorageMeta(PurePosixPath("/ckpt"), "save", "load"),
                    version="1.0.0")
    return pickle.dumps(meta)


def duplicate_storage_metadata(real: bytes) -> bytes:
    """`real` (a torch-written .metadata) with its first chunk's storage entry listed twice, the second copy
    pointing elsewhere. torch's dict cannot hold that (MetadataIndex compares by fqn and offset); a crafted
    pickle can, with two MetadataIndex objects that only unpickle equal."""
    meta = pickle.loads(real)
    key, info = next((k, v) for k, v in meta.storage_data.items() if k.offset is not None)
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    class _Twin:  # pickles exactly like MetadataIndex(key.fqn, key.offset) but hashes by identity
        __class__ = property(lambda self: MetadataIndex)   # what pickle checks before writing NEWOBJ

        def __reduce_ex__(self, protocol):
            return copyreg.__newobj__, (MetadataIndex,), dict(key.__dict__)

    meta.storage_data = {**meta.storage_data, _Twin(): _StorageInfo(info.relative_path, info.offset + 1, info.length)}
    return pickle.dumps(meta)


def blob_with_data_pkl(tensor_blob: bytes, data_pkl: bytes) -> bytes:
    """A torch.save archive (stored entries) with its data.pkl replaced."""
    with zipfile.ZipFile(io.BytesIO(tensor_blob)) as archive:
        entries = [(i.filename, archive.read(i.filename)) for i in archive.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            archive.writestr(name, data_pkl if name.endswith("/data.pkl") else data)
    return out.getvalue()


def write_folder(root: Path, files: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root
