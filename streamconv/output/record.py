"""The output record: what a finished streamconv output folder says about how it was made.

    <output>/streamconv.json    written into the staging folder after the index, committed with the folder

It ties an output to the checkpoint that produced it, by content rather than by path, so that a re-saved
checkpoint or a second run converted with the same template is not mistaken for one already converted. It
carries the options the output was made with, so `verify SRC OUT` needs none, and every other file's size and
CRC-32, so a renamed, truncated or edited file is found without reading the checkpoint. Its presence is also
how `--overwrite` knows a folder is streamconv's own output, and how `batch` knows a folder is an output and
not a checkpoint.

The record is the last file a conversion writes, so it is also what "finished" means, for a local folder and
an output prefix in object storage alike (`finished`, the one place that is decided: `convert` finding an output
already there, `batch`'s skip and `verify` all ask it). Locally the folder appears in one rename anyway; in a
bucket the record is copied into place after every other object (remote_staging.py), so a prefix without one
is an unfinished (interrupted) conversion.

This module owns the format and that definition (what the JSON holds and how it is read back safely); what
goes into a record is decided where the conversion is.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional

from .crc import crc32
from ..errors import VerificationError
from ..fs import location
from ..fs.remote import is_url

RECORD_FILE = "streamconv.json"
RECORD_FORMAT = "streamconv-output"
RECORD_VERSION = 1
# A record lists every file of the folder: ~100 bytes each, so even 100k shards stay far below this.
MAX_RECORD_BYTES = 64 << 20


class RecordError(VerificationError):
    """An output's record is present but unreadable, malformed, or from a format version we do not know:
    the folder cannot be trusted as a finished output (exit 3)."""


@dataclass(frozen=True)
class FileEntry:
    """One file of the output folder as it was committed."""

    nbytes: int
    crc32: int

    def to_json(self) -> dict:
        return {"bytes": self.nbytes, "crc32": f"{self.crc32:08x}"}


@dataclass(frozen=True)
class OutputRecord:
    streamconv_version: str
    # No path of the checkpoint: one checkpoint converts to the same bytes wherever it sits (a copy, a batch of
    # copies, a bind mount), and what decides is its content.
    # What the checkpoint's content was: equal fingerprints mean the same weights (see where it is computed).
    source_fingerprint: str
    # The plan's fingerprint: equal means the same output file names, headers and byte sources.
    plan_fingerprint: str
    # The ConvertOptions fields the output was made with (JSON values; tuples as lists).
    options: Dict[str, Any]
    # Every file in the folder but the record itself: name -> size and CRC-32.
    files: Dict[str, FileEntry]

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "version": RECORD_VERSION,
                "streamconv_version": self.streamconv_version,
                "source": {"fingerprint": self.source_fingerprint},
                "plan_fingerprint": self.plan_fingerprint,
                "options": dict(self.options),
                "files": {name: entry.to_json() for name, entry in sorted(self.files.items())}}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "OutputRecord":
        """Parse a record read from `where`, checking every field's type; RecordError names what is wrong."""
        def bad(what: str) -> RecordError:
            return RecordError(f"{where}: {what}; this is not a record streamconv wrote (or it was edited): "
                               "convert the checkpoint again into a new folder")

        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise bad(f"not a streamconv output record (no \"format\": \"{RECORD_FORMAT}\")")
        if data.get("version") != RECORD_VERSION:
            raise bad(f"record version {str(data.get('version'))[:20]!r} is not {RECORD_VERSION}, the one this "
                      "streamconv reads")
        source, files, options = data.get("source"), data.get("files"), data.get("options")
        strings = (data.get("streamconv_version"), data.get("plan_fingerprint"),
                   source.get("fingerprint") if isinstance(source, dict) else None)
        if not all(isinstance(s, str) for s in strings):
            raise bad("a version or fingerprint is missing or not a string")
        if not isinstance(options, dict) or not isinstance(files, dict):
            raise bad("\"options\" and \"files\" must be objects")
        entries = {}
        for name, entry in files.items():
            # Names are joined to the output folder by readers: a record names files in it, nothing else.
            if not name or name in (".", "..") or "/" in name or "\0" in name or name == RECORD_FILE:
                raise bad(f"file entry {name[:200]!r} is not the name of a file in the output folder")
            nbytes = entry.get("bytes") if isinstance(entry, dict) else None
            crc = entry.get("crc32") if isinstance(entry, dict) else None
            if not (isinstance(nbytes, int) and not isinstance(nbytes, bool) and nbytes >= 0
                    and isinstance(crc, str) and len(crc) == 8):
                raise bad(f"file entry {name[:200]!r} needs a byte count and an 8-digit hex CRC-32")
            try:
                entries[name] = FileEntry(nbytes, int(crc, 16))
            except ValueError:
                raise bad(f"file entry {name[:200]!r}: CRC-32 {crc!r} is not hexadecimal") from None
        return cls(streamconv_version=strings[0], source_fingerprint=strings[2],
                   plan_fingerprint=strings[1], options=options, files=entries)


def encode(record: OutputRecord) -> bytes:
    return (json.dumps(record.to_json(), indent=1, sort_keys=True) + "\n").encode("utf-8")


def read(output_dir: str) -> Optional[OutputRecord]:
    """The record of an output folder; None when the folder has none (not streamconv's output, or written
    before records existed). A record that is a symlink, a FIFO, too large, not JSON or not in our format
    raises RecordError: a folder that claims to be ours but cannot prove it is not a finished output."""
    if is_url(output_dir):
        return _read_remote(output_dir)
    path = os.path.join(output_dir, RECORD_FILE)
    try:
        # O_NOFOLLOW: a record planted as a symlink (to /dev/zero, to another output) is not believed.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        if exc.errno == errno.ELOOP:
            raise RecordError(f"{path} is a symbolic link; streamconv writes its record as a regular file") from None
        raise RecordError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(f"{path} is not a regular file")
        if st.st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{path} holds {st.st_size} bytes, more than any record streamconv writes "
                              f"({MAX_RECORD_BYTES} at most)")
        chunks, remaining = [], st.st_size + 1    # one byte more: a file that grows while read is caught
        while remaining > 0:
            data = os.read(fd, min(remaining, 1 << 20))
            if not data:
                break
            chunks.append(data)
            remaining -= len(data)
        raw = b"".join(chunks)
    except OSError as exc:
        raise RecordError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > st.st_size:
        raise RecordError(f"{path} changed while it was read")
    return _parse(raw, path)


def _read_remote(output_dir: str) -> Optional[OutputRecord]:
    where = location.at(output_dir, RecordError)
    path = where.join(RECORD_FILE)
    entry = where.entry(RECORD_FILE)
    if entry is None:
        return None
    if entry.kind != location.FILE:
        raise RecordError(f"{path} is not an object")
    if entry.size > MAX_RECORD_BYTES:
        raise RecordError(f"{path} holds {entry.size} bytes, more than any record streamconv writes "
                          f"({MAX_RECORD_BYTES} at most)")
    try:
        raw = where.read_small(RECORD_FILE, MAX_RECORD_BYTES)
    except FileNotFoundError:
        return None
    return _parse(raw, path)


def _parse(raw: bytes, path: str) -> OutputRecord:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{path} is not valid JSON ({str(exc)[:120]})") from None
    return OutputRecord.from_json(data, path)


def options_json(options: Mapping[str, Any]) -> Dict[str, Any]:
    """ConvertOptions fields as JSON values (tuples become lists), for `OutputRecord.options`."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def file_sizes(output_dir: str, names: Iterable[str]) -> Dict[str, Optional[int]]:
    """{name: its size, None when absent} of files of an output folder (symlinks not followed) or prefix."""
    names = list(names)
    if is_url(output_dir):
        found = location.entries(output_dir, names)
        return {n: (e.size if e is not None and e.kind == location.FILE else None) for n, e in found.items()}
    sizes: Dict[str, Optional[int]] = {}
    for name in names:
        try:
            sizes[name] = os.lstat(os.path.join(output_dir, name)).st_size
        except (OSError, ValueError):
            sizes[name] = None
    return sizes


def missing_or_resized(output_dir: str, found: OutputRecord) -> List[str]:
    """Files the record lists that are absent or of another size (cheap: no byte is read)."""
    sizes = file_sizes(output_dir, sorted(found.files))
    return [name for name, entry in sorted(found.files.items()) if sizes[name] != entry.nbytes]


def finished(output_dir: str) -> Optional[OutputRecord]:
    """The record of a FINISHED output, else None: its record is there and valid, and every file it lists is
    there with its recorded size. The one definition every verb uses (see the module docstring); RecordError
    when a record is there but not one streamconv wrote."""
    found = read(output_dir)
    if found is None or missing_or_resized(output_dir, found):
        return None
    return found


_CRC_PIECE_BYTES = 1 << 20


def file_crc32(output_dir: str, name: str) -> int:
    """CRC-32 of a file of an output folder or prefix (a small one: config, tokenizer, index)."""
    handle = location.open_file(location.at(output_dir).join(name), error=RecordError)
    try:
        crc, offset = 0, 0
        while True:
            data = handle.pread(_CRC_PIECE_BYTES, offset)
            if not data:
                return crc
            crc = crc32(data, crc)
            offset += len(data)
    finally:
        handle.close()
