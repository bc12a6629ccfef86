"""The registry of checkpoint folder flavors (the protocol: `base.Flavor`) and the one answer to "what folder is
this": `detect(folder)` asks each flavor in turn, most specific first. Discovery (`runs/discover`), opening a
checkpoint (`runs/checkpoint.load`) and the trainer adapter choice (Megatron's `metadata.json`) all ask here.

Adding a flavor: a module beside these with a `FLAVOR` object (detect, load_metadata, open_blobs) and one line in
FLAVORS. Where the folder is stored (a disk, a bucket) is not a flavor: flavors ask `fs.location` about the folder,
so each reads from object storage as from a disk.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence, Tuple

from ...errors import CheckpointError
from ...fs import location
from ...model import NOTHING_LEFT_OUT, CheckpointMetadata, LeftOut, LeftOutChunks
from ..io import RangeReader
from ..metadata import find_metadata_file
from . import dcp, hf_per_rank, megatron
from .base import Flavor

FLAVORS: Tuple[Flavor, ...] = (
    megatron.FLAVOR,        # a DCP folder with Megatron's metadata.json: before plain DCP
    dcp.FLAVOR,
    hf_per_rank.FLAVOR,
)


def detect(folder: "str | os.PathLike[str]", flavors: Optional[Sequence[Flavor]] = None) -> Optional[Flavor]:
    """The first flavor (of `flavors`, default FLAVORS as it is at call time) that recognises `folder`, or None.
    CheckpointError when a flavor recognises it as its own but broken (shard files beside other safetensors
    files...)."""
    folder = os.fspath(folder)
    if not location.at(folder).is_dir():
        return None
    return next((flavor for flavor in (FLAVORS if flavors is None else flavors) if flavor.detect(folder)), None)


def is_checkpoint_folder(folder: "str | os.PathLike[str]", flavors: Optional[Sequence[Flavor]] = None) -> bool:
    """True when some flavor claims `folder`, broken ones included (reading it then says what is wrong)."""
    try:
        return detect(folder, flavors) is not None
    except CheckpointError:
        return True


def open_checkpoint(folder: "str | os.PathLike[str]", directory_reader, *, left_out: LeftOut = NOTHING_LEFT_OUT,
                    flavors: Optional[Sequence[Flavor]] = None) -> Tuple[Flavor, RangeReader, CheckpointMetadata]:
    """(its flavor, the reader its blobs are read through, its metadata) of checkpoint folder `folder`;
    `directory_reader(folder)` opens the folder's files (closed here on failure, else by the caller through the
    returned reader). CheckpointError explaining what a checkpoint folder looks like when no flavor claims it.
    `left_out`: the tensors whose chunk locations may be left undecoded (`model.LeftOut`)."""
    folder = os.fspath(folder)
    flavor = detect(folder, flavors)
    if flavor is None:
        find_metadata_file(folder)      # raises, explaining what a DCP folder holds and what this one does
        raise CheckpointError(f"{folder}: no checkpoint flavor recognises this folder")
    directory = directory_reader(folder)
    try:
        meta = flavor.load_metadata(directory, folder, left_out)
        return flavor, flavor.open_blobs(directory, _locations(meta)), meta
    except BaseException:
        directory.close()
        raise


def _locations(meta: CheckpointMetadata) -> Iterable:
    return (chunk.location for t in meta.tensors if not isinstance(t.chunks, LeftOutChunks) for chunk in t.chunks)
