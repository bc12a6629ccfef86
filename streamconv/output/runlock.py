"""One run per destination: a second concurrent run would write into the same staging folder.

The lock is an flock on the staging folder. Some filesystems have none (Lustre mounted without `-o flock`, NFS
without lockd: flock fails with ENOSYS, ENOLCK or EOPNOTSUPP); there a lock file beside the staging folder,
created with O_EXCL and holding our pid and host, keeps a second run out. A lock file left by a killed run is
taken over when its pid is dead on this host; one from another host cannot be judged from here, so the message
says whose it is and how to remove it.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from typing import Optional

from ..errors import OutputError
from ..fs.outfiles import NOFOLLOW, out_of_descriptors

NO_FLOCK_ERRNOS = frozenset(e for e in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None))
                            if e is not None)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class RunLock:
    """Held from `acquire()` to `release()`. `note` says when the lock-file fallback was used."""

    def __init__(self, folder: str, lock_file: str, destination: str):
        self.folder = folder
        self.lock_file = lock_file
        self.destination = destination
        self.note: Optional[str] = None
        self._fd = -1
        self._holds_file = False

    @property
    def held(self) -> bool:
        return self._fd >= 0 or self._holds_file

    def acquire(self) -> None:
        if self.held:
            return
        import fcntl    # POSIX only: imported here so `import streamconv` works everywhere
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | NOFOLLOW | _CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(self.folder) from None
            raise OutputError(f"{self.folder}: cannot open the staging folder to lock it: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(f"its staging folder {self.folder} is locked") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in NO_FLOCK_ERRNOS:
                raise OutputError(f"{self.folder}: cannot lock the staging folder: {exc.strerror}") from None
            self._acquire_file(exc.strerror)
            return
        self._fd = fd

    def _acquire_file(self, why: str) -> None:
        import socket   # (here: only filesystems without flock need it, and it costs every start-up 2 ms of imports)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):      # a second try after removing a stale lock file
            try:
                fd = os.open(self.lock_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | _CLOEXEC, 0o644)
            except FileExistsError:
                holder = _read_holder(self.lock_file)
                if holder is not None and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    try:
                        os.unlink(self.lock_file)   # its run was killed: the lock is stale
                    except FileNotFoundError:
                        pass
                    except OSError as exc:
                        raise OutputError(f"{self.lock_file}: a stale lock file; cannot remove it: "
                                          f"{exc.strerror}") from None
                    continue
                raise self._busy_file(holder) from None
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise out_of_descriptors(self.lock_file) from None
                raise OutputError(f"{self.lock_file}: cannot create the lock file: {exc.strerror}") from None
            try:
                os.write(fd, json.dumps(me).encode("utf-8"))
            except OSError as exc:
                os.close(fd)
                self._remove_file()
                raise OutputError(f"{self.lock_file}: cannot write the lock file: {exc.strerror}") from None
            os.close(fd)
            self._holds_file = True
            self.note = (f"this filesystem cannot flock ({why}): the lock file {self.lock_file} keeps a second run "
                         "out instead (removed when this run ends)")
            return
        raise self._busy_file(_read_holder(self.lock_file))

    def _busy(self, detail: str) -> OutputError:
        return OutputError(f"{self.destination}: another streamconv run is converting into it right now "
                           f"({detail}); wait for it to finish")

    def _busy_file(self, holder: Optional[dict]) -> OutputError:
        if holder is None:
            who = "an unreadable lock file"
        else:
            who = f"the lock file of pid {holder.get('pid')} on host {holder.get('host')}"
        return OutputError(
            f"{self.destination}: another streamconv run may be converting into it ({who}: {self.lock_file}). "
            "Wait for it to finish; if no streamconv run is converting there, remove that file and run again")

    def _remove_file(self) -> None:
        try:
            os.unlink(self.lock_file)
        except OSError:
            pass        # already gone; nothing else of ours is in it

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._holds_file:
            self._remove_file()
            self._holds_file = False


def _read_holder(path: str) -> Optional[dict]:
    """The pid and host in a lock file (another user's too); None when it is not a readable lock file."""
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = json.loads(os.read(fd, 4096))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True     # cannot tell: keep out
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True     # EPERM: alive, another user's
    return True
