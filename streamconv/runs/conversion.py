"""One conversion (`streamconv.convert`), as the named phases it goes through:

    prepare   find the DCP folder, read its metadata, resolve the options, prepare the HF side (preparing.py)
    plan      the plan; where each chunk's bytes are; the destination checked; the checkpoint fingerprinted.
              An interrupted --overwrite is finished first, and an output that already is this conversion
              ends the run here, untouched
    stage     the staging folder (new, or resumed: its finished shards kept), free space, progress
    write     every shard left is a ShardJob, written by the runner (threads here, or Ray), then checked in
              the resume ledger whoever wrote it
    finish    tied heads proven equal to their embedding, config and tokenizer copied, the index, --verify,
              the output's record
    commit    the checkpoint checked unchanged, then one rename
    report    what was done (`ConversionReport`)

How to run is one value (`planning.options.RunOptions`: overwrite, resume, workers, verify, crc) and who
writes the shards another (a `runners.Runner`); what to convert is a third (`preparing.Request`).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import replace
from typing import Dict, List, Optional

from .. import hf
from ..failpoints import kill_point
from ..fs import fastpaths, location, objects
from ..fs.remote import is_url, scheme
from ..fs.cpus import available_cpus
from ..fs.paths import user_path
from ..output import upload
from ..output.destination import (check_destination, check_free_space, check_remote_destination, output_nbytes,
                                  output_nfiles, protected_paths)
from ..output.ledger import Ledger, plan_record, shard_fingerprints
from ..output.staging import StagingDir, recover_swap
from ..planning.options import ConvertOptions, RunOptions
from ..planning.plan import (INDEX_FILE_NAME, ConversionPlan, TensorPlan, with_io_step_each, with_permuted_chunks,
                             with_plain_io, with_verify_pass)
from ..planning.workers import with_workers
from ..execution.executor import Executor
from ..sizes import format_size
from ..source import remote as remote_reads
from ..source.remote import reading_paths
from ..source.integrity import ChunkIntegrity
from ..verification import provenance
from . import mapping
from .checkpoint import blob_reader
from .locating import Locating, write_order
from .preparing import Request, checked_plan, prepare, with_measured_numpy, with_tied_heads
from .report import ConversionReport, Reporter, peak_rss_bytes
from .runners import Runner, ThreadRunner
from .shardjob import CrcCount, JobContext, ShardJob, Workbench

def convert(checkpoint_dir: str, output_dir: str, request: Request, settings: RunOptions,
            reporter: Optional[Reporter] = None, runner: Optional[Runner] = None) -> ConversionReport:
    """See `streamconv.convert` (api.py) for what is promised; the phases are in the module docstring.
    `runner`: who writes the shards (None: the plan's `workers` threads of this process)."""
    run = Conversion(output_dir, request, settings, reporter or Reporter(), runner)
    run.prepare(checkpoint_dir)
    with run.reader:
        try:
            run.plan()
            if run.found_already_converted():
                return run.already_converted_report()
            # (the watch turns a failure in a checkpoint file that changed meanwhile into "it changed")
            with provenance.SourceWatch(run.checkpoint_dir, run.before), run.staging_dir() as staging:
                run.stage(staging)
                run.write(staging)
                run.finish(staging)
                run.commit(staging)
        finally:
            run.stop_locating()
    return run.report()


class Conversion:
    """The state one conversion builds up, phase by phase (see the module docstring)."""

    def __init__(self, output_dir: str, request: Request, settings: RunOptions, reporter: Reporter,
                 runner: Optional[Runner] = None):
        self.started = time.perf_counter()
        self.output_dir = user_path(output_dir, "the output folder (OUTPUT_DIR)")
        self.remote_output = is_url(self.output_dir)
        if self.remote_output:      # refused before anything is read when the protocol cannot take uploads
            objects.check_writable(self.output_dir)
            self.output_dir = self.output_dir.rstrip("/")
        # Resolved now: after the commit the current folder may be gone, and getcwd() with it.
        self.output_abs = location.absolute(self.output_dir)
        self.request, self.settings, self.reporter, self.runner = request, settings, reporter, runner
        self.fast = fastpaths.detect()      # fast IO paths are chosen once, here, and passed down (fastpaths.py)
        self.run_notes: List[str] = []
        self.kept: list = []
        self.resumed = False
        self.copied: List[str] = []
        self.verified_bytes = self.verified_tensors = 0
        self.integrity: Optional[ChunkIntegrity] = None
        self.crc_written = self.crc_after_write = CrcCount()
        self.task_peak_rss_bytes = 0
        self.locating: Optional[Locating] = None
        self.source_fp: Optional[str] = None      # known once every chunk is located (`located_all`)
        self._settling = threading.Lock()
        self._staging: Optional[StagingDir] = None    # whose plan record waits for the source fingerprint

    # -- prepare, plan ------------------------------------------------------------------------------------
    def prepare(self, checkpoint_dir: str) -> None:
        # objects, not files: no kernel fast path reads them; a file is not read through obstore
        self.fast = reading_paths(self.fast, checkpoint_dir)
        self.checkpoint_dir, self.reader, self.meta, self.setup, self.notes = prepare(
            checkpoint_dir, self.request, fast=self.fast)
        self.checkpoint_abs = location.absolute(self.checkpoint_dir)
        self.options = self.setup.options

    def plan(self) -> None:
        """Everything decided before the output is touched: the plan, the destination, the fingerprints."""
        meta, setup = self.meta, self.setup
        self.conversion = with_workers(checked_plan(meta, self.options, self.checkpoint_dir), self.settings.workers,
                                       available_cpus())
        self.with_heads, self.heads = with_tied_heads(meta, setup, self.conversion)
        config_folder = setup.config.folder if setup.config else None
        if self.remote_output:
            self.protected = frozenset()
            check_remote_destination(self.output_dir, [self.checkpoint_abs] + ([config_folder] if config_folder else []))
        else:
            folders, files = protected_paths(self.reader, meta, config_folder)
            self.protected = check_destination(self.output_dir, folders, files)   # before anything is written
        self.before = provenance.snapshot(self.checkpoint_dir, provenance.source_files(self.checkpoint_dir, meta))
        # The first tensors' chunks now, the others before anything needs them (`located_all`, runs/locating.py)
        self.locating = Locating(write_order(self.conversion, self.with_heads), self.reader, self.conversion.workers)
        self.locating.first()
        self.stored = self.locating.stored
        if self.stored.non_contiguous():    # assembled through numpy, which .metadata could not tell: measured now,
            self.conversion = with_measured_numpy(self.conversion)      # before a writer imports it
        self.blobs = blob_reader(self.with_heads, self.reader, self.stored)
        self.shard_fps = shard_fingerprints(self.conversion)     # (once: the plan record's and the ledger's)
        # ("source": the checkpoint's fingerprint, filled in by `located_all`)
        self.plan_record = plan_record(self.conversion, self.checkpoint_dir, meta, None, self.shard_fps)

    def located_all(self) -> None:
        """Every chunk located and checked (the batches no writer needed yet, here), then what needs them all:
        the memory prediction, the checkpoint's fingerprint and the staging folder's plan record. Once; from
        the driver or from the writer that finishes a shard first, whichever comes first."""
        with self._settling:
            if self.source_fp is not None:
                return
            self.locating.rest()
            # (.metadata cannot show chunks stored transposed, nor which CRC-32s the writer recorded; now that they
            # are located, the prediction counts them)
            permuted = self.stored.non_contiguous()
            if permuted:
                self.conversion = with_measured_numpy(self.conversion)
            self.conversion = with_permuted_chunks(self.conversion, permuted, self.conversion.workers)
            if not self.stored.crcs_recorded():     # copies in-kernel read back when their shard ends
                self.conversion = with_io_step_each(self.conversion, self.conversion.workers)
            source_fp = provenance.source_fingerprint(self.checkpoint_dir, self.meta, self.stored, self.before)
            self.plan_record["source"] = source_fp
            if self._staging is not None:
                self._staging.write_plan_record(self.plan_record)
            self.source_fp = source_fp

    def locates_while_writing(self) -> bool:
        """Whether the chunks the first tensors do not need are located while those are written: only where
        nothing before the writing needs them all. An output folder that exists (already this conversion?),
        --resume (its plan record must match), other runners (they locate their own), an output in a bucket
        (its plan record goes first) and transformed (zstd) blobs (one more decoder beside the writers') locate
        every chunk first."""
        return (self.runner is None and not self.remote_output and not self.settings.resume
                and _absent_or_empty(self.output_dir)
                and not any(t.is_compressed for t in self.with_heads.tensors))

    def _every_writer_steps(self) -> bool:
        """Whether every writer reads outside the buffer whatever it writes (`plan.with_io_step_each`): the plain IO
        paths' steps (no copy_file_range or preadv: beside the plain step's bytes `with_plain_io` counts), the CRC-32
        check's pieces, --verify, a resumed shard's CRC read-back, the tied heads' comparison, object storage."""
        s = self.settings
        return bool(s.check_crc or s.verify or s.resume or self.setup.tied or self.remote_output
                    or is_url(self.checkpoint_dir))

    def stop_locating(self) -> None:
        if self.locating is not None:
            self.locating.close()

    def found_already_converted(self) -> bool:
        """Whether the output already is this conversion. A killed --overwrite is finished (or undone) first:
        what OUT holds decides everything that follows."""
        if not self.remote_output:      # (a bucket has no swap to recover: remote_staging.py)
            self.run_notes += recover_swap(self.output_dir, self.protected)
        if not self.locates_while_writing():
            self.located_all()
        if self.source_fp is None:      # (an absent or empty folder: nothing there to compare)
            return False
        already = provenance.check_existing_output(self.output_dir, self.source_fp, self.plan_record["plan"],
                                                   overwrite=self.settings.overwrite,
                                                   overwrite_any=self.settings.overwrite_any)
        return already is not None

    # -- stage ----------------------------------------------------------------------------------------
    def staging_dir(self) -> StagingDir:
        s = self.settings
        how = dict(plan_record=self.plan_record, overwrite=s.overwrite or s.overwrite_any, resume=s.resume,
                   discard_partial=s.discard_partial, fast=self.fast, protected=self.protected)
        if self.remote_output:
            # (imported here: with its lock (socket, datetime) ~3 ms of every local conversion's start-up)
            from ..output.remote_staging import RemoteStaging
            return RemoteStaging(self.output_dir, **how)
        # (the plan record waits for the checkpoint's fingerprint when the chunks are located while writing)
        return StagingDir(self.output_dir, plan_record_later=self.source_fp is None, **how)

    def stage(self, staging: StagingDir) -> None:
        """Probe the copy path, keep what a resumed run finished, check free space, start the progress."""
        conversion, setup = self.conversion, self.setup
        first_file = _first_data_file(self.with_heads)
        if self.remote_output:      # uploaded from memory: no output file to copy into in-kernel
            self.fast = replace(self.fast, copy_file_range=False)
        elif first_file is not None:      # (no chunk at all: nothing is copied)
            self.fast = fastpaths.probe_copy(self.fast, self.reader.path(first_file), staging.scratch_dir)
        if not (self.fast.copy_file_range and self.fast.preadv):
            self.conversion = with_plain_io(self.conversion, self.conversion.workers)
        if self._every_writer_steps():
            self.conversion = with_io_step_each(self.conversion, self.conversion.workers)
        if self.settings.verify:
            self.conversion = with_verify_pass(self.conversion, mapping.numpy_import_bytes())
        if is_url(self.checkpoint_dir):     # the ranged GETs in flight and the client, beside the writers' buffers
            reading = remote_reads.INFLIGHT_BYTES
            if not (self.remote_output and scheme(self.output_dir) == scheme(self.checkpoint_dir)):
                reading += remote_reads.client_rss_bytes(self.checkpoint_dir, self.fast.obstore)
            self.conversion = replace(self.conversion, peak_bytes=self.conversion.peak_bytes + reading)
        if self.remote_output:      # the upload parts being filled and the client, beside the writers' buffers
            largest = max((s.nbytes for s in self.conversion.shards), default=0)
            self.conversion = replace(self.conversion, peak_bytes=self.conversion.peak_bytes
                                      + upload.upload_bytes(self.conversion.workers, largest,
                                                            objects.max_parts(self.output_dir))
                                      + upload.client_rss_bytes(self.output_dir))
        self.run_notes.extend(staging.notes)
        self._staging_notes_seen = len(staging.notes)
        self.ledger = Ledger.for_plan(staging.path, conversion, self.plan_record["plan"], self.shard_fps)
        self.resumed = staging.resumed
        for s in conversion.shards:
            staging.file(s.filename)    # (registers the name: only planned names are committed)
        if staging.resumed:
            self._keep_finished_shards(staging)
        kept_names = {s.filename for s in self.kept}
        self.to_write = [s for s in conversion.shards if s.filename not in kept_names]
        if not self.remote_output:      # (a bucket has no free space to measure)
            check_free_space(self.output_dir,
                             output_nbytes(conversion, setup.config.folder if setup.config else None,
                                           setup.sidecar_files) - sum(s.nbytes for s in self.kept),
                             needed_files=output_nfiles(conversion, setup.sidecar_files) - len(self.kept))
        self.reporter.start(conversion.total_bytes * (2 if self.settings.verify else 1)
                            + sum(t.nbytes for t in self.heads.values()), "converting")
        self.reporter.advance(sum(s.data_nbytes for s in self.kept))
        # while_decoding: transformed (zstd) chunks are summed as the copy decodes them (any failure discards the output)
        if self.settings.check_crc:
            self.integrity = ChunkIntegrity(self.blobs, self.stored, while_decoding=True)
        if self.meta.flavor:
            self.run_notes.append(f"source: {self.meta.flavor}")

    def _keep_finished_shards(self, staging: StagingDir) -> None:
        # Finished = recorded by the interrupted run; kept = also of the planned size and CRC-32 now.
        shards = self.conversion.shards
        self.kept = self.ledger.kept(shards, fast=staging.fast)
        finished = sum(self.ledger.has_record(s) for s in shards)
        self.run_notes.append(f"resumed: kept {len(self.kept)} of {len(shards)} shard(s) "
                              f"({format_size(sum(s.nbytes for s in self.kept))}); {finished} had finished, each "
                              f"kept one checked by size and CRC-32; wrote the other {len(shards) - len(self.kept)}")
        self.reporter.note(self.run_notes[-1])

    # -- write ----------------------------------------------------------------------------------------
    def write(self, staging: StagingDir) -> None:
        """Every shard left is a job; the runner writes them; the ledger must then hold each one."""
        kill_point("before-first-shard")
        context = JobContext(self.checkpoint_abs, self.conversion, self.ledger, self.plan_record["checkpoint"],
                             crc=self.settings.check_crc)
        jobs = [ShardJob(context, s.filename) for s in self.to_write]
        self._staging = staging
        self.locating.start()
        runner = self.runner or ThreadRunner(Workbench(
            self.blobs, self.stored, self.fast, self.integrity, self.options.buffer_bytes, self.conversion.workers,
            gate=_Located(self)))
        written = runner.run(jobs, self.reporter.advance)
        self.located_all()
        self.run_notes += [n for n in [provenance.fingerprint_note(self.source_fp)] if n]
        self.ledger.check_written(self.to_write, fast=staging.fast)
        self.crc_written = sum((w.crc for w in written), CrcCount())
        self.task_peak_rss_bytes = max((w.task_peak_rss_bytes for w in written), default=0)
        self.crc_after_write = CrcCount.of(self.integrity)

    # -- finish ---------------------------------------------------------------------------------------
    def finish(self, staging: StagingDir) -> None:
        """Everything but the shards, the index last of the output's files, then --verify and the record."""
        conversion, setup = self.conversion, self.setup
        if setup.tied:
            self._prove_tied_heads(staging)
        if setup.config is not None:
            self.copied = hf.sidecars.copy_sidecars(setup.config, setup.sidecar_files, staging.path,
                                                    hf.config_dtype(conversion))
            staging.added(self.copied)
        index = conversion.index()
        if index is not None:
            staging.write_json(INDEX_FILE_NAME, index)   # written last: its presence means complete
        if self.settings.verify:
            self._verify_staged(staging)
        data = provenance.record_bytes(
            self.ledger, [s.filename for s in conversion.shards],
            self.copied + ([INDEX_FILE_NAME] if index is not None else []),
            source_fp=self.source_fp, options=recorded_options(self.request, setup), version=_version())
        if self.remote_output:
            staging.write_record(data)      # published last: what makes the prefix finished
        else:
            staging.added([provenance.write_record(staging.path, data)])

    def _verify_staged(self, staging: StagingDir) -> None:
        """--verify: the staged output read back and compared with the checkpoint before the commit."""
        # Imported here: reading back is only --verify's, and not part of every conversion's start-up.
        from ..verification import compare as verifying
        checked = verifying.verify_output(self.conversion, self.blobs, self.stored, staging.path,
                                          buffer_bytes=self.options.buffer_bytes, checkpoint=self.checkpoint_dir,
                                          integrity=self.integrity, progress=self.reporter.advance, fast=self.fast)
        verifying.raise_if_failed(checked, staged=True)
        self.verified_bytes, self.verified_tensors = checked.bytes_compared, checked.tensors_equal

    def _prove_tied_heads(self, staging: StagingDir) -> None:
        """A dropped head is read once and compared with the embedding written in its place."""
        checker = Executor(self.blobs, self.stored, self.options.buffer_bytes, progress=self.reporter.advance,
                           integrity=self.integrity)
        shard_of = {t.name: s.filename for s in self.conversion.shards for t in s.tensors}
        by_name = {t.name: t for t in self.conversion.tensors}
        for pair in self.setup.tied:
            hf.tied.verify_tied(checker, self.heads[pair.head], by_name[pair.embedding],
                                staging.file(shard_of[pair.embedding]), config_path=self.setup.config.folder,
                                fast=self.fast)

    # -- commit ---------------------------------------------------------------------------------------
    def commit(self, staging: StagingDir) -> None:
        kill_point("before-source-recheck")
        provenance.check_unchanged(self.checkpoint_dir, self.before)     # a trainer still writing: commit no mix
        staging.commit(on_committed=getattr(self.reporter, "committed", None))  # (a caller's own may lack it)
        self.run_notes += staging.notes[self._staging_notes_seen:]
        self.reporter.close()
        unrecorded = self.crc_checked().unrecorded
        if unrecorded:
            self.run_notes.append(f"CRC-32: {unrecorded} chunk(s) unchecked: their writer recorded no CRC-32 "
                                  "(safetensors blobs, or torch.save with compute_crc32=False)")

    # -- report ---------------------------------------------------------------------------------------
    def crc_checked(self) -> CrcCount:
        """Source chunks checked by the writers (wherever they ran) and by this process after them."""
        return self.crc_written + (CrcCount.of(self.integrity) - self.crc_after_write)

    def report(self) -> ConversionReport:
        conversion, setup, options = self.conversion, self.setup, self.options
        casts: Dict[str, int] = {}
        for t in conversion.tensors:
            if t.is_cast:
                key = f"{t.src_dtype}->{t.dst_dtype}"
                casts[key] = casts.get(key, 0) + 1
        files = [s.filename for s in conversion.shards] + ([INDEX_FILE_NAME] if conversion.sharded else [])
        reference = hf.compare_with_reference(setup, conversion)
        crc = self.crc_checked()
        return ConversionReport(
            checkpoint=self.checkpoint_abs, output=self.output_abs,
            tensors=len(conversion.tensors), shards=len(conversion.shards), bytes_written=conversion.files_nbytes,
            kept_bytes=sum(s.nbytes for s in self.kept), resumed=self.resumed,
            seconds=time.perf_counter() - self.started, peak_rss_bytes=peak_rss_bytes(),
            predicted_peak_bytes=conversion.peak_bytes, buffer_bytes=options.buffer_bytes,
            workers=conversion.workers, workers_reason=conversion.workers_reason,
            task_peak_rss_bytes=self.task_peak_rss_bytes,
            max_shard_bytes=options.max_shard_bytes, skipped=conversion.skipped_counts,
            renamed=len(conversion.renamed), cast=casts, verified_bytes=self.verified_bytes,
            files=files + self.copied, copied_files=self.copied,
            crc_checked_bytes=crc.nbytes, verified_tensors=self.verified_tensors, crc_checked_chunks=crc.chunks,
            dropped_tied=list(setup.dropped_heads),
            notes=list(self.notes) + ([conversion.source_note] if conversion.source_note else []) + self.run_notes,
            config_from=setup.config.folder if setup.config else None, layout=setup.layout,
            unmatched_names=list(reference.unmatched), missing_names=list(reference.missing),
            fast_paths=list(self.fast.names))

    def already_converted_report(self) -> ConversionReport:
        """The report of a run that found its output already in place (a retry after a commit): nothing written."""
        conversion, options = self.conversion, self.options
        return ConversionReport(
            checkpoint=location.absolute(self.checkpoint_dir), output=self.output_abs,
            tensors=len(conversion.tensors), shards=len(conversion.shards), bytes_written=0,
            seconds=time.perf_counter() - self.started, peak_rss_bytes=peak_rss_bytes(),
            predicted_peak_bytes=conversion.peak_bytes, buffer_bytes=options.buffer_bytes,
            max_shard_bytes=options.max_shard_bytes, skipped=conversion.skipped_counts,
            notes=list(self.notes) + self.run_notes + [
                f"already converted: {self.output_dir} holds the output of this checkpoint (same content, same "
                "plan, every file of its record present); nothing was written. Pass --overwrite to convert it "
                "again"],
            already_converted=True)


def recorded_options(request: Request, setup) -> dict:
    """The ConvertOptions fields an output was made with, as `verify` needs them to plan the same output: the
    user's options (`setup.options.user`) with what was derived from them in their place (sizes in bytes, dtype
    "auto" as resolved, the source format a Megatron folder implies). Nothing is resolved again."""
    o = setup.options
    user = o.user if o.user is not None else ConvertOptions()
    return replace(
        user, max_shard_size=f"{o.max_shard_bytes}B", buffer_size=f"{o.buffer_bytes}B", dtype=o.dtype,
        config_from=location.absolute(user.config_from) if user.config_from else None, include=o.include,
        exclude=o.exclude, renames=tuple(r.text for r in o.renames), subtree=o.subtree,
        source_format=o.source_format).__dict__


def _version() -> str:
    # (looked up, not imported: the package's __init__ imports the API, which imports this)
    return getattr(sys.modules["streamconv"], "__version__", "unknown")


class _Located:
    """The writers' gate (runs/parallel.py): a tensor once its chunks are located, a shard's finished record
    once every chunk is and the plan record names the checkpoint's fingerprint."""

    def __init__(self, run: Conversion):
        self.run = run

    def tensor_ready(self, t: TensorPlan, stop: threading.Event) -> None:
        self.run.locating.tensor_ready(t, stop)

    def before_record(self) -> None:
        self.run.located_all()


def _absent_or_empty(folder: str) -> bool:
    try:
        return not os.listdir(folder)
    except FileNotFoundError:
        return True
    except OSError:         # (not a folder, unreadable: the checks that need every chunk decide)
        return False


def _first_data_file(conversion: ConversionPlan) -> Optional[str]:
    """The checkpoint file the first planned chunk is in: where copy_file_range is probed from."""
    return next((c.location.relative_path for t in conversion.tensors for c in t.chunks), None)
