"""output/crc.py's `crc32`: zlib's CRC-32 to the bit, whichever implementation computes it (libdeflate where the
system has it, zlib otherwise or with STREAMCONV_NO_FAST_PATHS=1), for every kind of buffer the writers hand it."""
import os
import random
import subprocess
import sys
import zlib

import numpy as np
import pytest

from streamconv import failpoints
from streamconv.output import crc

needs_libdeflate = pytest.mark.skipif(not crc.FAST_CRC32 and crc._libdeflate_crc32() is None,
                                      reason="libdeflate is not installed here: only zlib's CRC-32 runs")


def _buffers(data: bytes):
    """The same bytes as each kind of object the writers checksum."""
    arr = np.frombuffer(bytearray(b"xyz" + data), dtype=np.uint8)[3:]     # a view that does not start its base
    return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(bytearray(b"ab" + data))[2:],
            "readonly memoryview": memoryview(b"ab" + data)[2:], "numpy": arr,
            "numpy float32": np.frombuffer(bytearray(data[:len(data) // 4 * 4]), dtype=np.float32)}


SIZES = [0, 1, 7, 4095, crc._FAST_MIN_BYTES - 1, crc._FAST_MIN_BYTES, crc._FAST_MIN_BYTES + 13, 1 << 20, (3 << 20) + 5]


@needs_libdeflate
@pytest.mark.parametrize("nbytes", SIZES)
def test_libdeflate_crc32_is_zlibs(nbytes, monkeypatch):
    if not crc.FAST_CRC32:      # this process turned it off (STREAMCONV_NO_FAST_PATHS): test it all the same
        monkeypatch.setattr(crc, "_deflate_crc32", crc._libdeflate_crc32())
    data = random.Random(nbytes).randbytes(nbytes)
    for kind, buf in _buffers(data).items():
        want = zlib.crc32(memoryview(buf).cast("B"))
        assert crc.crc32_libdeflate(buf) == want, kind
        assert crc.crc32_libdeflate(buf, 0x12345678) == zlib.crc32(memoryview(buf).cast("B"), 0x12345678), kind


@pytest.mark.parametrize("fast", [True, False], ids=["as-detected", "zlib"])
@pytest.mark.parametrize("nbytes", SIZES)
def test_crc32_is_zlibs_and_continues_across_pieces(nbytes, fast, monkeypatch):
    if not fast:
        monkeypatch.setattr(crc, "FAST_CRC32", False)
    data = random.Random(nbytes + 1).randbytes(nbytes)
    for kind, buf in _buffers(data).items():
        assert crc.crc32(buf) == zlib.crc32(memoryview(buf).cast("B")), kind
    # in pieces, as the copy assembler checksums a plane one IO step at a time
    step = max(1, nbytes // 3)
    running = 0
    for start in range(0, nbytes, step):
        running = crc.crc32(memoryview(bytearray(data))[start:start + step], running)
    assert running == zlib.crc32(data)


@needs_libdeflate
def test_libdeflate_is_used_unless_fast_paths_are_off():
    """Whether a process uses it is decided once, at import, by the same switch as the IO fast paths."""
    code = "from streamconv.output import crc; print(crc.FAST_CRC32)"
    env = {k: v for k, v in os.environ.items() if k != failpoints.NO_FAST_PATHS_ENV}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(env, **{failpoints.NO_FAST_PATHS_ENV: "1"}))
    assert (default.stdout.strip(), off.stdout.strip()) == ("True", "False")


def test_a_file_with_unknown_pieces_is_read_back_to_its_crc32(tmp_path):
    """PieceCrcs.total reads ranges of unknown CRC back (through `crc32`) and combines them with the known ones."""
    data = random.Random(5).randbytes(3 * crc._READ_PIECE_BYTES + 17)
    pieces = crc.PieceCrcs()
    pieces.add_bytes(0, data[:100])
    pieces.add(100, 2 * crc._READ_PIECE_BYTES, None)                 # copied in-kernel, CRC unknown
    pieces.add(100 + 2 * crc._READ_PIECE_BYTES, 5000, zlib.crc32(data[100 + 2 * crc._READ_PIECE_BYTES:][:5000]))
    assert pieces.total(len(data), lambda offset, n: data[offset:offset + n]) == zlib.crc32(data)


def test_a_library_that_answers_otherwise_is_not_used():
    """The self-check at import: a libdeflate_crc32 that is not zlib's CRC-32 (another polynomial, a different
    calling convention) leaves zlib's in charge rather than writing records no reader would accept."""
    assert crc.checked(lambda c, data, n: zlib.crc32(data[:n], c) ^ 1) is None       # wrong value
    assert crc.checked(lambda c, data, n: zlib.crc32(data[:n])) is None               # ignores the running CRC
    assert crc.checked(lambda c, data, n: zlib.crc32(data[:n], c)) is not None
    if crc._libdeflate_crc32() is not None:
        assert crc.checked(crc._libdeflate_crc32()) is not None


def test_pieces_written_front_to_back_fold_into_one_record_and_stay_exact():
    """A shard written in many small pieces (each writer front to back through its tensors, two writers
    interleaved, in-kernel copies whose CRC the zip directory supplies beforehand) keeps one record per run, not
    one per piece, and its CRC-32 is still the file's; an overlapping write still sends total() to the file."""
    rng = random.Random(7)
    data = rng.randbytes(4 << 20)
    half = len(data) // 2
    pieces = crc.PieceCrcs()
    steps = [(o, min(4096, half - o)) for o in range(0, half, 4096)]
    for (a, n), (b, m) in zip(steps, [(half + o, k) for o, k in steps]):       # two writers, interleaved
        pieces.add_bytes(a, data[a:a + n])
        if b < half + 1000 or b >= half + 9192:
            pieces.add_bytes(b, data[b:b + m])
        else:                                                                # its CRC, then an in-kernel copy
            pieces.expect(b, m, zlib.crc32(data[b:b + m]))
            pieces.add(b, m, None)
    assert len(pieces._pieces) == 2
    never_read = lambda offset, n: (_ for _ in ()).throw(AssertionError("read back"))     # noqa: E731
    assert pieces.total(len(data), never_read) == zlib.crc32(data)
    pieces.add_bytes(100, b"\0" * 10)            # written again over the first run: only the file can say
    reads = []
    file_now = data[:100] + b"\0" * 10 + data[110:]
    assert pieces.total(len(data), lambda o, n: reads.append(o) or file_now[o:o + n]) == zlib.crc32(file_now)
    assert reads


def _never_read(offset, n):
    raise AssertionError(f"read back {n} bytes at {offset}")


def test_records_written_in_pieces_after_their_crc_is_given_are_never_summed_nor_read_back(monkeypatch):
    """A bucket's chunks reach the sink as answers of a few MiB each, one record after the other: with each
    record's CRC-32 given before its pieces (`expect`), none of them is summed and total() reads nothing back.
    (Given after, as until 2026-12-07, the pieces were summed and folded into a run that began in the record
    before, and total() read the whole file back.)"""
    data = random.Random(11).randbytes(1 << 20)
    pieces = crc.PieceCrcs()
    pieces.add_bytes(0, data[:100])                                      # the header, summed
    records = [(100, 300_000), (300_100, 500_000), (800_100, len(data) - 800_100)]
    summed = []
    monkeypatch.setattr(crc, "crc32", lambda d, c=0: summed.append(len(d)) or zlib.crc32(d, c))
    for start, n in records:
        pieces.expect(start, n, zlib.crc32(data[start:start + n]))
        for at in range(start, start + n, 65536):
            pieces.add_bytes(at, data[at:min(at + 65536, start + n)])
    assert summed == []
    assert pieces.total(len(data), _never_read) == zlib.crc32(data)
    assert len(pieces._pieces) == 1       # the header and the three records: one run


def test_a_record_not_written_front_to_back_is_read_back_not_trusted():
    """A write into an expected range anywhere but where the last one ended (a piece missed, or written twice)
    cancels the expectation: the range is then summed or read back from the file, never given the record's CRC
    (here the file ends up with a hole of zeros, which the record's CRC-32 would hide)."""
    data = random.Random(12).randbytes(200_000)
    hole = data[:150_000] + bytes(50_000)
    for order, file_now in (([(0, 50_000), (100_000, 100_000)], data[:50_000] + bytes(50_000) + data[100_000:]),
                            ([(0, 50_000), (0, 50_000), (50_000, 100_000)], hole)):     # written twice, then short
        pieces = crc.PieceCrcs()
        pieces.expect(0, len(data), zlib.crc32(data))
        for at, n in order:
            pieces.add_bytes(at, file_now[at:at + n])
        assert pieces.total(len(data), lambda o, n: file_now[o:o + n]) == zlib.crc32(file_now)
