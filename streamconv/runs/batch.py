"""Many checkpoints: `streamconv batch` and `streamconv.convert_many`.

    convert_many(["runs/*/checkpoint-*"], "hf/{parent}-{step}", ConvertOptions(dtype="bfloat16"), jobs=2)

Every checkpoint is planned first in this process (reading `.metadata` only), which gives three things before
any byte moves: the output's exact file sizes and headers, so an output that is already complete is skipped;
the predicted peak memory, so parallel jobs stay within `max_memory`; and early errors for bad options.

Then each checkpoint is converted by `conversion.convert` (resuming) in a process of its own (a fresh Python
running `batch_job`, which never imports the caller's `__main__`, and dies with this driver): a crash, an
out-of-memory kill or a bad checkpoint fails that checkpoint only, and each job's peak RSS is its own. An
interrupted job's staging folder is resumed shard by shard by the next run. With `ray` each checkpoint's
shards are written by Ray tasks instead (`ray_runner`), the driver still planning and committing.

An output is skipped only when it is already this conversion: its record (`streamconv.json`, record.py) names
the same plan and the same checkpoint content (`preparing.already_converted`), so a checkpoint re-saved in place or a
second run converted with the same template is not mistaken for one already converted (its output is refused,
or replaced with --overwrite). Tensor bytes are not re-read (`streamconv verify` does that).
"""
from __future__ import annotations

import glob
import json
import os
import queue as queue_module
import re
import string
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from . import batch_job
from ..errors import OptionsError, ResourceError, StreamconvError
from ..planning.names import natural_key
from ..planning.options import ConvertOptions
from ..planning.plan import with_io_step_each, with_verify_pass
from ..fs import location
from ..fs.paths import user_path
from ..fs.remote import is_url
from ..output.record import RECORD_FILE
from ..fs.cpus import available_cpus
from ..planning.options import DEFAULT_WORKERS
from ..source import flavors
from .preparing import Request, already_converted, dry_run
from .report import Reporter
from ..sizes import format_size, parse_size

TEMPLATE_FIELDS = ("name", "parent", "step")


@dataclass
class BatchItem:
    source: str
    output: str
    status: str = "pending"         # converted, resumed, skipped, failed
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    task_peak_rss_bytes: int = 0    # --ray: the largest peak RSS of its shard tasks' processes
    predicted_peak_bytes: int = 0
    error: Optional[str] = None
    kind: Optional[str] = None
    exit_code: int = 0
    notes: List[str] = field(default_factory=list)
    workers: Optional[int] = None   # the writer threads its job runs (chosen while planning)

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
    notes: List[str] = field(default_factory=list)      # about the batch as a whole (folders left out)

    @property
    def failed(self) -> List[BatchItem]:
        return [i for i in self.items if i.status == "failed"]

    def to_dict(self) -> dict:
        counts: Dict[str, int] = {}
        for i in self.items:
            counts[i.status] = counts.get(i.status, 0) + 1
        return {"checkpoints": [i.to_dict() for i in self.items], "counts": counts,
                "seconds": round(self.seconds, 3), "planning_seconds": round(self.planning_seconds, 3),
                "jobs": self.jobs, "max_memory_bytes": self.max_memory_bytes, "notes": self.notes,
                "bytes": sum(i.bytes for i in self.items if i.status in ("converted", "resumed"))}


# -- which checkpoints, which outputs -----------------------------------------------------------------

def expand_sources(sources: Sequence[str], from_file: Optional[str] = None,
                   notes: Optional[List[str]] = None) -> List[str]:
    """Folders and globs (`runs/*/checkpoint-*`, naturally sorted), plus the lines of `from_file` (blank lines
    and `#` comments skipped); each folder once. A glob matching nothing is an error: it is usually a typo.
    A folder a glob matches that is a converted output (`looks_like_output`) is left out, with a note in
    `notes`: `runs/*` with outputs in `runs/{name}-hf` must not take last run's outputs for checkpoints."""
    patterns = [user_path(s, "a batch source") for s in sources]
    if from_file is not None:
        patterns += _list_file_lines(user_path(from_file, "--from-file"))
    out: List[str] = []
    seen = set()
    for pattern in patterns:
        if glob.has_magic(pattern):
            folders = sorted(location.glob_folders(pattern), key=natural_key)
            if not folders:
                raise OptionsError(f"{pattern}: matches no folder")
            matches = [m for m in folders if not looks_like_output(m)]
            if notes is not None:
                notes += [f"left out {m}: it is a converted output, not a checkpoint" for m in folders
                          if m not in matches]
            if not matches:
                raise OptionsError(f"{pattern}: matches only converted outputs ({', '.join(folders[:3])}"
                                   f"{' ...' if len(folders) > 3 else ''}), no checkpoint")
        else:
            matches = [pattern]
        for m in matches:
            key = m.rstrip("/") if is_url(m) else os.path.realpath(m)
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


# Names of the files a conversion writes at the top of its output folder (hf_shards reads `shard-*` files:
# a per-rank Hugging Face checkpoint is a source, not an output).
_OUTPUT_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


def looks_like_output(folder: str) -> bool:
    """Whether `folder` is a converted output rather than a checkpoint: it holds streamconv's output record,
    or model safetensors (`model.safetensors`, `model-0000N-of-0000M.safetensors`, the index) with no
    `.metadata` and no sub-folder (a run folder with an exported model beside its DCP folder stays a source)."""
    if is_url(folder):
        return _looks_like_remote_output(folder)
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        return False
    names = {e.name for e in entries}
    if RECORD_FILE in names:
        return True
    if flavors.is_checkpoint_folder(folder):
        return False
    if any(e.is_dir(follow_symlinks=False) and not e.name.startswith(".") for e in entries):
        return False
    return any(_OUTPUT_FILE.match(n) for n in names)


def _looks_like_remote_output(folder: str) -> bool:
    """`looks_like_output` for a prefix in object storage (no symlinks there)."""
    where = location.at(folder)
    try:
        names = set(where.names())
    except OSError:
        return False
    if RECORD_FILE in names:
        return True
    if flavors.is_checkpoint_folder(folder):
        return False
    if any(not n.startswith(".") and (where.entry(n) or location.Entry(location.FILE, 0, ())).kind
           == location.DIRECTORY for n in names):
        return False
    return any(_OUTPUT_FILE.match(n) for n in names)


def output_for(template: str, source: str) -> str:
    """Fill `template` for one checkpoint folder: {name} its folder name, {parent} the folder above, {step} the
    digits at the end of its name (checkpoint-2000 -> 2000)."""
    template = user_path(template, "--output-template")
    path = location.absolute(source).rstrip("/" if is_url(source) else os.sep)
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
    return user_path(template.format(**values), f"--output-template {template!r} for {source}")




# -- the batch ------------------------------------------------------------------------------------------

def default_jobs(outputs: Sequence[str]) -> int:
    """One job per output device: one conversion already keeps a disk busy (README: Many checkpoints)."""
    devices = set()
    for out in outputs:
        if is_url(out):     # a bucket: one job per bucket, as per disk
            devices.add(out.partition("://")[2].partition("/")[0])
            continue
        probe = os.path.abspath(out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        devices.add(os.stat(probe).st_dev)
    return max(1, len(devices))


def convert_many(sources: Sequence[str], output_template: str, options: Optional[ConvertOptions] = None, *,
                 from_file: Optional[str] = None, jobs: Optional[int] = None, max_memory: Optional[str] = None,
                 workers: Optional[int] = DEFAULT_WORKERS, crc: Optional[bool] = None, verify: bool = False,
                 overwrite: bool = False, reporter: Optional[Reporter] = None, ray: Optional[str] = None,
                 overwrite_any: bool = False, discard_partial: bool = False, **keywords) -> BatchReport:
    """Convert every checkpoint in `sources` (folders or globs) into `output_template` filled per checkpoint.
    Complete matching outputs are skipped, interrupted ones resumed; a failed checkpoint does not stop the
    others (see `BatchReport.failed`). `jobs` checkpoints convert side by side (default: one per output
    device) while the sum of their predicted peaks stays within `max_memory` ("8GiB"). `ray`: run each
    checkpoint's shards as Ray tasks ("" or "local": a local cluster; else the address of one).
    `discard_partial`: an interrupted checkpoint's staging folder is deleted and the checkpoint converted from
    the start, instead of resumed (for a staging folder that cannot be resumed: other options, another version).
    `keywords` are `ConvertOptions` fields, instead of `options`."""
    if options is None:
        options = ConvertOptions(**keywords)
    elif keywords:
        raise OptionsError(f"options given twice: pass either options or the keyword(s) {', '.join(sorted(keywords))}")
    reporter = reporter or Reporter()
    started = time.perf_counter()
    max_memory_bytes = parse_size(max_memory, option="--max-memory") if max_memory is not None else None
    notes: List[str] = []
    items = [BatchItem(source=s, output=output_for(output_template, s))
             for s in expand_sources(sources, from_file, notes)]
    _refuse_shared_outputs(items, output_template)
    if ray is not None:     # an address nobody listens on fails now, not after planning and minutes of retries
        from . import ray_runner
        ray_runner.probe(ray)
    jobs = jobs or default_jobs([i.output for i in items])
    # Jobs run side by side: with no --workers, each chooses its writers from its share of the CPUs, so N jobs
    # do not start N times as many decoder threads as there are cores.
    cpus_per_job = available_cpus() / min(jobs, max(1, len(items)))
    todo = _plan_all(items, options, overwrite or overwrite_any, max_memory_bytes, workers, cpus_per_job, verify)
    planning_seconds = time.perf_counter() - started
    total = sum(i.bytes for i in todo) * (2 if verify else 1)     # --verify reads every byte back
    reporter.start(total, f"{len(todo)} of {len(items)} checkpoint(s)")
    for note in notes:
        reporter.note(note)
    kwargs = dict(workers=workers, crc=crc, verify=verify, overwrite=overwrite, overwrite_any=overwrite_any,
                  discard_partial=discard_partial)
    if ray is not None:
        from . import ray_runner
        ray_runner.run_batch(todo, options, kwargs, address=ray, jobs=jobs, reporter=reporter, finish=_finish)
    else:
        _run_local(todo, options, kwargs, jobs, max_memory_bytes, reporter)
    reporter.close()
    return BatchReport(items=items, seconds=time.perf_counter() - started, jobs=jobs,
                       max_memory_bytes=max_memory_bytes, planning_seconds=planning_seconds, notes=notes)


def output_identity(path: str) -> tuple:
    """What folder `path` is, not how it is spelt: symlinks resolved, then the (st_dev, st_ino) of the folder
    or of its nearest existing ancestor plus the names still to be created below it. Two outputs aliased by a
    symlink or a bind mount get the same identity; two paths into one folder yet to be made do too."""
    if is_url(path):        # a prefix is what its URL says (no symlinks in a bucket)
        return (path.rstrip("/"),)
    probe, rest = os.path.realpath(path), []
    while True:
        try:
            st = os.stat(probe)
            return (st.st_dev, st.st_ino) + tuple(reversed(rest))
        except FileNotFoundError:
            parent = os.path.dirname(probe)
            if parent == probe:
                return (probe,) + tuple(reversed(rest))
            rest.append(os.path.basename(probe))
            probe = parent
        except OSError:
            return (probe,) + tuple(reversed(rest))


def _refuse_shared_outputs(items: Sequence[BatchItem], template: str) -> None:
    """Two checkpoints must never write one folder (the second would replace or resume the first's): compared
    by identity, so `hf/a` and `hf/b -> a` (a symlink, a bind mount) collide too. Refused before any write."""
    seen: Dict[tuple, BatchItem] = {}
    for i in items:
        key = output_identity(i.output)
        if key in seen:
            first = seen[key]
            same = "the same output" if os.path.abspath(first.output) == os.path.abspath(i.output) else \
                f"outputs that are one folder ({first.output} and {i.output}, through a symbolic link or a mount)"
            raise OptionsError(f"--output-template {template!r} gives {first.source} and {i.source} {same}; "
                               f"{_suggest_template(template, [x.source for x in items])}")
        seen[key] = i


def _suggest_template(template: str, sources: Sequence[str]) -> str:
    """Advice that works: a template built from `template` that gives every source its own output, if one of
    the usual fixes does (checkpoint-1 of runs a and b: add {parent}, the run's folder)."""
    head, tail = os.path.split(template)
    candidates = [os.path.join(head, "{parent}", tail), template.replace("{step}", "{parent}-{step}", 1),
                  template.replace("{parent}", "{parent}/{name}", 1)]
    for candidate in candidates:
        if candidate == template:
            continue
        try:
            outputs = [os.path.abspath(output_for(candidate, s)) for s in sources]
        except OptionsError:
            continue
        if len(set(outputs)) == len(outputs):
            return f"use e.g. --output-template {candidate!r}"
    return "use {name}, {parent} and {step} so that each checkpoint gets its own folder"


def _plan_all(items: Sequence[BatchItem], options: ConvertOptions, overwrite: bool,
              max_memory_bytes: Optional[int], workers: Optional[int], cpus_per_job: float,
              verify: bool) -> List[BatchItem]:
    """Plan every checkpoint: skip complete outputs, fail the unplannable and the too large, return the rest,
    each with the writer count its job runs (`workers`, or chosen from `cpus_per_job`) and its predicted peak
    (with --verify, reading the output back: as the job's own conversion will count it)."""
    todo = []
    for item in items:
        try:
            conversion = dry_run(item.source, Request(options), workers=workers, cpus=cpus_per_job)
            if verify:
                conversion = with_verify_pass(with_io_step_each(conversion, conversion.workers), None)
        except StreamconvError as exc:
            item.status, item.error, item.kind, item.exit_code = "failed", str(exc), type(exc).__name__, exc.exit_code
            continue
        item.predicted_peak_bytes = conversion.peak_bytes
        item.bytes = conversion.files_nbytes
        item.workers = conversion.workers
        try:
            done = not overwrite and already_converted(item.source, item.output, Request(options))
        except StreamconvError as exc:
            item.status, item.error, item.kind, item.exit_code = "failed", str(exc), type(exc).__name__, exc.exit_code
            continue
        if done:
            item.status = "skipped"
            item.notes.append("already converted: its record names this checkpoint's content and the same plan")
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
    """Start jobs (`batch_job`, one process each) while fewer than `jobs` run and their predicted peaks fit
    `max_memory_bytes`; collect progress and results from one queue; a job that dies without a result fails
    its checkpoint only."""
    messages: "queue_module.Queue" = queue_module.Queue()
    pending = list(enumerate(todo))
    running: Dict[int, _Job] = {}
    try:
        while pending or running:
            in_use = sum(todo[i].predicted_peak_bytes for i in running)
            while pending and len(running) < jobs:
                index, item = pending[0]
                if running and max_memory_bytes is not None and in_use + item.predicted_peak_bytes > max_memory_bytes:
                    break       # waits for memory; alone it always fits (checked while planning)
                pending.pop(0)
                running[index] = _Job(index, item, options, kwargs, messages)
                in_use += item.predicted_peak_bytes
                reporter.note(f"started {item.source} -> {item.output}")
            _collect(messages, todo, running, reporter, timeout_s=0.2)
    except BaseException:
        for job in running.values():
            job.process.terminate()     # SIGTERM: each job ends like an interrupted convert (staging kept: resume)
        for job in running.values():
            job.process.wait()
        raise


class _Job:
    """One running `batch_job` process: its request on stdin (kept open: the job watches it to die with this
    driver), its messages read by a thread into the batch's queue, then ("eof", index, None)."""

    def __init__(self, index: int, item: BatchItem, options: ConvertOptions, kwargs: dict, messages):
        self.index, self.started, self.result = index, time.perf_counter(), None
        try:
            read_fd, write_fd = os.pipe()
        except OSError as exc:
            raise ResourceError(f"cannot start a batch job: {exc.strerror}; raise the open-file limit "
                                "(ulimit -n) or lower --jobs") from None
        try:
            # stdout to stderr: whatever a job might print must not mix into the driver's --json report.
            self.process = subprocess.Popen(batch_job.command(write_fd), stdin=subprocess.PIPE, stdout=2,
                                            pass_fds=(write_fd,))
        except OSError as exc:
            os.close(read_fd)
            raise ResourceError(f"cannot start a batch job ({batch_job.command(write_fd)[0]}): {exc.strerror}; "
                                "lower --jobs or free memory and processes") from None
        finally:
            os.close(write_fd)
        try:
            self.process.stdin.write(batch_job.job_request(item.source, item.output, options,
                                                           {**kwargs, "workers": item.workers}))
            self.process.stdin.flush()
        except BrokenPipeError:
            pass        # the job died at start: its pipe closes, and it is reported as died with its exit code
        threading.Thread(target=self._read, args=(read_fd, messages), daemon=True,
                         name=f"streamconv-batch-{index}").start()

    def _read(self, fd: int, messages) -> None:
        # os.read, not a file object: a daemon thread blocked in a buffered reader's lock would abort the
        # interpreter's shutdown if the driver exits (an interrupt) before a killed job's pipe closes.
        pending = b""
        try:
            while True:
                data = os.read(fd, 1 << 16)
                if not data:
                    break
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    kind, value = json.loads(line)
                    messages.put((kind, self.index, value))
        finally:        # (a line cut off by a kill is dropped: the job then has no result and failed)
            os.close(fd)
            messages.put(("eof", self.index, None))

    def end(self) -> int:
        """The job's exit status (negative: killed by that signal), after closing its stdin."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        return self.process.wait()


def _collect(messages, todo: List[BatchItem], running: Dict[int, _Job], reporter: Reporter,
             timeout_s: float) -> None:
    try:
        message = messages.get(timeout=timeout_s)
    except queue_module.Empty:
        return
    while message is not None:
        kind, index, value = message
        job = running.get(index)
        if kind == "progress":
            reporter.advance(value)
        elif kind == "done" and job is not None:
            job.result = value
        elif kind == "eof" and job is not None:     # every message of the job has been read
            code = running.pop(index).end()
            result = job.result
            if result is None:
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                result = {"status": "failed", "kind": "WorkerDied", "exit_code": 1,
                          "seconds": time.perf_counter() - job.started,
                          "error": f"{todo[index].source}: the conversion process died ({how}); its staging "
                                   "folder is kept and the next run resumes it"}
            _finish(todo[index], result, reporter)
        try:
            message = messages.get_nowait()
        except queue_module.Empty:
            message = None


def _finish(item: BatchItem, result: dict, reporter: Reporter) -> None:
    for key, value in result.items():
        setattr(item, key, value)
    if item.status == "failed":
        reporter.note(f"failed {item.source}: {item.error}")
    else:
        reporter.note(f"{item.status} {item.source} -> {item.output} ({format_size(item.bytes)} in "
                      f"{item.seconds:.1f} s)")
