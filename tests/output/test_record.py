"""The output record's format (streamconv/output/record.py): round trip, and every way a planted or damaged record is
refused rather than believed."""
from __future__ import annotations

import json
import os

import pytest

from streamconv.output import record
from streamconv.output.record import FileEntry, OutputRecord, RecordError


def _record() -> OutputRecord:
    return OutputRecord(streamconv_version="0.1.0", source_fingerprint="abc-1",
                        plan_fingerprint="def-2", options=record.options_json({"dtype": "bfloat16",
                                                                               "include": ("a*",)}),
                        files={"model.safetensors": FileEntry(123, 0xDEADBEEF), "config.json": FileEntry(7, 1)})


def test_round_trip(tmp_path):
    (tmp_path / record.RECORD_FILE).write_bytes(record.encode(_record()))
    back = record.read(str(tmp_path))
    assert back == _record()
    assert back.options["include"] == ["a*"]
    assert json.loads((tmp_path / record.RECORD_FILE).read_text())["files"]["model.safetensors"] == {
        "bytes": 123, "crc32": "deadbeef"}


def test_absent_record_is_none(tmp_path):
    assert record.read(str(tmp_path)) is None
    assert record.read(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(format="other"), "not a streamconv output record"),
    (lambda d: d.update(version=2), "record version"),
    (lambda d: d.update(plan_fingerprint=5), "not a string"),
    (lambda d: d.update(files=[]), "must be objects"),
    (lambda d: d["files"].update(x={"bytes": -1, "crc32": "00000000"}), "byte count"),
    (lambda d: d["files"].update(x={"bytes": True, "crc32": "00000000"}), "byte count"),
    (lambda d: d["files"].update(x={"bytes": 1, "crc32": "zzzzzzzz"}), "not hexadecimal"),
    (lambda d: d["files"].update({"../ckpt/.metadata": {"bytes": 1, "crc32": "00000000"}}), "not the name of a file"),
    (lambda d: d["files"].update({"..": {"bytes": 1, "crc32": "00000000"}}), "not the name of a file"),
    (lambda d: d["files"].update({"streamconv.json": {"bytes": 1, "crc32": "00000000"}}), "not the name of a file"),
])
def test_malformed_records_are_refused(tmp_path, mutate, words):
    data = _record().to_json()
    mutate(data)
    (tmp_path / record.RECORD_FILE).write_text(json.dumps(data))
    with pytest.raises(RecordError, match=words):
        record.read(str(tmp_path))


def test_planted_records_are_not_followed(tmp_path):
    real = tmp_path / "real.json"
    real.write_bytes(record.encode(_record()))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(real, out / record.RECORD_FILE)
    with pytest.raises(RecordError, match="symbolic link"):
        record.read(str(out))
    os.unlink(out / record.RECORD_FILE)
    os.mkfifo(out / record.RECORD_FILE)     # a FIFO with no writer must not block
    with pytest.raises(RecordError, match="not a regular file"):
        record.read(str(out))
    os.unlink(out / record.RECORD_FILE)
    (out / record.RECORD_FILE).write_bytes(b"\xff{")
    with pytest.raises(RecordError, match="not valid JSON"):
        record.read(str(out))


def test_oversized_record_is_refused_without_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 100)
    (tmp_path / record.RECORD_FILE).write_bytes(record.encode(_record()))
    with pytest.raises(RecordError, match="more than any record"):
        record.read(str(tmp_path))
