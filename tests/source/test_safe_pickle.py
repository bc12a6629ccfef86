"""The decoded-record cache of `safe_pickle.load_tensor_record`: torch.save writes one `data.pkl` per dtype, shape
and stride, so a checkpoint's blobs decode a handful of distinct pickles; equal bytes are decoded once, and the
general machine decodes every new one (the fallback is the first decode of each)."""
import io
import zipfile

import pytest
import torch

from streamconv.errors import CheckpointError
from streamconv.source import safe_pickle, unpickle


def data_pkl(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


@pytest.fixture
def decodes(monkeypatch):
    """Counts the general machine's runs; the cache starts empty."""
    monkeypatch.setattr(safe_pickle, "_records", {})
    runs = []
    real = unpickle.load

    def counting(*args, **kwargs):
        runs.append(kwargs.get("source"))
        return real(*args, **kwargs)
    monkeypatch.setattr(unpickle, "load", counting)
    return runs


def test_equal_bytes_decode_once_and_equal_the_general_decode(decodes):
    a, b = data_pkl(torch.zeros(4, 3)), data_pkl(torch.ones(4, 3))
    assert a == b       # torch writes the same pickle for the same dtype, shape and stride
    first = safe_pickle.load_tensor_record(a, source="x/__0_0.distcp[0]")
    again = safe_pickle.load_tensor_record(b, source="x/__1_0.distcp[0]")
    assert again == first and len(decodes) == 1
    assert (first.dtype, first.shape, first.stride) == ("float32", (4, 3), (3, 1))
    transposed = safe_pickle.load_tensor_record(data_pkl(torch.zeros(3, 4).t()), source="y")
    assert (transposed.shape, transposed.stride) == ((4, 3), (1, 4)) and len(decodes) == 2
    assert safe_pickle._decode_tensor_record(a, source="z") == first


def test_failures_are_not_cached_and_name_each_file(decodes):
    bad = data_pkl(torch.zeros(2)).replace(b"_rebuild_tensor_v2", b"_rebuild_tensor_v9")
    for source in ("a/__0_0.distcp", "b/__1_0.distcp"):
        with pytest.raises(CheckpointError, match=source):
            safe_pickle.load_tensor_record(bad, source=source)
    assert len(decodes) == 2 and not safe_pickle._records


def test_the_cache_is_bounded(decodes, monkeypatch):
    monkeypatch.setattr(safe_pickle, "RECORD_CACHE_ENTRIES", 3)
    for n in range(1, 8):
        safe_pickle.load_tensor_record(data_pkl(torch.zeros(n)), source="x")
        assert len(safe_pickle._records) <= 3
    big = data_pkl(torch.zeros(2))
    monkeypatch.setattr(safe_pickle, "RECORD_CACHE_MAX_PKL_BYTES", len(big) - 1)
    safe_pickle._records.clear()
    safe_pickle.load_tensor_record(big, source="x")
    assert not safe_pickle._records
