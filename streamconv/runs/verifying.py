"""`streamconv verify`: an existing output folder checked against its checkpoint, both streamed.

With the output's record (`streamconv.json`) the options come from it and the checkpoint's content must be what
was converted; without one, the options given are used and the result says so. The comparison itself is
`verification/compare.py`.
"""
from __future__ import annotations

import os
import time
from typing import Optional

from ..errors import VerificationError
from ..fs import fastpaths, location
from ..fs.paths import user_path
from ..fs.remote import is_url
from ..output import record
from ..source.integrity import ChunkIntegrity
from ..verification import compare, provenance
from .checkpoint import blob_reader, locate_chunks
from .preparing import Request, checked_plan, prepare, with_tied_heads
from .report import Reporter, peak_rss_bytes


def verify(checkpoint_dir: str, output_dir: str, request: Request, reporter: Optional[Reporter] = None,
           crc: bool = True) -> compare.VerifyResult:
    """See `streamconv.verify` (api.py): the result, or `OutputDiffersError` / `CorruptSourceError` carrying it."""
    reporter = reporter or Reporter()
    started = time.perf_counter()
    output_dir = user_path(output_dir, "the output folder (OUTPUT_DIR)")
    if not is_url(output_dir) and os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise VerificationError(f"{output_dir} is a file, not an output folder; pass the folder `streamconv convert` "
                                "wrote (the one holding the .safetensors files and their index)")
    found = record.read(output_dir)     # a damaged or planted record: RecordError, exit 3
    if found is None and is_url(output_dir):
        # In a bucket the record is published last (record.finished): without it the prefix is unfinished.
        raise VerificationError(f"{output_dir}: no {record.RECORD_FILE} there, so this is not a finished output (an "
                                "interrupted conversion into the bucket, or not streamconv's output); convert again, "
                                "with --resume to keep what an interrupted run uploaded")
    checked: list = []
    fast = fastpaths.detect()       # chosen once, here, and passed down (fastpaths.py)
    if found is not None:
        request = Request(*provenance.options_from_record(
            found, request.options, request.kwargs, config_from=request.config_from,
            allow_unmatched=request.allow_unmatched, no_config=request.no_config))
        checked.append(f"options from {record.RECORD_FILE}: " + (provenance.describe_options(found) or "defaults"))
    checkpoint_dir, reader, meta, setup, notes = prepare(checkpoint_dir, request, fast=fast)
    with reader:
        conversion = checked_plan(meta, setup.options, checkpoint_dir)
        with_heads, heads = with_tied_heads(meta, setup, conversion)
        before = provenance.snapshot(checkpoint_dir, provenance.source_files(checkpoint_dir, meta))
        stored = locate_chunks(with_heads, reader)
        blobs = blob_reader(with_heads, reader, stored)
        if found is not None:
            checked += provenance.check_source(found, output_dir, checkpoint_dir,
                                               provenance.source_fingerprint(checkpoint_dir, meta, stored, before))
        else:
            checked.append(f"{output_dir} has no {record.RECORD_FILE} (made before records, or not by streamconv): "
                           "checked with the options given; pass the naming and dtype options convert used")
        integrity = ChunkIntegrity(blobs, stored) if crc else None
        reporter.start(conversion.total_bytes + sum(t.nbytes for t in heads.values()), "verifying")
        result = compare.verify_output(conversion, blobs, stored, output_dir, checkpoint=checkpoint_dir,
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
    compare.raise_if_failed(result)
    return result
