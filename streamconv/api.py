"""The Python API: the same verbs as the CLI (`inspect`, `plan`, `convert`, `verify`), returning values.

    import streamconv
    report = streamconv.convert("ckpt/", "hf_model/", max_shard_size="2GB", dtype="bfloat16")

Arguments are checked here and handed to `runs/` (conversion.py: the phases of one conversion; preparing.py:
what every verb does first) as two values: what to convert (`Request`) and how to run (`RunOptions`).
"""
from __future__ import annotations

import os
import time
from typing import Dict, Iterable, Optional, Sequence, Union

from . import dtypes
from .errors import OptionsError, VerificationError
from .fs import fastpaths, location
from .fs.paths import user_path
from .output import record
from .planning import names
from .planning.options import DEFAULT_CRC, DEFAULT_WORKERS, ConvertOptions, RunOptions  # noqa: F401 (DEFAULT_CRC: named here for callers)
from .planning.naming import source_format
from .planning.plan import ConversionPlan, PlanOptions
from .planning.trainers import megatron
from .runs import discover
from .runs.checkpoint import load, locate_chunks
from .runs.conversion import convert as _convert
from .runs.preparing import Request, already_converted as _already_converted, checked_plan, checkpoint_argument
from .runs.preparing import dry_run, prepare, with_tied_heads
from .runs.report import ConversionReport, Reporter, peak_rss_bytes
from .runs.runners import Runner
from .source import transforms
from .source.integrity import ChunkIntegrity
from .verification import provenance
from .verification import compare as verifying

# What `plan`, `convert` and `verify` take: the user's options, or the planner's resolved view.
Options = Union[ConvertOptions, PlanOptions]


def make_options(**keywords) -> PlanOptions:
    """PlanOptions from user-facing values ("5GB", "bf16", "REGEX=REPL"): the fields of `ConvertOptions`."""
    return ConvertOptions(**keywords).plan_options()


def plan(checkpoint_dir: str, options: Optional[Options] = None, *, config_from: Optional[str] = None,
         reporter: Optional[Reporter] = None, allow_unmatched: bool = False, no_config: bool = False,
         workers: Optional[int] = DEFAULT_WORKERS, **kwargs) -> ConversionPlan:
    """The dry run: everything `convert` would do, decided from `.metadata` (and the config folder) alone.
    `workers` (as for `convert`) changes only the predicted peak memory.
    Which folder was taken and what was decided about config, names and tied weights goes to `reporter.note`;
    an output that would not match the reference raises ReferenceMismatchError, as `convert` does."""
    return dry_run(checkpoint_dir, Request(options, kwargs, config_from, allow_unmatched, no_config), reporter,
                   workers)


def convert(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
            run: Optional[RunOptions] = None, overwrite: bool = False, reporter: Optional[Reporter] = None,
            config_from: Optional[str] = None, workers: Optional[int] = DEFAULT_WORKERS, verify: bool = False,
            crc: Optional[bool] = None, allow_unmatched: bool = False, no_config: bool = False, resume: bool = False,
            discard_partial: bool = False, shard_runner: Optional[Runner] = None, overwrite_any: bool = False,
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
    `shard_runner`: who writes the shards (`runs.runners.Runner`: `run(jobs, progress)`, e.g.
    `ray_runner.RayRunner()` for Ray tasks; default: `workers` threads here). Every shard must then be recorded
    in the staging folder's ledger, checked before the commit.
    The output holds a record (`streamconv.json`, record.py) tying it to the checkpoint's content and options.
    `overwrite` replaces only a folder holding such a record; `overwrite_any` any folder. A folder that already
    holds this conversion (same checkpoint content, same plan) is left as it is: the report says
    `already_converted`. Every checkpoint file is checked again before the commit: one that changed during the
    run (a trainer still writing) commits nothing (SourceChangedError, exit 2).
    `run` (a `RunOptions`) holds `overwrite`, `workers`, `verify`, `crc`, `resume`, `discard_partial` and
    `overwrite_any` in one object; pass it or those keywords, not both.
    """
    if shard_runner is not None and not callable(getattr(shard_runner, "run", None)):
        raise OptionsError(f"shard_runner: {type(shard_runner).__name__} is not a runner; pass an object with "
                           "run(jobs, progress) (streamconv.runs.runners.Runner), e.g. ray_runner.RayRunner()")
    run = RunOptions.given(run, overwrite=overwrite, workers=workers, verify=verify, crc=crc, resume=resume,
                           discard_partial=discard_partial, overwrite_any=overwrite_any)
    return _convert(checkpoint_dir, output_dir, Request(options, kwargs, config_from, allow_unmatched, no_config),
                    run, reporter, runner=shard_runner)


def already_converted(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
                      config_from: Optional[str] = None, allow_unmatched: bool = False, no_config: bool = False,
                      **kwargs) -> bool:
    """Whether `output_dir` already holds what `convert` would write: its record names the same plan and the
    same checkpoint content (`provenance.source_fingerprint`), and every file it lists has its recorded size.
    Reads the record, `.metadata` and the chunks' headers; no tensor bytes."""
    return _already_converted(checkpoint_dir, output_dir,
                              Request(options, kwargs, config_from, allow_unmatched, no_config))


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
        trainer = {"name": detected.name, "note": detected.note,
                   "family": detected.adapter.family if detected.adapter else None,
                   "expert_layout": (detected.adapter.expert_layout or None) if detected.adapter else None}
    except OptionsError as exc:
        trainer = {"name": "ambiguous", "note": str(exc)}
    top_keys: Dict[str, int] = {}
    for t in meta.tensors:
        key = str(t.path[0]) if len(t.path) >= 2 else "(top level)"
        top_keys[key] = top_keys.get(key, 0) + 1
    return {
        "checkpoint": location.absolute(checkpoint_dir),
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
    checkpoint_dir, reader, meta, setup, notes = prepare(
        checkpoint_dir, Request(options, kwargs, config_from, allow_unmatched, no_config), fast=fast)
    with reader:
        conversion = checked_plan(meta, setup.options, checkpoint_dir)
        with_heads, heads = with_tied_heads(meta, setup, conversion)
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
    result.checkpoint = location.absolute(checkpoint_dir)
    if found is not None:
        checked += provenance.check_record_files(found, output_dir, result)
    result.checked = checked
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = peak_rss_bytes()
    verifying.raise_if_failed(result)
    return result
