"""An output prefix in object storage: staged under the prefix, published by server-side copies, record last.

Object stores have no rename, so the local protocol (staging.py: one rename) becomes:

    s3://bucket/hf/model/.streamconv-staging-<run id>/     everything is written here first
        .streamconv-resume/plan.json, <shard>.json          the resume ledger (ledger.py), as objects
        model-00001-of-00002.safetensors ...                each shard one multipart upload (upload.py)
        config.json, tokenizer files, the index, streamconv.json
    s3://bucket/hf/model/                                   published by `commit`:
        1. the previous output's streamconv.json and index are deleted (it stops being finished)
        2. every staged file but the index and the record is copied into place (server-side, no download)
        3. the index, then streamconv.json LAST: its presence is what "finished" means (record.finished)
        4. objects of the previous output the new one does not have are deleted, then the staging prefix

A prefix is finished when its streamconv.json is there, valid, and every file it lists has its size: written
last, so no reader (verify, batch's skip, convert's "already converted") mistakes a partial upload for a model.
A run that fails deletes its staging prefix (or keeps it for `--resume`); a killed run leaves it, with no record
at the prefix. The previous output is untouched until the new one is complete in the staging prefix; a run
killed while publishing (between 1 and 3) leaves the prefix unfinished and the new output complete in staging:
`--resume` keeps every shard and publishes again. Object stores have no lock: a run holds the prefix's lock
object (remote_lock.py, conditional PUTs) from just after its staging prefix is made until it is removed; a
second run finds the first's staging prefix (or, starting at the same moment, its lock) and is refused.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Callable, Dict, Iterable, List, Optional, Set

from ..errors import OutputError
from ..failpoints import kill_point
from ..fs import location, objects
from ..fs.fastpaths import NONE, FastPaths
from ..planning.plan import INDEX_FILE_NAME
from .ledger import PLAN_RECORD, RECORD_VERSION, RECORDS_DIR, check_resumable, read_remote_json
from .record import RECORD_FILE
from .remote_lock import LOCK_NAME, PrefixLock

STAGING_PREFIX = ".streamconv-staging-"
PUBLISHING_RECORD = "publishing.json"      # in the staging prefix's records: the publication has begun


def staging_names(names: Iterable[str]) -> List[str]:
    return sorted(n for n in names if n.startswith(STAGING_PREFIX))


def is_run_object(name: str) -> bool:
    """A name under an output prefix that belongs to a run, not to an output: a staging prefix or the lock."""
    return name.startswith(STAGING_PREFIX) or name == LOCK_NAME


def _run_id() -> str:
    return os.urandom(6).hex()


class RemoteStaging:
    """`staging.StagingDir`'s interface for an output URL (see the module docstring)."""

    def __init__(self, destination: str, *, plan_record: Dict, overwrite: bool = False, resume: bool = False,
                 discard_partial: bool = False, fast: FastPaths = NONE, protected=()):
        objects.check_writable(destination)
        self.destination = destination.rstrip("/")
        self.plan_record = dict(plan_record, version=RECORD_VERSION)
        self.overwrite, self.resume, self.fast = overwrite, resume, NONE
        self.notes: List[str] = []
        self.resumed = self.committed = self._done = self.publishing = False
        self._planned: Set[str] = set()
        self.record_bytes: Optional[bytes] = None
        self._lock = PrefixLock(self.destination, _run_id())
        self.path = self._open(discard_partial)
        self.notes.extend(self._lock.notes)

    # -- opening ----------------------------------------------------------------------------------------
    def _open(self, discard_partial: bool) -> str:
        """The staging prefix of this run: a new one, or an interrupted run's taken over (--resume)."""
        found = staging_names(_names(self.destination))
        previous = [self._join(name) for name in found]
        if found and discard_partial:
            for url in previous:
                _remove_prefix(url)
            self.notes.append(f"--discard-partial: deleted {len(previous)} interrupted conversion(s) under "
                              f"{self.destination}")
            previous = []
        if previous and not self.resume:
            raise OutputError(
                f"{self.destination}: an interrupted conversion into this prefix was found ({previous[0]}/), or "
                "another run is writing there now. Run the same command again with --resume to keep its "
                "finished shards, or with --discard-partial to delete it and start over.")
        for url in previous:
            recorded = read_remote_json(posixpath.join(url, RECORDS_DIR, PLAN_RECORD))
            if recorded is None:
                continue
            check_resumable(recorded, self.plan_record, self.destination, url)
            self._lock.acquire(posixpath.basename(url), take_over=True)
            aborted = objects.abort_uploads(url)     # a killed run's unfinished shards: parts billed, never read
            if aborted:
                self.notes.append(f"aborted {aborted} unfinished upload(s) of the interrupted run")
            self.resumed = True
            return url
        name = STAGING_PREFIX + self._lock.run_id
        path = self._join(name)
        objects.put(posixpath.join(path, RECORDS_DIR, PLAN_RECORD),
                    json.dumps(self.plan_record, sort_keys=True).encode("utf-8"))
        try:        # the staging prefix first, then the lock: a live holder always has one (remote_lock.py)
            self._lock.acquire(name, take_over=discard_partial)
        except OutputError:
            _remove_prefix(path)
            raise
        return path

    def _join(self, name: str) -> str:
        return posixpath.join(self.destination, name)

    @property
    def scratch_dir(self) -> str:
        raise OutputError(f"{self.destination}: an output in object storage has no scratch folder")

    # -- writing ----------------------------------------------------------------------------------------
    def file(self, name: str) -> str:
        self._planned.add(name)
        return posixpath.join(self.path, name)

    def write_json(self, name: str, obj: Dict) -> None:
        objects.put(self.file(name), (json.dumps(obj, indent=2) + "\n").encode("utf-8"))
        kill_point("index")

    def added(self, names: Iterable[str]) -> None:
        for name in names:
            self.file(name)

    def write_record(self, data: bytes) -> None:
        """The output's record (record.py), staged like the rest; published last by `commit`."""
        objects.put(self.file(RECORD_FILE), data)

    # -- publishing -------------------------------------------------------------------------------------
    def commit(self, on_committed: Optional[Callable[[str], None]] = None) -> None:
        staged = {n: s for n, s in objects.listing(self.path).items() if "/" not in n}
        unplanned = sorted(set(staged) - self._planned)
        missing = sorted(self._planned - set(staged))
        if unplanned or missing or RECORD_FILE not in staged:
            raise OutputError(f"{self.path}: the staged output is not the planned one (missing: "
                              f"{', '.join(missing[:5]) or 'none'}; unplanned: {', '.join(unplanned[:5]) or 'none'}); "
                              "nothing was committed. Run again with --discard-partial")
        before = {n for n in _names(self.destination) if not is_run_object(n)}
        marker = posixpath.join(self.path, RECORDS_DIR, PUBLISHING_RECORD)
        if before and not self.overwrite and read_remote_json(marker) is None:
            raise OutputError(f"{self.destination}: something was written there during the conversion; it was left "
                              "untouched and nothing was committed. Pass --overwrite to replace it, or choose "
                              "another output prefix.")
        self._lock.check_held()
        # (a run killed from here on left the prefix unfinished: the marker lets `--resume` publish again)
        objects.put(marker, json.dumps({"replaces": sorted(before)}).encode("utf-8"))
        self.publishing = True      # from here a failure keeps the staged output: it may be all that is left
        try:
            objects.delete([self._join(n) for n in (RECORD_FILE, INDEX_FILE_NAME) if n in before])
            kill_point("promote")
            last = [n for n in (INDEX_FILE_NAME, RECORD_FILE) if n in staged]
            for name in sorted(set(staged) - set(last)) + last:       # the record last: then it is finished
                objects.copy(posixpath.join(self.path, name), self._join(name))
        except OutputError as exc:
            raise OutputError(f"{exc}. Publishing the output was interrupted: {self.destination} is unfinished (no "
                              f"{RECORD_FILE}) and the complete new output is kept in {self.path}/; run the same "
                              "command again with --resume to publish it") from None
        self.committed = self._done = True
        if on_committed is not None:
            on_committed(self.destination)
        stale = sorted(before - set(staged))
        objects.delete([self._join(n) for n in stale])
        _remove_prefix(self.path)
        self._release()
        kill_point("after-commit")

    # -- the end ----------------------------------------------------------------------------------------
    def discard(self) -> None:
        if not self._done:
            self._done = True
            try:
                _remove_prefix(self.path)
            except OutputError as exc:
                self.notes.append(f"the staging prefix could not be deleted; delete {self.path}/ yourself ({exc})")
                return      # (its lock stays: the staging prefix it names says a run was here)
            self._release()

    def _release(self) -> None:
        self._lock.release()
        self.notes.extend(n for n in self._lock.notes if n not in self.notes)

    def keep_for_resume(self) -> None:
        self._done = True

    def __enter__(self) -> "RemoteStaging":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and (self.resume or self.publishing) and not self._done:
            self.keep_for_resume()
        else:
            self.discard()


def interrupted_publication(destination: str) -> Optional[str]:
    """The staging prefix of a run killed while publishing into `destination` (whose previous output it had
    begun to replace), or None."""
    for name in staging_names(_names(destination)):
        url = posixpath.join(destination, name)
        if read_remote_json(posixpath.join(url, RECORDS_DIR, PUBLISHING_RECORD)) is not None:
            return url
    return None


def _names(prefix: str) -> List[str]:
    """The names directly under `prefix` ([] when there is nothing)."""
    try:
        return location.at(prefix, OutputError).names()
    except FileNotFoundError:
        return []


def _remove_prefix(url: str) -> None:
    """Every object under `url`, and every upload in progress there, gone."""
    objects.abort_uploads(url)
    objects.delete([posixpath.join(url, n) for n in objects.listing(url)])
