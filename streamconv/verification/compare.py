"""Check a converted folder against its checkpoint: `streamconv verify` and `convert --verify`.

Tensors are found by NAME in the output (its index and safetensors headers), so an output sharded in any way,
by any tool, can be checked; what each tensor must hold is decided by the same plan `convert` makes (names,
casts). Each one is compared by running the executor again with a `ComparingSink` aimed at the tensor's bytes
in the output: the source is read, cast and assembled exactly as when converting, and compared piece by piece
with the file. Memory is the executor's buffer plus one compare piece, whatever the sizes; one output file is open at a time.

Only a real difference is a finding (`OutputDiffersError`, exit 3). Not being able to read the output (EIO,
out of descriptors) raises its own error, and anything unexpected propagates as the bug it is.

Checks, each reported with the file and tensor it concerns:
* the folder: safetensors files present, named as transformers looks for them (`model.safetensors` alone, or
  `model-NNNNN-of-NNNNN.safetensors`); with several, an index that lists every file and nothing else;
* the index: a JSON object whose `weight_map` names each weight once, only files that exist, each weight in
  the file whose header holds it, every tensor of every file, and `metadata.total_size` = their bytes;
* each file: a regular file (a FIFO or device is named, never read), whose header follows the rules the
  safetensors library enforces (`safetensors_format.py`: no safetensors package needed), whose `__metadata__`
  is what streamconv writes, and which is exactly as long as its header says;
* each tensor: present (missing), planned (extra), dtype, shape, and bytes (the first differing element);
* the source: each chunk's CRC-32 (`source.integrity`), when asked.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import dtypes
from .. import safetensors_format as sf
from ..errors import CorruptChunkError, OutputError, VerificationError
from ..execution.executor import Executor
from ..fs.fastpaths import NONE, FastPaths
from ..fs import location
from ..fs.remote import is_url
from ..source.blob_reader import BlobReader
from ..model import BlobLocation, StoredTensor
from ..planning.plan import INDEX_FILE_NAME, SINGLE_FILE_NAME, ConversionPlan, TensorPlan, shard_filename
from ..output.sink import ComparingSink, Mismatch

MAX_INDEX_BYTES = 64 * 2**20       # an index for a 400B model is a few hundred KB
LIST_LIMIT = 10                    # problems of each kind spelled out in a message before "... and N more"


@dataclass(frozen=True)
class OutputTensor:
    """One tensor as a safetensors header describes it; begin/end are absolute offsets in the file."""

    name: str
    file: str
    dtype: str          # safetensors code, e.g. "BF16"
    shape: Tuple[int, ...]
    begin: int
    end: int


@dataclass
class VerifyResult:
    checkpoint: str
    output: str
    tensors_expected: int = 0
    tensors_equal: int = 0
    bytes_compared: int = 0                 # header bytes parsed + tensor bytes compared with the checkpoint
    files: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)          # planned, not in the output
    extra: List[dict] = field(default_factory=list)           # {name, file}: in the output, not planned
    differing: List[dict] = field(default_factory=list)       # {name, file, problem, element?, byte_offset?}
    file_problems: List[dict] = field(default_factory=list)   # {file, problem}
    index_problems: List[str] = field(default_factory=list)
    corrupt_chunks: List[dict] = field(default_factory=list)  # {file, tensor, begin, end, recorded, computed}
    crc_checked_chunks: int = 0
    crc_checked_bytes: int = 0
    crc_unrecorded_chunks: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    checked: List[str] = field(default_factory=list)          # what else was checked, in words (the record's)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differing or self.file_problems or self.index_problems
                    or self.corrupt_chunks)

    def problems(self) -> List[str]:
        """Every problem as one line, sources first."""
        lines = [f"{c['file']}: tensor {c['tensor']!r}: bytes [{c['begin']}, {c['end']}) fail their CRC-32 check "
                 f"(recorded {c['recorded']:08x}, computed {c['computed']:08x})" for c in self.corrupt_chunks]
        lines += [f"{p['file']}: {p['problem']}" for p in self.file_problems]
        lines += [f"index: {p}" for p in self.index_problems]
        lines += [f"missing: {name}" for name in self.missing]
        lines += [f"extra: {e['name']} in {e['file']} (not in the conversion plan)" for e in self.extra]
        lines += [f"differs: {d['name']} in {d['file']}: {d['problem']}" for d in self.differing]
        return lines

    def summary(self) -> str:
        counts = [(len(self.corrupt_chunks), "corrupt source chunk(s)"), (len(self.file_problems), "file problem(s)"),
                  (len(self.index_problems), "index problem(s)"), (len(self.missing), "missing tensor(s)"),
                  (len(self.extra), "extra tensor(s)"), (len(self.differing), "differing tensor(s)")]
        found = ", ".join(f"{n} {what}" for n, what in counts if n)
        lines = self.problems()
        shown = "; ".join(lines[:LIST_LIMIT]) + (f"; ... and {len(lines) - LIST_LIMIT} more" if len(lines) > LIST_LIMIT
                                                 else "")
        return f"{found}: {shown}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["seconds"] = round(self.seconds, 3)
        return d


class OutputDiffersError(VerificationError):
    """The output folder is not what the checkpoint converts to (exit 3). `result` says where."""

    def __init__(self, message: str, result: VerifyResult):
        super().__init__(message)
        self.result = result


class CorruptSourceError(CorruptChunkError):
    """Checkpoint chunks fail their CRC-32 (exit 2, as any bad checkpoint). `result` has the rest."""

    def __init__(self, message: str, result: VerifyResult):
        c = result.corrupt_chunks[0]
        super().__init__(message, file=c["file"], tensor=c["tensor"], begin=c["begin"], end=c["end"],
                         recorded=c["recorded"], computed=c["computed"])
        self.result = result


def raise_if_failed(result: VerifyResult, *, staged: bool = False) -> None:
    if result.ok:
        return
    where = "the output written" if staged else result.output
    tail = " Nothing was committed." if staged else ""
    if result.corrupt_chunks:
        raise CorruptSourceError(
            f"{result.checkpoint}: the checkpoint is corrupt: {result.summary()}. Restore the named .distcp "
            f"file(s) from a good copy.{tail}", result)
    hint = _dtype_hint(result)
    raise OutputDiffersError(f"{where} does not match {result.checkpoint}: {result.summary()}{hint}.{tail}", result)


def _dtype_hint(result: VerifyResult) -> str:
    if any(d["problem"].startswith("dtype") for d in result.differing):
        return " (pass verify the same --dtype, --rename, --include/--exclude and --config-from as convert)"
    if result.missing and result.extra:
        return " (pass verify the same naming options as convert: --rename, --config-from, --subtree)"
    return ""


# -- reading the output side ---------------------------------------------------------------------------------
# Every output-side file is opened as carefully as a checkpoint file (`infiles.open_regular`: a FIFO, device or
# socket is a finding, never read), read with a size cap, and closed before the next one is opened. What is
# wrong with the folder is a finding (exit 3); not being able to read it (EIO, out of descriptors) is not.


def _open_output(path: str, filename: str, result: VerifyResult, missing: str = "missing"):
    """A regular output file (or object) open for reading (`location.open_file`), or None with the problem
    recorded."""
    try:
        return location.open_file(path, error=VerificationError)
    except FileNotFoundError:
        result.file_problems.append({"file": filename, "problem": missing})
    except VerificationError as exc:
        result.file_problems.append({"file": filename, "problem": str(exc)})
    return None


def _pread_exact(file, length: int, offset: int, path: str) -> bytes:
    """Up to `length` bytes at `offset` (fewer only at the end of the file)."""
    parts, done = [], 0
    try:
        while done < length:
            block = file.pread(length - done, offset + done)
            if not block:
                break
            parts.append(block)
            done += len(block)
    except OSError as exc:
        raise OutputError(f"{path}: cannot read at offset {offset + done:,}: {exc.strerror or exc}") from None
    return b"".join(parts)


def _read_safetensors_header(fd, path: str) -> Tuple[int, Optional[sf.Header], Optional[str]]:
    """(file size, parsed header, problem that stopped the parse) of an open output file."""
    size = fd.size
    length, problem = sf.header_length(_pread_exact(fd, sf.LENGTH.size, 0, path), size)
    if problem:
        return size, None, problem
    text = _pread_exact(fd, length, sf.LENGTH.size, path)
    if len(text) != length:
        return size, None, f"header claims {length:,} bytes but the file ends after {len(text):,}"
    return size, sf.parse_header(text), None


def read_header(path: str) -> Tuple[int, Dict[str, dict]]:
    """(data section start, {name: entry}) of a safetensors file; ValueError/OSError with the reason."""
    fd = location.open_file(path, error=VerificationError)
    try:
        _, header, problem = _read_safetensors_header(fd, path)
    finally:
        fd.close()
    if problem or header.problems:
        raise ValueError(problem or "; ".join(header.problems))
    return header.data_start, {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                               for e in header.entries}


def _file_tensors(output_dir: str, filename: str, result: VerifyResult) -> Dict[str, OutputTensor]:
    path = location.at(output_dir).join(filename)
    fd = _open_output(path, filename, result)
    if fd is None:
        return {}
    try:
        size, header, problem = _read_safetensors_header(fd, path)
    finally:
        fd.close()
    if problem:
        result.file_problems.append({"file": filename, "problem": f"does not load as safetensors: {problem}"})
        return {}
    result.bytes_compared += header.data_start
    for problem in header.problems:
        result.file_problems.append({"file": filename, "problem": f"does not load as safetensors: {problem}"})
    if header.is_object and header.metadata != sf.WRITTEN_METADATA:
        result.file_problems.append({"file": filename, "problem": (
            f"header {sf.METADATA_KEY} is {sf.shown(header.metadata)}, streamconv writes {sf.WRITTEN_METADATA} "
            "(transformers refuses to load a file whose format is not 'pt'); convert again")})
    described = header.data_start + header.data_end
    if size != described:
        state = "truncated" if size < described else "longer than its header says"
        result.file_problems.append({"file": filename, "problem": f"{state}: {size} bytes, its header describes "
                                                                  f"{described}"})
    return {e.name: OutputTensor(e.name, filename, e.dtype, e.shape, header.data_start + e.begin,
                                 header.data_start + e.end) for e in header.entries}


def _read_index(output_dir: str, result: VerifyResult) -> Optional[Tuple[Optional[Dict[str, str]], object]]:
    """(weight_map, total_size); None when there is no index, (None, None) when it is unreadable (reported)."""
    path = location.at(output_dir).join(INDEX_FILE_NAME)
    if not (os.path.lexists(path) if not is_url(path) else location.at(output_dir).entry(INDEX_FILE_NAME)):
        return None
    fd = _open_output(path, INDEX_FILE_NAME, result, missing="a symlink to nothing")
    if fd is None:
        return None, None
    try:
        size = fd.size
        text = _pread_exact(fd, MAX_INDEX_BYTES + 1, 0, path) if size <= MAX_INDEX_BYTES else None
    finally:
        fd.close()
    try:
        if text is None or len(text) > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES} bytes")
        index = json.loads(text, object_pairs_hook=sf.unique_keys)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        result.index_problems.append(f"{INDEX_FILE_NAME} unreadable: {str(exc)[:300]}")
        return None, None
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    return weight_map, total


def scan_output(output_dir: str, result: VerifyResult) -> Dict[str, OutputTensor]:
    """Every tensor of the output folder by name, after the folder, index and header checks."""
    where = location.at(output_dir, VerificationError)
    if not where.is_dir():
        result.file_problems.append({"file": output_dir, "problem": "output folder does not exist"})
        return {}
    # Every name a loader would look at, whatever its type: a FIFO or a directory there is a finding.
    on_disk = sorted(f for f in where.names() if f.endswith(".safetensors"))
    indexed = _read_index(output_dir, result)
    files = list(on_disk)
    if indexed is None:
        if len(on_disk) > 1:
            result.index_problems.append(f"{len(on_disk)} safetensors files but no {INDEX_FILE_NAME}")
        elif not on_disk:
            result.file_problems.append({"file": output_dir, "problem": "holds no .safetensors file"})
    elif indexed[0] is not None:
        weight_map, _ = indexed
        listed = sorted(set(weight_map.values()))
        for name in listed:
            if name not in on_disk:
                result.file_problems.append({"file": name, "problem": "named in the index but missing"})
        for name in on_disk:
            if name not in listed:
                result.file_problems.append({"file": name, "problem": "not listed in the index"})
    result.files = files
    listed = set(indexed[0].values()) if indexed is not None and indexed[0] is not None else set()
    result.file_problems += _name_problems(on_disk, listed, indexed is not None)
    found: Dict[str, OutputTensor] = {}
    for filename in files:
        for name, tensor in _file_tensors(output_dir, filename, result).items():
            if name in found:
                result.index_problems.append(f"{name} is in both {found[name].file} and {filename}")
                continue
            found[name] = tensor
    if indexed is not None and indexed[0] is not None:
        weight_map, total = indexed
        for name, tensor in found.items():
            if name not in weight_map:
                result.index_problems.append(f"{name} is in {tensor.file} but not in the index")
            elif weight_map[name] != tensor.file:
                result.index_problems.append(f"{name} is in {tensor.file} but the index says {weight_map[name]}")
        for name, filename in weight_map.items():
            if name not in found and filename in on_disk:
                result.index_problems.append(f"the index puts {name} in {filename}, whose header does not hold it")
        nbytes = sum(t.end - t.begin for t in found.values())
        if weight_map and total != nbytes:
            result.index_problems.append(f"metadata.total_size is {total!r}; the tensors hold {nbytes} bytes")
    return found


_SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def _name_problems(on_disk: Sequence[str], listed: set, has_index: bool) -> List[dict]:
    """The folder's entry points: transformers opens `model.safetensors`, or the index and the files it lists.
    A renamed file loads as nothing, so names are checked as strictly as bytes: one file is
    SINGLE_FILE_NAME, several are model-NNNNN-of-NNNNN.safetensors with one total (what `plan` names them)."""
    if not has_index:
        if len(on_disk) == 1 and on_disk[0] != SINGLE_FILE_NAME:
            return [{"file": on_disk[0], "problem": f"a single-file output must be named {SINGLE_FILE_NAME} (the "
                                                     f"name transformers loads, with no {INDEX_FILE_NAME}); rename "
                                                     f"it to {SINGLE_FILE_NAME}"}]
        return []
    problems, totals = [], set()
    for name in sorted(set(on_disk) | listed):
        match = _SHARD_NAME.fullmatch(name)
        if match is None:
            problems.append({"file": name, "problem": f"not a shard name streamconv writes (expected "
                                                      f"{shard_filename(1, 2)} and so on); convert again"})
        else:
            totals.add(int(match.group(2)))
    if len(totals) > 1:
        problems.append({"file": INDEX_FILE_NAME, "problem": f"shards of different totals ({sorted(totals)}) in one "
                                                             "folder; convert again"})
    return problems


# -- comparing ---------------------------------------------------------------------------------------------


def _differs(t: TensorPlan, o: OutputTensor, problem: str, **extra) -> dict:
    return dict({"name": t.name, "file": o.file, "problem": problem}, **extra)


def _first_difference(t: TensorPlan, o: OutputTensor, byte_offset: int) -> dict:
    import numpy as np
    item = dtypes.BY_NAME[t.dst_dtype].itemsize
    element = (byte_offset - o.begin) // item
    where = [int(i) for i in np.unravel_index(element, t.shape)] if t.shape else []
    return _differs(t, o, f"bytes differ from the checkpoint, first at element {where} (flat {element}, "
                          f"file byte {byte_offset})", element=where, flat_element=element, byte_offset=byte_offset)


def compare_tensors(conversion: ConversionPlan, found: Dict[str, OutputTensor], reader: BlobReader,
                    stored: Dict[BlobLocation, StoredTensor], output_dir: str, result: VerifyResult, *,
                    buffer_bytes: int, integrity=None, progress=None, fast: FastPaths = NONE) -> None:
    """Every planned tensor against the output's bytes; problems go to `result`."""
    executor = Executor(reader, stored, buffer_bytes, progress=progress, integrity=integrity)
    planned = {t.name: t for t in conversion.tensors}
    result.tensors_expected = len(planned)
    result.missing = [name for name in planned if name not in found]
    result.extra = [{"name": o.name, "file": o.file} for o in found.values() if o.name not in planned]
    sink: Optional[ComparingSink] = None       # one file open at a time: each is closed as the scan leaves it
    corrupt: set = set()
    todo = sorted((found[n] for n in planned if n in found), key=lambda o: (o.file, o.begin))
    try:
        for o in todo:
            t = planned[o.name]
            want = dtypes.BY_NAME[t.dst_dtype].safetensors
            if o.dtype != want:
                result.differing.append(_differs(t, o, f"dtype {o.dtype}, expected {want}"))
            elif o.shape != tuple(t.shape):
                result.differing.append(_differs(t, o, f"shape {list(o.shape)}, expected {list(t.shape)}"))
            elif o.end - o.begin != t.nbytes:
                result.differing.append(_differs(t, o, f"{o.end - o.begin} bytes, expected {t.nbytes}"))
            else:
                if sink is None or sink.path != location.at(output_dir).join(o.file):
                    if sink is not None:
                        sink.close()
                        sink = None
                    sink = ComparingSink(location.at(output_dir).join(o.file), fast=fast)
                before = sink.compared
                try:
                    executor.write_tensor(dataclasses.replace(t, begin=o.begin), sink)
                except Mismatch as exc:
                    result.differing.append(_first_difference(t, o, exc.offset))
                    continue
                except CorruptChunkError as exc:
                    if (exc.file, exc.begin) not in corrupt:
                        corrupt.add((exc.file, exc.begin))
                        result.corrupt_chunks.append({"file": exc.file, "tensor": exc.tensor, "begin": exc.begin,
                                                      "end": exc.end, "recorded": exc.recorded,
                                                      "computed": exc.computed})
                    continue
                finally:
                    result.bytes_compared += sink.compared - before
                result.tensors_equal += 1
    finally:
        if sink is not None:
            sink.close()
    if integrity is not None:
        result.crc_checked_chunks = integrity.checked_chunks
        result.crc_checked_bytes = integrity.checked_bytes
        result.crc_unrecorded_chunks = len(integrity.unrecorded)


def check_tied(heads: Sequence[Tuple[TensorPlan, str]], conversion: ConversionPlan,
               found: Dict[str, OutputTensor], executor: Executor, output_dir: str, result: VerifyResult, *,
               fast: FastPaths = NONE) -> None:
    """Each dropped tied head (its source plan, its embedding's output name) must equal the embedding as
    written, as `convert` checked before dropping it."""
    from ..hf.tied import verify_tied
    planned = {t.name: t for t in conversion.tensors}
    bad = {d["name"] for d in result.differing}
    for head, embedding in heads:
        o = found.get(embedding)
        if o is None or embedding in bad or embedding not in planned:
            continue        # already reported
        try:
            result.bytes_compared += verify_tied(executor, head, dataclasses.replace(planned[embedding], begin=o.begin),
                                                 location.at(output_dir).join(o.file), fast=fast)
        except VerificationError as exc:
            result.differing.append({"name": head.name, "file": o.file, "problem": str(exc)})


def verify_output(conversion: ConversionPlan, reader: BlobReader, stored: Dict[BlobLocation, StoredTensor],
                  output_dir: str, *, buffer_bytes: int, checkpoint: str = "", integrity=None,
                  progress=None, tied_heads: Sequence[Tuple[TensorPlan, str]] = (), fast: FastPaths = NONE
                  ) -> VerifyResult:
    """Everything above, for one output folder; never raises for a finding (see `raise_if_failed`).
    `tied_heads`: (head plan, embedding name) for heads dropped as tied duplicates, checked equal."""
    result = VerifyResult(checkpoint=checkpoint, output=location.absolute(output_dir))
    found = scan_output(output_dir, result)
    compare_tensors(conversion, found, reader, stored, output_dir, result, buffer_bytes=buffer_bytes,
                    integrity=integrity, progress=progress, fast=fast)
    if tied_heads:
        executor = Executor(reader, stored, buffer_bytes, progress=progress, integrity=integrity)
        check_tied(tied_heads, conversion, found, executor, output_dir, result, fast=fast)
    return result

