"""What every verb does first, and the two verbs made of nothing else: `plan` (the dry run) and
`already_converted` (batch's skip test).

`prepare` finds the DCP folder (a run folder stands for the one in it), reads its metadata, resolves the options,
refuses optimizer-only folders, and prepares the HF side (config, names, reference check). The user's naming
choices travel as one `Request`, as they were given to the API.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Dict, NamedTuple, Optional, Tuple

from .. import hf
from ..errors import CheckpointError, OptionsError
from ..fs import fastpaths, location
from ..fs.paths import user_path
from ..model import CheckpointMetadata
from ..output import ledger, record
from ..planning.naming import left_out_while_decoding
from ..planning.options import resolve as resolve_options
from ..fs.cpus import available_cpus
from ..planning.plan import ConversionPlan, build_plan, uses_numpy, with_compiled_source, with_numpy_bytes
from ..planning.workers import with_workers
from ..source import transforms
from ..source.io import RangeReader
from ..verification import provenance
from . import discover, mapping
from .checkpoint import load, locate_chunks
from .report import Reporter


@dataclass(frozen=True)
class Request:
    """The user's choices of what to convert, as the API takes them: a `ConvertOptions` (or the planner's
    resolved `PlanOptions`), loose ConvertOptions fields as keywords, and the config choices."""
    options: Any = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    config_from: Optional[str] = None
    allow_unmatched: bool = False
    no_config: bool = False

    def resolved(self):
        """(PlanOptions, the user's ConvertOptions view) as `planning.options.resolve` makes them."""
        return resolve_options(self.options, self.kwargs, config_from=self.config_from,
                               allow_unmatched=self.allow_unmatched, no_config=self.no_config)


class Prepared(NamedTuple):
    checkpoint_dir: str
    reader: RangeReader         # the caller closes it
    meta: CheckpointMetadata
    setup: Any                  # hf.prepare's HfSetup: resolved options, config, names, tied heads
    notes: Tuple[str, ...]


def checkpoint_argument(checkpoint_dir) -> str:
    """A checkpoint path as given, refused when empty (OptionsError) or a file (CheckpointError, with what to
    pass instead); every verb starts here."""
    checkpoint_dir = user_path(checkpoint_dir, "the checkpoint folder (CHECKPOINT_DIR)")
    where = location.at(checkpoint_dir)
    if not where.is_dir() and where.exists():
        raise CheckpointError(
            f"{checkpoint_dir} is a file, not a folder; pass the DCP checkpoint folder (the one holding `.metadata` "
            f"and the .distcp files, e.g. {location.parent_and_name(checkpoint_dir)[0] or os.curdir}) or a run folder "
            "holding one")
    return checkpoint_dir


def prepare(checkpoint_dir: str, request: Request, fast: fastpaths.FastPaths = fastpaths.NONE) -> Prepared:
    """See the module docstring."""
    checkpoint_dir, found_note = discover.find_checkpoint(checkpoint_argument(checkpoint_dir))
    options, user = request.resolved()
    # The tensors planning leaves out whatever else it decides (optimizer state) are decoded without their
    # chunks' locations: decided once, from the options.
    reader, meta = load(checkpoint_dir, fast, left_out_while_decoding(options))
    try:
        options = replace(options, user=user)
        if options.subtree is None:     # --subtree names what to convert, optimizer state included
            discover.refuse_optimizer_only(meta, checkpoint_dir)
        setup = hf.prepare(meta, options, checkpoint_dir, config_from=user.config_from,
                           allow_unmatched=user.allow_unmatched, no_config=user.no_config)
    except BaseException:
        reader.close()
        raise
    notes = tuple(n for n in (found_note, transforms.note(meta)) if n) + tuple(setup.notes)
    return Prepared(checkpoint_dir, reader, meta, setup, notes)


def checked_plan(meta: CheckpointMetadata, options, checkpoint_dir: str) -> ConversionPlan:
    """The plan, refused when it selects nothing, its predicted peak counting numpy as this process maps it when
    the run will import it (runs/mapping.py)."""
    conversion = build_plan(meta, options)
    if not conversion.tensors:
        raise OptionsError(
            f"{checkpoint_dir}: no tensors selected to convert ({len(meta.tensors)} in the checkpoint); "
            "check --include/--exclude/--subtree (see `streamconv inspect` for the names)")
    if uses_numpy(conversion):
        conversion = with_measured_numpy(conversion)
    compiled = mapping.compiled_share(getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())
                                      if name.startswith("streamconv."))
    return with_compiled_source(conversion, compiled) if compiled else conversion


def with_measured_numpy(conversion: ConversionPlan) -> ConversionPlan:
    """The plan with numpy counted as its import measured in this process (runs/mapping.py: imported now if it
    was not), or as it was when that cannot be told (numpy imported already, no /proc)."""
    import_bytes = mapping.numpy_import_bytes()
    return conversion if import_bytes is None else with_numpy_bytes(conversion, import_bytes)


def metadata_plan(meta: CheckpointMetadata, request: Request) -> ConversionPlan:
    """`streamconv.build_plan`: the plan of metadata already in hand, no folder read. So no config: names are not
    checked against a reference model, `--dtype auto` keeps the checkpoint's dtypes, and a trainer layout that
    needs the config's head counts is refused by the planner. `config_from` is refused, not ignored."""
    options, user = request.resolved()
    if user.config_from is not None:
        raise OptionsError(f"config_from={user.config_from!r}: build_plan plans from metadata alone and reads no "
                           "folder; for a plan checked against the base model call "
                           "streamconv.plan(checkpoint_dir, config_from=...)")
    return build_plan(meta, replace(options, user=user))


def with_tied_heads(meta: CheckpointMetadata, setup, conversion: ConversionPlan):
    """(plan to locate, {head name: TensorPlan}): dropped tied heads are still read once, to prove they equal the
    embedding written in their place."""
    with_heads = build_plan(meta, replace(setup.options, drop=())) if setup.tied else conversion
    return with_heads, {t.name: t for t in with_heads.tensors if t.name in setup.dropped_heads}


def dry_run(checkpoint_dir: str, request: Request, reporter: Optional[Reporter] = None,
            workers: Optional[int] = None, cpus: Optional[float] = None) -> ConversionPlan:
    """`streamconv.plan`: everything `convert` would do, decided from `.metadata` (and the config folder) alone;
    notes go to `reporter.note`. `workers`: as --workers (None: chosen from `cpus`, by default the CPUs this
    process may use; planning/workers.py)."""
    reporter = reporter or Reporter()
    prepared = prepare(checkpoint_dir, request)
    prepared.reader.close()
    for note in prepared.notes:
        reporter.note(note)
    conversion = with_workers(checked_plan(prepared.meta, prepared.setup.options, prepared.checkpoint_dir), workers,
                              available_cpus() if cpus is None else cpus)
    if conversion.source_note:
        reporter.note(conversion.source_note)
    return conversion


def already_converted(checkpoint_dir: str, output_dir: str, request: Request) -> bool:
    """Whether `output_dir` already holds what `convert` would write: it is finished (`record.finished`: its
    record is there and every file it lists has its recorded size), and the record names the same plan and the
    same checkpoint content (`provenance.source_fingerprint`). Reads the record, `.metadata` and the chunks'
    headers; no tensor bytes."""
    try:
        found = record.finished(output_dir)
    except record.RecordError:
        return False
    if found is None:
        return False
    checkpoint_dir, reader, meta, setup, _ = prepare(checkpoint_dir, request)
    with reader:
        conversion = checked_plan(meta, setup.options, checkpoint_dir)
        if ledger.plan_fingerprint(conversion) != found.plan_fingerprint:
            return False
        with_heads, _ = with_tied_heads(meta, setup, conversion)
        before = provenance.snapshot(checkpoint_dir, provenance.source_files(checkpoint_dir, meta))
        source_fp = provenance.source_fingerprint(checkpoint_dir, meta, locate_chunks(with_heads, reader), before)
    return source_fp == found.source_fingerprint
