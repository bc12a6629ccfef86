"""Many checkpoints: `streamconv batch` and `streamconv.convert_many`.

    convert_many(["runs/*/checkpoint-*"], "hf/{parent}-{step}", ConvertOptions(dtype="bfloat16"), jobs=2)

Every checkpoint is planned first in this process (reading `.metadata` only), which gives three things before
any byte moves: the output's exact file sizes and headers, so an output that is already complete is skipped;
the predicted peak memory, so parallel jobs stay within `max_memory`; and early errors for bad options.

Then each checkpoint is converted by `api.convert(..., resume=True)` in a process of its own (forked from a
forkserver that has streamconv imported, so a job starts in milliseconds): a crash, an out-of-memory kill or a
bad checkpoint fails that checkpoint only, and each job's peak RSS is its own. An interrupted job's staging
folder is resumed shard by shard by the next run. With `ray` each checkpoint's shards are written by Ray tasks
instead (`ray_runner`), the driver still planning and committing.

Whether a finished output "matches" is decided without any stamp file, so output folders stay exactly what
Hugging Face expects: every planned shard must exist with its planned size and begin with its planned
safetensors header (which fixes every tensor's name, dtype, shape and byte range), and the index must equal
the planned one. Tensor bytes are not re-read (`streamconv verify` does that).
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import queue as queue_module
import re
import string
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from . import api
from .errors import OptionsError, StreamconvError
from .names import natural_key
from .options import ConvertOptions
from .plan import INDEX_FILE_NAME, ConversionPlan
from .report import Reporter
from .sizes import format_size, parse_size

TEMPLATE_FIELDS = ("name", "parent", "step")
# Progress from a job is sent at most this often (bytes), so the queue carries a few hundred messages per GB.
_PROGRESS_STEP_BYTES = 4 << 20


@dataclass
class BatchItem:
    source: str
    output: str
    status: str = "pending"         # converted, resumed, skipped, failed
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    predicted_peak_bytes: int = 0
    error: Optional[str] = None
    kind: Optional[str] = None
    exit_code: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 and self.status != "skipped" else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), seconds=round(self.seconds, 3), mb_per_s=round(self.mb_per_s, 1))


@dataclass
class BatchReport:
    items: List[BatchItem]
    seconds: float
    jobs: int
    max_memory_bytes: Optional[int]
    planning_seconds: float = 0.0   # reading every `.metadata` and planning, in the driver

    @property
    def failed(self) -> List[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    def to_dict(self) -> dict:
        counts: Dict[str, int] = {}
        for i in self.items:
            counts[i.status] = counts.get(i.status, 0) + 1
        return {"checkpoints": [i.to_dict() for i in self.items], "counts": counts,
                "seconds": round(self.seconds, 3), "planning_seconds": round(self.planning_seconds, 3),
                "jobs": self.jobs, "max_memory_bytes": self.max_memory_bytes,
                "bytes": sum(i.bytes for i in self.items if i.status in ("converted", "resumed"))}


# -- which checkpoints, which outputs -----------------------------------------------------------------

def expand_sources(sources: Sequence[str], from_file: Optional[str] = None) -> List[str]:
    """Folders and globs (`runs/*/checkpoint-*`, naturally sorted), plus the lines of `from_file` (blank lines
    and `#` comments skipped); each folder once. A glob matching nothing is an error: it is usually a typo."""
    patterns = list(sources)
    if from_file is not None:
        patterns += _list_file_lines(from_file)
    out: List[str] = []
    seen = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted((m for m in glob.glob(pattern) if os.path.isdir(m)), key=natural_key)
            if not matches:
                raise OptionsError(f"{pattern}: matches no folder")
        else:
            matches = [pattern]
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                out.append(m)
    if not out:
        raise OptionsError("no checkpoints given: name folders or globs, or --from-file LIST")
    return out


def _list_file_lines(from_file: str) -> List[str]:
    """The entries of a --from-file list. Each line is decoded as the shell decodes arguments (os.fsdecode:
    a folder whose name is not valid UTF-8 still works), a leading UTF-8 BOM and CRLF endings (lists written
    on Windows) are dropped; a file holding NUL bytes is not a list (e.g. a checkpoint file passed by mistake)."""
    try:
        with open(from_file, "rb") as f:
            data = f.read(_MAX_LIST_BYTES + 1)
    except OSError as exc:
        raise OptionsError(f"--from-file {from_file}: cannot read: {exc.strerror}") from None
    if len(data) > _MAX_LIST_BYTES or b"\0" in data:
        raise OptionsError(f"--from-file {from_file}: not a list of folders (binary data or over "
                           f"{_MAX_LIST_BYTES // 2**20} MiB); give a text file with one folder or glob a line")
    lines = (os.fsdecode(raw).strip() for raw in data.removeprefix(b"\xef\xbb\xbf").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


_MAX_LIST_BYTES = 16 << 20      # far more than any list of checkpoint folders


def output_for(template: str, source: str) -> str:
    """Fill `template` for one checkpoint folder: {name} its folder name, {parent} the folder above, {step} the
    digits at the end of its name (checkpoint-2000 -> 2000)."""
    path = os.path.abspath(source).rstrip(os.sep)
    name = os.path.basename(path)
    digits = re.search(r"(\d+)$", name)
    values = {"name": name, "parent": os.path.basename(os.path.dirname(path)),
              "step": digits.group(1) if digits else None}
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise OptionsError(f"--output-template {template!r}: {exc}") from None
    unknown = used - set(TEMPLATE_FIELDS)
    if unknown:
        raise OptionsError(f"--output-template {template!r}: unknown field(s) {', '.join(sorted(unknown))}; "
                           f"use {{name}}, {{parent}} or {{step}}")
    if not used:
        raise OptionsError(f"--output-template {template!r} names every checkpoint's output the same; "
                           "use {name}, {parent} or {step} in it")
    if "step" in used and values["step"] is None:
        raise OptionsError(f"{source}: --output-template uses {{step}} but the folder name {name!r} does not end "
                           "in digits")
    return template.format(**values)


def matches_plan(conversion: ConversionPlan, output_dir: str) -> bool:
    """Whether `output_dir` holds the planned output: every shard with its size and header, and the index
    (see the module docstring for why no stamp file)."""
    for shard in conversion.shards:
        path = os.path.join(output_dir, shard.filename)
        try:
            if os.path.getsize(path) != shard.nbytes:
                return False
            with open(path, "rb") as f:
                if f.read(len(shard.header)) != shard.header:
                    return False
        except OSError:
            return False
    index = conversion.index()
    if index is None:
        return True
    try:
        with open(os.path.join(output_dir, INDEX_FILE_NAME), encoding="utf-8") as f:
            return json.load(f) == index
    except (OSError, ValueError):
        return False


# -- one job (in its own process) -----------------------------------------------------------------------

class _QueueReporter(Reporter):
    """Forwards a job's progress to the batch's one display, a few MB at a time."""

    def __init__(self, index: int, queue):
        self.index, self.queue, self.pending = index, queue, 0

    def advance(self, n_bytes: int) -> None:
        self.pending += n_bytes
        if self.pending >= _PROGRESS_STEP_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.queue.put(("progress", self.index, self.pending))
            self.pending = 0


def convert_one(source: str, output: str, options: ConvertOptions, *, workers: int = api.DEFAULT_WORKERS,
                crc: Optional[bool] = None, verify: bool = False, overwrite: bool = False,
                reporter: Optional[Reporter] = None, shard_runner=None) -> dict:
    """Convert one checkpoint of a batch, resuming its staging folder; never raises a StreamconvError:
    the result dict says what happened (BatchItem fields)."""
    started = time.perf_counter()
    try:
        report = api.convert(source, output, options, overwrite=overwrite, reporter=reporter, workers=workers,
                             verify=verify, crc=crc, resume=True, shard_runner=shard_runner)
    except StreamconvError as exc:
        return {"status": "failed", "error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code,
                "seconds": time.perf_counter() - started}
    except Exception as exc:     # one checkpoint's bug must not end the batch; reported like the CLI does
        return {"status": "failed", "error": f"internal error ({type(exc).__name__}: {exc})"[:500],
                "kind": "InternalError", "exit_code": 1, "seconds": time.perf_counter() - started}
    resumed = any(n.startswith("resumed:") for n in report.notes)
    return {"status": "resumed" if resumed else "converted", "bytes": report.bytes_written,
            "seconds": report.seconds, "peak_rss_bytes": report.peak_rss_bytes, "notes": report.notes}


def _child(index: int, source: str, output: str, options: ConvertOptions, kwargs: dict, queue) -> None:
    reporter = _QueueReporter(index, queue)
    try:
        result = convert_one(source, output, options, reporter=reporter, **kwargs)
    except KeyboardInterrupt:   # Ctrl-C reaches the whole process group: the driver reports it, once
        return
    reporter.flush()
    queue.put(("done", index, result))


# -- the batch ------------------------------------------------------------------------------------------

def default_jobs(outputs: Sequence[str]) -> int:
    """One job per output device: one conversion already keeps a disk busy (README: Many checkpoints)."""
    devices = set()
    for out in outputs:
        probe = os.path.abspath(out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        devices.add(os.stat(probe).st_dev)
    return max(1, len(devices))


_context = None


def _mp_context():
    """A forkserver with streamconv imported: each job is a fork of a small, clean process (no threads, no
    tqdm, no parent state), started in milliseconds."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["streamconv.api"])
    return _context


def convert_many(sources: Sequence[str], output_template: str, options: Optional[ConvertOptions] = None, *,
                 from_file: Optional[str] = None, jobs: Optional[int] = None, max_memory: Optional[str] = None,
                 workers: int = api.DEFAULT_WORKERS, crc: Optional[bool] = None, verify: bool = False,
                 overwrite: bool = False, reporter: Optional[Reporter] = None, ray: Optional[str] = None,
                 **keywords) -> BatchReport:
    """Convert every checkpoint in `sources` (folders or globs) into `output_template` filled per checkpoint.
    Complete matching outputs are skipped, interrupted ones resumed; a failed checkpoint does not stop the
    others (see `BatchReport.failed`). `jobs` checkpoints convert side by side (default: one per output
    device) while the sum of their predicted peaks stays within `max_memory` ("8GiB"). `ray`: run each
    checkpoint's shards as Ray tasks ("" or "local": a local cluster; else the address of one).
    `keywords` are `ConvertOptions` fields, instead of `options`."""
    if options is None:
        options = ConvertOptions(**keywords)
    elif keywords:
        raise OptionsError(f"options given twice: pass either options or the keyword(s) {', '.join(sorted(keywords))}")
    reporter = reporter or Reporter()
    started = time.perf_counter()
    max_memory_bytes = parse_size(max_memory, option="--max-memory") if max_memory is not None else None
    items = [BatchItem(source=s, output=output_for(output_template, s)) for s in expand_sources(sources, from_file)]
    _refuse_shared_outputs(items)
    todo = _plan_all(items, options, overwrite, max_memory_bytes)
    planning_seconds = time.perf_counter() - started
    jobs = jobs or default_jobs([i.output for i in items])
    total = sum(i.bytes for i in todo) * (2 if verify else 1)     # --verify reads every byte back
    reporter.start(total, f"{len(todo)} of {len(items)} checkpoint(s)")
    kwargs = dict(workers=workers, crc=crc, verify=verify, overwrite=overwrite)
    if ray is not None:
        from . import ray_runner
        ray_runner.run_batch(todo, options, kwargs, address=ray, jobs=jobs, reporter=reporter)
    else:
        _run_local(todo, options, kwargs, jobs, max_memory_bytes, reporter)
    reporter.close()
    return BatchReport(items=items, seconds=time.perf_counter() - started, jobs=jobs,
                       max_memory_bytes=max_memory_bytes, planning_seconds=planning_seconds)


def _refuse_shared_outputs(items: Sequence[BatchItem]) -> None:
    seen: Dict[str, str] = {}
    for i in items:
        key = os.path.abspath(i.output)
        if key in seen:
            raise OptionsError(f"--output-template gives {i.source} and {seen[key]} the same output {i.output}; "
                               "add {parent} or {step} to it")
        seen[key] = i.source


def _plan_all(items: Sequence[BatchItem], options: ConvertOptions, overwrite: bool,
              max_memory_bytes: Optional[int]) -> List[BatchItem]:
    """Plan every checkpoint: skip complete outputs, fail the unplannable and the too large, return the rest."""
    todo = []
    for item in items:
        try:
            conversion = api.plan(item.source, options)
        except StreamconvError as exc:
            item.status, item.error, item.kind, item.exit_code = "failed", str(exc), type(exc).__name__, exc.exit_code
            continue
        item.predicted_peak_bytes = conversion.peak_bytes
        item.bytes = conversion.files_nbytes
        if not overwrite and matches_plan(conversion, item.output):
            item.status = "skipped"
            item.notes.append("output complete and matching its plan (sizes, headers, index)")
            continue
        if max_memory_bytes is not None and conversion.peak_bytes > max_memory_bytes:
            item.status, item.kind, item.exit_code = "failed", "OptionsError", OptionsError.exit_code
            item.error = (f"{item.source}: predicted peak memory {format_size(conversion.peak_bytes)} exceeds "
                          f"--max-memory {format_size(max_memory_bytes)}; raise it or lower --buffer-size")
            continue
        todo.append(item)
    return todo


def _run_local(todo: List[BatchItem], options: ConvertOptions, kwargs: dict, jobs: int,
               max_memory_bytes: Optional[int], reporter: Reporter) -> None:
    """Start jobs while fewer than `jobs` run and their predicted peaks fit `max_memory_bytes`; collect
    progress and results from one queue; a job that dies without a result fails its checkpoint only."""
    ctx = _mp_context()
    queue = ctx.Queue()
    pending = list(enumerate(todo))
    running: Dict[int, tuple] = {}      # index -> (process, started, seen dead at)
    try:
        while pending or running:
            in_use = sum(todo[i].predicted_peak_bytes for i in running)
            while pending and len(running) < jobs:
                index, item = pending[0]
                if running and max_memory_bytes is not None and in_use + item.predicted_peak_bytes > max_memory_bytes:
                    break       # waits for memory; alone it always fits (checked while planning)
                pending.pop(0)
                proc = ctx.Process(target=_child, args=(index, item.source, item.output, options, kwargs, queue),
                                   name=f"streamconv-batch-{index}", daemon=True)
                proc.start()
                running[index] = (proc, time.perf_counter(), None)
                in_use += item.predicted_peak_bytes
                reporter.note(f"started {item.source} -> {item.output}")
            _collect(queue, todo, running, reporter, timeout_s=0.2)
    except BaseException:
        for proc, _, _ in running.values():
            proc.terminate()    # SIGTERM: each job ends like an interrupted convert (staging kept: resume)
        for proc, _, _ in running.values():
            proc.join()
        raise


def _collect(queue, todo: List[BatchItem], running: Dict[int, tuple], reporter: Reporter, timeout_s: float) -> None:
    try:
        message = queue.get(timeout=timeout_s)
    except queue_module.Empty:
        message = None
    while message is not None:
        kind, index, value = message
        if kind == "progress":
            reporter.advance(value)
        else:
            _finish(todo[index], value, reporter)
            running.pop(index)[0].join()
        try:
            message = queue.get_nowait()
        except queue_module.Empty:
            message = None
    now = time.perf_counter()
    for index, entry in list(running.items()):
        proc, started, dead_since = entry
        if proc.is_alive():
            continue
        if dead_since is None:      # its last messages may still be in the pipe: look again next round
            running[index] = (proc, started, now)
            continue
        if now - dead_since < 1.0:
            continue
        running.pop(index)
        code = proc.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        _finish(todo[index], {"status": "failed", "kind": "WorkerDied", "exit_code": 1, "seconds": now - started,
                              "error": f"{todo[index].source}: the conversion process died ({how}); its staging "
                                       "folder is kept and the next run resumes it"}, reporter)


def _finish(item: BatchItem, result: dict, reporter: Reporter) -> None:
    for key, value in result.items():
        setattr(item, key, value)
    if item.status == "failed":
        reporter.note(f"failed {item.source}: {item.error}")
    else:
        reporter.note(f"{item.status} {item.source} -> {item.output} ({format_size(item.bytes)} in "
                      f"{item.seconds:.1f} s)")
