"""runs/locating.py: a conversion's chunks located batch by batch in the order the writers take them, the first
batch before the first byte and the rest while the writers copy, with every check still run before anything is
published.

A real tensor-parallel checkpoint written by torch's DCP writers (the safety suite's private copy: several shards);
bytes are corrupted by hand only where a blob must fail.
"""
from __future__ import annotations

import json
import shutil
import threading

import pytest

import streamconv
from streamconv.errors import CheckpointError
from streamconv.execution.workspace import Cancelled
from streamconv.runs.checkpoint import load, locate_chunks
from streamconv.runs.locating import GROWTH, MIN_BATCH_CHUNKS, Locating, batches, write_order
from streamconv.runs.report import Reporter
from streamconv.verification import provenance
from tests.support.safety import SHARD, hidden, no_traceback, run


def _plan(ckpt):
    reader, meta = load(str(ckpt))
    return reader, meta, streamconv.build_plan(meta, max_shard_size=SHARD)


def _chunks(tensors) -> int:
    return sum(len(t.chunks) for t in tensors)


def test_batches_take_the_write_order_once_growing_four_fold(source):
    reader, _, plan = _plan(source["ckpt"])
    reader.close()
    order = write_order(plan, plan)
    assert [t.name for t in order] == [t.name for s in plan.shards for t in s.tensors]
    cut = batches(order, 2)
    assert [t.name for b in cut for t in b] == [t.name for t in order] and len(cut) >= 3
    assert len(cut[0]) == 2
    located = _chunks(cut[0])
    for batch in cut[1:-1]:
        assert _chunks(batch) >= max(MIN_BATCH_CHUNKS, GROWTH * located) > _chunks(batch[:-1])
        located += _chunks(batch)


def test_batches_located_on_a_thread_are_what_one_pass_locates(source):
    reader, meta, plan = _plan(source["ckpt"])
    with reader:
        before = provenance.snapshot(str(source["ckpt"]), provenance.source_files(str(source["ckpt"]), meta))
        whole = locate_chunks(plan, reader)
        locating = Locating(write_order(plan, plan), reader, 1)
        locating.first()
        assert 0 < len(locating.stored) < len(whole)
        locating.start()
        batched = locating.rest()
        locating.close()
    assert len(batched._tables) > 2
    assert list(batched.items()) == list(whole.items())      # the same chunks, in the same (file) order
    assert dict(batched.names()) == dict(whole.names()) and batched.non_contiguous() == whole.non_contiguous()
    # so the checkpoint's fingerprint (resume, verify) is the one a run that located everything first computes
    assert (provenance.source_fingerprint(str(source["ckpt"]), meta, batched, before)
            == provenance.source_fingerprint(str(source["ckpt"]), meta, whole, before))


def _corrupt_blob(ckpt, location) -> None:
    """The blob's zip end record zeroed: locating it fails ("no zip end-of-central-directory record")."""
    with open(ckpt / location.relative_path, "r+b") as f:
        f.seek(location.offset + location.length - 22)
        f.write(b"\0" * 22)


@pytest.fixture
def last_blob_corrupt(source, tmp_path):
    """A copy of the checkpoint whose last-written tensor's blob is corrupt, and that blob."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source["ckpt"], ckpt)
    reader, _, plan = _plan(ckpt)
    reader.close()
    location = plan.shards[-1].tensors[-1].chunks[-1].location
    _corrupt_blob(ckpt, location)
    return ckpt, location


def test_a_writer_waits_for_its_batch_and_meets_the_locating_error(last_blob_corrupt):
    ckpt, _ = last_blob_corrupt
    reader, _, plan = _plan(ckpt)
    order = write_order(plan, plan)
    with reader:
        locating = Locating(order, reader, 1)
        locating.first()                  # the first tensor's blobs are fine
        stop = threading.Event()
        locating.tensor_ready(order[0], stop)
        stop.set()
        with pytest.raises(Cancelled):    # a writer waiting for a batch no thread locates stops with the others
            locating.tensor_ready(order[-1], stop)
        locating.start()
        with pytest.raises(CheckpointError, match="end-of-central-directory"):
            locating.tensor_ready(order[-1], threading.Event())
        with pytest.raises(CheckpointError, match="end-of-central-directory"):
            locating.tensor_ready(order[0], threading.Event())     # ready, but the run is failing: stop
        with pytest.raises(CheckpointError, match="end-of-central-directory"):
            locating.rest()
        locating.close()


class _Moved(Reporter):
    def __init__(self):
        self.moved = 0
        self.began = threading.Event()

    def advance(self, n_bytes: int) -> None:
        self.moved += n_bytes
        self.began.set()


def test_a_corrupt_blob_in_the_last_shard_fails_after_writing_began_and_leaves_nothing(
        last_blob_corrupt, tmp_path, monkeypatch):
    ckpt, location = last_blob_corrupt
    out = tmp_path / "out"
    moved = _Moved()
    later = Locating._run

    def after_the_first_bytes(self):     # (a checkpoint this small is located before a writer starts, else)
        moved.began.wait(30)
        later(self)

    monkeypatch.setattr(Locating, "_run", after_the_first_bytes)
    with pytest.raises(CheckpointError, match="end-of-central-directory") as failed:
        streamconv.convert(str(ckpt), str(out), max_shard_size=SHARD, workers=1, reporter=moved)
    assert f"blob at offset {location.offset}" in str(failed.value)
    assert moved.began.is_set()       # the first tensors were written before the last one's blob was located...
    assert not out.exists() and hidden(out) == []       # ...and nothing of them is left
    monkeypatch.undo()
    result = run("convert", ckpt, out, "--max-shard-size", SHARD)
    assert result.returncode == 2 and no_traceback(result) and "end-of-central-directory" in result.stderr
    assert not out.exists() and hidden(out) == []


def test_an_existing_output_or_resume_locates_everything_first(last_blob_corrupt, tmp_path):
    """Where the run must know the checkpoint's fingerprint before writing, a corrupt blob fails before it."""
    ckpt, _ = last_blob_corrupt
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    moved = _Moved()
    with pytest.raises(CheckpointError, match="end-of-central-directory"):
        streamconv.convert(str(ckpt), str(out), max_shard_size=SHARD, workers=1, reporter=moved, resume=True)
    assert moved.moved == 0 and (out / "notes.txt").read_text() == "mine" and hidden(out) == []


def test_the_plan_record_is_written_once_every_chunk_is_located(source, tmp_path):
    """A run that locates while writing writes its plan record (with the checkpoint's fingerprint) before any shard's
    finished record, so a resumed run keeps those shards."""
    out = tmp_path / "out"
    killed = run("convert", source["ckpt"], out, "--max-shard-size", SHARD, "--workers", "1",
                 env={"STREAMCONV_TEST_KILL_AT": "between-shards"})
    assert killed.returncode == -9
    records = tmp_path / ".out.streamconv-partial" / ".streamconv-resume"
    plan = json.loads((records / "plan.json").read_text())
    reader, meta, _ = _plan(source["ckpt"])
    with reader:
        before = provenance.snapshot(str(source["ckpt"]), provenance.source_files(str(source["ckpt"]), meta))
        whole = locate_chunks(streamconv.build_plan(meta, max_shard_size=SHARD), reader)
    assert plan["source"] == provenance.source_fingerprint(str(source["ckpt"]), meta, whole, before)
    assert len(list(records.glob("*.safetensors.json"))) == 1
