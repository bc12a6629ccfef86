"""The resume ledger (output/ledger.py): the one answer to "does this shard match the plan"."""
import os
import zlib

import pytest

import streamconv
from streamconv.errors import OutputError
from streamconv.output import ledger
from streamconv.output.ledger import Ledger, RECORDS_DIR


@pytest.fixture(scope="module")
def plan(demo_checkpoint):
    return streamconv.plan(str(demo_checkpoint.ckpt_dir), max_shard_size="100KB", no_config=True)


def _write(folder, shard, data):
    path = folder / shard.filename
    path.write_bytes(data)
    return zlib.crc32(data)


def test_a_recorded_shard_is_recognised_only_by_its_own_plan_size_and_crc(plan, tmp_path):
    (tmp_path / RECORDS_DIR).mkdir()
    book = Ledger.for_plan(str(tmp_path), plan, ledger.plan_fingerprint(plan))
    shard, other = plan.shards[0], plan.shards[1]
    assert not book.recorded(shard) and not book.has_record(shard)
    crc = _write(tmp_path, shard, os.urandom(shard.nbytes))
    book.record(shard, crc)
    assert book.recorded(shard) and book.has_record(shard) and book.crc32(shard.filename) == crc
    assert book.kept(plan.shards) == [shard]
    # another plan's ledger over the same folder keeps nothing
    assert not Ledger(str(tmp_path), "another plan", book.shard_fingerprints).recorded(shard)
    # a shard recorded under another shard's fingerprint is not that shard
    swapped = dict(book.shard_fingerprints, **{shard.filename: book.shard_fingerprints[other.filename]})
    assert not Ledger(str(tmp_path), book.plan_fingerprint, swapped).recorded(shard)
    # the same size, other bytes: kept only without the CRC-32 check (what check_written asks)
    (tmp_path / shard.filename).write_bytes(os.urandom(shard.nbytes))
    assert not book.recorded(shard) and book.recorded(shard, check_crc=False)
    book.check_written([shard])
    # a wrong size is never recorded, and a shard without a record fails the check before any commit
    (tmp_path / shard.filename).write_bytes(b"short")
    assert not book.recorded(shard, check_crc=False)
    with pytest.raises(OutputError, match="no finished record"):
        book.check_written([shard])
    with pytest.raises(OutputError, match=other.filename):
        book.crc32(other.filename)


def test_the_plan_fingerprint_follows_what_decides_the_bytes(demo_checkpoint, plan):
    same = streamconv.plan(str(demo_checkpoint.ckpt_dir), max_shard_size="100KB", no_config=True)
    cast = streamconv.plan(str(demo_checkpoint.ckpt_dir), max_shard_size="100KB", no_config=True, dtype="float16")
    assert ledger.plan_fingerprint(same) == ledger.plan_fingerprint(plan) != ledger.plan_fingerprint(cast)


@pytest.mark.parametrize("field,message", [
    ("version", "another streamconv version"), ("checkpoint", "the checkpoint changed"),
    ("source", "content changed"), ("plan", "other options"),
])
def test_a_staging_folder_of_another_plan_is_not_resumed(field, message):
    current = {"version": ledger.RECORD_VERSION, "checkpoint": {"a": [1, 2]}, "source": "s", "plan": "p",
               "options": {"--dtype": "bfloat16"}}
    ledger.check_resumable(dict(current), current, "/out", "/.out.partial")
    previous = dict(current, **{field: {"a": [1, 3]} if field == "checkpoint" else "other"})
    with pytest.raises(OutputError, match=message) as caught:
        ledger.check_resumable(previous, current, "/out", "/.out.partial")
    assert "--discard-partial" in str(caught.value)


def test_a_transposed_tensor_has_another_shard_fingerprint(plan):
    """How a tensor's bytes are put in place is part of what decides them: the same chunks transposed by the plan
    (`TensorPlan.axes`) are another shard, so a resumed run does not keep a shard written the other way."""
    import dataclasses
    shard = plan.shards[0]
    t = next(t for t in shard.tensors if len(t.shape) == 2)
    turned = dataclasses.replace(shard, tensors=tuple(dataclasses.replace(x, axes=(1, 0)) if x is t else x
                                                      for x in shard.tensors))
    assert ledger.shard_fingerprint(turned) != ledger.shard_fingerprint(shard)


def test_the_shard_fingerprints_computed_once_give_the_same_plan_record_and_ledger(plan, tmp_path):
    """A conversion fingerprints each shard once (`shard_fingerprints`) for both its plan record and its ledger:
    the same values as computing them in each."""
    fps = ledger.shard_fingerprints(plan)
    assert len(fps) == len(plan.shards) > 1 and len(set(fps.values())) == len(fps)
    assert ledger.plan_fingerprint(plan, fps) == ledger.plan_fingerprint(plan)
    assert Ledger.for_plan(str(tmp_path), plan, "p", fps) == Ledger.for_plan(str(tmp_path), plan, "p")
    # the plan fingerprint really is made from the ones given
    swapped = dict(zip(fps, reversed(list(fps.values()))))
    assert ledger.plan_fingerprint(plan, swapped) != ledger.plan_fingerprint(plan)
