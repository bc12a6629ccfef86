"""One run per output prefix in object storage: a lock object written with conditional PUTs.

A local output is locked with flock (runlock.py); a bucket has no lock, and before this module two runs started
into the same prefix at the same moment both found it free (no staging prefix yet), both converted, and both
published server-side copies over each other: the last record written could describe a mix of the two outputs.
Now each run, after creating its staging prefix, creates `<prefix>/.streamconv-lock` with `If-None-Match: *`
(S3 conditional writes, atomic on the service): exactly one run gets it.

The lock names the run and its staging prefix. A run that finds a lock:
* whose staging prefix is still there, is refused: a run is converting, or was killed (its staging prefix says
  which, and `--resume` / `--discard-partial` are how the user says it is not running: they take the lock over);
* whose staging prefix is gone, takes it over: its holder finished or failed and was killed while tidying up
  (a run removes its staging prefix before its lock, and creates it before the lock, so a live holder always
  has one);
* that is its own (the same run id: a PUT that reached the service but whose answer was lost, then retried).
Taking over is a PUT with `If-Match: <the version read>`: of two runs taking over one lock, one wins. The holder
checks it still holds the lock before publishing (`check_held`): a run whose lock was taken over (the user ran
`--discard-partial` beside it) publishes nothing. It is deleted with `If-Match` too, never someone else's.

A service without conditional writes answers 501: the run goes on without a lock and says so, as before this
module. One that ignores the headers overwrites: `check_held` then stops every run but the last one to write it.
"""
from __future__ import annotations

import datetime
import json
import os
import posixpath
import socket
from typing import List, Optional

from ..errors import OutputError
from ..fs import objects

LOCK_NAME = ".streamconv-lock"
_MAX_LOCK_BYTES = 1 << 16


def _describe(holder: dict) -> str:
    who = ", ".join(f"{k} {holder[k]}" for k in ("host", "pid", "started") if holder.get(k) is not None)
    return f"run {holder.get('run', '?')}" + (f" ({who})" if who else "")


class PrefixLock:
    """The lock of `destination` for the run `run_id`: `acquire` it once its staging prefix exists, `check_held`
    before publishing, `release` after removing the staging prefix. `notes` for the report."""

    def __init__(self, destination: str, run_id: str):
        self.destination = destination.rstrip("/")
        self.url = posixpath.join(self.destination, LOCK_NAME)
        self.run_id = run_id
        self.notes: List[str] = []
        self._etag: Optional[str] = None
        self._unsupported = False

    @property
    def held(self) -> bool:
        return self._etag is not None

    def _body(self, staging: str) -> bytes:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps({"run": self.run_id, "staging": staging, "host": socket.gethostname(),
                           "pid": os.getpid(), "started": started}, sort_keys=True).encode("utf-8")

    def acquire(self, staging: str, *, take_over: bool) -> None:
        """Hold the lock for the staging prefix `staging` (a name under the destination), or OutputError when
        another run holds it. `take_over`: the user said (--resume, --discard-partial) that no run is writing."""
        body = self._body(staging)
        try:
            for _ in range(3):     # each round: create, or read the holder and replace its version
                self._etag = objects.put_new(self.url, body)
                if self._etag is not None:
                    return
                found = objects.get(self.url, _MAX_LOCK_BYTES)
                if found is None:
                    continue        # released between our two requests
                holder = _parse(found[0])
                if holder.get("run") == self.run_id:
                    self._etag = found[1]       # our own PUT, whose answer was lost and retried
                    return
                if not take_over and self._staging_exists(holder):
                    raise self._busy(holder)
                self._etag = objects.put_replacing(self.url, body, found[1])
                if self._etag is not None:
                    self.notes.append(f"took over the output prefix's lock from {_describe(holder)}, "
                                      + ("as asked" if take_over else "which had finished (its staging prefix is gone)"))
                    return
            raise OutputError(f"{self.destination}: other runs keep taking this output prefix's lock ({self.url}); "
                              "nothing was written. Make sure one run at a time writes there")
        except objects.NoConditionalWrites as exc:
            self._unsupported = True
            self.notes.append(f"no lock: {exc}; two runs into {self.destination} at once are not kept apart")

    def _staging_exists(self, holder: dict) -> bool:
        staging = holder.get("staging")
        if not isinstance(staging, str) or not staging or "/" in staging:
            return True     # cannot tell: treat the holder as alive
        return bool(objects.listing(posixpath.join(self.destination, staging)))

    def _busy(self, holder: dict) -> OutputError:
        return OutputError(
            f"{self.destination}: another conversion holds this output prefix ({_describe(holder)}, staging "
            f"{holder.get('staging', '?')}/), or it was killed. If no run is writing there, run the same command "
            "again with --resume to keep its finished shards, or with --discard-partial to delete them and start "
            "over")

    def check_held(self) -> None:
        """OutputError unless the lock is still ours (not taken over since): called right before publishing."""
        if self._unsupported or self._etag is None:
            return
        found = objects.get(self.url, _MAX_LOCK_BYTES)
        if found is None or found[1] != self._etag:
            holder = _parse(found[0]) if found else {}
            taker = f" by {_describe(holder)}" if holder else " (it was deleted)"
            raise OutputError(f"{self.destination}: this run's lock on the output prefix was taken over{taker}; "
                              "nothing was published")

    def release(self) -> None:
        """Delete the lock if it is still ours. Best effort: a lock left behind is taken over by the next run
        once this run's staging prefix is gone."""
        etag, self._etag = self._etag, None
        if etag is None:
            return
        try:
            try:
                objects.delete_if(self.url, etag)
            except objects.NoConditionalWrites:
                # (conditional PUTs but no conditional DELETE: compare, then delete; a take-over between the
                # two requests loses its lock, and is stopped by its own check_held before publishing)
                found = objects.get(self.url, _MAX_LOCK_BYTES)
                if found is not None and found[1] == etag:
                    objects.delete([self.url])
        except OutputError as exc:
            self.notes.append(f"the output prefix's lock could not be deleted ({exc}); the next run takes it over")


def _parse(data: bytes) -> dict:
    """The holder a lock object names; {} for bytes that are not a lock's (any object there still holds it)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}
