"""Chunk locations left out while decoding `.metadata` (`model.LeftOut`): the tensors planning leaves out whatever
else it decides (optimizer state) are decoded without their storage rows, and every plan is the one a full decode
gives."""
from __future__ import annotations

import pickle

import pytest

import streamconv
from streamconv.model import NOTHING_LEFT_OUT, ChunkTable, LeftOut, LeftOutChunks
from streamconv.planning import naming
from streamconv.planning.names import NON_MODEL_KEYS
from streamconv.runs import preparing
from streamconv.source import metadata, transforms
from streamconv.source.io import DirectoryReader, MemoryReader

OPTIMIZER = LeftOut(frozenset(NON_MODEL_KEYS))


def _plan(ckpt, **options) -> dict:
    plan = streamconv.plan(str(ckpt), **options)
    return {**plan.to_dict(), "skipped": [(s.fqn, s.reason) for s in plan.skipped]}


@pytest.mark.parametrize("name", ["fsdp2_optim", "fsdp1"])
def test_plans_are_the_same_with_and_without_leaving_optimizer_state_out(name, dcp_checkpoints, monkeypatch):
    """`plan` of a torch-written checkpoint with AdamW's state: its moments are decoded without their locations, and
    the plan (every tensor, shard, skipped entry and the predicted peak, which counts the left-out chunks) is the one
    decoding everything gives. With `--subtree optim` the optimizer state is what is converted: nothing of it is
    left out, and the plans agree again."""
    ckpt = dcp_checkpoints[name]
    meta = metadata.load_metadata(DirectoryReader(ckpt), left_out=OPTIMIZER)
    left = [t for t in meta.tensors if isinstance(t.chunks, LeftOutChunks)]
    assert left and all(t.fqn.startswith("optim.") for t in left)
    assert all(isinstance(t.chunks, ChunkTable) for t in meta.tensors if not t.fqn.startswith("optim."))
    full = metadata.load_metadata(DirectoryReader(ckpt))
    assert [len(t.chunks) for t in meta.tensors] == [len(t.chunks) for t in full.tensors]
    assert meta.files == full.files and transforms.note(meta) == transforms.note(full)

    left_out = [_plan(ckpt), _plan(ckpt, subtree="optim")]
    monkeypatch.setattr(preparing, "left_out_while_decoding", lambda options: NOTHING_LEFT_OUT)
    assert left_out == [_plan(ckpt), _plan(ckpt, subtree="optim")]
    assert left_out[0]["skipped"] and left_out[1]["tensors"]


def test_the_options_decide_what_is_left_out():
    options = preparing.Request(kwargs={}).resolved()[0]
    assert naming.left_out_while_decoding(options).top_keys == frozenset(NON_MODEL_KEYS)
    subtree = preparing.Request(kwargs={"subtree": "optim"}).resolved()[0]
    assert "optim" not in naming.left_out_while_decoding(subtree).top_keys


def _metadata(tensors, paths, rows) -> bytes:
    """torch's Metadata pickled as FileSystemWriter pickles it: `tensors` {fqn: (shape, [chunk offsets], sizes)},
    `paths` planner_data, `rows` [(fqn, offsets, blob offset)] of 48-byte blobs in __0_0.distcp."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    sdm = {fqn: TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape),
                                      [ChunkStorageMetadata(torch.Size(o), torch.Size(sizes)) for o in offsets])
           for fqn, (shape, offsets, sizes) in tensors.items()}
    storage = {MetadataIndex(fqn, torch.Size(o), k): _StorageInfo("__0_0.distcp", at, 48)
               for k, (fqn, o, at) in enumerate(rows)}
    return pickle.dumps(Metadata(sdm, planner_data=paths, storage_data=storage), protocol=4)


OFFSETS = [(4 * r, 0) for r in range(4)]
TENSORS = {"model.w": ((16, 3), OFFSETS, (4, 3)), "optim.state.w.exp_avg": ((16, 3), OFFSETS, (4, 3))}
ROWS = [(fqn, o, 100 * k + 400 * (fqn != "model.w")) for fqn in TENSORS for k, o in enumerate(OFFSETS)]


def test_a_key_its_path_does_not_show_as_optimizer_state_is_decoded_whole():
    """Left out is guessed from the key while the rows are read (the paths come after them in the pickle): a flat
    state dict whose key only starts with 'optim.' is a model tensor, decoded again with its locations."""
    files = {"__0_0.distcp": bytes(800)}
    files[".metadata"] = _metadata(TENSORS, {fqn: (fqn,) for fqn in TENSORS}, ROWS)
    meta = metadata.load_metadata(MemoryReader(files), left_out=OPTIMIZER)
    assert meta == metadata.load_metadata(MemoryReader(files))
    assert [c.location.offset for c in meta.tensors[1].chunks] == [400, 500, 600, 700]

    files[".metadata"] = _metadata(TENSORS, {"model.w": ("model", "w"), "optim.state.w.exp_avg":
                                             ("optim", "state", "w", "exp_avg")}, ROWS)
    meta = metadata.load_metadata(MemoryReader(files), left_out=OPTIMIZER)
    assert isinstance(meta.tensors[1].chunks, LeftOutChunks) and len(meta.tensors[1].chunks) == 4
    with pytest.raises(LookupError, match="left out while decoding"):
        meta.tensors[1].chunks[0]


def test_a_row_listed_twice_in_left_out_state_is_refused_as_before():
    """A left-out tensor's rows are counted and summed, not kept: one listed twice in place of another makes the
    file decode again whole, which refuses it with the message it always gave."""
    paths = {"model.w": ("model", "w"), "optim.state.w.exp_avg": ("optim", "state", "w", "exp_avg")}
    rows = list(ROWS)
    rows[5] = rows[4]           # the moment's first chunk twice (another key index), its second not at all
    files = {".metadata": _metadata(TENSORS, paths, rows), "__0_0.distcp": bytes(800)}
    with pytest.raises(streamconv.CheckpointError) as full:
        metadata.load_metadata(MemoryReader(files))
    with pytest.raises(streamconv.CheckpointError) as left_out:
        metadata.load_metadata(MemoryReader(files), left_out=OPTIMIZER)
    assert str(left_out.value) == str(full.value) and "no entry in storage_data" in str(full.value)


def test_rows_of_a_key_that_is_no_tensor_decode_as_before():
    """Rows naming an optimizer key state_dict_metadata does not list: a full decode keeps them unused; leaving out
    cannot confirm them, so the file is decoded whole and gives the same metadata."""
    paths = {"model.w": ("model", "w"), "optim.state.w.exp_avg": ("optim", "state", "w", "exp_avg")}
    rows = ROWS + [("optim.state.v.exp_avg", (0, 0), 700)]
    files = {".metadata": _metadata(TENSORS, paths, rows), "__0_0.distcp": bytes(800)}
    meta = metadata.load_metadata(MemoryReader(files), left_out=OPTIMIZER)
    assert meta == metadata.load_metadata(MemoryReader(files))
    assert isinstance(meta.tensors[1].chunks, ChunkTable)
