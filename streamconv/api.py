"""The Python API: the same verbs as the CLI (`inspect`, `plan`, `convert`), returning values.

    import streamconv
    report = streamconv.convert("ckpt/", "hf_model/", max_shard_size="2GB", dtype="bfloat16")
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from typing import Dict, Iterable, Optional, Sequence, Tuple

from . import dtypes, hf, names
from .errors import OptionsError, OutputError, VerificationError
from .executor import Executor, check_stored
from .io import DirectoryReader, RangeReader
from .model import BlobLocation, CheckpointMetadata, StoredTensor, TensorEntry
from .plan import INDEX_FILE_NAME, ConversionPlan, PlanOptions, build_plan
from .report import ConversionReport, Reporter, peak_rss_bytes
from .parallel import write_shards
from .sink import ComparingSink, Mismatch, StagingDir
from .sizes import format_size, parse_size


# Two writer threads overlap one shard's reads with another's writes and casts; more rarely helps a disk.
DEFAULT_WORKERS = 2


def make_options(*, max_shard_size="5GB", buffer_size="32MiB", include: Sequence[str] = (),
                 exclude: Sequence[str] = (), dtype: str = "keep", renames: Sequence[str] = (),
                 subtree: Optional[str] = None, source_format: str = "auto") -> PlanOptions:
    """PlanOptions from user-facing values ("5GB", "bf16", "REGEX=REPL")."""
    out_dtype = dtypes.parse_output_dtype(dtype)   # "auto" stays: plan()/convert() resolve it from the config
    return PlanOptions(
        max_shard_bytes=parse_size(max_shard_size, option="--max-shard-size"),
        buffer_bytes=parse_size(buffer_size, option="--buffer-size"),
        include=tuple(include), exclude=tuple(exclude), dtype=out_dtype,
        renames=tuple(names.RenameRule.parse(r) for r in renames), subtree=subtree, source_format=source_format)


def load(checkpoint_dir: str) -> Tuple[DirectoryReader, CheckpointMetadata]:
    from .reader import find_metadata_file, load_metadata
    name = find_metadata_file(checkpoint_dir)   # explains what a DCP folder looks like when it is not one
    reader = DirectoryReader(checkpoint_dir)
    try:
        return reader, load_metadata(reader, name)
    except BaseException:
        reader.close()
        raise


def plan(checkpoint_dir: str, options: Optional[PlanOptions] = None, *, config_from: Optional[str] = None,
         reporter: Optional[Reporter] = None, **kwargs) -> ConversionPlan:
    """The dry run: everything `convert` would do, decided from `.metadata` (and the config folder) alone.
    What was decided about config, names and tied weights goes to `reporter.note`."""
    reader, meta = load(checkpoint_dir)
    reader.close()
    setup = hf.prepare(meta, options or make_options(**kwargs), checkpoint_dir, config_from=config_from)
    for note in setup.notes:
        (reporter or Reporter()).note(note)
    conversion = _checked_plan(meta, setup.options, checkpoint_dir)
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


def check_free_space(output_dir: str, needed_bytes: int) -> None:
    """Refuse before writing when the output's filesystem cannot hold it: a full disk half-way through a
    40 GB conversion wastes the time and leaves the disk full."""
    probe = os.path.dirname(os.path.abspath(output_dir))
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise OutputError(
            f"{output_dir}: the output needs {format_size(needed_bytes)} but {probe} has {format_size(free)} free; "
            "free some space, choose another output folder, or shrink the output with --dtype bfloat16")


def locate_chunks(conversion: ConversionPlan, reader: RangeReader) -> Dict[BlobLocation, StoredTensor]:
    """Find every planned chunk's raw bytes and check them against the metadata, before any output exists.
    Blobs are visited in file order, each once."""
    from .reader import locate_all
    entries = [TensorEntry(fqn=t.source_fqn, dtype=t.src_dtype, shape=t.shape, chunks=t.chunks)
               for t in conversion.tensors]
    advise = getattr(reader, "set_random_access", None)
    if advise:
        advise(True)
    try:
        stored = locate_all(reader, entries)
    finally:
        if advise:
            advise(False)
    for t in conversion.tensors:
        for chunk in t.chunks:
            check_stored(t, chunk, stored[chunk.location])
    return stored


def verify_shards(shards, reader: RangeReader, stored: Dict[BlobLocation, StoredTensor], path_for,
                  buffer_bytes: int, progress=None) -> int:
    """Re-run the executor against the written files, comparing instead of writing: catches a short write,
    a disk error or a bug that corrupted bytes. Returns the bytes compared."""
    checker = Executor(reader, stored, buffer_bytes, progress=progress)
    compared = 0
    for shard in shards:
        sink = ComparingSink(path_for(shard.filename))
        try:
            checker.write_shard(shard, sink)
        except Mismatch as exc:
            raise VerificationError(
                f"{shard.filename}: byte {exc.offset} differs from the checkpoint after writing; the disk or "
                "filesystem corrupted the output. Nothing was committed; check the disk and run again.") from None
        if os.path.getsize(path_for(shard.filename)) != shard.nbytes:
            raise VerificationError(f"{shard.filename}: file size differs from the planned {shard.nbytes} bytes")
        compared += sink.compared
    return compared


def convert(checkpoint_dir: str, output_dir: str, options: Optional[PlanOptions] = None, *,
            overwrite: bool = False, reporter: Optional[Reporter] = None, config_from: Optional[str] = None,
            workers: int = DEFAULT_WORKERS, verify: bool = False, **kwargs) -> ConversionReport:
    """Convert a DCP checkpoint folder into a folder of safetensors shards (+ index when sharded), with the
    base model's config and tokenizer beside them when `config_from` (or train_params.yaml) names it.

    Output appears at `output_dir` only when complete; on any error nothing is left there.
    `workers` threads write shards side by side, sharing the buffer budget. `verify` reads every written
    shard back and compares it with the checkpoint before the output is committed.
    """
    reporter = reporter or Reporter()
    started = time.perf_counter()
    reader, meta = load(checkpoint_dir)
    with reader:
        setup = hf.prepare(meta, options or make_options(**kwargs), checkpoint_dir, config_from=config_from)
        options = setup.options
        conversion = _checked_plan(meta, options, checkpoint_dir)
        # Dropped tied heads are still read once, to prove they equal the embedding written in their place.
        with_heads = build_plan(meta, replace(options, drop=())) if setup.tied else conversion
        heads = {t.name: t for t in with_heads.tensors if t.name in setup.dropped_heads}
        stored = locate_chunks(with_heads, reader)
        check_free_space(output_dir, conversion.files_nbytes)
        with StagingDir(output_dir, overwrite=overwrite) as staging:
            reporter.start(conversion.total_bytes * (2 if verify else 1) + sum(t.nbytes for t in heads.values()),
                           "converting")
            write_shards(conversion.shards, reader, stored, staging.file, buffer_bytes=options.buffer_bytes,
                         workers=workers, progress=reporter.advance)
            if setup.tied:
                checker = Executor(reader, stored, options.buffer_bytes, progress=reporter.advance)
                shard_of = {t.name: s.filename for s in conversion.shards for t in s.tensors}
                by_name = {t.name: t for t in conversion.tensors}
                for pair in setup.tied:
                    hf.tied.verify_tied(checker, heads[pair.head], by_name[pair.embedding],
                                        staging.file(shard_of[pair.embedding]), config_path=setup.config.folder)
            verified_bytes = 0
            if verify:
                verified_bytes = verify_shards(conversion.shards, reader, stored, staging.file, options.buffer_bytes,
                              progress=reporter.advance)
            copied = []
            if setup.config is not None:
                copied = hf.sidecars.copy_sidecars(setup.config, setup.sidecar_files, staging.path,
                                                   hf.config_dtype(conversion))
            index = conversion.index()
            if index is not None:
                staging.write_json(INDEX_FILE_NAME, index)   # written last: its presence means complete
            staging.commit()
            reporter.close()
    casts: Dict[str, int] = {}
    for t in conversion.tensors:
        if t.is_cast:
            key = f"{t.src_dtype}->{t.dst_dtype}"
            casts[key] = casts.get(key, 0) + 1
    files = [s.filename for s in conversion.shards] + ([INDEX_FILE_NAME] if conversion.sharded else [])
    reference = hf.compare_with_reference(setup, conversion)
    return ConversionReport(
        checkpoint=os.path.abspath(checkpoint_dir), output=os.path.abspath(output_dir),
        tensors=len(conversion.tensors), shards=len(conversion.shards), bytes_written=conversion.files_nbytes,
        seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
        predicted_peak_bytes=conversion.peak_bytes, buffer_bytes=options.buffer_bytes,
        max_shard_bytes=options.max_shard_bytes, skipped=conversion.skipped_counts,
        renamed=len(conversion.renamed), cast=casts, verified_bytes=verified_bytes, files=files + copied, copied_files=copied,
        dropped_tied=list(setup.dropped_heads),
        notes=list(setup.notes) + ([conversion.source_note] if conversion.source_note else []),
        config_from=setup.config.folder if setup.config else None, layout=setup.layout,
        unmatched_names=list(reference.unmatched), missing_names=list(reference.missing))


def describe_layout(shape: Sequence[int], chunks: Iterable) -> str:
    """'3 chunks, dim 0' / '4 chunks, dims 0,1' / 'replicated' for inspect."""
    chunks = list(chunks)
    dims = sorted({d for c in chunks for d, (s, full) in enumerate(zip(c.sizes, shape)) if s != full})
    if not dims:
        return "whole" if len(chunks) == 1 else f"{len(chunks)} copies"
    return f"{len(chunks)} chunks, dim{'s' if len(dims) > 1 else ''} {','.join(map(str, dims))}"


def inspect(checkpoint_dir: str) -> dict:
    """What is inside a checkpoint, from `.metadata` alone (and a Megatron folder's metadata.json)."""
    from .trainers import megatron
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
        "non_tensor_entries": [b.fqn for b in meta.byte_entries],
        "tensors": tensors,
        "format": megatron_folder.note if megatron_folder else None,
    }
