"""source/fast_records.py: torch's per-chunk `.metadata` records read in bulk into columns, and the general machine as
the tested fallback: both decode every checkpoint to the same metadata, whichever way the pickle was written."""
from __future__ import annotations

import pickle

import pytest

from benchmarks import metadata_scale
from streamconv.source import fast_records, metadata, safe_pickle
from streamconv.source.io import DirectoryReader, MemoryReader


def _both(reader, monkeypatch):
    fast = metadata.load_metadata(reader)
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "1")
    assert not metadata.fast_records_on()
    general = metadata.load_metadata(reader)
    monkeypatch.delenv("STREAMCONV_NO_FAST_PATHS")
    return fast, general


def _columns(raw: bytes):
    return safe_pickle.load_metadata_pickle(raw, source="x", fast=fast_records.handlers).columns


@pytest.fixture(scope="module")
def small_scale(tmp_path_factory):
    """The benchmark's DeepSeek-V3 layout, scaled down: 4 layers (1 dense), 8 experts, EP 2 x FSDP 2."""
    out = tmp_path_factory.mktemp("scale") / "ckpt"
    counts = metadata_scale.write(out, layers=4, dense_layers=1, experts=8, ep=2, fsdp=2, with_optim=True)
    return out, counts


def test_the_generator_writes_what_it_counts(small_scale):
    out, counts = small_scale
    meta = metadata.load_metadata(DirectoryReader(out))
    assert counts["model_tensors"] == 3 + 9 * 4 + 3 + 8 * 3 and counts["tensors"] == 4 * counts["model_tensors"]
    assert sum(len(t.chunks) for t in meta.tensors) == counts["chunks"]
    assert len(meta.files) == counts["ranks"] == 4
    assert sum((out / f).stat().st_size for f in meta.files) == counts["data_bytes"]
    assert sum((out / f).stat().st_blocks for f in meta.files) == 0          # sparse: nothing written


def test_fast_and_general_decode_the_same_metadata(small_scale, monkeypatch):
    out, counts = small_scale
    fast, general = _both(DirectoryReader(out), monkeypatch)
    assert fast == general
    raw = (out / ".metadata").read_bytes()
    columns = _columns(raw)
    # Every record went through the fast path (AdamW's 0-d steps too) but the first of each kind (its key names are
    # new strings) and those a FRAME (every 64 KiB) cuts.
    rows = sum(len(t.chunks) for t in fast.tensors)
    assert any(not t.shape for t in fast.tensors)
    missed = 2 + len(raw) // 65536 + 1
    assert rows - missed <= columns.row_count <= rows
    assert 2 * (rows - missed) <= len(columns.chunk_dims) <= 2 * rows


@pytest.mark.parametrize("name", ["fsdp2_optim", "tp", "exotic_dtypes", "dtensor_2d"])
def test_torch_written_checkpoints_decode_the_same_both_ways(name, tmp_path_factory, monkeypatch):
    from tests.support import dcp_writers
    ckpt = dcp_writers.build(tmp_path_factory.mktemp(name), [name])[name]
    fast, general = _both(DirectoryReader(ckpt), monkeypatch)
    assert fast == general


def test_a_reference_back_into_consumed_records_falls_back_to_the_general_machine(tmp_path, monkeypatch):
    """torch never refers back to a chunk's objects, but a pickle may: here two tensors share their chunk objects,
    so the pickle fetches memo entries the fast path elided. The load runs again on the general machine and decodes
    the same metadata."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    chunks = [ChunkStorageMetadata(offsets=torch.Size([4 * r, 0]), sizes=torch.Size([4, 3])) for r in range(4)]
    storage = {MetadataIndex(fqn, c.offsets, r): _StorageInfo("__0_0.distcp", 100 * r + 400 * (fqn == "v"), 100)
               for fqn in ("w", "v") for r, c in enumerate(chunks)}
    props = TensorProperties(dtype=torch.float32)
    md = Metadata({fqn: TensorStorageMetadata(props, torch.Size([16, 3]), list(chunks)) for fqn in ("w", "v")},
                  planner_data={"w": ("w",), "v": ("v",)}, storage_data=storage)
    raw = pickle.dumps(md, protocol=4)
    files = {".metadata": raw, "__0_0.distcp": bytes(800)}
    assert _columns(raw) is None             # the fast load gave up: decoded by the general machine alone
    fast, general = _both(MemoryReader(files), monkeypatch)
    assert fast == general
    assert [c.offsets for c in fast.tensors[0].chunks] == [(0, 0), (4, 0), (8, 0), (12, 0)]
    assert [c.location.offset for c in fast.tensors[1].chunks] == [400, 500, 600, 700]


def test_a_negative_size_in_a_record_is_refused_as_before(small_scale, monkeypatch):
    """A number the fast path does not take (negative) sends the record to the general machine, which refuses it
    with the same message."""
    out, _ = small_scale
    raw = bytearray((out / ".metadata").read_bytes())
    record = raw.index(b"\x86\x94\x85\x94R\x94", len(raw) // 3)     # the end of some 2-D torch.Size
    # The second dim just before it becomes BININT -1 when it was a BININT2 (M xx): rewrite it as J ffffffff.
    at = record - 3
    assert raw[at] == 0x4D
    raw[at:record] = b"J\xff\xff\xff\xff"
    files = {".metadata": bytes(raw)}
    errors = []
    for env in (None, "1"):
        if env:
            monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", env)
        with pytest.raises(Exception) as caught:
            metadata.load_metadata(MemoryReader(files))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "not a tuple of non-negative ints" in errors[0]
