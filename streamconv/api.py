"""The Python API: the same verbs as the CLI (`inspect`, `plan`, `convert`, `verify`), returning values.

    import streamconv
    report = streamconv.convert("ckpt/", "hf_model/", max_shard_size="2GB", dtype="bfloat16")

Arguments are checked here and handed to `runs/` (conversion.py: the phases of one conversion; preparing.py:
what every verb does first, and `plan`; inspecting.py, verifying.py: the other two verbs) as two values: what to
convert (`Request`) and how to run (`RunOptions`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from .errors import OptionsError
from .model import CheckpointMetadata
from .planning.options import DEFAULT_CRC, DEFAULT_WORKERS, ConvertOptions, RunOptions
from .planning.plan import ConversionPlan, PlanOptions
from .runs.checkpoint import load, locate_chunks
from .runs.preparing import Request, already_converted as _already_converted, dry_run, metadata_plan
from .runs.report import ConversionReport, Reporter

if TYPE_CHECKING:       # (each verb imports its own machinery when called: start-up of the others)
    from .runs.runners import Runner
    from .verification.compare import VerifyResult

# The verbs, and names callers and messages use from here: `load` and `locate_chunks` (open a checkpoint as
# every verb does; hf_shards' message names `streamconv.api.load`), the option objects and their defaults.
__all__ = ["inspect", "plan", "convert", "verify", "already_converted", "build_plan", "make_options", "Options",
           "load", "locate_chunks", "ConvertOptions", "RunOptions", "DEFAULT_CRC", "DEFAULT_WORKERS"]

# What `plan`, `build_plan`, `convert` and `verify` take: the user's options, or the planner's resolved view.
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


def build_plan(meta: CheckpointMetadata, options: Optional[Options] = None, **kwargs) -> ConversionPlan:
    """The plan of a checkpoint's metadata already in hand (`streamconv.api.load(folder)[1]`, or a
    `CheckpointMetadata` built by hand): every output file, name, header and byte offset, from the metadata alone.
    `options`: a `ConvertOptions` or its fields as keywords (a `PlanOptions` is still taken). No folder is read, so
    unlike `plan` no config: names are not checked against a base model and `dtype="auto"` keeps the checkpoint's
    dtypes; `config_from` is refused. An empty selection is an empty plan, not an error."""
    return metadata_plan(meta, Request(options, kwargs))


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
    from .runs.conversion import convert as _convert     # here: `plan`, `inspect` and --help never write
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


def inspect(checkpoint_dir: str) -> dict:
    """What is inside a checkpoint, from `.metadata` alone (and a Megatron folder's metadata.json). A run folder
    stands for the model's DCP folder in it (`discover.find_checkpoint`); `found` then says which was taken."""
    from .runs.inspecting import inspect as _inspect     # here: only this verb needs it (start-up of the others)
    return _inspect(checkpoint_dir)


def verify(checkpoint_dir: str, output_dir: str, options: Optional[Options] = None, *,
           config_from: Optional[str] = None, reporter: Optional[Reporter] = None, crc: bool = True,
           allow_unmatched: bool = False, no_config: bool = False, **kwargs) -> VerifyResult:
    """Check an existing output folder against its checkpoint, streaming both: every tensor `convert` would
    write (same naming and cast options) must be there once, with the same bytes; the index and headers must
    be sound. `crc` also checks each chunk's CRC-32. Raises `OutputDiffersError` (exit 3) or
    `CorruptSourceError` (exit 2; both in verification/compare.py) carrying the `VerifyResult`; returns it when
    all is well."""
    from .runs.verifying import verify as _verify     # here: the comparison is only this verb's (and --verify's)
    return _verify(checkpoint_dir, output_dir, Request(options, kwargs, config_from, allow_unmatched, no_config),
                   reporter, crc=crc)
