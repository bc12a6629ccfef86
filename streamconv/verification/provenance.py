"""Provenance: which checkpoint an output was made from, decided by content rather than by path.

`record.py` owns the format of `<output>/streamconv.json`; this module decides what goes into it and what it
proves: the source fingerprint, the snapshot of the checkpoint's files that is checked again before the commit,
and whether an existing folder may be replaced, is already this conversion, or belongs to someone else.

What the source fingerprint can tell (see `source_fingerprint`):
- torch.save blobs with CRC-32s (torch's default): the bytes of `.metadata` and every converted chunk's recorded
  CRC-32, offset and length. Two saves with different weights differ, whatever their sizes and mtimes (a
  re-save restored with `cp -p` or `rsync -a` included); a copy of the same save elsewhere is the same.
- where the writer recorded no CRC-32 (safetensors-serialized DCP, HF per-rank shards, compute_crc32=False):
  `.metadata` (or the shards' layout), sizes and modification times of those files. A re-save whose weights
  changed but whose files kept their sizes and mtimes (restored with `cp -p`) cannot be told apart; a copy of
  the same save without its mtimes looks like other weights (refused, never wrongly taken as the same). Such
  fingerprints start with "stat-" and the notes say so.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..output import record
from ..output.ledger import Fingerprint, Ledger
from ..errors import CheckpointError, OptionsError, OutputError, StreamconvError
from ..fs import location
from ..fs.infiles import open_regular
from ..fs.remote import is_url
from ..fs.outfiles import write_failed
from ..model import CheckpointMetadata
from ..source.located import LocatedChunks

# A fingerprint names how it was made, so a weaker one is never compared with a stronger one as equal.
CONTENT_SCHEME = "crc1-"
STAT_SCHEME = "stat1-"
_READ_PIECE_BYTES = 1 << 20
# Names that make a folder look like a model (weights or a model's config): replacing it loses something.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".distcp", ".metadata", ".h5", ".msgpack")
_MODEL_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class SourceChangedError(CheckpointError):
    """The checkpoint's files changed while it was converted (a trainer still writing): nothing committed."""


# -- the checkpoint's files ---------------------------------------------------------------------------------

def source_files(checkpoint_dir: str, meta: CheckpointMetadata) -> List[str]:
    """The files a conversion reads: every `*.metadata` and every data file the metadata names."""
    return sorted(set(meta.files) | set(location.metadata_names(checkpoint_dir)))


StatSnapshot = Dict[str, Optional[Tuple[Any, ...]]]


def snapshot(checkpoint_dir: str, names: Iterable[str]) -> StatSnapshot:
    """{file: (size, mtime_ns, ctime_ns, inode)}: a write (ctime), a restore with kept mtimes (ctime) and a
    replacement by rename (inode) all change it. In object storage (size, ETag or generation, last-modified):
    every upload of an object changes its ETag."""
    return {name: e.version if e is not None else None
            for name, e in location.entries(checkpoint_dir, list(names)).items()}


def changed_file(checkpoint_dir: str, before: StatSnapshot) -> Optional[str]:
    """The first file of `before` whose size, times or identity differ now; None when all are the same."""
    now = snapshot(checkpoint_dir, before)
    return next((name for name in sorted(before) if now[name] != before[name]), None)


def changed_error(checkpoint_dir: str, name: str) -> SourceChangedError:
    return SourceChangedError(
        f"the checkpoint changed while it was converted ({location.at(checkpoint_dir).join(name)}): a trainer may "
        "still be writing it; nothing was committed; convert again when it is done")


def check_unchanged(checkpoint_dir: str, before: StatSnapshot) -> None:
    """Before the commit: every file the conversion read is still the one it read (else nothing is committed)."""
    name = changed_file(checkpoint_dir, before)
    if name is not None:
        raise changed_error(checkpoint_dir, name)


class SourceWatch:
    """Around a conversion: a failure (a CRC-32 mismatch, a short read, a failed --verify) while a checkpoint
    file changed is reported as the change, not as a corrupt checkpoint to restore from a good copy."""

    def __init__(self, checkpoint_dir: str, before: StatSnapshot):
        self.checkpoint_dir, self.before = checkpoint_dir, before

    def __enter__(self) -> "SourceWatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from ..errors import StreamconvError
        if isinstance(exc, StreamconvError) and not isinstance(exc, SourceChangedError):
            name = changed_file(self.checkpoint_dir, self.before)
            if name is not None:
                raise changed_error(self.checkpoint_dir, name) from None


# -- the fingerprint ----------------------------------------------------------------------------------------

def _hash_file(h: Fingerprint, path: str) -> None:
    if is_url(path):
        _hash_object(h, path)
        return
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: disappeared while the checkpoint was read; convert again when the "
                              "checkpoint is complete") from None
    try:
        while True:
            data = os.read(fd, _READ_PIECE_BYTES)
            if not data:
                return
            h.update(data)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def _hash_object(h: Fingerprint, url: str) -> None:
    folder, name = location.parent_and_name(url)
    where = location.at(folder)
    entry = where.entry(name)
    if entry is None:
        raise CheckpointError(f"{url}: disappeared while the checkpoint was read; convert again when the "
                              "checkpoint is complete")
    h.update(where.read_small(name, entry.size))


def source_fingerprint(checkpoint_dir: str, meta: CheckpointMetadata,
                       stored: LocatedChunks, before: StatSnapshot) -> str:
    """What the checkpoint's converted content is (see the module docstring for what it can tell).
    `stored`: every converted chunk as located (its recorded CRC-32); `before`: the files' snapshot."""
    h = Fingerprint()
    for name in sorted(n for n in before if n.endswith(".metadata")):
        h.update(f"{name}\0".encode("utf-8", "surrogateescape"))
        _hash_file(h, location.at(checkpoint_dir).join(name))
    without_crc = set()
    # In file order, (relative_path, offset, tensor_key, length): LocatedChunks iterates so, one chunk at a time.
    for blob, s in stored.items():
        if s.crc32 is None:
            without_crc.add(blob.relative_path)
        h.update(repr((blob.relative_path, blob.offset, blob.length, blob.tensor_key,
                       s.dtype, s.shape, s.data_offset, s.data_nbytes, s.crc32)).encode("utf-8", "surrogateescape"))
    for name in meta.files:
        entry = before.get(name)
        size = entry[0] if entry else None
        # Without a recorded CRC-32 only the file's modification time can tell two saves of one layout apart.
        mtime = entry[1] if entry and name in without_crc else None
        h.update(repr((name, size, mtime)).encode("utf-8", "surrogateescape"))
    return (STAT_SCHEME if without_crc else CONTENT_SCHEME) + h.hexdigest()


def fingerprint_note(fingerprint: str) -> Optional[str]:
    if fingerprint.startswith(STAT_SCHEME):
        return ("source fingerprint: the checkpoint's writer recorded no CRC-32s, so the output is tied to it by "
                "its .metadata, file sizes and modification times only (a re-save restored with its mtimes kept "
                "cannot be told apart)")
    return None


# -- an existing output folder --------------------------------------------------------------------------------

def _has_model_files(names: Iterable[str]) -> bool:
    return any(n.endswith(_MODEL_SUFFIXES) or n in _MODEL_NAMES for n in names)


def _contents(output_dir: str, names: List[str]) -> str:
    shown = sorted(names, key=lambda n: (not (n in _MODEL_NAMES or n.startswith(".")), n))[:4]
    return f"holds {len(names)} file(s) or folder(s), among them {', '.join(shown)}"


def check_existing_output(output_dir: str, source_fp: str, plan_fp: str, *, overwrite: bool,
                          overwrite_any: bool) -> Optional[record.OutputRecord]:
    """Decide about a non-empty `output_dir` before anything is written. Returns its record when it already is
    this conversion (same source fingerprint and plan, every file with its recorded size) and no overwrite was
    asked: nothing needs writing. Returns None when the folder is absent, empty, or may be replaced. Raises
    OutputError when it may not be: `--overwrite` replaces only a streamconv output (a folder with a valid
    record), `--overwrite-any` anything."""
    names = _output_names(output_dir)
    if not names or (not is_url(output_dir) and os.path.islink(output_dir)):
        return None
    try:
        found = record.read(output_dir)
        bad_record = None
    except record.RecordError as exc:
        found, bad_record = None, str(exc)
    if found is not None:
        same = found.source_fingerprint == source_fp and found.plan_fingerprint == plan_fp
        damaged = record.missing_or_resized(output_dir, found) if same else []
        if same and not (overwrite or overwrite_any) and not damaged:
            return found
        if overwrite or overwrite_any:
            return None
        if damaged:
            raise OutputError(
                f"{output_dir} holds this checkpoint's output, but {', '.join(damaged[:5])} "
                f"{'is' if len(damaged) == 1 else 'are'} missing or not the size its record says; pass --overwrite "
                "to convert it again")
        what = "from other weights" if found.source_fingerprint != source_fp else "with other options"
        raise OutputError(
            f"{output_dir} holds a streamconv output made {what} than this checkpoint's; pass --overwrite to "
            "replace it, or choose another output folder")
    if overwrite_any or (is_url(output_dir) and _remote_staging().interrupted_publication(output_dir)):
        return None     # (a run killed while publishing: its staging prefix decides, remote_staging.py)
    why = (f"its record is not valid ({bad_record})" if bad_record
           else f"it has no {record.RECORD_FILE}, so it is not a streamconv output (or one made before records)")
    if not _has_model_files(names):
        raise OutputError(f"{output_dir} exists, is not empty and holds no model files ({_contents(output_dir, names)});"
                          " choose another output folder")
    if overwrite:
        raise OutputError(
            f"{output_dir}: --overwrite replaces only streamconv outputs, and {why}; it {_contents(output_dir, names)}"
            ". Pass --overwrite-any to replace it and lose them, or choose another output folder")
    raise OutputError(f"{output_dir} exists and is not empty ({_contents(output_dir, names)}); {why}. Choose "
                      "another output folder, or pass --overwrite-any to replace it and lose them")


def _remote_staging():
    """output/remote_staging.py, imported for an output in a bucket only: with its lock (socket, datetime) it is
    ~3 ms of every local conversion's start-up otherwise."""
    from ..output import remote_staging
    return remote_staging


def _output_names(output_dir: str) -> List[str]:
    """What an output folder holds ([] when absent); in a bucket, an interrupted run's staging prefix is not
    counted, nor a run's lock (remote_staging.py decides about them)."""
    if is_url(output_dir):
        try:
            names = location.at(output_dir, OutputError).names()
        except FileNotFoundError:
            return []
        return [n for n in names if not _remote_staging().is_run_object(n)]
    try:
        return os.listdir(output_dir)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return []     # absent, or a file (staging says so)
        raise OutputError(f"{output_dir}: cannot list: {exc.strerror}") from None


def check_record_options(found: record.OutputRecord, given: Mapping[str, object],
                         defaults: Mapping[str, object]) -> None:
    """Options given to verify that contradict the ones the output was made with: an error naming both."""
    clash = []
    for name, value in given.items():
        if name not in found.options or value == defaults.get(name):
            continue
        recorded = found.options[name]
        if name == "dtype" and isinstance(value, str):
            from ..dtypes import parse_output_dtype
            value = parse_output_dtype(value)       # bf16 and bfloat16 are one choice
        if name == "config_from" and isinstance(value, str):
            value = os.path.abspath(value)
        if (list(value) if isinstance(value, tuple) else value) != recorded:
            clash.append(f"{name}: given {value!r}, recorded {recorded!r}")
    if clash:
        raise OptionsError(f"options that contradict the ones this output was made with ({record.RECORD_FILE}): "
                           f"{'; '.join(clash)}; leave them out (verify takes them from the record)")


# -- writing the record ---------------------------------------------------------------------------------------

def record_bytes(ledger: Ledger, shard_names: Iterable[str], other_names: Iterable[str], *,
                 source_fp: str, options: Mapping[str, object], version: str) -> bytes:
    """The record of the staged output (`ledger.staging_dir`, a folder or a prefix), listing every shard (CRC-32
    from the resume ledger: the one its writer computed, here or on a Ray worker, so the shard is not read again)
    and every other file (CRC-32 of its bytes)."""
    staging_dir, plan_fp = ledger.staging_dir, ledger.plan_fingerprint
    shard_names, other_names = list(shard_names), list(other_names)
    sizes = record.file_sizes(staging_dir, shard_names + other_names)
    files = {}
    for name in shard_names + other_names:
        if sizes[name] is None:
            raise OutputError(f"{location.at(staging_dir).join(name)}: missing from the staged output; nothing "
                              "was committed")
        crc = ledger.crc32(name) if name in shard_names else record.file_crc32(staging_dir, name)
        files[name] = record.FileEntry(sizes[name], crc)
    return record.encode(record.OutputRecord(
        streamconv_version=version, source_fingerprint=source_fp, plan_fingerprint=plan_fp,
        options=record.options_json(options), files=files))


def write_record(staging_dir: str, data: bytes) -> str:
    """Write `streamconv.json` (`record_bytes`) into the local staging folder. Returns the record's file name,
    for the caller to fsync with the rest."""
    path = os.path.join(staging_dir, record.RECORD_FILE)
    try:
        try:
            os.unlink(path)     # a record a killed run wrote before its commit; never followed if a symlink
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
    except OSError as exc:
        raise OutputError(write_failed(path, exc)) from None
    return record.RECORD_FILE


# -- verify: the record's options and files -------------------------------------------------------------------

# Working memory only: verify may use its own, whatever the conversion used.
_FREE_OPTIONS = ("buffer_size",)
# Verify finds tensors by name: how the output was split into files does not matter (accepted, not compared).
_IGNORED_OPTIONS = ("max_shard_size",)


def options_from_record(found: record.OutputRecord, options, kwargs: Mapping[str, object], **config):
    """(options, kwargs, config_from, allow_unmatched, no_config) for `verify` (runs/verifying.py) from an output's
    record: the options the output was made with; any given option that contradicts them is an error naming both."""
    from dataclasses import fields
    from ..planning.options import ConvertOptions
    defaults = {f.name: f.default for f in fields(ConvertOptions)}
    given = dict(kwargs)
    if isinstance(options, ConvertOptions):
        given.update({k: v for k, v in options.__dict__.items() if v != defaults[k]})
    elif options is not None:
        raise OptionsError(f"{record.RECORD_FILE} holds the options this output was made with; pass no planner "
                           "options object to verify it")
    given.update({k: v for k, v in config.items() if v != defaults[k]})
    check_record_options(found, {k: v for k, v in given.items() if k not in _FREE_OPTIONS + _IGNORED_OPTIONS},
                         defaults)
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in found.options.items() if k in defaults}
    values.update({k: given[k] for k in _FREE_OPTIONS if k in given})
    try:
        recorded = ConvertOptions(**values)
    except (TypeError, OptionsError) as exc:
        raise record.RecordError(f"{record.RECORD_FILE}: its options cannot be used ({str(exc)[:200]}); "
                                 "verify with the options convert used and no record, or convert again") from None
    return recorded, {}, None, False, False


def describe_options(found: record.OutputRecord) -> str:
    from dataclasses import fields
    from ..planning.options import ConvertOptions
    defaults = {f.name: f.default for f in fields(ConvertOptions)}
    shown = []
    for name, value in found.options.items():
        if name in ("max_shard_size", "buffer_size") or value in (defaults.get(name), [], None, False):
            continue
        shown.append(f"{name}={value}")
    return ", ".join(shown)


def check_source(found: record.OutputRecord, output_dir: str, checkpoint_dir: str, source_fp: str) -> List[str]:
    """Before verify compares any tensor: the output was made from this checkpoint's content. A CRC-based
    fingerprint that differs raises OutputDiffersError (exit 3); one made of sizes and mtimes only cannot tell
    a copy from a re-save, so the tensors' bytes decide. Returns the line saying what was checked."""
    from .compare import OutputDiffersError, VerifyResult
    if found.source_fingerprint == source_fp:
        return ["source fingerprint: the output was made from this checkpoint's content"
                + (" (sizes and modification times only: its writer recorded no CRC-32s)"
                   if source_fp.startswith(STAT_SCHEME) else "")]
    if source_fp.startswith(STAT_SCHEME) and found.source_fingerprint.startswith(STAT_SCHEME):
        return ["source fingerprint differs (only sizes and modification times: a copy of the checkpoint?); "
                "the tensors' bytes decide"]
    result = VerifyResult(checkpoint=os.path.abspath(checkpoint_dir), output=os.path.abspath(output_dir))
    result.file_problems.append({"file": record.RECORD_FILE, "problem": (
        f"this output was made from other weights: its record's source fingerprint {found.source_fingerprint[:40]}"
        f" is not this checkpoint's {source_fp[:40]}; verify it against "
        "the checkpoint it was made from, or convert this one")})
    raise OutputDiffersError(f"{output_dir}: {result.summary()}", result)


def check_record_files(found: record.OutputRecord, output_dir: str, result) -> List[str]:
    """Every file the record lists is there with its size, and every file but the shards and the index (which
    verify checks itself, tensor by tensor and entry by entry) with its CRC-32: a truncated, deleted or edited
    config.json is found. Problems go into `result.file_problems` (files verify already blamed are skipped);
    returns the line saying what was checked."""
    from ..planning.plan import INDEX_FILE_NAME
    blamed = {p["file"] for p in result.file_problems}
    crc_checked = []
    sizes = record.file_sizes(output_dir, sorted(found.files))
    for name, entry in sorted(found.files.items()):
        if name in blamed:
            continue
        problem = None
        size = sizes[name]
        if size is None:
            problem = "missing: the record lists it (deleted or renamed after the conversion)"
        elif size != entry.nbytes:
            problem = f"{size} bytes, the record says {entry.nbytes} (truncated or replaced after the conversion)"
        elif not name.endswith(".safetensors") and name != INDEX_FILE_NAME:
            try:
                crc = record.file_crc32(output_dir, name)
            except (StreamconvError, OSError) as exc:
                crc, problem = None, f"cannot read: {str(exc)[:200]}"
            if crc is not None and crc != entry.crc32:
                problem = f"CRC-32 {crc:08x}, the record says {entry.crc32:08x} (edited after the conversion)"
            crc_checked.append(name)
        if problem:
            result.file_problems.append({"file": name, "problem": problem})
    return [f"{len(found.files)} file(s) of {record.RECORD_FILE} present with their sizes"
            + (f"; {', '.join(crc_checked[:6])} with their CRC-32s" if crc_checked else "")]
