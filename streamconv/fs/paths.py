"""Paths the user names, and what they are on disk: one validator for every path argument, identities
(st_dev, st_ino) instead of path strings, mount points, and the one routine that deletes a folder tree.

Why identities: one folder can have many spellings (bind mounts, `docker run -v /data:/data -v /data:/workspace`,
symlinks, hard links), so comparing path strings lets `/workspace/ckpt` and `/data/ckpt` look different while
deleting one empties the other. Why mountinfo as well as st_dev: a bind mount of a folder of the same
filesystem keeps its st_dev, so only the kernel's mount table shows it.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Collection, FrozenSet, Iterator, List, Optional, Tuple

from ..errors import OptionsError

Identity = Tuple[int, int]      # (st_dev, st_ino)

_MOUNTINFO = "/proc/self/mountinfo"
# POSIX ACLs of a pre-created output folder, carried over to the new one (see `adopt_folder_attributes`).
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


def user_path(value, what: str) -> str:
    """Every path a user gives (CLI argument, API argument, `--config-from`, a batch template or list entry)
    passes here first. An empty or blank path is refused: `abspath("")` is the current folder, so a script
    whose variable is unset (`OUT=""`) would otherwise convert into, or replace, the folder it runs in."""
    if value is None:
        raise OptionsError(f"{what}: no path given; pass a folder")
    try:
        text = os.fspath(value)
    except TypeError:
        raise OptionsError(f"{what}: expected a path, got {type(value).__name__}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise OptionsError(f"{what} is empty ({text!r}); an empty path would mean the current folder. "
                           "Check the variable your script passes, or give the folder explicitly")
    if "\0" in text:
        raise OptionsError(f"{what} {text[:200]!r} contains a NUL character; no file can have that name")
    return text


def identity(path: str, *, follow_symlinks: bool = True) -> Optional[Identity]:
    """(st_dev, st_ino) of `path`, or None when it does not exist or cannot be looked at."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def ancestors(path: str) -> Iterator[str]:
    """`path` (made real: symlinks resolved) and every folder above it, up to `/`."""
    current = os.path.realpath(path)
    while True:
        yield current
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> FrozenSet[str]:
    """Every mount point this process sees (empty when /proc is not mounted: st_dev checks still apply)."""
    try:
        with open(_MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return frozenset(_unescape_mountinfo(line.split()[4]) for line in f if len(line.split()) > 4)
    except OSError:
        return frozenset()


def is_mount_point(path: str, mounts: Optional[Collection[str]] = None) -> bool:
    """Whether the folder at `path` is the root of a mount: another filesystem (st_dev differs from its
    parent's), the same folder as its parent (a filesystem's root), or a bind mount listed in mountinfo."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        parent = os.stat(os.path.dirname(real) if real != os.sep else real)
    except OSError:
        return False
    if st.st_dev != parent.st_dev or (st.st_ino == parent.st_ino):
        return True
    return real in (mount_points() if mounts is None else mounts)


def remove_tree(path: str, protected: Collection[Identity] = ()) -> List[str]:
    """Delete the folder tree at `path` without following a symlink, crossing into another filesystem or
    mount, or deleting anything whose identity is in `protected` (the checkpoint and config folders and
    their files). Returns what was left, one "path: why" each (empty: all gone). A symlink is removed as a
    link; what it points at is never touched. `path` itself being a symlink is removed as a link."""
    left: List[str] = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return left
    except OSError as exc:
        return [f"{path}: {exc.strerror}"]
    if not stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in protected:
            return [f"{path}: a file of the checkpoint or config folder"]
        _unlink(path, None, left)
        return left
    mounts = mount_points()
    if is_mount_point(path, mounts):
        return [f"{path}: a mount point; not deleted (unmount it first)"]
    _remove_dir_contents(path, None, os.path.basename(path), st, protected, mounts, left)
    if not left:
        try:
            os.rmdir(path)
        except OSError as exc:
            left.append(f"{path}: {exc.strerror}")
    return left


def _unlink(name: str, dir_fd: Optional[int], left: List[str], shown: Optional[str] = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        left.append(f"{shown or name}: {exc.strerror}")


def _remove_dir_contents(shown: str, parent_fd: Optional[int], name: str, expected: os.stat_result,
                         protected: Collection[Identity], mounts: Collection[str], left: List[str]) -> None:
    """Empty the folder `name` (in `parent_fd`, or a path when None), whose lstat was `expected`."""
    target = name if parent_fd is not None else shown
    root_dev = expected.st_dev
    if (expected.st_dev, expected.st_ino) in protected:
        left.append(f"{shown}: the checkpoint or config folder (or one holding it) is here; not deleted")
        return
    try:
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as exc:
        left.append(f"{shown}: {exc.strerror}")
        return
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
            left.append(f"{shown}: replaced while being deleted; not deleted")
            return
        for entry in list(os.scandir(fd)):
            child = os.path.join(shown, entry.name)
            try:
                cst = os.lstat(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as exc:
                left.append(f"{child}: {exc.strerror}")
                continue
            if (cst.st_dev, cst.st_ino) in protected:
                left.append(f"{child}: the checkpoint or config folder, or one of their files, is here (a bind "
                            "mount or hard link); not deleted")
                continue
            if not stat.S_ISDIR(cst.st_mode):
                _unlink(entry.name, fd, left, child)
                continue
            if cst.st_dev != root_dev or os.path.realpath(child) in mounts:
                left.append(f"{child}: a mount point; not deleted (unmount it first)")
                continue
            before = len(left)
            _remove_dir_contents(child, fd, entry.name, cst, protected, mounts, left)
            if len(left) == before:
                try:
                    os.rmdir(entry.name, dir_fd=fd)
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        left.append(f"{child}: {exc.strerror}")
    except OSError as exc:
        left.append(f"{shown}: {exc.strerror}")
    finally:
        os.close(fd)


def adopt_folder_attributes(existing: str, new: str) -> List[str]:
    """Give the new output folder the mode, owner, group and POSIX ACLs of the folder it replaces (a folder the
    user pre-created with mode 0555, a group or ACLs for a team). Returns notes for what could not be kept.
    A project quota id (XFS/ext4 `chattr -p`) is not copied: the new folder inherits its parent's."""
    try:
        st = os.stat(existing, follow_symlinks=False)
    except OSError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        return []
    notes = []
    try:
        now = os.stat(new)
        if (now.st_uid, now.st_gid) != (st.st_uid, st.st_gid):
            os.chown(new, st.st_uid, st.st_gid)
    except OSError as exc:
        notes.append(f"{existing}: its owner {st.st_uid}:{st.st_gid} could not be kept on the new output folder "
                     f"({exc.strerror}); chown it yourself if others need it")
    for name in _ACL_XATTRS:
        try:
            value = os.getxattr(existing, name, follow_symlinks=False)
        except OSError:
            continue
        try:
            os.setxattr(new, name, value, follow_symlinks=False)
        except OSError as exc:
            notes.append(f"{existing}: its ACL ({name}) could not be kept on the new output folder ({exc.strerror})")
    try:
        os.chmod(new, stat.S_IMODE(st.st_mode))     # last: an ACL's mask entry rewrites the group bits
    except OSError as exc:
        notes.append(f"{existing}: its mode {stat.S_IMODE(st.st_mode):o} could not be kept on the new output "
                     f"folder ({exc.strerror})")
    return notes


def parent_not_writable_hint(parent: str, exc: OSError) -> str:
    """Why creating the staging folder failed, when the user owns the output folder but not its parent."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"; the staging folder is created beside the output, in {parent}, so that folder must be writable "
                "too (a folder you own inside it is not enough). Choose an output folder in a folder you can "
                "write, or ask its owner for write access")
    return ""
