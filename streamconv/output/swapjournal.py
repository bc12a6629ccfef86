"""What an --overwrite commit was doing, so that a run killed in the middle of it is finished, never guessed at.

Replacing a non-empty output takes two steps: RENAME_EXCHANGE then a rename of the old output to `-old`, or,
without EXCHANGE, a rename of the old output to `-old` then the new one into place. A kill between the steps
leaves a state that names alone cannot tell apart (the staging folder may hold the new output, or, after the
exchange, the old one; OUT may be the new output or a folder the user made since). So before the first step a
small journal beside the output records both folders' identities (st_dev, st_ino: renames keep them), and the
next run decides by identity:

    the new output is at OUT                  committed: the old one (wherever it is) is deleted, as asked
    the old output is at -old, OUT is absent  not committed: the old output is moved back
      or an empty folder (`mkdir -p OUT`)
    the old output is still at OUT            not committed, nothing moved
    anything else                             nothing is deleted; the message says where each folder is

Without a journal (a run of an older version) an `-old` folder is moved back when OUT is absent or empty,
and otherwise left alone and reported: an `-old` folder is deleted only when a new complete output is known
to be in place.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Collection, List, Optional, Tuple

from ..errors import OutputError
from ..fs.outfiles import create_new, open_ours
from ..fs.paths import Identity, remove_tree


def identity(path: str) -> Optional[Identity]:
    """(st_dev, st_ino) of a real folder at `path` (a symlink or file is nobody's identity here)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def write(journal: str, new: Identity, old: Identity, durable) -> None:
    """Record, durably (`durable(path, directory=...)` fsyncs), that `new` is about to replace `old`."""
    try:
        with os.fdopen(create_new(journal), "w", encoding="utf-8") as f:
            json.dump({"new": list(new), "old": list(old)}, f)
    except OSError as exc:
        raise OutputError(f"{journal}: cannot write the commit journal: {exc.strerror}") from None
    durable(journal)
    durable(os.path.dirname(journal), directory=True)


def remove(journal: str) -> None:
    try:
        os.unlink(journal)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(f"{journal}: cannot remove the commit journal: {exc.strerror}") from None


def _read(journal: str) -> Optional[Tuple[Identity, Identity]]:
    try:
        with os.fdopen(open_ours(journal), encoding="utf-8") as f:
            data = json.loads(f.read(4096))
        new, old = tuple(data["new"]), tuple(data["old"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(f"{journal}: an unreadable commit journal of an interrupted --overwrite; look at the "
                          "output folder and the hidden folders beside it, then remove the journal") from None
    if len(new) != 2 or len(old) != 2:
        raise OutputError(f"{journal}: not a commit journal; remove it and run again")
    return new, old


def _is_empty_dir(path: str) -> bool:
    return identity(path) is not None and not os.listdir(path)


def _put_back(old_path: str, destination: str) -> None:
    if os.path.lexists(destination):
        os.rmdir(destination)       # empty (checked): `mkdir -p OUT` after the kill
    os.rename(old_path, destination)


def recover(destination: str, staging: str, old_path: str, journal: str,
            protected: Collection[Identity] = ()) -> List[str]:
    """Finish or undo an --overwrite commit a killed run left half done (see the module docstring). Returns
    notes for the report; raises OutputError, deleting nothing, when the state is not one we made. Deleting
    the previous output goes through `paths.remove_tree`: it spares `protected` (the sources) and mounts."""
    try:
        recorded = _read(journal)
        if recorded is None:
            if not os.path.lexists(old_path):
                return []
            if not os.path.lexists(destination) or _is_empty_dir(destination):
                _put_back(old_path, destination)
                return [f"an interrupted --overwrite had set the previous output aside: moved it back to "
                        f"{destination}"]
            raise OutputError(
                f"{old_path}: the previous output, set aside by an interrupted --overwrite, and {destination} "
                "both exist, and nothing records which is newer; neither was touched. Look at both, then "
                f"delete the one you do not want (or move {old_path} back to {destination}) and run again")
        new, old = recorded
        if identity(destination) == new:
            left: List[str] = []
            for place in (old_path, staging):
                if identity(place) == old:      # the previous output --overwrite was asked to replace
                    left += remove_tree(place, protected)
            if left:
                raise OutputError(f"{destination} holds the complete new output, but the previous one could not "
                                  f"be deleted entirely ({'; '.join(left[:3])}); delete it yourself, then remove "
                                  f"{journal}")
            remove(journal)
            return [f"finished an interrupted --overwrite: {destination} holds the complete new output and the "
                    "previous output was removed"]
        if identity(destination) == old or old not in (identity(old_path), identity(staging)):
            remove(journal)         # nothing was moved yet (or the old output is gone): nothing to undo
            return []
        where = old_path if identity(old_path) == old else staging
        if not os.path.lexists(destination) or _is_empty_dir(destination):
            _put_back(where, destination)
            remove(journal)
            return [f"an interrupted --overwrite had set the previous output aside: moved it back to {destination}"]
        raise OutputError(
            f"{destination}: an interrupted --overwrite set the previous output aside in {where}, and "
            f"{destination} now holds something else; neither was touched. Look at both, then delete the one you "
            f"do not want (or move {where} back to {destination}), remove {journal}, and run again")
    except OSError as exc:
        raise OutputError(f"{destination}: cannot finish an interrupted --overwrite ({exc.filename}: "
                          f"{exc.strerror}); look at the hidden folders beside it") from None
