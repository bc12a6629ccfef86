"""Hugging Face per-rank shards (`HuggingFaceStorageWriter(path, save_distributed=True)`) as a CheckpointMetadata.

torch's HF writer (torch >= 2.8; torchtitan's `last_save_in_hf` on a sharded model) lets every rank write its own
pieces of the tensors, as plain safetensors files named `shard-<rank>-model-<k>-of-<n>.safetensors` (ranks count
from 1; `k` is the file a `fqn_to_index_mapping` assigns, else 1). It writes no `.metadata`: the only record of
where a piece belongs is each file's `__metadata__["DCP_SHARDING_INFO"]`, `{name: {"saved_offsets": [...]}}`.
torch consolidates such a folder with `consolidate_safetensors_files`, which holds each whole tensor in memory.

Here the headers become the same `CheckpointMetadata` a `.metadata` gives (each piece a chunk, located by its
header key), so the planner proves coverage and the executor streams the pieces in bounded memory. Only headers
are read (each at most `safetensors_format.MAX_HEADER_BYTES`), only from regular files (`DirectoryReader`).

Global shapes are not recorded anywhere: as torch's consolidator does, a tensor's shape is the box its pieces
span. Missing pieces inside that box fail the coverage proof, and missing rank numbers are refused; a folder
that lost its last rank's files cannot be told apart from a smaller model, hence the reference check of
`--config-from` (shapes against the base model's weights).
"""
from __future__ import annotations

import re
from typing import Dict, List, Tuple

from ..errors import CheckpointError
from ..fs import location
from .io import RangeReader
from ..model import BlobLocation, CheckpointMetadata, Chunk, TensorEntry
from .safetensors_blob import read_header
from .unpickle import describe

SHARD_FILE = re.compile(r"shard-(\d{5,9})-model-(\d{5,9})-of-(\d{5,9})\.safetensors")


def flavor(ranks: int, files: int) -> str:
    return (f"Hugging Face per-rank shards (HuggingFaceStorageWriter(save_distributed=True)): {ranks} rank(s), "
            f"{files} file(s); each tensor's shape is the box its pieces span (no .metadata records it)")


def shard_files(root: str) -> List[str]:
    """The per-rank shard files of folder `root`, by (rank, file index); [] when it holds none. CheckpointError
    when shard files sit beside other safetensors files (torch's consolidator would mix them in) or rank numbers
    are missing. Which flavor a folder is (a `.metadata` beside shard files makes it plain DCP) is decided by
    `source.flavors.detect`."""
    where = location.at(root)
    if not where.is_dir():
        return []
    names = where.names()
    shards: List[Tuple[int, int, int, str]] = []
    others = []
    for name in names:
        match = SHARD_FILE.fullmatch(name)
        if match:
            shards.append((int(match.group(1)), int(match.group(2)), int(match.group(3)), name))
        elif name.endswith(".safetensors"):
            others.append(name)
    if not shards:
        return []
    shards.sort()
    if others:
        raise CheckpointError(
            f"{root} holds HuggingFaceStorageWriter per-rank shards ({shards[0][3]}, ...) and other safetensors files "
            f"({', '.join(describe(n) for n in sorted(others)[:3])}); move the shard files into a folder of their own")
    ranks = sorted({rank for rank, _, _, _ in shards})
    if ranks[0] != 1 or ranks[-1] != len(ranks):
        present = set(ranks)
        missing = [r for r in range(1, ranks[-1] + 1) if r not in present][:10]
        raise CheckpointError(
            f"{root}: per-rank shard files of rank(s) {missing} are missing (found ranks {ranks[:10]}"
            f"{' ...' if len(ranks) > 10 else ''}, numbered from 1); copy them: each rank holds pieces of the tensors")
    totals = {total for _, _, total, _ in shards}
    bad = [name for _, index, total, name in shards if not 1 <= index <= total]
    if len(totals) != 1 or bad:
        raise CheckpointError(f"{root}: shard file names disagree on the number of files per rank "
                              f"({sorted(totals)[:5]}{'; ' + describe(bad[0]) if bad else ''}); they come from "
                              "different saves")
    return [name for _, _, _, name in shards]


def load_metadata(reader: RangeReader, names: List[str]) -> CheckpointMetadata:
    """The checkpoint as `.metadata` would describe it, from the shard files' safetensors headers."""
    order: List[str] = []
    dtype_of: Dict[str, Tuple[str, str]] = {}            # key -> (dtype, file that said so)
    pieces: Dict[str, List[Chunk]] = {}
    for name in names:
        if reader.size(name) >= 4 and reader.read(name, 0, 4) == b"PK\x03\x04":
            raise CheckpointError(
                f"{name} starts with a torch.save archive, not a safetensors header: the state dict saved with "
                "HuggingFaceStorageWriter held non-tensor items (a step counter, a config), which torch writes "
                "before the tensors, and no .metadata says where those end. Neither torch's consolidator nor "
                "streamconv can read the file; save only tensors with HuggingFaceStorageWriter.")
        header = read_header(reader, name, 0)
        if not header.has_sharding_info:
            raise CheckpointError(
                f"{name}: safetensors file named like a HuggingFaceStorageWriter shard has no DCP_SHARDING_INFO in "
                "its __metadata__, so where its pieces belong is unknown; it was not written by torch's HF writer "
                "with save_distributed=True")
        # DCP_SHARDING_INFO lists the tensors in the writer's state-dict order; the header sorts them.
        for key in header.sharding_order:
            t = header.tensors[key]
            first = dtype_of.setdefault(key, (t.dtype, name))
            if first[0] != t.dtype:
                raise CheckpointError(f"{name}: tensor {describe(key)} is {t.dtype} here but {first[0]} in {first[1]}")
            if key not in pieces:
                order.append(key)
                pieces[key] = []
            elif len(pieces[key][0].sizes) != len(t.shape):
                raise CheckpointError(f"{name}: tensor {describe(key)} has {len(t.shape)} dims here, "
                                      f"{len(pieces[key][0].sizes)} in another shard file")
            pieces[key].append(Chunk(t.saved_offsets, t.shape, BlobLocation(name, 0, t.nbytes, tensor_key=key)))
    tensors = []
    for key in order:
        chunks = pieces[key]
        shape = tuple(max(c.offsets[d] + c.sizes[d] for c in chunks) for d in range(len(chunks[0].sizes)))
        # Path as DCP's planner records a flat state dict's key: the names stay as they are.
        tensors.append(TensorEntry(key, dtype_of[key][0], shape, tuple(chunks), (key,)))
    ranks = len({SHARD_FILE.fullmatch(n).group(1) for n in names})
    return CheckpointMetadata(tensors=tuple(tensors), torch_version_hint=">=2.8",
                              files=tuple(sorted(names)), flavor=flavor(ranks, len(names)))


# ---------------------------------------------------------------------------------------------------------
# folders that are not per-rank shards: what to tell the user

MAX_FILES_EXPLAINED = 8     # safetensors headers read to explain a folder that is not a checkpoint
MAX_INDEX_BYTES = 16 << 20  # a model.safetensors.index.json read for the same reason (a few hundred KB is usual)
_CLOBBERED = ("it looks like HuggingFaceStorageWriter(save_distributed=False) given a sharded state dict, where every "
              "rank writes the same file names and the last one wins, so the other ranks' pieces are lost. Save with "
              "save_distributed=True (streamconv converts those per-rank shards) or from a full state dict.")


def holds_safetensors(root: str) -> bool:
    try:
        return any(n.endswith(".safetensors") for n in location.at(root).names())
    except OSError:
        return False


def explain_model_folder(root: str, names: List[str]) -> str:
    """Why a folder of safetensors files (no `.metadata`, no per-rank shard names) is not converted: a consolidated
    model (maybe consolidated by torch from `sharded/`), or what HuggingFaceStorageWriter(save_distributed=False)
    leaves when given a sharded state dict (one rank's pieces; the index counts every rank's bytes)."""
    if any(SHARD_FILE.fullmatch(n) for n in names):
        return ("These are HuggingFaceStorageWriter per-rank shards, which need no .metadata: streamconv's commands "
                "(and streamconv.api.load) read them from their safetensors headers.")
    clobbered = _clobbered(root, sorted(n for n in names if n.endswith(".safetensors")))
    if clobbered:
        return clobbered
    line = "This looks like a safetensors model already, not a DCP checkpoint."
    sharded = location.at(root).join("sharded")
    try:
        if shard_files(sharded):
            line += (f" It was consolidated by HuggingFaceStorageWriter(enable_consolidation=True) from the per-rank "
                     f"shards in {sharded}, which streamconv converts too.")
    except CheckpointError:
        pass
    return line


def _clobbered(root: str, files: List[str]) -> str:
    """The explanation when torch's HF writer left pieces of tensors, else ''. Only headers written by torch's
    DCP writers (DCP_SHARDING_INFO) are judged, and at most MAX_FILES_EXPLAINED of them."""
    import json

    from .remote import folder_reader

    if not files or len(files) > MAX_FILES_EXPLAINED:
        return ""
    tensor_bytes = 0
    try:
        with folder_reader(root) as reader:
            for name in files:
                header = read_header(reader, name, 0)
                if not header.has_sharding_info:
                    return ""
                piece = next(((k, t.saved_offsets) for k, t in header.tensors.items()
                              if t.saved_offsets and any(t.saved_offsets)), None)
                if piece is not None:
                    return (f"{name} holds pieces of tensors, not whole ones (e.g. {describe(piece[0])} at offsets "
                            f"{list(piece[1])}): {_CLOBBERED}")
                tensor_bytes += sum(t.nbytes for t in header.tensors.values())
            index = "model.safetensors.index.json"
            if reader.size(index) > MAX_INDEX_BYTES:
                return ""
            total = json.loads(reader.read(index, 0, reader.size(index))).get("metadata", {}).get("total_size")
    except (CheckpointError, OSError, ValueError, RecursionError, AttributeError):
        return ""    # damaged or not torch's: the generic message applies
    if type(total) is int and total > tensor_bytes:
        return (f"the safetensors files hold {tensor_bytes} bytes of tensors but model.safetensors.index.json says "
                f"{total} were saved: {_CLOBBERED}")
    return ""
