"""`output/remote_lock.py`: one run per output prefix in a bucket, by conditional PUTs, against the moto server
(tests/support/s3_server.py) and the local GCS server (tests/support/gcs_server.py: the same lock through
ifGenerationMatch) through the real client stacks. The race it closes: two runs started into the same prefix at
once both find no staging prefix; each creates its own, and only one gets the lock."""
from __future__ import annotations

import json

import pytest

from streamconv.errors import OutputError
from streamconv.fs import objects
from streamconv.output.remote_lock import LOCK_NAME, PrefixLock
from streamconv.output.remote_staging import RemoteStaging
from tests.support import s3_server as s3

BUCKET = "locks"


@pytest.fixture(params=["s3", "gs"])
def root(request) -> str:
    """gs:// or s3:// of the test bucket, its server running and its variables set in this process."""
    server = request.getfixturevalue("s3_env" if request.param == "s3" else "gcs_env")
    server.bucket(BUCKET)
    return f"{request.param}://{BUCKET}"


def _staging(prefix: str, name: str) -> str:
    """A staging prefix as a run makes it (one object in it)."""
    objects.put(f"{prefix}/{name}/.streamconv-resume/plan.json", b"{}")
    return name


def _holder(url: str) -> dict:
    return json.loads(objects.get(url, 1 << 16)[0])


def test_of_two_runs_started_at_once_one_gets_the_lock(root):
    prefix = f"{root}/race"
    first, second = PrefixLock(prefix, "aaaa"), PrefixLock(prefix, "bbbb")
    first.acquire(_staging(prefix, ".streamconv-staging-aaaa"), take_over=False)
    assert first.held
    with pytest.raises(OutputError) as refused:
        second.acquire(_staging(prefix, ".streamconv-staging-bbbb"), take_over=False)
    text = str(refused.value)
    assert "another conversion holds this output prefix" in text and "run aaaa" in text
    assert "--resume" in text and "--discard-partial" in text
    assert not second.held and _holder(f"{prefix}/{LOCK_NAME}")["run"] == "aaaa"
    first.check_held()          # still ours
    first.release()
    assert objects.get(f"{prefix}/{LOCK_NAME}", 1 << 16) is None


def test_a_take_over_wins_once_and_stops_the_old_holder_before_it_publishes(root):
    prefix = f"{root}/taken"
    old = PrefixLock(prefix, "old1")
    old.acquire(_staging(prefix, ".streamconv-staging-old1"), take_over=False)
    new = PrefixLock(prefix, "new1")
    new.acquire(_staging(prefix, ".streamconv-staging-new1"), take_over=True)      # --resume / --discard-partial
    assert new.held and any("took over" in n and "run old1" in n for n in new.notes)
    with pytest.raises(OutputError, match="taken over by run new1"):
        old.check_held()
    old.release()               # If-Match: the new holder's lock is not the old one's to delete
    assert _holder(f"{prefix}/{LOCK_NAME}")["run"] == "new1"
    new.check_held()
    new.release()


def test_a_lock_whose_staging_prefix_is_gone_is_taken_over_without_being_asked(root):
    """Its run finished (staging prefix removed) but was killed before deleting its lock."""
    prefix = f"{root}/stale"
    gone = PrefixLock(prefix, "gone")
    gone.acquire(".streamconv-staging-gone", take_over=False)       # no such prefix
    fresh = PrefixLock(prefix, "next")
    fresh.acquire(_staging(prefix, ".streamconv-staging-next"), take_over=False)
    assert fresh.held and any("had finished" in n for n in fresh.notes)


def test_our_own_lock_found_after_a_lost_answer_is_ours(root):
    prefix = f"{root}/retried"
    lock = PrefixLock(prefix, "same")
    lock.acquire(_staging(prefix, ".streamconv-staging-same"), take_over=False)
    again = PrefixLock(prefix, "same")      # the PUT reached the service; its answer did not reach us
    again.acquire(".streamconv-staging-same", take_over=False)
    assert again.held and not again.notes
    again.check_held()


def _refuse_conditional_writes(method, path, headers):
    return "501" if method in ("PUT", "DELETE") and (headers.get("If-None-Match") or headers.get("If-Match")) else None


def test_a_service_without_conditional_writes_runs_without_a_lock_and_says_so(s3_server, monkeypatch):
    s3_server.bucket(BUCKET)
    proxy = s3.FaultProxy(s3_server.url, _refuse_conditional_writes)
    try:
        for key, value in s3.env_for(s3_server, proxy.url).items():
            monkeypatch.setenv(key, value)
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()
        lock = PrefixLock(f"s3://{BUCKET}/plain", "only")
        lock.acquire(".streamconv-staging-only", take_over=False)
        assert not lock.held and proxy.faults == 1
        assert any("no lock" in n and "does not support conditional writes" in n for n in lock.notes)
        lock.check_held()       # nothing to check
    finally:
        proxy.stop()
        import s3fs
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_second_staging_opened_beside_a_live_one_is_refused_and_leaves_nothing(root):
    """RemoteStaging end to end: the second run (here without the first's staging prefix in its listing, as in
    the race, because it lists before the first creates it) is refused by the lock and removes its own
    staging prefix; the first run's staging and lock are untouched."""
    prefix = f"{root}/staged"
    first = RemoteStaging(prefix, plan_record={"plan": 1})
    lock = PrefixLock(prefix, "late")
    with pytest.raises(OutputError, match="another conversion holds"):
        lock.acquire(_staging(prefix, ".streamconv-staging-late"), take_over=False)
    first.discard()
    assert list(objects.listing(prefix)) == [".streamconv-staging-late/.streamconv-resume/plan.json"]  # the test's own
