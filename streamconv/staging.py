"""The output folder's life: a staging folder beside the destination, durable shards, resume, atomic commit.

    .<name>.streamconv-partial/     everything is written here (the name is fixed, so a later run finds it)
        .streamconv-resume/plan.json          what this staging folder is converting (plan fingerprint)
        .streamconv-resume/<shard>.json       one record per finished shard, written after its fsync
    <name>/                         appears in one rename, complete and fsynced, or not at all

The records are removed just before the rename, so they never reach the destination. A run killed at any
point leaves either the staging folder (resumable with `--resume`, or removed with `--discard-partial`) or
the finished destination. With `--overwrite` the old destination is swapped out in one step
(`renameat2(RENAME_EXCHANGE)`) and deleted only once the new one is in place; where the kernel or filesystem
cannot exchange (or `STREAMCONV_NO_FAST_PATHS` turns renameat2 off, see fastpaths.py), two renames are used
and the old folder is put back if the second one fails.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import signal
import zlib
from contextlib import contextmanager
from typing import Collection, Dict, Iterable, Iterator, List, Optional

from .errors import OutputError
from .fastpaths import FastPaths, detect, read_at
from .names import staging_name
from .paths import Identity, adopt_folder_attributes, parent_not_writable_hint, remove_tree

STAGING_SUFFIX = ".streamconv-partial"
OLD_SUFFIX = ".streamconv-old"         # the previous output, while --overwrite swaps it out without EXCHANGE
RECORDS_DIR = ".streamconv-resume"
PLAN_RECORD = "plan.json"
RECORD_VERSION = 1
_CRC_PIECE_BYTES = 8 << 20

# Test and benchmark switches (never needed in normal use):
KILL_ENV = "STREAMCONV_TEST_KILL_AT"            # "point" or "point@N": send signals to ourselves there
KILL_SIGNALS_ENV = "STREAMCONV_TEST_KILL_SIGNALS"   # "KILL" (default) or e.g. "INT,TERM,HUP"
NO_FSYNC_ENV = "STREAMCONV_UNSAFE_NO_FSYNC"      # benchmarks only: measure what durability costs
_kill_counts: Dict[str, int] = {}

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def kill_point(name: str) -> None:
    """Test hook: when STREAMCONV_TEST_KILL_AT names this point (its Nth pass with `@N`), signal ourselves."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] != int(nth or 1):
        return
    for sig in os.environ.get(KILL_SIGNALS_ENV, "KILL").split(","):
        os.kill(os.getpid(), getattr(signal, "SIG" + sig.strip().upper()))


def _fsync_enabled() -> bool:
    return os.environ.get(NO_FSYNC_ENV) != "1"


def fsync_path(path: str, *, directory: bool = False) -> None:
    if not _fsync_enabled():
        return
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(f"{path}: fsync failed: {exc.strerror}; the output may not be on disk") from None


def file_crc32(path: str, fast: FastPaths) -> int:
    """CRC-32 of a whole file, read in pieces (the shard was just written, so this reads the page cache)."""
    crc = 0
    buf = bytearray(_CRC_PIECE_BYTES)
    view = memoryview(buf)
    offset = 0
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read back: {exc.strerror}") from None
    try:
        while True:
            n = read_at(fd, view, offset, fast)
            if n <= 0:
                return crc
            crc = zlib.crc32(view[:n], crc)
            offset += n
    except OSError as exc:
        raise OutputError(f"{path}: read back failed at offset {offset}: {exc.strerror}") from None
    finally:
        os.close(fd)


# -- renameat2 ----------------------------------------------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _renameat2(src: str, dst: str, flags: int) -> bool:
    """Linux renameat2(2). False when the kernel, libc or filesystem does not offer it (caller falls back);
    OSError for a real failure (EEXIST, ENOENT...)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    fn = getattr(_libc, "renameat2", None) if _libc else None
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), dst)


@contextmanager
def _signals_held() -> Iterator[List[int]]:
    """While the destination changes hands, SIGINT/SIGTERM/SIGHUP are only recorded (in the yielded list).
    Python-level handlers, not a signal mask: a process-directed signal may be taken by any thread (numpy's
    BLAS threads block nothing), but Python runs every handler in the main thread, where commit runs."""
    held: List[int] = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in _INTERRUPTS}
    except ValueError:      # not the main thread: signals are the main thread's business anyway
        yield held
        return
    try:
        yield held
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])    # not committed: the caller's handler decides (the CLI: exit 130)


# -- paths --------------------------------------------------------------------------------------------

# Both names stay within NAME_MAX for any legal output name (a 255-byte one included): `names.staging_name`
# cuts a long name and puts a hash of it in. The same destination always gives the same names (resume).

def staging_path_for(destination: str) -> str:
    parent, base = os.path.split(destination)
    return os.path.join(parent, staging_name(base, tag="streamconv", suffix=STAGING_SUFFIX[len(".streamconv"):]))


def old_path_for(destination: str) -> str:
    parent, base = os.path.split(destination)
    return os.path.join(parent, staging_name(base, tag="streamconv", suffix=OLD_SUFFIX[len(".streamconv"):]))


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.rename(tmp, path)
    except OSError as exc:
        raise OutputError(write_failed(path, exc)) from None


class StagingDir:
    """The hidden folder beside the destination; see the module docstring.

    `plan_record` identifies what is being converted (a fingerprint of the plan and of the checkpoint's
    files). An existing staging folder for the same destination is resumed when `resume` (only if its
    plan record matches), removed when `discard_partial`, and otherwise refused with an explanation.
    Use as a context manager: leaving with an exception discards (or, with `resume`, keeps for later).
    `fast.renameat2` (default: `fastpaths.detect()`) commits with renameat2; else with plain renames.
    Every deletion (of this staging folder, a swapped-out old output, records) goes through
    `paths.remove_tree`, sparing `protected` identities (the sources, `destination.check_destination`) and
    mounts; what it leaves is raised, or (once committed or while discarding) added to `notes`.
    """

    def __init__(self, destination: str, *, plan_record: Optional[dict] = None, overwrite: bool = False,
                 resume: bool = False, discard_partial: bool = False, fast: Optional[FastPaths] = None,
                 protected: Collection[Identity] = ()):
        self.protected = frozenset(protected)
        self.notes: List[str] = []
        self.destination = os.path.abspath(os.fspath(destination))
        self.fast = fast if fast is not None else detect()
        self.overwrite = overwrite
        self.resume = resume
        self.plan_record = dict(plan_record or {}, version=RECORD_VERSION)
        self.path = staging_path_for(self.destination)
        self.resumed = False
        self._done = False
        self._lock_fd = -1
        self._unsynced: List[str] = []
        self._restore_interrupted_swap()
        if os.path.lexists(self.destination) and not _is_empty_dir(self.destination):
            if not os.path.isdir(self.destination) or os.path.islink(self.destination):
                raise OutputError(f"{self.destination} exists and is not a folder; choose another output folder")
            if not overwrite:
                raise OutputError(
                    f"{self.destination} exists and is not empty; pass --overwrite to replace it, "
                    "or choose another output folder")
        parent = os.path.dirname(self.destination)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create: {exc.strerror}"
                              f"{parent_not_writable_hint(os.path.dirname(parent), exc)}") from None
        if os.path.lexists(self.path):
            self._lock()
            try:
                self._take_over_existing(discard_partial)
            except BaseException:
                self._unlock()
                raise
        if not os.path.isdir(self.path):
            try:
                os.mkdir(self.path)
            except OSError as exc:
                full = f" ({free_space_note(self.path)})" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
                raise OutputError(f"{parent}: cannot create staging folder {self.path}: {exc.strerror}{full}"
                                  f"{parent_not_writable_hint(parent, exc)}") from None
        self._lock()       # (a no-op when taken above; never discard a folder another run holds)
        try:
            os.makedirs(self.records_dir, exist_ok=True)
            _write_json_atomic(os.path.join(self.records_dir, PLAN_RECORD), self.plan_record)
        except OSError as exc:
            self.__exit__(OutputError, None, None)
            raise OutputError(f"{self.records_dir}: cannot create: {exc.strerror}") from None
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise

    # -- opening --------------------------------------------------------------------------------------
    def _lock(self) -> None:
        """One run per destination: a second concurrent run would write into the same staging folder."""
        if self._lock_fd >= 0:
            return
        import fcntl    # POSIX only: imported here so `import streamconv` works everywhere
        try:
            self._lock_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise OutputError(f"{self.destination}: another streamconv run is converting into it right now "
                              f"(its staging folder {self.path} is locked); wait for it to finish") from None
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open the staging folder: {exc.strerror}") from None

    def _take_over_existing(self, discard_partial: bool) -> None:
        if not os.path.isdir(self.path) or os.path.islink(self.path):
            raise OutputError(f"{self.path} exists and is not a staging folder; remove it and run again")
        if discard_partial:
            self._clear()
            return
        if not self.resume:
            raise OutputError(
                f"{self.destination}: an interrupted conversion into this folder was found ({self.path}). "
                "Run the same command again with --resume to keep its finished shards, or with "
                "--discard-partial to delete it and start over.")
        previous = _read_json(os.path.join(self.records_dir, PLAN_RECORD))
        if previous is None:
            # Killed before its plan record was written: nothing in it can be trusted or is worth keeping.
            self._clear()
            return
        if previous.get("version") != RECORD_VERSION:
            raise OutputError(f"{self.path}: written by another streamconv version; cannot resume it. "
                              "Run again with --discard-partial to start over.")
        if previous.get("checkpoint") != self.plan_record.get("checkpoint"):
            changed = _changed_keys(previous.get("checkpoint") or {}, self.plan_record.get("checkpoint") or {})
            raise OutputError(
                f"{self.destination}: cannot resume: the checkpoint changed since the interrupted run "
                f"({', '.join(changed[:5])} differ in size or modification time). "
                "Run again with --discard-partial to start over.")
        if previous.get("source") != self.plan_record.get("source"):
            raise OutputError(
                f"{self.destination}: cannot resume: the checkpoint's content changed since the interrupted run "
                "(its .metadata or chunk CRC-32s differ, though sizes and modification times may not: a re-save "
                "restored with cp -p or rsync -a). Run again with --discard-partial to start over.")
        if previous.get("plan") != self.plan_record.get("plan"):
            changed = _changed_keys(previous.get("options") or {}, self.plan_record.get("options") or {})
            detail = f" (options that differ: {', '.join(changed)})" if changed else ""
            raise OutputError(
                f"{self.destination}: cannot resume: the interrupted run was converting with other options, so "
                f"its shards would differ{detail}. Run again with the same options and --resume, or with "
                "--discard-partial to start over.")
        self.resumed = True

    def _clear(self) -> None:
        for name in os.listdir(self.path):
            left = remove_tree(os.path.join(self.path, name), self.protected)
            if left:
                raise OutputError(f"cannot remove the interrupted conversion: {'; '.join(left[:5])}")

    def _restore_interrupted_swap(self) -> None:
        """A run killed between the two renames of the --overwrite fallback left the old output aside."""
        old = old_path_for(self.destination)
        if not os.path.lexists(old):
            return
        try:
            if not os.path.lexists(self.destination):
                os.rename(old, self.destination)        # the new one never arrived: put the old one back
                return
        except OSError as exc:
            raise OutputError(f"{old}: left by an interrupted --overwrite; cannot tidy it: {exc.strerror}. "
                              f"Move it back to {self.destination} yourself, or delete it.") from None
        left = remove_tree(old, self.protected)         # the new one is in place: the old one was to go
        if left:
            raise OutputError(f"{old}: left by an interrupted --overwrite; cannot tidy it: {'; '.join(left[:5])}. "
                              "Delete it yourself.")

    # -- writing --------------------------------------------------------------------------------------
    @property
    def records_dir(self) -> str:
        return os.path.join(self.path, RECORDS_DIR)

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def kept_shard(self, filename: str, nbytes: int, shard_fingerprint: str) -> bool:
        """Whether a shard of a resumed run is complete: its record matches the plan, and the file its size
        and checksum. A shard that fails any check is rewritten."""
        return self.resumed and self.shard_recorded(filename, nbytes, shard_fingerprint)

    def shard_recorded(self, filename: str, nbytes: int, shard_fingerprint: str, *, check_crc: bool = True) -> bool:
        """Whether a shard was finished by this plan (here or by another process writing into this folder):
        its record matches, the file has its size and (`check_crc`) the recorded CRC-32."""
        return shard_recorded(self.path, self.plan_record.get("plan"), filename, nbytes, shard_fingerprint,
                              check_crc=check_crc, fast=self.fast)

    def shard_done(self, filename: str, nbytes: int, shard_fingerprint: str, crc32: int) -> None:
        """A shard's bytes are all written: make them durable, then record it so a resume can keep it.
        `crc32` is the file's CRC-32 as the writer computed it (crc.py), checked against the file on resume."""
        record_shard(self.path, self.plan_record.get("plan"), filename, nbytes, shard_fingerprint, crc32)

    def write_json(self, name: str, obj: Dict) -> None:
        path = self.file(name)
        data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                half = len(data) // 2
                os.write(fd, data[:half])
                kill_point("index")
                done = half
                while done < len(data):
                    done += os.write(fd, data[done:])
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(write_failed(path, exc)) from None
        self._unsynced.append(path)

    def added(self, names: Iterable[str]) -> None:
        """Files written into the folder by others (config, tokenizer...): fsynced before the commit."""
        self._unsynced.extend(self.file(n) for n in names)

    # -- the end --------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Make the folder durable, then move it into place in one rename (see the module docstring)."""
        for path in self._unsynced:
            fsync_path(path)
        left = remove_tree(self.records_dir, self.protected)
        if left:
            raise OutputError(f"{self.records_dir}: cannot remove: {'; '.join(left[:5])}")
        if os.path.isdir(self.destination) and not os.path.islink(self.destination):
            self.notes += adopt_folder_attributes(self.destination, self.path)
        fsync_path(self.path, directory=True)
        kill_point("before-rename")
        parent = os.path.dirname(self.destination)
        with _signals_held() as held:
            if not held:
                self._move_into_place(parent)
                held.clear()    # past the rename the output is committed: a late Ctrl-C changes nothing
        if not self._done:
            raise KeyboardInterrupt
        self._unlock()

    def _move_into_place(self, parent: str) -> None:
        try:
            if os.path.lexists(self.destination) and not _is_empty_dir(self.destination):
                if not self.overwrite:
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), self.destination)
                self._swap_in()
            elif os.path.lexists(self.destination):
                os.rename(self.path, self.destination)  # replaces an empty folder only, else ENOTEMPTY
            elif not (self.fast.renameat2 and _renameat2(self.path, self.destination, RENAME_NOREPLACE)):
                os.rename(self.path, self.destination)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(
                    f"{self.destination}: something was written there during the conversion; it was left "
                    "untouched and nothing was committed. Pass --overwrite to replace it, or choose "
                    "another output folder.") from None
            raise OutputError(f"{self.destination}: cannot move the finished output into place: "
                              f"{exc.strerror}") from None
        self._done = True
        kill_point("after-rename")
        fsync_path(parent, directory=True)
        old = old_path_for(self.destination)
        if os.path.lexists(old):
            left = remove_tree(old, self.protected)
            if left:
                self.notes.append(f"the previous output could not be deleted entirely; delete {old} yourself "
                                  f"({'; '.join(left[:3])})")

    def _swap_in(self) -> None:
        """Replace a non-empty destination (--overwrite): the old folder goes only after the new is in."""
        old = old_path_for(self.destination)
        if self.fast.renameat2 and _renameat2(self.path, self.destination, RENAME_EXCHANGE):
            os.rename(self.path, old)          # the staging name now holds the old output
            return
        os.rename(self.destination, old)
        try:
            kill_point("between-swap-renames")
            os.rename(self.path, self.destination)
        except BaseException:
            os.rename(old, self.destination)
            raise

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def discard(self) -> None:
        if not self._done:
            left = remove_tree(self.path, self.protected)
            if left:
                self.notes.append(f"the staging folder could not be deleted entirely; delete {self.path} yourself "
                                  f"({'; '.join(left[:3])})")
            self._done = True
        self._unlock()

    def keep_for_resume(self) -> None:
        self._done = True
        self._unlock()

    def __enter__(self) -> "StagingDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> Optional[bool]:
        if exc_type is not None and self.resume and not self._done:
            self.keep_for_resume()      # --resume: a failed or interrupted run keeps its finished shards
        else:
            self.discard()              # an error, an interrupt, or leaving without commit()
        return None


def _changed_keys(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def write_failed(path: str, exc: OSError, offset: Optional[int] = None, what: str = "write failed") -> str:
    """The message for an OSError while writing `path`: file, offset, and free space when the disk is full."""
    where = f" at offset {offset:,}" if offset is not None else ""
    message = f"{path}: {what}{where}: {exc.strerror}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        message += f" ({free_space_note(path)})"
    return message


def free_space_note(path: str) -> str:
    probe = os.path.dirname(path)
    try:
        free = shutil.disk_usage(probe).free
        vfs = os.statvfs(probe)
    except OSError:
        return "free some space or choose another folder"
    # ENOSPC with bytes to spare: the filesystem ran out of inodes (f_files == 0: it does not count them)
    if vfs.f_files and vfs.f_favail == 0:
        return (f"no free inodes on {probe} although {free:,} bytes are free; delete some files there "
                "or choose another folder")
    return f"{free:,} bytes free on {probe}; free some space or choose another folder"


def shard_recorded(staging: str, plan_fingerprint: Optional[str], filename: str, nbytes: int,
                   shard_fingerprint: str, *, check_crc: bool = True, fast: Optional[FastPaths] = None) -> bool:
    """See `StagingDir.shard_recorded`; a function so that a worker process without the StagingDir can ask."""
    record = _read_json(os.path.join(staging, RECORDS_DIR, filename + ".json"))
    path = os.path.join(staging, filename)
    if (record is None or record.get("plan") != plan_fingerprint
            or record.get("shard") != shard_fingerprint or record.get("nbytes") != nbytes):
        return False
    try:
        if os.path.getsize(path) != nbytes:
            return False
    except OSError:
        return False
    return not check_crc or file_crc32(path, fast or detect()) == record.get("crc32")


def record_shard(staging: str, plan_fingerprint: Optional[str], filename: str, nbytes: int,
                 shard_fingerprint: str, crc32: int) -> None:
    """See `StagingDir.shard_done`: fsync the shard, then write its record (atomically, by rename). Any process
    writing into the staging folder may call it; the driver's later `shard_recorded` sees it."""
    path = os.path.join(staging, filename)
    fsync_path(path)
    record = {"plan": plan_fingerprint, "shard": shard_fingerprint, "nbytes": nbytes, "crc32": crc32}
    _write_json_atomic(os.path.join(staging, RECORDS_DIR, filename + ".json"), record)
    kill_point("between-shards")
