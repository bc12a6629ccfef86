"""`fs/gcs_objects.py` (objects.py's verbs on GCS) against the local GCS server (tests/support/gcs_server.py)
through gcsfs, as a run uses them: conditional writes by generation, a shard composed from parts uploaded in any
order (more than one compose request's 32), an upload a killed run left found and deleted."""
from __future__ import annotations

import pytest

from streamconv.errors import OutputError
from streamconv.fs import gcs_objects, objects

BUCKET = "gobjects"


@pytest.fixture()
def server(gcs_env):
    gcs_env.bucket(BUCKET)
    return gcs_env


def test_the_server_honours_the_preconditions_the_lock_relies_on(server):
    """What fake-gcs-server honours, checked before anything relies on it: ifGenerationMatch on a (JSON-API
    multipart) upload, 0 and a generation alike."""
    url = f"gs://{BUCKET}/cond/lock"
    first = objects.put_new(url, b"one")
    assert first is not None and objects.put_new(url, b"two") is None        # 0: only where nothing is
    assert objects.get(url, 100) == (b"one", first)
    assert objects.put_replacing(url, b"three", "12345") is None             # another generation: refused
    second = objects.put_replacing(url, b"three", first)
    assert second not in (None, first) and objects.get(url, 100) == (b"three", second)
    assert objects.put_replacing(url, b"four", first) is None                # the generation we read is gone
    assert objects.delete_if(url, first) is False and objects.get(url, 100)[0] == b"three"
    assert objects.delete_if(url, second) is True and objects.get(url, 100) is None
    with pytest.raises(OutputError, match="more than the 2 expected"):
        objects.put(url, b"xyz") or objects.get(url, 2)


def test_parts_in_any_order_compose_into_one_object_and_leave_nothing_behind(server):
    """70 parts (three compose requests' worth, then one more) uploaded backwards: the object is their bytes in
    order, appears only at `complete`, and no part is left."""
    url = f"gs://{BUCKET}/staged/model.safetensors"
    parts = [bytes([n]) * (1000 + n) for n in range(1, 71)]
    upload = objects.start_upload(url)
    for number in range(70, 0, -1):
        upload.put_part(number, bytearray(parts[number - 1]))
    assert objects.get(url, 1 << 20) is None                    # nothing visible yet
    assert objects.in_progress_uploads(f"gs://{BUCKET}/staged") != []
    upload.complete(70)
    assert objects.get(url, 1 << 20)[0] == b"".join(parts)
    assert list(objects.listing(f"gs://{BUCKET}/staged")) == ["model.safetensors"]
    assert objects.max_parts(url) == gcs_objects.MAX_PARTS


def test_a_missing_part_is_refused_and_an_abort_removes_the_parts(server):
    url = f"gs://{BUCKET}/aborted/model.safetensors"
    upload = objects.start_upload(url)
    upload.put_part(2, b"b" * 10)
    with pytest.raises(OutputError, match=r"parts \[1\] were never uploaded"):
        upload.complete(2)
    upload.abort()
    assert objects.listing(f"gs://{BUCKET}/aborted") == {}


def test_a_killed_runs_uploads_are_found_and_deleted(server):
    """A run killed mid-upload leaves part objects (never a shard): in_progress_uploads names each upload once,
    abort_uploads deletes their parts and nothing else."""
    prefix = f"gs://{BUCKET}/killed/.streamconv-staging-abc"
    objects.put(f"{prefix}/.streamconv-resume/plan.json", b"{}")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        upload = objects.start_upload(f"{prefix}/{name}")
        upload.put_part(1, b"x" * 10)
        upload.put_part(3, b"y" * 10)
    found = objects.in_progress_uploads(prefix)
    assert [key.rsplit("/", 1)[1] for key, _ in found] == ["model-00001-of-00002.safetensors",
                                                           "model-00002-of-00002.safetensors"]
    assert objects.abort_uploads(prefix) == 2
    assert list(objects.listing(prefix)) == [".streamconv-resume/plan.json"]
