"""Before anything is written: is the output folder a place we may create, and replace, without harming
anything else? Decided by what things are (st_dev, st_ino; see paths.py), not by how their paths are spelled.

Refused here, each with the fix: an output that is a file; the current folder or one holding it (a swap would
pull the folder out from under the shell); a mount point (a rename cannot replace it, so the whole model would
be written onto the parent filesystem and then fail with EBUSY); and any output, staging or swap folder that
is, holds, or is held by (through a bind mount or a hard link) the checkpoint or config folder or their files.
Free bytes and free inodes are measured on the filesystem that will hold the staging folder.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from typing import FrozenSet, Iterable, Optional, Sequence, Set

from ..errors import OutputError
from ..model import CheckpointMetadata
from ..planning.plan import ConversionPlan
from ..source.io import RangeReader
from ..fs.paths import Identity, ancestors, identity, is_mount_point, mount_points
from ..sizes import format_size
from .staging import old_path_for, staging_path_for

# Entries looked at in an existing output/staging/swap folder for bind-mounted or hard-linked sources; a tree
# larger than this is still deleted safely (paths.remove_tree skips mounts and sources), only not refused early.
MAX_ENTRIES_CHECKED = 200_000


def protected_identities(folders: Iterable[str], files: Iterable[str]) -> FrozenSet[Identity]:
    """Identities of the checkpoint and config folders and their files (symlinks followed: what is read)."""
    out: Set[Identity] = set()
    for path in list(folders) + list(files):
        ident = identity(path)
        if ident is not None:
            out.add(ident)
    return frozenset(out)


def _cwd_identities() -> Set[Identity]:
    """The current folder and every folder above it, walked through `..` (no getcwd: it fails once the
    folder is unlinked, and a path string would miss bind mounts)."""
    out: Set[Identity] = set()
    probe = os.curdir
    for _ in range(4096):
        ident = identity(probe)
        if ident is None or ident in out:
            break
        out.add(ident)
        probe = os.path.join(probe, os.pardir)
    return out


def _walk_for_sources(top: str, protected: FrozenSet[Identity], mounts: FrozenSet[str]) -> Optional[str]:
    """The first path under `top` (symlinks not followed) that is a protected identity or a mount point."""
    seen = 0
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES_CHECKED:
                return None
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in protected:
                return entry.path
            if stat.S_ISDIR(st.st_mode):
                if is_mount_point(entry.path, mounts):
                    return entry.path
                stack.append(entry.path)
    return None


def check_destination(destination: str, protected_folders: Iterable[str], protected_files: Iterable[str]
                      ) -> FrozenSet[Identity]:
    """Refuse, before anything is written, a destination we could not create or replace safely (see the module
    docstring). A destination inside the checkpoint folder is fine. Returns the identities every later
    deletion must spare (`paths.remove_tree(..., protected)`)."""
    dest = os.path.abspath(destination)
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise OutputError(f"{destination} is a file, not a folder; pass the path of a folder to create "
                          "(or an empty one) for the output")
    if identity(dest) is not None and identity(dest) in _cwd_identities():
        raise OutputError(f"{destination} is the current folder or holds it; converting there would swap out the "
                          "folder you are working in. Choose a new folder for the output, e.g. ./hf_model")
    mounts = mount_points()
    if os.path.isdir(dest) and is_mount_point(dest, mounts):
        raise OutputError(f"{destination} is a mount point: the finished output replaces the folder in one rename, "
                          "which a mount point cannot take. Write into a new folder inside it, e.g. "
                          f"{os.path.join(destination, 'model')}")
    folders, files = list(protected_folders), list(protected_files)
    protected = protected_identities(folders, files)
    risky = [dest, staging_path_for(dest), old_path_for(dest)]
    risky_ids = {identity(p): p for p in risky if identity(p) is not None}
    for source in folders + files:
        for above in ancestors(source):
            hit = risky_ids.get(identity(above))
            if hit is None:
                continue
            where = "the output folder" if hit == dest else f"its staging or swap folder {hit}"
            if source in folders:
                relation = "is" if above == os.path.realpath(source) else "contains"
                raise OutputError(
                    f"{destination}: {where} {relation} the source folder {source} (on disk: the same folder as "
                    f"{above}); converting there could delete the source. Choose an output folder outside it "
                    "(a subfolder of the checkpoint folder is fine).")
            raise OutputError(
                f"{destination}: {where} would hold the source file {source} (real path "
                f"{os.path.realpath(source)}, inside {above}); converting there could delete or overwrite it. "
                "Choose another output folder.")
    for path in risky:
        if os.path.isdir(path) and not os.path.islink(path):
            found = _walk_for_sources(path, protected, mounts)
            if found is None:
                continue
            if identity(found, follow_symlinks=False) in protected:
                raise OutputError(
                    f"{destination}: {found} is the checkpoint or config folder, or one of their files (a bind "
                    "mount or hard link); replacing the output would delete it. Unmount or move it, or choose "
                    "another output folder.")
            raise OutputError(f"{destination}: {found} is a mount point; replacing the output would have to "
                              "delete what is mounted there. Unmount it, or choose another output folder.")
    return protected


def check_remote_destination(destination: str, sources: Sequence[str]) -> None:
    """An output prefix in object storage must not be, or hold, the checkpoint or config prefix: replacing the
    output deletes objects under it. A prefix inside the checkpoint's is fine, as a subfolder is locally."""
    dest = destination.rstrip("/") + "/"
    for source in sources:
        if (source.rstrip("/") + "/").startswith(dest):
            raise OutputError(f"{destination}: the output prefix is or holds {source}, which this conversion reads; "
                              "replacing the output could delete it. Choose an output prefix outside it (one "
                              "inside the checkpoint's prefix is fine).")


def staging_filesystem(output_dir: str) -> str:
    """The deepest existing folder above the output: the staging folder is created beside the output, so
    this filesystem holds the data (a destination that is a mount point is refused by `check_destination`)."""
    probe = os.path.dirname(os.path.abspath(output_dir))
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    return probe


def check_free_space(output_dir: str, needed_bytes: int, needed_files: int = 0) -> None:
    """Refuse before writing when the filesystem that will hold the output cannot: too few bytes, or too few
    inodes (`needed_files` files and folders). A full disk half-way through a 40 GB conversion wastes the time."""
    probe = staging_filesystem(output_dir)
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise OutputError(
            f"{output_dir}: the output needs {format_size(needed_bytes)} but {probe} has {format_size(free)} free; "
            "free some space, choose another output folder, or shrink the output with --dtype bfloat16")
    try:
        vfs = os.statvfs(probe)
    except OSError:
        return
    # f_files == 0: the filesystem does not count inodes (btrfs, many network filesystems); nothing to check.
    if vfs.f_files and vfs.f_favail < needed_files:
        raise OutputError(
            f"{output_dir}: the output needs {needed_files} files and folders but {probe} has {vfs.f_favail} free "
            f"inodes (and {format_size(free)} free); delete some files on that filesystem or choose another "
            "output folder")


# Each file takes whole filesystem blocks; counted so that a folder of many small files is not underestimated.
_BLOCK_BYTES = 4096


def output_nbytes(conversion: ConversionPlan, config_folder: Optional[str], sidecars: Sequence[str]) -> int:
    """Bytes the finished folder takes: shards, index and the copied config/tokenizer files."""
    index = conversion.index()
    total = conversion.files_nbytes + (len(json.dumps(index, indent=2)) + 1 if index is not None else 0)
    for name in sidecars:
        try:
            total += os.path.getsize(os.path.join(config_folder or "", name)) + 1024   # config.json grows a little
        except OSError:
            pass
    return total + _BLOCK_BYTES * (len(conversion.shards) + 1 + len(sidecars))


def output_nfiles(conversion: ConversionPlan, sidecars: Sequence[str]) -> int:
    """Inodes the run takes at its peak: the staging folder, its records folder and plan record, and per shard
    the file and its record; the index and the copied config/tokenizer files."""
    return 4 + 2 * len(conversion.shards) + 1 + len(sidecars)      # 4: + the copy probe's file


def protected_paths(reader: RangeReader, meta: CheckpointMetadata, config_folder: Optional[str]):
    """(folders, files) a destination must never hold: the checkpoint's and the config folder's.
    Data file names come from untrusted metadata: `reader.path` refuses the ones no filesystem can hold."""
    checkpoint_dir = reader.root
    folders = [checkpoint_dir] + ([config_folder] if config_folder else [])
    files = [reader.path(f) for f in meta.files]
    for folder in folders:
        try:
            files += [os.path.join(folder, n) for n in os.listdir(folder)
                      if not os.path.isdir(os.path.join(folder, n))]
        except OSError:
            pass
    return folders, files
