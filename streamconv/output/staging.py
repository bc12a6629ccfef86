"""The output folder's life: a staging folder beside the destination, durable shards, resume, atomic commit.

    .<name>.streamconv-partial/     everything is written here (the name is fixed, so a later run finds it)
        .streamconv-resume/plan.json          what this staging folder is converting (plan fingerprint)
        .streamconv-resume/<shard>.json       one record per finished shard, written after its fsync (ledger.py)
    <name>/                         appears in one rename, complete and fsynced, or not at all

The records are removed just before the rename, so they never reach the destination. A run killed at any
point leaves either the staging folder (resumable with `--resume`, or removed with `--discard-partial`) or
the finished destination. With `--overwrite` the old destination is swapped out in one step
(`renameat2(RENAME_EXCHANGE)`) and deleted only once the new one is in place; where the kernel or filesystem
cannot exchange (or `STREAMCONV_NO_FAST_PATHS` turns renameat2 off, see fastpaths.py), two renames are used
and the old folder is put back if the second one fails. A journal written before the swap lets the next run
finish or undo a swap that was killed half way, by folder identity (swapjournal.py).

The folder may sit in a shared scratch folder and outlive its run, so nothing in it is trusted: files are
created fresh and read back without following symlinks (outfiles.py), a folder or entry that is a symlink or
another user's is refused, and the commit publishes nothing but the names handed out by `file()` (and the
methods that register names). One run per destination: runlock.py (flock, or a lock file where there is none).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import stat
from contextlib import contextmanager
from typing import Callable, Collection, Dict, Iterable, Iterator, List, Optional, Set

from ..errors import OutputError
from ..failpoints import kill_point
from ..fs.fastpaths import NONE, PROBE_FILE_NAME, FastPaths
from ..planning.names import staging_name
from ..fs.outfiles import create_new, foreign, not_ours, free_space_note, write_failed
from ..fs.paths import Identity, adopt_folder_attributes, parent_not_writable_hint, remove_tree
from .runlock import RunLock
from . import durable, swapjournal
from .durable import fsync_path
from .ledger import PLAN_RECORD, RECORD_VERSION, RECORDS_DIR, check_resumable

STAGING_SUFFIX = ".streamconv-partial"
OLD_SUFFIX = ".streamconv-old"         # the previous output, while --overwrite swaps it out without EXCHANGE

_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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
            # The C library this process already runs on (dlopen(NULL)): no `find_library`, which forks
            # `ldconfig -p`, and no guess at libc's file name (musl's differs).
            _libc = ctypes.CDLL(None, use_errno=True)
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


def lock_path_for(destination: str) -> str:
    """The lock file used where the filesystem has no flock (runlock.py)."""
    parent, base = os.path.split(destination)
    return os.path.join(parent, staging_name(base, tag="streamconv", suffix="-lock"))


def journal_path_for(destination: str) -> str:
    """What an --overwrite commit is doing, for the next run if this one is killed (swapjournal.py)."""
    parent, base = os.path.split(destination)
    return os.path.join(parent, staging_name(base, tag="streamconv", suffix="-commit"))


def old_path_for(destination: str) -> str:
    parent, base = os.path.split(destination)
    return os.path.join(parent, staging_name(base, tag="streamconv", suffix=OLD_SUFFIX[len(".streamconv"):]))


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def recover_swap(destination: str, protected: Collection[Identity] = (), lock: Optional[RunLock] = None) -> List[str]:
    """Finish or undo the --overwrite swap of a run killed in the middle of its commit (swapjournal.py); notes for
    the report. Under the run lock when its staging folder is still there: a run that is committing right now
    holds it, and its half-done swap is not ours to tidy. `lock` (a StagingDir's own) stays held when the
    staging folder is still there afterwards; a lock made here is always released. Also called by a run that
    finds its output already converted and writes nothing: the tidy-up is owed all the same."""
    destination = os.path.abspath(destination)
    path, journal, old = staging_path_for(destination), journal_path_for(destination), old_path_for(destination)
    if not (os.path.lexists(journal) or os.path.lexists(old)):
        return []
    own = lock is None
    lock = lock or RunLock(path, lock_path_for(destination), destination)
    if swapjournal.identity(path) is not None and not foreign(os.lstat(path), directory=True):
        lock.acquire()
    try:
        return swapjournal.recover(destination, path, old, journal, protected)
    except BaseException:
        lock.release()
        raise
    finally:
        if own or not os.path.lexists(path):
            lock.release()      # (a StagingDir's: its folder held the old output, now gone; a fresh one is made)


class StagingDir:
    """The hidden folder beside the destination; see the module docstring.

    `plan_record` identifies what is being converted (a fingerprint of the plan and of the checkpoint's
    files). An existing staging folder for the same destination is resumed when `resume` (only if its
    plan record matches), removed when `discard_partial`, and otherwise refused with an explanation.
    Use as a context manager: leaving with an exception discards (or, with `resume`, keeps for later).
    `fast.renameat2` (the fast paths the run detected once; default none) commits with renameat2; else with plain
    renames.
    Every deletion (of this staging folder, a swapped-out old output, records) goes through
    `paths.remove_tree`, sparing `protected` identities (the sources, `destination.check_destination`) and
    mounts; what it leaves is raised, or (once committed or while discarding) added to `notes`.
    """

    def __init__(self, destination: str, *, plan_record: Optional[dict] = None, overwrite: bool = False,
                 resume: bool = False, discard_partial: bool = False, fast: FastPaths = NONE,
                 protected: Collection[Identity] = (), plan_record_later: bool = False):
        self.protected = frozenset(protected)
        self.notes: List[str] = []
        self.destination = os.path.abspath(os.fspath(destination))
        self.fast = fast
        self.overwrite = overwrite
        self.resume = resume
        self.plan_record = dict(plan_record or {}, version=RECORD_VERSION)
        self._plan_record_later = plan_record_later
        self.path = staging_path_for(self.destination)
        self.resumed = False
        self._old_identity = None   # the output --overwrite replaces, once set aside
        self.committed = False      # the new output is in place (from then on, nothing may report otherwise)
        self._done = False
        self._run_lock = RunLock(self.path, lock_path_for(self.destination), self.destination)
        self._unsynced: List[str] = []
        self._planned: Set[str] = set()     # names handed out or registered: all that commit may publish
        self._restore_interrupted_swap()
        self._refuse_a_full_destination()
        self._open(discard_partial)

    # -- opening --------------------------------------------------------------------------------------
    def _refuse_a_full_destination(self) -> None:
        if os.path.lexists(self.destination) and not _is_empty_dir(self.destination):
            if not os.path.isdir(self.destination) or os.path.islink(self.destination):
                raise OutputError(f"{self.destination} exists and is not a folder; choose another output folder")
            if not self.overwrite:
                finished = "".join(f" ({n})" for n in self.notes)     # e.g. a killed --overwrite just finished
                raise OutputError(
                    f"{self.destination} exists and is not empty{finished}; pass --overwrite to replace it, "
                    "or choose another output folder")

    def _open(self, discard_partial: bool) -> None:
        """Take over (resume or clear) or create the staging folder, locked, with its plan record."""
        parent = os.path.dirname(self.destination)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create: {exc.strerror}"
                              f"{parent_not_writable_hint(os.path.dirname(parent), exc)}") from None
        if os.path.lexists(self.path):
            try:
                self._take_over_existing(discard_partial)
            except BaseException:
                self._unlock()
                raise
        if not self._run_lock.held:
            self._create(parent)
        if self._run_lock.note:
            self.notes.append(self._run_lock.note)
        try:
            self._make_records_dir()
            if not self._plan_record_later:
                self.write_plan_record(self.plan_record)
        except OSError as exc:
            self.__exit__(OutputError, None, None)
            raise OutputError(f"{self.records_dir}: cannot create: {exc.strerror}") from None
        except BaseException as exc:
            self.__exit__(type(exc), exc, None)
            raise

    def _create(self, parent: str) -> None:
        try:
            os.mkdir(self.path, 0o755)
        except OSError as exc:
            full = f" ({free_space_note(self.path)})" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise OutputError(f"{parent}: cannot create staging folder {self.path}: {exc.strerror}{full}"
                              f"{parent_not_writable_hint(parent, exc)}") from None
        try:
            self._lock()
        except BaseException:
            os.rmdir(self.path)     # ours and empty: a run that cannot start leaves nothing behind
            raise

    def _lock(self) -> None:
        """One run per destination (runlock.py); never discard or write a folder another run holds."""
        self._run_lock.acquire()

    def _take_over_existing(self, discard_partial: bool) -> None:
        """An existing staging folder: ours to resume or clear only if it is a real folder this user owns (a
        planted symlink or a stranger's folder in a shared parent is refused, CWE-59)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        problem = foreign(st, directory=True)
        if problem and not discard_partial:
            raise OutputError(not_ours(self.path, problem))
        if problem and not stat.S_ISDIR(st.st_mode):
            try:
                os.unlink(self.path)        # a symlink goes itself; what it points to is never touched
            except OSError as exc:
                raise OutputError(f"{self.path}: cannot remove: {exc.strerror}") from None
            return
        self._lock()
        if problem:     # another user's folder and --discard-partial: start over in a folder of our own
            remove_tree(self.path, self.protected)
            self._unlock()
            if os.path.lexists(self.path):
                raise OutputError(f"{self.path}: cannot remove it ({problem}); remove it yourself and run again")
            return
        if discard_partial:
            self._clear()
            return
        if not self.resume:
            raise OutputError(
                f"{self.destination}: an interrupted conversion into this folder was found ({self.path}). "
                "Run the same command again with --resume to keep its finished shards, or with "
                "--discard-partial to delete it and start over.")
        previous = durable.read_json(os.path.join(self.records_dir, PLAN_RECORD))
        if previous is None:
            # Killed before its plan record was written: nothing in it can be trusted or is worth keeping.
            self._clear()
            return
        self._check_contents()
        check_resumable(previous, self.plan_record, self.destination, self.path)
        self.resumed = True

    def _make_records_dir(self) -> None:
        try:
            os.mkdir(self.records_dir, 0o755)
        except FileExistsError:
            problem = foreign(os.lstat(self.records_dir), directory=True)
            if problem:
                raise OutputError(not_ours(self.records_dir, problem)) from None

    def _check_contents(self) -> None:
        """Before resuming: every entry must be a regular file of ours (the records folder: a folder of ours).
        Probe files of older versions, killed mid-probe, are removed: they are never part of an output."""
        for folder in (self.path, self.records_dir):
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                full = os.path.join(folder, name)
                st = os.lstat(full)
                problem = foreign(st, directory=(folder == self.path and name == RECORDS_DIR))
                if problem:
                    raise OutputError(not_ours(full, problem))
                if folder == self.path and name.startswith(PROBE_FILE_NAME):
                    os.unlink(full)

    def _clear(self) -> None:
        for name in os.listdir(self.path):
            left = remove_tree(os.path.join(self.path, name), self.protected)
            if left:
                raise OutputError(f"cannot remove the interrupted conversion: {'; '.join(left[:5])}")

    def _restore_interrupted_swap(self) -> None:
        """A run killed in the middle of an --overwrite commit: finish or undo it (see `recover_swap`)."""
        self.notes.extend(recover_swap(self.destination, self.protected, self._run_lock))

    # -- writing --------------------------------------------------------------------------------------
    def write_plan_record(self, plan_record: dict) -> None:
        """What this folder converts, for --resume. With `plan_record_later` the conversion writes it once the
        record is known (every chunk located: runs/locating.py), before any shard is recorded finished; a
        folder killed before it has nothing a resumed run keeps."""
        self.plan_record = dict(plan_record, version=RECORD_VERSION)
        durable.write_json_atomic(os.path.join(self.records_dir, PLAN_RECORD), self.plan_record)

    @property
    def records_dir(self) -> str:
        return os.path.join(self.path, RECORDS_DIR)

    @property
    def scratch_dir(self) -> str:
        """Where short-lived files (the copy probe) go: inside the records folder, which is never committed."""
        return scratch_dir_of(self.path)

    def file(self, name: str) -> str:
        """The path to write output file `name` at; only names asked for here (or registered by the methods
        below) may be in the folder at the commit."""
        self._planned.add(name)
        return os.path.join(self.path, name)

    def write_json(self, name: str, obj: Dict) -> None:
        path = self.file(name)      # (registers the name)
        data = (json.dumps(obj, indent=2) + "\n").encode("utf-8")
        try:
            fd = create_new(path)
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
        self._unsynced.extend(self.file(n) for n in names)     # (registers the names)

    # -- the end --------------------------------------------------------------------------------------
    def commit(self, on_committed: Optional[Callable[[str], None]] = None) -> None:
        """Make the folder durable, then move it into place in one rename (see the module docstring).
        `on_committed(destination)` is called the moment the new output is in place, before any signal held
        during the rename is looked at: a caller interrupted after that knows the output is complete."""
        self._check_only_planned()
        for path in self._unsynced:
            fsync_path(path)
        kill_point("files-synced")
        left = remove_tree(self.records_dir, self.protected)
        if left:
            raise OutputError(f"{self.records_dir}: cannot remove: {'; '.join(left[:5])}")
        kill_point("records-removed")
        if os.path.isdir(self.destination) and not os.path.islink(self.destination):
            self.notes += adopt_folder_attributes(self.destination, self.path)
        fsync_path(self.path, directory=True)
        kill_point("before-rename")
        parent = os.path.dirname(self.destination)
        with _signals_held() as held:
            if not held:
                self._move_into_place(parent, on_committed)
                held.clear()    # past the rename the output is committed: a late Ctrl-C changes nothing
        if not self.committed:
            raise KeyboardInterrupt
        self._unlock()
        kill_point("after-commit")

    def _check_only_planned(self) -> None:
        """Nothing but planned files is published: not a probe left by a killed run, not a stranger's file."""
        for name in sorted(os.listdir(self.path)):
            if name == RECORDS_DIR:
                continue
            full = os.path.join(self.path, name)
            problem = foreign(os.lstat(full), owner=False)     # (ownership: checked at the take-over)
            if problem:
                raise OutputError(not_ours(full, problem) + "; nothing was committed")
            if name not in self._planned:
                raise OutputError(
                    f"{full}: not part of the planned output (not a shard, the index or a copied file), so "
                    "nothing was committed. Remove it, or run again with --discard-partial to start over")

    def _move_into_place(self, parent: str, on_committed: Optional[Callable[[str], None]]) -> None:
        swapped = False
        try:
            if os.path.lexists(self.destination) and not _is_empty_dir(self.destination):
                if not self.overwrite:
                    raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), self.destination)
                self._swap_in()
                swapped = True
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
        self._done = self.committed = True
        if on_committed is not None:
            on_committed(self.destination)
        kill_point("after-rename")
        fsync_path(parent, directory=True)
        kill_point("parent-synced")
        if swapped:     # the new output is in place: the old one, set aside by this run, goes (only then)
            left = []
            for place in (old_path_for(self.destination), self.path):
                if swapjournal.identity(place) == self._old_identity:
                    left += remove_tree(place, self.protected)
            kill_point("old-removed")
            if left:        # the journal stays: the next run finishes the tidy-up of what can go
                self.notes.append(f"the previous output could not be deleted entirely; delete it yourself "
                                  f"({'; '.join(left[:3])})")
            else:
                try:
                    swapjournal.remove(journal_path_for(self.destination))
                except OutputError:
                    pass        # committed all the same; the next run removes it

    def _swap_in(self) -> None:
        """Replace a non-empty destination (--overwrite): the old folder goes only after the new is in."""
        old = old_path_for(self.destination)
        journal = journal_path_for(self.destination)
        self._old_identity = swapjournal.identity(self.destination)
        swapjournal.write(journal, swapjournal.identity(self.path), self._old_identity, fsync_path)
        kill_point("journal-written")
        try:
            exchanged = self.fast.renameat2 and _renameat2(self.path, self.destination, RENAME_EXCHANGE)
        except OSError:
            swapjournal.remove(journal)     # nothing moved
            raise
        if exchanged:
            kill_point("after-exchange")
            try:
                os.rename(self.path, old)      # the staging name now holds the old output
            except OSError:
                pass    # committed all the same: the tidy-up finds the old output by its identity
            return
        try:
            os.rename(self.destination, old)
        except OSError:
            swapjournal.remove(journal)     # nothing moved
            raise
        try:
            kill_point("between-swap-renames")
            os.rename(self.path, self.destination)
        except BaseException:
            os.rename(old, self.destination)
            swapjournal.remove(journal)
            raise

    def _unlock(self) -> None:
        self._run_lock.release()

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


def scratch_dir_of(staging: str) -> str:
    """See `StagingDir.scratch_dir`; a function so that a worker process without the StagingDir can ask."""
    return os.path.join(staging, RECORDS_DIR)
