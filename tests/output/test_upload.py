"""`output/upload.py`: a shard written straight into a bucket as one multipart upload, against the moto server
(tests/support/s3_server.py) through the real client stack. Parts fill in any order; an upload that cannot be
completed is aborted, never published short; the part buffers open at once stay within the run's budget."""
from __future__ import annotations

import random
import zlib

import pytest

from streamconv.errors import OutputError
from streamconv.output.sink import FileSink
from streamconv.output.upload import PartBudget, UploadSink, part_bytes_for, shard_opener

BUCKET = "uploads"
PART = 5 << 20      # S3's smallest part: the tests need several parts without much data


@pytest.fixture()
def server(s3_env):
    s3_env.bucket(BUCKET)
    return s3_env


def _in_progress(server) -> list:
    return server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def _object(server, key: str) -> bytes:
    return server.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_pieces_written_in_any_order_make_the_object_exactly(server):
    data = random.Random(0).randbytes(3 * PART + 12345)
    pieces = [(o, data[o:o + 700_001]) for o in range(0, len(data), 700_001)]      # straddling part bounds
    random.Random(1).shuffle(pieces)
    budget = PartBudget(100)
    sink = UploadSink(f"s3://{BUCKET}/any-order", len(data), budget, part_bytes=PART)
    for offset, piece in pieces:
        sink.write_at(offset, piece)
    sink.close()
    assert _object(server, "any-order") == data
    assert sink.crc32() == zlib.crc32(data)
    assert budget.open == 0 and 1 <= budget.peak <= 4
    assert _in_progress(server) == []


def test_front_to_back_writes_hold_one_part_at_a_time(server):
    data = bytes(range(256)) * (2 * PART // 256 + 10)
    budget = PartBudget(1)      # one part open at once is enough for writes in order
    sink = UploadSink(f"s3://{BUCKET}/in-order", len(data), budget, part_bytes=PART)
    for offset in range(0, len(data), 256 << 10):
        sink.write_at(offset, data[offset:offset + (256 << 10)])
    sink.close()
    assert _object(server, "in-order") == data and budget.peak == 1


def test_bytes_never_written_fail_the_shard_and_publish_nothing(server):
    sink = UploadSink(f"s3://{BUCKET}/holey", 2 * PART, PartBudget(10), part_bytes=PART)
    sink.write_at(0, bytes(PART))           # the first part only
    with pytest.raises(OutputError, match=f"bytes from offset {PART:,} were never written"):
        sink.close()
    assert _in_progress(server) == []
    assert "Contents" not in server.client().list_objects_v2(Bucket=BUCKET, Prefix="holey")


def test_more_open_parts_than_the_budget_is_an_error_then_abort_drops_the_upload(server):
    sink = UploadSink(f"s3://{BUCKET}/scattered", 4 * PART, PartBudget(2), part_bytes=PART)
    sink.write_at(0, b"x")
    sink.write_at(PART, b"x")
    with pytest.raises(OutputError, match="upload parts .* open at once"):
        sink.write_at(2 * PART, b"x")
    sink.abort()
    assert _in_progress(server) == []


def test_a_write_into_an_uploaded_part_is_refused(server):
    sink = UploadSink(f"s3://{BUCKET}/twice", 2 * PART, PartBudget(4), part_bytes=PART)
    sink.write_at(0, bytes(PART))
    with pytest.raises(OutputError, match="after their part was uploaded"):
        sink.write_at(10, b"late")
    sink.abort()


def test_part_sizes_fit_s3_limits():
    assert part_bytes_for(1) == 8 << 20
    huge = 200 << 30                     # 200 GiB in at most 10,000 parts of whole MiB
    assert part_bytes_for(huge) * 10_000 >= huge and part_bytes_for(huge) % (1 << 20) == 0
    assert part_bytes_for(huge, 1024) * 1024 >= huge > part_bytes_for(huge) * 1024    # GCS composes 1,024 at most


def test_the_opener_is_an_upload_for_a_url_and_a_file_for_a_folder(tmp_path):
    from streamconv.fs.fastpaths import NONE
    opened = shard_opener(str(tmp_path), NONE, 2)(str(tmp_path / "a.safetensors"), 10)
    assert isinstance(opened, FileSink)
    opened.close()


_SEND_ONE_PART = """
import random, sys, tracemalloc
from streamconv.output.upload import PartBudget, UploadSink
part = int(sys.argv[2])
data = random.Random(2).randbytes(2 * part)
sink = UploadSink(sys.argv[1], len(data), PartBudget(4), part_bytes=part)
sink.write_at(0, data[:part])           # the first part: the client's first call sets it up
second = data[part:]
tracemalloc.start()
sink.write_at(part, second)             # the second part filled, then uploaded
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
sink.close()
print(peak)
"""


def test_a_part_goes_up_without_python_copies_of_it(server):
    """Issue 21's write peak: handed a bytearray, the client stack copied each part two or three times while sending
    it (aiohttp's slice and header join, asyncio's transport buffer), and the part itself came from malloc. Now the
    part is a mapping of its own and the client reads it as a file: what Python allocates while a part is filled
    and sent stays far below the part's size (tracemalloc counts allocations, not time; in a process of its own,
    since the server's allocations are this one's)."""
    import subprocess
    import sys
    url = f"s3://{BUCKET}/no-copies"
    part = 16 << 20         # the client's own steps are 1 MiB (checksums) and 64 KiB (sending): far below it
    sent = subprocess.run([sys.executable, "-c", _SEND_ONE_PART, url, str(part)], capture_output=True, text=True,
                          timeout=300)
    assert sent.returncode == 0, sent.stderr
    assert _object(server, "no-copies") == random.Random(2).randbytes(2 * part)
    peak = int(sent.stdout)
    assert peak < part // 4, f"{peak / 2**20:.1f} MiB allocated while a {part >> 20} MiB part was filled and sent"


def test_the_buffer_reader_reads_seeks_and_rereads_a_buffer():
    from streamconv.fs.s3_objects import BufferReader
    data = bytearray(range(256)) * 10
    reader = BufferReader(data)
    assert len(reader) == 2560 and reader.read(300) == bytes(data[:300]) and reader.tell() == 300
    assert reader.read() == bytes(data[300:]) and reader.read(5) == b""
    assert reader.seek(-10, 2) == 2550 and reader.read(100) == bytes(data[-10:])
    assert reader.seek(0) == 0 and reader.read(7) == bytes(data[:7])      # a retried request reads it again
    reader.close()      # (the client's request objects outlive the upload: closed, the reader holds no buffer)
    data.extend(b"x")   # BufferError while a view of `data` is still exported


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_part_sent_again_after_a_fault_carries_all_its_bytes(server, monkeypatch, fault):
    """A part's body is a file read to its end by the failed try: every later try (botocore's own, which rewinds
    it, then streamconv's, with a new reader) must send the whole part again, never an empty or short body (s3fs's
    own retry loop sent the spent file again: a request whose body never came)."""
    import s3fs
    from tests.support import s3_server as s3
    tries = {}

    def first_two_fail(method, path, headers):
        if method == "PUT" and "partNumber=" in path:
            tries[path] = tries.get(path, 0) + 1
            return fault if tries[path] <= 2 else None
        return None
    proxy = s3.FaultProxy(server.url, first_two_fail)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        data = random.Random(3).randbytes(PART + 4321)
        sink = UploadSink(f"s3://{BUCKET}/sent-again-{fault}", len(data), PartBudget(4), part_bytes=PART)
        sink.write_at(0, data)
        sink.close()
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.faults >= 4 and all(n == 3 for n in tries.values()), tries
    assert _object(server, f"sent-again-{fault}") == data and sink.crc32() == zlib.crc32(data)
