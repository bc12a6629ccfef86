"""The Python API: the same verbs as the CLI (`inspect`, `plan`, `convert`), returning values.

    import streamconv
    report = streamconv.convert("ckpt/", "hf_model/", max_shard_size="2GB", dtype="bfloat16")
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Dict, Iterable, Optional, Sequence, Union

from .runs import discover
from . import dtypes, hf
from .fs import fastpaths
from .planning import names
from .verify import provenance
from .output import record
from .output.destination import check_destination, check_free_space
from .errors import CheckpointError, OptionsError, OutputError, VerificationError
from .runs.checkpoint import load, locate_chunks
from .execution.executor import Executor
from .source.io import DirectoryReader
from .planning.options import ConvertOptions, resolve as resolve_options
from .model import CheckpointMetadata
from .verify.provenance import Fingerprint as _Fingerprint
from .planning.plan import (DEFAULT_WRITERS, INDEX_FILE_NAME, ConversionPlan, PlanOptions, build_plan, source_format,
                            with_writers)
from .runs.report import ConversionReport, Reporter, peak_rss_bytes
from .runs.parallel import write_shards
from .source import transforms
from .source.integrity import ChunkIntegrity
from .runs.shardjob import ShardJob
from .fs.paths import user_path
from .failpoints import kill_point
from .output.staging import StagingDir, recover_swap
from .planning.trainers import megatron
from .verify import verification as verifying
from .sizes import format_size


# Two writer threads overlap one shard's reads with another's writes and casts; more rarely helps a disk.
DEFAULT_WORKERS = DEFAULT_WRITERS
# Whether `convert` checks each chunk's CRC-32 unless told (`--verify` turns it on). Off: on the 2gb benchmark
# the pass costs ~0.2 s of CPU per GB (a read of page-cached data plus zlib.crc32), 20-80% of the wall time on
# this 2-core machine, far above the 5% that would make it a free default. `verify` checks CRCs by default.
DEFAULT_CRC = False
# What `plan`, `convert` and `verify` take: the user's options, or the planner's resolved view.
Options = Union[ConvertOptions, PlanOptions]


def make_options(**keywords) -> PlanOptions:
    """PlanOptions from user-facing values ("5GB", "bf16", "REGEX=REPL"): the fields of `ConvertOptions`."""
    return ConvertOptions(**keywords).plan_options()


def checkpoint_argument(checkpoint_dir) -> str:
    """A checkpoint path as given, refused when empty (OptionsError) or a file (CheckpointError, with what to
    pass instead); every verb starts here."""
    checkpoint_dir = user_path(checkpoint_dir, "the checkpoint folder (CHECKPOINT_DIR)")
    if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
        raise CheckpointError(
            f"{checkpoint_dir} is a file, not a folder; pass the DCP checkpoint folder (the one holding `.metadata` "
            f"and the .distcp files, e.g. {os.path.dirname(checkpoint_dir) or os.curdir}) or a run folder "
            "holding one")
    return checkpoint_dir


def _prepare(checkpoint_dir: str, options, kwargs, *, config_from, allow_unmatched: bool, no_config: bool,
             fast: fastpaths.FastPaths = fastpaths.NONE):
    """What every verb does first: find the DCP folder (a run folder stands for the one in it), read its
    metadata, resolve the options, refuse optimizer-only folders, and prepare the HF side (config, names,
    reference check). Returns (checkpoint_dir, reader, meta, setup, notes); the caller closes the reader."""
    checkpoint_dir, found_note = discover.find_checkpoint(checkpoint_argument(checkpoint_dir))
    reader, meta = load(checkpoint_dir, fast)
    try:
        options, user = resolve_options(options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
                                        no_config=no_config)
        if options.subtree is None:     # --subtree names what to convert, optimizer state included
            discover.refuse_optimizer_only(meta, checkpoint_dir)
        setup = hf.prepare(meta, options, checkpoint_dir, config_from=user.config_from,
                           allow_unmatched=user.allow_unmatched, no_config=user.no_config)
    except BaseException:
        reader.close()
        raise
    notes = tuple(n for n in (found_note, transforms.note(meta)) if n) + tuple(setup.notes)
    return checkpoint_dir, reader, meta, setup, notes


def _with_tied_heads(meta: CheckpointMetadata, setup, conversion: ConversionPlan):
    """(plan to locate, {head name: TensorPlan}): dropped tied heads are still read once, to prove they equal the
    embedding written in their place."""
    with_heads = build_plan(meta, replace(setup.options, drop=())) if setup.tied else conversion
    return with_heads, {t.name: t for t in with_heads.tensors if t.name in setup.dropped_heads}


def plan(checkpoint_dir: str, options: Optional[Options] = None, *, config_from: Optional[str] = None,
         reporter: Optional[Reporter] = None, allow_unmatched: bool = False, no_config: bool = False,
         workers: int = DEFAULT_WORKERS, **kwargs) -> ConversionPlan:
    """The dry run: everything `convert` would do, decided from `.metadata` (and the config folder) alone.
    `workers` (as for `convert`) changes only the predicted peak memory.
    Which folder was taken and what was decided about config, names and tied weights goes to `reporter.note`;
    an output that would not match the reference raises ReferenceMismatchError, as `convert` does."""
    checkpoint_dir, reader, meta, setup, notes = _prepare(
        checkpoint_dir, options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
        no_config=no_config)
    reader.close()
    for note in notes:
        (reporter or Reporter()).note(note)
    conversion = with_writers(_checked_plan(meta, setup.options, checkpoint_dir), workers)
    if conversion.source_note:
        (reporter or Reporter()).note(conversion.source_note)
    return conversion


def _checked_plan(meta: CheckpointMetadata, options: PlanOptions, checkpoint_dir: str) -> ConversionPlan:
    conversion = build_plan(meta, options)
    if not conversion.tensors:
        raise OptionsError(
            f"{checkpoint_dir}: no tensors selected to convert ({len(meta.tensors)} in the checkpoint); "
            "check --include/--exclude/--subtree (see `streamconv inspect` for the names)")
    return conversion


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


def checkpoint_files(checkpoint_dir: str, meta: CheckpointMetadata) -> Dict[str, list]:
    """{relative path: [size, mtime_ns]} of the files the conversion reads: a resumed run must see the same."""
    names = set(meta.files)
    try:
        names.update(n for n in os.listdir(checkpoint_dir) if n.endswith(".metadata"))
    except OSError:
        pass
    out = {}
    for name in sorted(names):
        try:
            st = os.stat(os.path.join(checkpoint_dir, name))
            out[name] = [st.st_size, st.st_mtime_ns]
        except OSError:
            out[name] = None
    return out


def shard_fingerprint(shard) -> str:
    """What decides a shard's bytes: its name, header, and where every tensor's bytes come from (and how)."""
    h = _Fingerprint()
    h.update(shard.filename.encode("utf-8") + b"\0" + shard.header)
    for t in shard.tensors:
        chunks = [[c.location.relative_path, c.location.offset, c.location.length, list(c.offsets), list(c.sizes)]
                  for c in t.chunks]
        h.update(json.dumps([t.name, t.source_fqn, t.src_dtype, t.dst_dtype, list(t.shape), t.begin, t.nbytes,
                             chunks]).encode("utf-8"))
    return h.hexdigest()


def plan_fingerprint(conversion: ConversionPlan) -> str:
    """What decides every output file's bytes (`shard_fingerprint` of each shard)."""
    h = _Fingerprint()
    for shard in conversion.shards:
        h.update(shard_fingerprint(shard).encode("ascii"))
    return h.hexdigest()


def plan_record(conversion: ConversionPlan, checkpoint_dir: str, meta: CheckpointMetadata,
                source_fingerprint: Optional[str] = None) -> dict:
    """Identifies a conversion for --resume: the plan's fingerprint, the checkpoint's files and content
    (`provenance.source_fingerprint`: a re-save restored with sizes and mtimes kept is not resumed into), and
    the options (shown when they differ)."""
    o = conversion.options
    return {"plan": plan_fingerprint(conversion), "checkpoint": checkpoint_files(checkpoint_dir, meta), "source": source_fingerprint,
            "options": {"--max-shard-size": o.max_shard_bytes, "--dtype": o.dtype, "--include": list(o.include),
                        "--exclude": list(o.exclude), "--rename": [f"{r.pattern}={r.replacement}" for r in o.renames],
                        "--subtree": conversion.subtree, "tied heads dropped": list(o.drop)}}


def protected_paths(reader: DirectoryReader, meta: CheckpointMetadata, config_folder: Optional[str]):
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


def convert(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
            overwrite: bool = False, reporter: Optional[Reporter] = None, config_from: Optional[str] = None,
            workers: int = DEFAULT_WORKERS, verify: bool = False, crc: Optional[bool] = None,
            allow_unmatched: bool = False, no_config: bool = False, resume: bool = False,
            discard_partial: bool = False, shard_runner=None, overwrite_any: bool = False,
            **kwargs) -> ConversionReport:
    """Convert a DCP checkpoint folder into a folder of safetensors shards (+ index when sharded), with the
    base model's config and tokenizer beside them when `config_from` (or train_params.yaml) names it.

    Output appears at `output_dir` only when complete, fsynced, in one rename; on any error nothing is left
    there. The output may not be, contain or hold the checkpoint or config folder (refused before writing).
    A run killed hard leaves its staging folder beside `output_dir`: `resume=True` keeps its finished shards
    (and keeps the staging folder on failure), `discard_partial=True` deletes it; otherwise it is refused.
    `workers` threads write shards side by side, sharing the buffer budget. `verify` checks the written
    folder as `verify()` does (every tensor read back and compared with the checkpoint) before it is
    committed. `crc` checks each chunk's CRC-32 as its bytes are read (None: only with `verify`).
    `checkpoint_dir` may be a run folder holding the DCP folder (`discover.find_checkpoint`). With a reference
    model, an output that would not match its weights raises ReferenceMismatchError before anything is written,
    unless `allow_unmatched`. `no_config`: no config unless `config_from` (train_params.yaml is not read).
    `shard_runner(job, filenames, progress)`: writes the shards elsewhere (e.g. Ray tasks,
    `ray_runner.shard_runner`) given a `shardjob.ShardJob`, calling `progress(tensor bytes)` as shards finish;
    every shard must then be recorded in the staging folder, checked before the commit.
    The output holds a record (`streamconv.json`, record.py) tying it to the checkpoint's content and options.
    `overwrite` replaces only a folder holding such a record; `overwrite_any` any folder. A folder that already
    holds this conversion (same checkpoint content, same plan) is left as it is: the report says
    `already_converted`. Every checkpoint file is checked again before the commit: one that changed during the
    run (a trainer still writing) commits nothing (SourceChangedError, exit 2).
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    output_dir = user_path(output_dir, "the output folder (OUTPUT_DIR)")
    # Resolved now: after the commit the current folder may be gone, and getcwd() with it.
    output_abs = os.path.abspath(output_dir)
    given = options     # (`options` becomes the resolved planner view below)
    fast = fastpaths.detect()       # fast IO paths are chosen once, here, and passed down (fastpaths.py)
    checkpoint_dir, reader, meta, setup, notes = _prepare(
        checkpoint_dir, options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
        no_config=no_config, fast=fast)
    checkpoint_abs = os.path.abspath(checkpoint_dir)
    with reader:
        options = setup.options
        conversion = with_writers(_checked_plan(meta, options, checkpoint_dir), workers)
        with_heads, heads = _with_tied_heads(meta, setup, conversion)
        folders, files = protected_paths(reader, meta, setup.config.folder if setup.config else None)
        protected = check_destination(output_dir, folders, files)       # before anything is written
        before = provenance.snapshot(checkpoint_dir, provenance.source_files(checkpoint_dir, meta))
        stored = locate_chunks(with_heads, reader)
        source_fp = provenance.source_fingerprint(checkpoint_dir, meta, stored, before)
        resume_record = plan_record(conversion, checkpoint_dir, meta, source_fp)
        # A killed --overwrite is finished (or undone) first: what OUT holds decides everything below.
        swap_notes = recover_swap(output_dir, protected)
        already = provenance.check_existing_output(output_dir, source_fp, resume_record["plan"], overwrite=overwrite,
                                                   overwrite_any=overwrite_any)
        if already is not None:
            return _already_converted(checkpoint_dir, output_dir, conversion, options, list(notes) + swap_notes,
                                      started)
        fingerprints = {s.filename: shard_fingerprint(s) for s in conversion.shards}
        run_notes = swap_notes + [n for n in [provenance.fingerprint_note(source_fp)] if n]
        # (the watch turns a failure in a checkpoint file that changed meanwhile into "it changed")
        with provenance.SourceWatch(checkpoint_dir, before), StagingDir(
                output_dir, plan_record=resume_record, overwrite=overwrite or overwrite_any, resume=resume,
                discard_partial=discard_partial, fast=fast, protected=protected) as staging:
            first_file = _first_data_file(with_heads)
            if first_file is not None:      # (no chunk at all: nothing is copied)
                fast = fastpaths.probe_copy(fast, reader.path(first_file), staging.scratch_dir)
            run_notes.extend(staging.notes)
            kept = [s for s in conversion.shards if staging.kept_shard(s.filename, s.nbytes, fingerprints[s.filename])]
            if staging.resumed:
                # Finished = recorded by the interrupted run; kept = also of the planned size and CRC-32 now.
                finished = sum(os.path.lexists(os.path.join(staging.records_dir, s.filename + ".json"))
                               for s in conversion.shards)
                total = len(conversion.shards)
                run_notes.append(f"resumed: kept {len(kept)} of {total} shard(s) "
                                 f"({format_size(sum(s.nbytes for s in kept))}); {finished} had finished, each kept "
                                 f"one checked by size and CRC-32; wrote the other {total - len(kept)}")
                reporter.note(run_notes[-1])
            kept_names = {s.filename for s in kept}
            to_write = [s for s in conversion.shards if s.filename not in kept_names]
            check_free_space(output_dir, output_nbytes(conversion, setup.config.folder if setup.config else None,
                                                       setup.sidecar_files) - sum(s.nbytes for s in kept),
                             needed_files=output_nfiles(conversion, setup.sidecar_files) - len(kept))
            reporter.start(conversion.total_bytes * (2 if verify else 1) + sum(t.nbytes for t in heads.values()),
                           "converting")
            reporter.advance(sum(s.data_nbytes for s in kept))
            check_crc = crc if crc is not None else verify or DEFAULT_CRC
            # while_decoding: zstd chunks are summed as the copy decodes them (any failure discards the output)
            integrity = ChunkIntegrity(reader, stored, while_decoding=True) if check_crc else None
            if meta.flavor:
                run_notes.append(f"source: {meta.flavor}")
            kill_point("before-first-shard")
            if shard_runner is None:
                write_shards(to_write, reader, stored, staging.file, buffer_bytes=options.buffer_bytes,
                             workers=workers, progress=reporter.advance, integrity=integrity, fast=fast,
                             on_shard_done=lambda s, crc: staging.shard_done(s.filename, s.nbytes,
                                                                             fingerprints[s.filename], crc))
            else:
                job = ShardJob(checkpoint_dir=checkpoint_abs, staging_dir=staging.path,
                               plan=conversion, plan_fingerprint=resume_record["plan"],
                               checkpoint_files=resume_record["checkpoint"],
                               shard_fingerprints=fingerprints, crc=check_crc)
                shard_runner(job, [s.filename for s in to_write], reporter.advance)
                for s in to_write:      # the workers' records, and each file's size (its bytes: --verify)
                    if not staging.shard_recorded(s.filename, s.nbytes, fingerprints[s.filename], check_crc=False):
                        raise OutputError(f"{staging.file(s.filename)}: the worker writing it reported success but "
                                          "no finished record or the wrong size is there; nothing was committed")
            if setup.tied:
                checker = Executor(reader, stored, options.buffer_bytes, progress=reporter.advance,
                                   integrity=integrity)
                shard_of = {t.name: s.filename for s in conversion.shards for t in s.tensors}
                by_name = {t.name: t for t in conversion.tensors}
                for pair in setup.tied:
                    hf.tied.verify_tied(checker, heads[pair.head], by_name[pair.embedding],
                                        staging.file(shard_of[pair.embedding]), config_path=setup.config.folder,
                                        fast=fast)
            copied = []
            if setup.config is not None:
                copied = hf.sidecars.copy_sidecars(setup.config, setup.sidecar_files, staging.path,
                                                   hf.config_dtype(conversion))
                staging.added(copied)
            index = conversion.index()
            if index is not None:
                staging.write_json(INDEX_FILE_NAME, index)   # written last: its presence means complete
            verified_bytes = verified_tensors = 0
            if verify:
                checked = verifying.verify_output(conversion, reader, stored, staging.path,
                                                  buffer_bytes=options.buffer_bytes, checkpoint=checkpoint_dir,
                                                  integrity=integrity, progress=reporter.advance, fast=fast)
                verifying.raise_if_failed(checked, staged=True)
                verified_bytes, verified_tensors = checked.bytes_compared, checked.tensors_equal
            staging.added([provenance.write_record(
                staging.path, [s.filename for s in conversion.shards],
                copied + ([INDEX_FILE_NAME] if index is not None else []),
                source_fp=source_fp, plan_fp=resume_record["plan"],
                options=_recorded_options(given, kwargs, config_from, allow_unmatched, no_config, setup),
                version=_version())])
            kill_point("before-source-recheck")
            provenance.check_unchanged(checkpoint_dir, before)     # a trainer still writing: commit no mix
            staging.commit(on_committed=getattr(reporter, "committed", None))   # (a caller's own reporter may lack it)
            run_notes += staging.notes
            reporter.close()
            if integrity is not None and integrity.unrecorded:
                run_notes.append(f"CRC-32: {len(integrity.unrecorded)} chunk(s) unchecked: their writer recorded no "
                                 "CRC-32 (safetensors blobs, or torch.save with compute_crc32=False)")
    casts: Dict[str, int] = {}
    for t in conversion.tensors:
        if t.is_cast:
            key = f"{t.src_dtype}->{t.dst_dtype}"
            casts[key] = casts.get(key, 0) + 1
    files = [s.filename for s in conversion.shards] + ([INDEX_FILE_NAME] if conversion.sharded else [])
    reference = hf.compare_with_reference(setup, conversion)
    return ConversionReport(
        checkpoint=checkpoint_abs, output=output_abs,
        tensors=len(conversion.tensors), shards=len(conversion.shards), bytes_written=conversion.files_nbytes,
        kept_bytes=sum(s.nbytes for s in kept),
        seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
        predicted_peak_bytes=conversion.peak_bytes, buffer_bytes=options.buffer_bytes,
        max_shard_bytes=options.max_shard_bytes, skipped=conversion.skipped_counts,
        renamed=len(conversion.renamed), cast=casts, verified_bytes=verified_bytes, files=files + copied, copied_files=copied,
        crc_checked_bytes=integrity.checked_bytes if integrity is not None else 0,
        verified_tensors=verified_tensors, crc_checked_chunks=integrity.checked_chunks if integrity is not None else 0,
        dropped_tied=list(setup.dropped_heads),
        notes=list(notes) + ([conversion.source_note] if conversion.source_note else []) + run_notes,
        config_from=setup.config.folder if setup.config else None, layout=setup.layout,
        unmatched_names=list(reference.unmatched), missing_names=list(reference.missing),
        fast_paths=list(fast.names))


def already_converted(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
                      config_from: Optional[str] = None, allow_unmatched: bool = False, no_config: bool = False,
                      **kwargs) -> bool:
    """Whether `output_dir` already holds what `convert` would write: its record names the same plan and the
    same checkpoint content (`provenance.source_fingerprint`), and every file it lists has its recorded size.
    Reads the record, `.metadata` and the chunks' headers; no tensor bytes."""
    try:
        found = record.read(output_dir)
    except record.RecordError:
        return False
    if found is None:
        return False
    checkpoint_dir, reader, meta, setup, _ = _prepare(
        checkpoint_dir, options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
        no_config=no_config)
    with reader:
        conversion = _checked_plan(meta, setup.options, checkpoint_dir)
        if plan_fingerprint(conversion) != found.plan_fingerprint:
            return False
        with_heads, _ = _with_tied_heads(meta, setup, conversion)
        before = provenance.snapshot(checkpoint_dir, provenance.source_files(checkpoint_dir, meta))
        source_fp = provenance.source_fingerprint(checkpoint_dir, meta, locate_chunks(with_heads, reader), before)
    return source_fp == found.source_fingerprint and not provenance.missing_or_resized(output_dir, found)


def _version() -> str:
    import sys
    return getattr(sys.modules[__package__], "__version__", "unknown")   # (no import: streamconv imports api)


def _recorded_options(options, kwargs, config_from, allow_unmatched: bool, no_config: bool, setup) -> dict:
    """The ConvertOptions fields an output was made with, as `verify` needs them to plan the same output: the
    resolved planner options (dtype "auto" as resolved, sizes in bytes) and the user's config choices."""
    _, user = resolve_options(options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
                              no_config=no_config)
    o = setup.options
    return ConvertOptions(
        max_shard_size=f"{o.max_shard_bytes}B", buffer_size=f"{o.buffer_bytes}B", dtype=o.dtype,
        config_from=os.path.abspath(user.config_from) if user.config_from else None, no_config=user.no_config,
        allow_unmatched=user.allow_unmatched, include=o.include, exclude=o.exclude,
        renames=tuple(f"{r.pattern.replace('=', chr(92) + '=')}={r.replacement}" for r in o.renames),
        subtree=o.subtree, source_format=o.source_format).__dict__


def _already_converted(checkpoint_dir: str, output_dir: str, conversion: ConversionPlan, options: PlanOptions,
                       notes, started: float) -> ConversionReport:
    """The report of a run that found its output already in place (a retry after a commit): nothing written."""
    return ConversionReport(
        checkpoint=os.path.abspath(checkpoint_dir), output=os.path.abspath(output_dir),
        tensors=len(conversion.tensors), shards=len(conversion.shards), bytes_written=0,
        seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
        predicted_peak_bytes=conversion.peak_bytes, buffer_bytes=options.buffer_bytes,
        max_shard_bytes=options.max_shard_bytes, skipped=conversion.skipped_counts,
        notes=list(notes) + [f"already converted: {output_dir} holds the output of this checkpoint (same content, "
                             "same plan, every file of its record present); nothing was written. Pass --overwrite "
                             "to convert it again"],
        already_converted=True)


def _first_data_file(conversion: ConversionPlan) -> Optional[str]:
    """The checkpoint file the first planned chunk is in: where copy_file_range is probed from."""
    return next((c.location.relative_path for t in conversion.tensors for c in t.chunks), None)


def describe_layout(shape: Sequence[int], chunks: Iterable) -> str:
    """'3 chunks, dim 0' / '4 chunks, dims 0,1' / 'replicated' for inspect."""
    chunks = list(chunks)
    dims = sorted({d for c in chunks for d, (s, full) in enumerate(zip(c.sizes, shape)) if s != full})
    if not dims:
        return "whole" if len(chunks) == 1 else f"{len(chunks)} copies"
    return f"{len(chunks)} chunks, dim{'s' if len(dims) > 1 else ''} {','.join(map(str, dims))}"


def inspect(checkpoint_dir: str) -> dict:
    """What is inside a checkpoint, from `.metadata` alone (and a Megatron folder's metadata.json). A run folder
    stands for the model's DCP folder in it (`discover.find_checkpoint`); `found` then says which was taken."""
    checkpoint_dir, found_note = discover.find_checkpoint(checkpoint_argument(checkpoint_dir))
    megatron_folder = megatron.recognise(checkpoint_dir)
    reader, meta = load(checkpoint_dir)
    reader.close()
    tensors = []
    total = 0
    by_dtype: Dict[str, int] = {}
    for t in meta.tensors:
        n = 1
        for s in t.shape:
            n *= s
        nbytes = n * dtypes.BY_NAME[t.dtype].itemsize if t.dtype in dtypes.BY_NAME else 0
        total += nbytes
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + nbytes
        tensors.append({"name": t.fqn, "dtype": t.dtype, "shape": list(t.shape), "bytes": nbytes,
                        "chunks": len(t.chunks), "layout": describe_layout(t.shape, t.chunks)})
    subtree = names.model_subtree(t.path for t in meta.tensors)
    try:
        detected = source_format(meta, PlanOptions())
        trainer = {"name": detected.name, "note": detected.note}
    except OptionsError as exc:
        trainer = {"name": "ambiguous", "note": str(exc)}
    top_keys: Dict[str, int] = {}
    for t in meta.tensors:
        key = str(t.path[0]) if len(t.path) >= 2 else "(top level)"
        top_keys[key] = top_keys.get(key, 0) + 1
    return {
        "checkpoint": os.path.abspath(checkpoint_dir),
        "torch_version_hint": meta.torch_version_hint,
        "metadata_version": meta.version,
        "files": list(meta.files),
        "tensor_count": len(meta.tensors),
        "tensor_bytes": total,
        "bytes_by_dtype": by_dtype,
        "top_level_keys": top_keys,
        "model_subtree": subtree,
        "source_format": trainer,
        "non_tensor_entries": [b.fqn for b in meta.byte_entries],
        "tensors": tensors,
        "found": found_note,
        "format": megatron_folder.note if megatron_folder else (meta.flavor or None),
        "transform": transforms.note(meta),     # compressed blobs, and whether this install can decode them
    }


def verify(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
           config_from: Optional[str] = None, reporter: Optional[Reporter] = None, crc: bool = True,
           allow_unmatched: bool = False, no_config: bool = False, **kwargs) -> verifying.VerifyResult:
    """Check an existing output folder against its checkpoint, streaming both: every tensor `convert` would
    write (same naming and cast options) must be there once, with the same bytes; the index and headers must
    be sound. `crc` also checks each chunk's CRC-32. Raises `verify.OutputDiffersError` (exit 3) or
    `verify.CorruptSourceError` (exit 2), both carrying the `VerifyResult`; returns it when all is well."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    output_dir = user_path(output_dir, "the output folder (OUTPUT_DIR)")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise VerificationError(f"{output_dir} is a file, not an output folder; pass the folder `streamconv convert` "
                                "wrote (the one holding the .safetensors files and their index)")
    found = record.read(output_dir)     # a damaged or planted record: RecordError, exit 3
    checked: list = []
    fast = fastpaths.detect()       # chosen once, here, and passed down (fastpaths.py)
    if found is not None:
        options, kwargs, config_from, allow_unmatched, no_config = provenance.options_from_record(
            found, options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched, no_config=no_config)
        checked.append(f"options from {record.RECORD_FILE}: " + (provenance.describe_options(found) or "defaults"))
    checkpoint_dir, reader, meta, setup, notes = _prepare(
        checkpoint_dir, options, kwargs, config_from=config_from, allow_unmatched=allow_unmatched,
        no_config=no_config, fast=fast)
    with reader:
        conversion = _checked_plan(meta, setup.options, checkpoint_dir)
        with_heads, heads = _with_tied_heads(meta, setup, conversion)
        before = provenance.snapshot(checkpoint_dir, provenance.source_files(checkpoint_dir, meta))
        stored = locate_chunks(with_heads, reader)
        if found is not None:
            checked += provenance.check_source(found, output_dir, checkpoint_dir,
                                               provenance.source_fingerprint(checkpoint_dir, meta, stored, before))
        else:
            checked.append(f"{output_dir} has no {record.RECORD_FILE} (made before records, or not by streamconv): "
                           "checked with the options given; pass the naming and dtype options convert used")
        integrity = ChunkIntegrity(reader, stored) if crc else None
        reporter.start(conversion.total_bytes + sum(t.nbytes for t in heads.values()), "verifying")
        result = verifying.verify_output(conversion, reader, stored, output_dir, checkpoint=checkpoint_dir,
                                         buffer_bytes=setup.options.buffer_bytes, integrity=integrity,
                                         progress=reporter.advance,
                                         tied_heads=[(heads[p.head], p.embedding) for p in setup.tied], fast=fast)
        reporter.close()
    result.checkpoint = os.path.abspath(checkpoint_dir)
    if found is not None:
        checked += provenance.check_record_files(found, output_dir, result)
    result.checked = checked
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = peak_rss_bytes()
    verifying.raise_if_failed(result)
    return result
