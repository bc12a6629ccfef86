"""The Flavor seam: one kind of checkpoint folder, behind one protocol.

A flavor answers three questions about a folder, in this order:

* `detect(folder)`: is the folder this kind? Reads a listing and at most small side files, never a data file;
  CheckpointError when it is this kind but broken in a way the listing shows (the error then explains it).
* `load_metadata(reader, folder, left_out)`: the checkpoint as streamconv's own model (`streamconv.model`), from
  whatever the flavor keeps: a pickled `.metadata`, safetensors headers... `left_out` (`model.LeftOut`, decided once
  from the options) names the tensors whose chunk locations the flavor may leave undecoded, because planning leaves
  them out: each flavor either uses it or says why it ignores it.
* `open_blobs(directory, locations)`: the RangeReader the blobs' *stored* bytes are read through (the folder's files
  for every flavor today; an object store would give its own). A transformed blob (`BlobLocation.
  transform_descriptors`, e.g. zstd) is not the flavor's business: `blob_reader.BlobReader` reads it over this
  reader as its decoded stream.

Locating a chunk's bytes inside its blob is a question about the blob, not the folder (one DCP folder mixes
`torch.save` blobs and a safetensors blob), so `source.located.locate_all` answers it from each `BlobLocation`.

`flavors/__init__.py` holds the registry (a tuple, most specific first); adding a flavor is one module with one
`FLAVOR` object and one line there.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from ...model import BlobLocation, CheckpointMetadata, LeftOut
from ..io import RangeReader


class Flavor(Protocol):
    name: str          # short, for notes and tests: "dcp", "hf-per-rank", "megatron-torch_dist"

    def detect(self, folder: str) -> bool:
        """True when `folder` is this kind (CheckpointError: it is, but broken; the message says how)."""

    def load_metadata(self, reader: RangeReader, folder: str, left_out: LeftOut) -> CheckpointMetadata:
        """The checkpoint's tensors, chunks and blob locations (CheckpointError naming the file and field); the
        tensors `left_out` names may have their chunks as `model.LeftOutChunks`."""

    def open_blobs(self, directory: RangeReader, locations: Iterable[BlobLocation]) -> RangeReader:
        """The reader the stored bytes of the blobs at `locations` are read through (the caller closes
        `directory`)."""


class ReadsBlobsAsStored:
    """`open_blobs` for flavors whose blobs are where `.metadata` says, in the folder's own files."""

    def open_blobs(self, directory: RangeReader, locations: Iterable[BlobLocation]) -> RangeReader:
        return directory
