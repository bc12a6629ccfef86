"""The resume ledger: does a shard in the staging folder match the plan? Its one home.

    .<name>.streamconv-partial/.streamconv-resume/plan.json       what the folder converts (`plan_record`)
    .<name>.streamconv-partial/.streamconv-resume/<shard>.json    one per finished shard (`Ledger.record`)

A shard's record names the plan's fingerprint, the shard's own fingerprint (`shard_fingerprint`: its name,
header and where every byte comes from), its size and the CRC-32 its writer computed. It is written only after
the shard is fsynced, by whichever process wrote the shard (a local thread or a Ray task), so a record means
"these bytes are this shard of this plan". The driver asks the same questions of every shard, whoever wrote it:
`kept` (a resumed run keeps it: record, size and CRC-32 of the file), `check_written` (a runner said it wrote
them: record and size) and `crc32` (the output's record takes the CRC-32 from here, without reading the shard).
`Ledger` is a small picklable value, so a shard job carries it to another machine.

A staging prefix in object storage (remote_staging.py) keeps the same records as objects under the same names:
a record is PUT after the shard's multipart upload completed (the object exists whole or not at all), and a
kept shard is checked by its size and the CRC-32 of its bytes read back with ranged GETs, as a file is.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import OutputError
from ..failpoints import kill_point
from ..fs import location, objects
from ..fs.remote import is_url
from ..fs.fastpaths import NONE, FastPaths
from ..fs.outfiles import foreign
from ..model import CheckpointMetadata, Chunk, ChunkTable
from ..planning.plan import ConversionPlan, ShardPlan
from . import durable

RECORDS_DIR = ".streamconv-resume"     # in the staging folder; removed just before the commit
PLAN_RECORD = "plan.json"
RECORD_VERSION = 1


class Fingerprint:
    """CRC-32 + Adler-32 + length of a byte stream: enough to tell two saves or plans apart (nobody forges
    these), and without hashlib, whose OpenSSL costs 3.5 MiB of resident memory."""

    def __init__(self):
        self.crc, self.adler, self.nbytes = 0, 1, 0

    def update(self, data: bytes) -> None:
        self.crc, self.adler = zlib.crc32(data, self.crc), zlib.adler32(data, self.adler)
        self.nbytes += len(data)

    def hexdigest(self) -> str:
        return f"{self.crc:08x}{self.adler:08x}-{self.nbytes:x}"


def _located(chunks: Sequence[Chunk]) -> Iterable[Tuple[str, int, int, Sequence[int], Sequence[int]]]:
    """(relative_path, blob offset, blob length, offsets, sizes) of each chunk; read from the columns of a
    ChunkTable without making its Chunks (two thirds of the fingerprints' time at 11B went into making them)."""
    if isinstance(chunks, ChunkTable):
        return chunks.located()
    return ((c.location.relative_path, c.location.offset, c.location.length, c.offsets, c.sizes) for c in chunks)


def shard_fingerprint(shard: ShardPlan) -> str:
    """What decides a shard's bytes: its name, header, and where every tensor's bytes come from (and how)."""
    h = Fingerprint()
    h.update(shard.filename.encode("utf-8") + b"\0" + shard.header)
    for t in shard.tensors:
        chunks = [[path, offset, length, list(offsets), list(sizes)]
                  for path, offset, length, offsets, sizes in _located(t.chunks)]
        how = [list(t.axes)] if t.axes else []      # a transposed tensor (only then, so other plans keep theirs)
        h.update(json.dumps([t.name, t.source_fqn, t.src_dtype, t.dst_dtype, list(t.shape), t.begin, t.nbytes,
                             chunks] + how).encode("utf-8"))
    return h.hexdigest()


def shard_fingerprints(conversion: ConversionPlan) -> Dict[str, str]:
    """{shard file name: `shard_fingerprint`}: computed once per conversion for the plan record and the ledger
    (~4 us a chunk: two passes cost seconds at 671B scale)."""
    return {s.filename: shard_fingerprint(s) for s in conversion.shards}


def plan_fingerprint(conversion: ConversionPlan, shard_fps: Optional[Mapping[str, str]] = None) -> str:
    """What decides every output file's bytes (`shard_fingerprint` of each shard; `shard_fps`: those of this
    plan's shards, already computed)."""
    shard_fps = shard_fingerprints(conversion) if shard_fps is None else shard_fps
    h = Fingerprint()
    for shard in conversion.shards:
        h.update(shard_fps[shard.filename].encode("ascii"))
    return h.hexdigest()


def checkpoint_files(checkpoint_dir: str, meta: CheckpointMetadata) -> Dict[str, Optional[list]]:
    """{relative path: [size, mtime_ns] (in object storage [size, ETag])} of the files the conversion reads: a resumed run must see the same."""
    names = sorted(set(meta.files) | set(location.metadata_names(checkpoint_dir)))
    return {name: list(e.stamp) if e is not None else None
            for name, e in location.entries(checkpoint_dir, names).items()}


def plan_record(conversion: ConversionPlan, checkpoint_dir: str, meta: CheckpointMetadata,
                source_fingerprint: Optional[str] = None, shard_fps: Optional[Mapping[str, str]] = None) -> dict:
    """Identifies a conversion for --resume (`plan.json`): the plan's fingerprint, the checkpoint's files and
    content (`provenance.source_fingerprint`: a re-save restored with sizes and mtimes kept is not resumed into),
    and the options (shown when they differ)."""
    o = conversion.options
    return {"plan": plan_fingerprint(conversion, shard_fps), "checkpoint": checkpoint_files(checkpoint_dir, meta),
            "source": source_fingerprint,
            "options": {"--max-shard-size": o.max_shard_bytes, "--dtype": o.dtype, "--include": list(o.include),
                        "--exclude": list(o.exclude), "--rename": [f"{r.pattern}={r.replacement}" for r in o.renames],
                        "--subtree": conversion.subtree, "tied heads dropped": list(o.drop)}}


def check_resumable(previous: dict, current: dict, destination: str, staging_dir: str) -> None:
    """A staging folder's plan record (`previous`) against this run's (`current`, from `plan_record`): resumed
    only when made by this version for the same checkpoint files, content and plan; else OutputError, naming
    what changed and how to start over."""
    if previous.get("version") != RECORD_VERSION:
        raise OutputError(f"{staging_dir}: written by another streamconv version; cannot resume it. "
                          "Run again with --discard-partial to start over.")
    if previous.get("checkpoint") != current.get("checkpoint"):
        changed = _changed_keys(previous.get("checkpoint") or {}, current.get("checkpoint") or {})
        raise OutputError(
            f"{destination}: cannot resume: the checkpoint changed since the interrupted run "
            f"({', '.join(changed[:5])} differ in size or modification time). "
            "Run again with --discard-partial to start over.")
    if previous.get("source") != current.get("source"):
        raise OutputError(
            f"{destination}: cannot resume: the checkpoint's content changed since the interrupted run "
            "(its .metadata or chunk CRC-32s differ, though sizes and modification times may not: a re-save "
            "restored with cp -p or rsync -a). Run again with --discard-partial to start over.")
    if previous.get("plan") != current.get("plan"):
        changed = _changed_keys(previous.get("options") or {}, current.get("options") or {})
        detail = f" (options that differ: {', '.join(changed)})" if changed else ""
        raise OutputError(
            f"{destination}: cannot resume: the interrupted run was converting with other options, so "
            f"its shards would differ{detail}. Run again with the same options and --resume, or with "
            "--discard-partial to start over.")


def _changed_keys(a: dict, b: dict) -> List[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


@dataclass(frozen=True)
class Ledger:
    """The finished-shard records of one staging folder for one plan."""
    staging_dir: str
    plan_fingerprint: Optional[str]
    shard_fingerprints: Mapping[str, str]       # {shard file name: shard_fingerprint}

    @classmethod
    def for_plan(cls, staging_dir: str, conversion: ConversionPlan, plan_fp: Optional[str],
                 shard_fps: Optional[Mapping[str, str]] = None) -> "Ledger":
        return cls(staging_dir, plan_fp, dict(shard_fingerprints(conversion) if shard_fps is None else shard_fps))

    def _record_path(self, filename: str) -> str:
        return os.path.join(self.staging_dir, RECORDS_DIR, filename + ".json")

    @property
    def remote(self) -> bool:
        return is_url(self.staging_dir)

    def record(self, shard: ShardPlan, crc32: int) -> None:
        """A shard's bytes are all written: fsync the file, then write its record (atomically, by rename), so a
        record always means durable bytes. Any process writing into the staging folder may call it."""
        entry = {"plan": self.plan_fingerprint, "shard": self.shard_fingerprints[shard.filename],
                 "nbytes": shard.nbytes, "crc32": crc32}
        if self.remote:     # (the upload is complete: the object is durable once it exists)
            objects.put(self._record_path(shard.filename), json.dumps(entry, sort_keys=True).encode("utf-8"))
        else:
            durable.fsync_path(os.path.join(self.staging_dir, shard.filename))
            durable.write_json_atomic(self._record_path(shard.filename), entry)
        kill_point("between-shards")

    def _entry(self, filename: str) -> Optional[dict]:
        if self.remote:
            return read_remote_json(self._record_path(filename))
        return durable.read_json(self._record_path(filename))

    def recorded(self, shard: ShardPlan, *, check_crc: bool = True, fast: FastPaths = NONE) -> bool:
        """Whether `shard` was finished for this plan (here or by another process): its record matches, the file
        is a regular file of its size and (`check_crc`) has the recorded CRC-32."""
        entry = self._entry(shard.filename)
        if (entry is None or entry.get("plan") != self.plan_fingerprint
                or entry.get("shard") != self.shard_fingerprints.get(shard.filename)
                or entry.get("nbytes") != shard.nbytes):
            return False
        if self.remote:
            return _object_matches(self.staging_dir, shard.filename, shard.nbytes,
                                   entry.get("crc32") if check_crc else None)
        path = os.path.join(self.staging_dir, shard.filename)
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if foreign(st, owner=False) or st.st_size != shard.nbytes:   # a symlink is never kept: it is replaced
            return False
        return not check_crc or durable.file_crc32(path, fast) == entry.get("crc32")

    def has_record(self, shard: ShardPlan) -> bool:
        """A record under the shard's name, matching or not (a resumed run's "had finished")."""
        if self.remote:
            return self._entry(shard.filename) is not None
        return os.path.lexists(self._record_path(shard.filename))

    def kept(self, shards: Iterable[ShardPlan], fast: FastPaths = NONE) -> List[ShardPlan]:
        """The shards of a resumed run that need no rewriting: record, size and CRC-32 all match."""
        return [s for s in shards if self.recorded(s, fast=fast)]

    def check_written(self, shards: Sequence[ShardPlan], fast: FastPaths = NONE) -> None:
        """After a runner reported success: every shard it was given is recorded with its size (its bytes are
        read back by --verify), else OutputError and nothing is committed."""
        for s in shards:
            if not self.recorded(s, check_crc=False, fast=fast):
                raise OutputError(f"{os.path.join(self.staging_dir, s.filename)}: the worker writing it reported "
                                  "success but no finished record or the wrong size is there; nothing was committed")

    def crc32(self, filename: str) -> int:
        """A shard's CRC-32 as its writer computed it, so the output's record need not read the shard again."""
        path = self._record_path(filename)
        entry = self._entry(filename) or {}
        crc = entry.get("crc32")
        if not isinstance(crc, int) or isinstance(crc, bool):
            raise OutputError(f"{path}: the finished-shard record holds no CRC-32 for {filename}; nothing was "
                              "committed. Run again with --discard-partial")
        return crc


MAX_RECORD_BYTES = 1 << 20     # a ledger record is ~200 bytes
_CRC_PIECE_BYTES = 8 << 20


def read_remote_json(url: str) -> Optional[dict]:
    """A JSON object stored at `url`, or None when absent or not one (a transient failure raises OutputError)."""
    folder, name = location.parent_and_name(url)
    try:
        data = json.loads(location.at(folder, OutputError).read_small(name, MAX_RECORD_BYTES))
    except (FileNotFoundError, ValueError):
        return None
    except OSError as exc:
        raise OutputError(f"{url}: cannot read: {exc}") from None
    return data if isinstance(data, dict) else None


def _object_matches(folder: str, name: str, nbytes: int, crc32: Optional[int]) -> bool:
    """Object `name` in `folder` (a URL) is `nbytes` long and (unless `crc32` is None) has that CRC-32, its
    bytes read back with ranged GETs of _CRC_PIECE_BYTES."""
    where = location.at(folder, OutputError)
    entry = where.entry(name)
    if entry is None or entry.kind != location.FILE or entry.size != nbytes:
        return False
    if crc32 is None:
        return True
    crc = 0
    for offset in range(0, nbytes, _CRC_PIECE_BYTES):
        crc = zlib.crc32(where.read(name, offset, min(_CRC_PIECE_BYTES, nbytes - offset)), crc)
    return crc == crc32
