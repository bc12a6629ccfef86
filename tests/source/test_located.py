"""source/located.py: every located chunk kept as columns, read back as the StoredTensor `locate_tensor` finds.

Real checkpoints of each flavor the table holds (torch.save blobs, zstd-transformed blobs, safetensors blobs)
written by torch's own DCP writers; hand-built locations only for lookups that must miss.
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from streamconv.errors import CheckpointError
from streamconv.model import BlobLocation, Chunk, StoredTensor, TensorEntry
from streamconv.source import LocatedChunks, load_metadata, locate_all, locate_tensor
from streamconv.source.io import DirectoryReader
from tests.support import zstd_writers


def _state(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "t": torch.randn(3, 5, generator=g).t(),            # stored with permuted strides
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "ids": torch.arange(7, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("located")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "torch.distributed is disabled ... assuming a single process"
        _write(root)
    return root


def _write(root) -> None:
    dcp.save(_state(), storage_writer=FileSystemWriter(str(root / "plain")), no_dist=True)
    zstd_writers.strided_single(root / "zstd", zstd=True)
    from torch.distributed.checkpoint.filesystem import SerializationFormat
    contiguous = {k: v.contiguous() for k, v in _state(1).items()}     # safetensors refuses strided tensors
    dcp.save(contiguous, storage_writer=FileSystemWriter(str(root / "st"),
                                                        serialization_format=SerializationFormat.SAFETENSORS),
             no_dist=True)


@pytest.mark.parametrize("flavor", ["plain", "zstd", "st"])
def test_table_equals_each_chunk_located_alone(written, flavor):
    with DirectoryReader(str(written / flavor)) as reader:
        meta = load_metadata(reader)
        found = locate_all(reader, meta.tensors)
        alone = {c.location: locate_tensor(reader, c.location, fqn=t.fqn) for t in meta.tensors for c in t.chunks}
    assert isinstance(found, LocatedChunks)
    assert len(found) == len(alone) > 0
    for location, stored in alone.items():
        assert location in found and found[location] == stored
    names = found.names()
    assert {t.fqn for t in meta.tensors} == {names[c.location] for t in meta.tensors for c in t.chunks}
    assert all(names[c.location] == t.fqn for t in meta.tensors for c in t.chunks)
    assert dict(found.items()) == alone and found == alone
    if flavor == "zstd":
        assert all(s.transforms for s in found.values())
    assert found.non_contiguous() == {loc for loc, s in alone.items() if not s.is_contiguous}
    if flavor == "plain":
        assert any(s.crc32 is not None for s in found.values())
        assert found.non_contiguous()


def test_iterates_in_file_order(written):
    """The source fingerprint hashes chunks in this order: it must not depend on how the table groups them."""
    with DirectoryReader(str(written / "st")) as reader:
        meta = load_metadata(reader)
        found = locate_all(reader, meta.tensors)
    keys = list(found)
    assert keys == sorted(keys, key=lambda b: (b.relative_path, b.offset, b.tensor_key, b.length))
    assert [loc for loc, _ in found.items()] == keys


def test_lookups_that_must_miss(written):
    with DirectoryReader(str(written / "plain")) as reader:
        meta = load_metadata(reader)
        found = locate_all(reader, meta.tensors)
    location = meta.tensors[0].chunks[0].location
    for other in (replace(location, length=location.length + 1), replace(location, offset=location.offset + 1),
                  replace(location, relative_path="elsewhere.distcp"), replace(location, tensor_key="w"),
                  replace(location, transform_descriptors=("stream.zstd/1",))):
        assert other not in found
        with pytest.raises(KeyError):
            found[other]
    assert found.get("not a location") is None


def test_one_offset_with_two_lengths_is_two_blobs_and_the_wrong_one_fails(written):
    """As two BlobLocations they are located apart: the table keeps both lengths apart, and a length that is not
    the blob's fails where that blob is read (a corrupt .metadata names the file and offset)."""
    with DirectoryReader(str(written / "plain")) as reader:
        meta = load_metadata(reader)
        entry = meta.tensors[0]
        chunk = entry.chunks[0]
        twin = Chunk(chunk.offsets, chunk.sizes, replace(chunk.location, length=chunk.location.length - 1))
        with pytest.raises(CheckpointError, match=f"blob at offset {chunk.location.offset}"):
            locate_all(reader, [entry, TensorEntry("twin", entry.dtype, entry.shape, (twin,))])
    stored = StoredTensor("float32", (2,), (1,), 100, 8, 100, 8, None)
    table = LocatedChunks()
    table.add(BlobLocation("a", 10, 50), stored)
    table.add(BlobLocation("a", 10, 60), replace(stored, data_offset=200))
    table.add(BlobLocation("a", 20, 5), replace(stored, data_offset=300))
    assert [table[BlobLocation("a", 10, n)].data_offset for n in (50, 60)] == [100, 200]
    assert BlobLocation("a", 10, 55) not in table and table[BlobLocation("a", 20, 5)].data_offset == 300


def test_a_blob_shared_by_two_chunks_is_located_once(written):
    with DirectoryReader(str(written / "plain")) as reader:
        meta = load_metadata(reader)
        entry = meta.tensors[0]
        found = locate_all(reader, [entry, replace(entry, fqn="again")])
    assert len(found) == len(entry.chunks)


def test_add_keeps_each_place_together_and_in_offset_order():
    stored = StoredTensor("float32", (2,), (1,), 100, 8, 100, 8, None)
    table = LocatedChunks()
    table.add(BlobLocation("a", 10, 50), stored)
    with pytest.raises(ValueError, match="added after"):
        table.add(BlobLocation("a", 10, 50), stored)
    table.add(BlobLocation("b", 0, 50), stored)
    with pytest.raises(ValueError, match="added twice"):
        table.add(BlobLocation("a", 90, 50), stored)
    assert table[BlobLocation("a", 10, 50)] == stored and len(table) == 2


def test_file_order_merges_the_places_of_one_file():
    """Places group a file's blobs by tensor_key and transforms; iteration interleaves them back by offset."""
    stored = StoredTensor("float32", (2,), (1,), 100, 8, 100, 8, None)
    table = LocatedChunks()
    for location in (BlobLocation("a", 0, 8, (), "k2"), BlobLocation("a", 100, 8, (), "k1"),
                     BlobLocation("a", 50, 9, ("stream.zstd/1",)), BlobLocation("a", 70, 9, ("stream.zstd/1",)),
                     BlobLocation("0", 500, 9)):
        table.add(location, stored)
    assert [(b.relative_path, b.offset) for b in table] == [("0", 500), ("a", 0), ("a", 50), ("a", 70), ("a", 100)]


@pytest.mark.parametrize("flavor, recorded", [("plain", True), ("zstd", True), ("st", False)])
def test_crcs_recorded_says_whether_every_plain_chunk_has_its_storage_crc(written, flavor, recorded):
    """What decides whether a run's writers read shards back for their CRC-32 (runs/conversion.py predicts an IO
    step each then): every plain chunk its whole storage record with a recorded CRC-32. Safetensors blobs record
    none; zstd blobs are summed as they are decoded, so they count as recorded."""
    with DirectoryReader(str(written / flavor)) as reader:
        meta = load_metadata(reader)
        found = locate_all(reader, meta.tensors)
    each = all(s.storage_crc32 is not None for s in found.values() if not s.transforms)
    assert found.crcs_recorded() == each == recorded
    one = LocatedChunks()
    location = BlobLocation("__0_0.distcp", 0, 100)
    one.add(location, StoredTensor("float32", (4,), (1,), 40, 16, 40, 16, 0x1234))
    assert one.crcs_recorded()
    for odd in (dict(crc32=None), dict(record_nbytes=32)):      # none recorded; a view of a larger storage
        table = LocatedChunks()
        table.add(location, replace(one[location], **odd))
        assert not table.crcs_recorded()
