"""The verbs of the command line: `streamconv convert | plan | inspect | verify | batch`, as click commands.

With cli.py (the entry: signals first, then this module) and exits.py (a failure as one line and its exit code),
the only place that prints or picks exit codes. Imported by `streamconv.cli.main` once the interrupt handlers
are in place, and by `from streamconv.cli import cli` (the click group, for tests and embedding).
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import Optional

import click

from . import api, exits
from .errors import OptionsError, StreamconvError
from .fs import remote
from .help_sections import SectionedCommand
from .planning.options import BatchOptions, ConvertOptions, RunOptions, command_fields
from .runs.report import CollectingReporter, Reporter, TqdmReporter
from .planning.names import printable
from .sizes import format_size


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP) after the output was committed: the run is interrupted, the output complete."""

    def __init__(self, output: str):
        super().__init__(output)
        self.output = output


def _fail_cleanly(fn=None, *, keeps_staging: bool = False):
    """Turn library errors into one-line messages and their exit codes; never a traceback. `keeps_staging`: the
    command always resumes (batch), so an interrupt keeps staging folders whatever --resume says."""
    if fn is None:
        return functools.partial(_fail_cleanly, keeps_staging=keeps_staging)
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        exits.forget_signal()
        previous = exits.catch_signals()
        try:
            # for every URL the command opens (checkpoint, --config-from, output): set once, before it runs
            remote.StorageOptions.set(remote.parse_storage_options(kwargs.pop("storage_options", None)))
            return fn(*args, **kwargs)
        except StreamconvError as exc:
            if exits.signal_received():
                exits.interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
            exits.emit_failure(str(exc), type(exc).__name__, exc.exit_code, as_json)
            sys.exit(exc.exit_code)
        except InterruptedAfterCommit as exc:
            exits.emit_failure(f"interrupted after the commit: {exc.output} is complete and in place (only this "
                               "report was cut short); nothing needs to be run again", "Interrupted",
                               exits.INTERRUPTED_EXIT_CODE, as_json)
            sys.exit(exits.INTERRUPTED_EXIT_CODE)
        except (KeyboardInterrupt, click.exceptions.Abort):
            exits.interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
        except (click.exceptions.Exit, click.ClickException, BrokenPipeError):
            raise       # usage errors and a closed stdout are handled by _Group
        except Exception as exc:
            if exits.signal_received():     # whatever the interrupt broke on its way out
                exits.interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
            exits.internal_error(exc, as_json)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return wrapper


class _Group(click.Group):
    """Usage errors exit 64 (EX_USAGE, as README says) instead of click's 2, which README gives to a bad
    checkpoint; with --json they print the same one-object failure as every other error."""

    command_class = SectionedCommand        # every command's --help lists its options in titled sections

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        args = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in args
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            exc.exit_code = OptionsError.exit_code
            if as_json:
                click.echo(json.dumps({"error": exc.format_message(), "kind": "UsageError",
                                       "exit_code": exc.exit_code}))
            exc.show()
            sys.exit(exc.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            exits.interrupted(as_json, "--resume" in args)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except Exception as exc:
            exits.internal_error(exc, as_json)
        sys.exit(rv if isinstance(rv, int) else 0)

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:  # `streamconv --help | head -1`
            _stdout_to_devnull()
            raise click.exceptions.Exit(0) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            # The reader of stdout went away (`streamconv inspect ckpt | head`): what it wanted, it got. Without
            # this click would exit 1 with no message. A pipe closed while an error was being reported keeps
            # the error's exit code.
            _stdout_to_devnull()
            failure = exc.__context__
            ctx.exit(failure.exit_code if isinstance(failure, StreamconvError) else 0)


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null so Python's final flush of stdout does not hit the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _click_option(f, command: str) -> "click.Option":
    """One click option from an options field's metadata (flag, help, how it parses) as `command` takes it."""
    m = f.metadata
    default = m["default_in"].get(command, f.default)
    kwargs = dict(help=m["help_in"].get(command, m["help"]), metavar=m["metavar"],
                  show_default=m["show_default"] or command in m["default_in"], hidden=command in m["hidden_in"],
                  required=m["required"])
    kwargs.update(default=default)     # for an on/off pair None means "not given" (--crc: on with --verify)
    if m["is_flag"]:
        kwargs.update(is_flag=True)
    elif m["multiple"]:
        kwargs.update(multiple=True)
    if m["flag_value"] is not None:
        kwargs.update(is_flag=False, flag_value=m["flag_value"])
    if m["choices"]:
        kwargs.update(type=click.Choice(m["choices"]))
    elif m["int_range"]:
        kwargs.update(type=click.IntRange(*m["int_range"]))
    elif m["path"] or m["file"]:
        kwargs.update(type=click.Path(dir_okay=not m["file"]))
    spellings = [m["flag"]] + ([m["short"]] if m["short"] else [])
    # (a None default stays: for an on/off pair it means "not given", which click would otherwise make False)
    return click.option(*spellings, f.name, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _options(command: str):
    """Every option `command` takes, derived from the options objects' field metadata (`options.command_fields`:
    BatchOptions, ConvertOptions, RunOptions), then --json. No command declares a flag of its own."""
    def add(fn):
        decorators = [_click_option(f, command) for f in command_fields(command)]
        decorators.append(click.option("--json", "as_json", is_flag=True,
                                       help="A JSON report on stdout, errors included."))
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return add


# A terminal wider than 80 columns gets wider --help (click stops at 80 by default), so a command's sections fit
# more of a screen; a pipe still gets 80.
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(package_name="streamconv")
def cli():
    """Turn PyTorch Distributed Checkpoints (FSDP / DTensor `.distcp` + `.metadata`) into Hugging Face
    safetensors shards, streaming: memory stays at the buffer size whatever the model size.

    \b
    Typical use after FSDP fine-tuning:
      streamconv inspect ckpt/                    # what is inside
      streamconv plan ckpt/ --max-shard-size 2GB  # dry run: files, names, memory
      streamconv convert ckpt/ hf_model/          # shards + index, all or nothing
      streamconv verify ckpt/ hf_model/           # every byte checked again
      streamconv batch 'runs/*/checkpoint-*' -o 'hf/{parent}/{name}'

    Every command takes --help, and --json: one JSON object on stdout, failures included (`error`, `exit_code`).

    \b
    Exit codes (in full: README.md, "Exit codes"):
        0  done
        1  internal error (a bug: please report it); batch: a checkpoint failed
        2  bad, unsupported or unreadable checkpoint
        3  verification failed: the output differs from the checkpoint
        4  output names or shapes are not what the reference model loads
       64  bad option or usage
       71  out of a system resource (open files: raise ulimit -n)
       73  output cannot be written (not empty, disk full, permission...)
      130  interrupted by a signal (the message says what was kept)
    """


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.argument("output_dir", type=click.Path())
@_options("convert")
@_fail_cleanly
def convert(checkpoint_dir, output_dir, as_json, **option_values):
    """Convert CHECKPOINT_DIR (a DCP folder, or a run folder holding one) into OUTPUT_DIR.

    Written into a hidden staging folder and renamed into place only when complete: an error or Ctrl-C leaves
    nothing that looks finished. Dry run: `plan`. Options in full: docs/options.md; exit codes: `streamconv --help`.
    """
    options = ConvertOptions.take(option_values)
    run = RunOptions.take(option_values)
    progress = run.progress
    if progress is None:
        progress = sys.stderr.isatty() and not as_json and not run.quiet
    reporter: Reporter = TqdmReporter() if progress else CollectingReporter()
    try:
        try:
            report = api.convert(checkpoint_dir, output_dir, options, run=run, reporter=reporter)
        finally:
            reporter.close()
        _echo_convert_report(report, as_json, run)
    except KeyboardInterrupt:
        if reporter.committed_output is not None:     # the output is in place: say so, whatever was cut short
            raise InterruptedAfterCommit(reporter.committed_output) from None
        raise


def _echo_convert_report(report, as_json: bool, run: RunOptions) -> None:
    quiet = run.quiet
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), error=None, exit_code=0), indent=2))
    elif not quiet and report.already_converted:
        click.echo(f"already converted: {report.output} holds this checkpoint's output; nothing was written")
    elif not quiet:
        skipped = ", ".join(f"{n} {why}" for why, n in report.skipped.items()) or "nothing"
        cast = ", ".join(f"{n} {k}" for k, n in report.cast.items()) or "none"
        click.echo(f"wrote {report.tensors} tensors into {report.shards} file(s) in {report.output}\n"
                   f"  {format_size(report.bytes_written)} in {report.seconds:.2f} s ({report.mb_per_s:.0f} MB/s"
                   f"{_kept_text(report.kept_bytes)}), "
                   f"peak RSS {format_size(report.peak_rss_bytes)} "
                   f"(predicted {format_size(report.predicted_peak_bytes)})"
                   f"{_task_rss_text(report.task_peak_rss_bytes)}\n"
                   f"  skipped: {skipped}; cast: {cast}; renamed: {report.renamed}\n"
                   f"  copied: {', '.join(report.copied_files) or 'nothing'}; "
                   f"dropped tied: {', '.join(report.dropped_tied) or 'none'}")
        checked = _checked_line(report.verified_tensors if run.verify else None,
                                report.crc_checked_chunks if run.check_crc else None)
        if checked:
            click.echo(f"  {checked}")
        for note in report.notes:
            click.echo(f"  {note}")


def _checked_line(tensors: Optional[int], crc_chunks: Optional[int]) -> str:
    """The one line saying what a check proved ('' when nothing was checked); None: that check did not run."""
    if tensors is None:
        return "" if crc_chunks is None else f"CRC-checked: {crc_chunks:,} chunks as they were read (--verify " \
                                              "also reads the output back)"
    crc = "CRC-32s not checked" if crc_chunks is None else f"{crc_chunks:,} chunks CRC-checked"
    return f"verified: {tensors:,} tensors equal to the checkpoint; {crc}"


def _task_rss_text(task_peak_rss_bytes: int) -> str:
    """The shard tasks' own peak (--ray: each task is a process of its own; the driver's figure is not theirs)."""
    return f"; shard tasks' peak RSS {format_size(task_peak_rss_bytes)}" if task_peak_rss_bytes else ""


def _kept_text(kept_bytes: int) -> str:
    """Say what the MB/s counts when --resume kept shards (their bytes were not written by this run)."""
    return f" written by this run; {format_size(kept_bytes)} kept from the interrupted one" if kept_bytes else ""


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@_options("plan")
@_fail_cleanly
def plan(checkpoint_dir, as_json, **option_values):
    """Dry run: the files, the tensors in each and the predicted peak memory, from `.metadata` (and the config
    folder's JSON and safetensors headers) alone; writes nothing.

    Exits as `convert` would before writing: 2 (checkpoint), 4 (names or shapes not the reference model's), 64.
    """
    options = ConvertOptions.take(option_values)
    run = RunOptions.take(option_values)
    workers, quiet = run.workers, run.quiet
    notes = CollectingReporter()
    conversion = api.plan(checkpoint_dir, options, reporter=notes, workers=workers)
    summary = conversion.to_dict()
    if as_json:
        click.echo(json.dumps(dict(summary, notes=notes.notes, error=None, exit_code=0), indent=2))
        return
    for shard in conversion.shards if not quiet else ():
        click.echo(f"{shard.filename}  {format_size(shard.nbytes)}  {len(shard.tensors)} tensors:")
        for t in shard.tensors:     # in the file's order: each tensor under the file it goes into
            cast = f" (from {t.src_dtype})" if t.is_cast else ""
            click.echo(f"  {printable(t.name)}  {t.dst_dtype}{cast} {list(t.shape)}  {len(t.chunks)} chunk(s), "
                       f"{t.assembly}")
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "nothing"
    click.echo(f"total {format_size(conversion.total_bytes)} in {len(conversion.shards)} file(s); "
               f"skipped: {skipped}; predicted peak memory {format_size(conversion.peak_bytes)} "
               f"({conversion.workers} worker(s): {conversion.workers_reason})")
    for note in notes.notes if not quiet else ():
        click.echo(f"  {note}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.argument("output_dir", type=click.Path())
@_options("verify")
@_fail_cleanly
def verify(checkpoint_dir, output_dir, as_json, **option_values):
    """Check OUTPUT_DIR (a converted folder) against CHECKPOINT_DIR without converting again.

    Streams both sides: every tensor's dtype, shape and bytes, the index (total_size, every weight once), the
    headers. An output with a record (streamconv.json) is checked with the options it was made with. Exit 0:
    all match; 3: the output differs; 2: a checkpoint chunk fails its CRC-32. More: docs/verify.md.
    """
    from .verification.compare import CorruptSourceError, OutputDiffersError
    options = ConvertOptions.take(option_values)
    run = RunOptions.take(option_values)
    crc, quiet = run.crc, run.quiet
    interactive = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if interactive else CollectingReporter()
    try:
        result = api.verify(checkpoint_dir, output_dir, options, reporter=reporter, crc=crc)
    except (OutputDiffersError, CorruptSourceError) as exc:
        reporter.close()
        # One JSON object for scripts: the whole finding plus the error, as for any other failure.
        if as_json:
            click.echo(json.dumps(dict(exc.result.to_dict(), error=str(exc), kind=type(exc).__name__,
                                       exit_code=exc.exit_code), indent=2))
        else:
            for line in exc.result.problems():
                click.echo(line)
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    finally:
        reporter.close()
    if as_json:
        # The same keys as a failure's report: scripts read `error` and `exit_code` either way.
        click.echo(json.dumps(dict(result.to_dict(), error=None, exit_code=0), indent=2))
    elif not quiet:
        crc_text = (f"; {result.crc_checked_chunks} chunk CRC-32s ok ({format_size(result.crc_checked_bytes)})"
                    if crc else "; CRC-32s not checked")
        if result.crc_unrecorded_chunks:
            crc_text += (f", {result.crc_unrecorded_chunks} chunk(s) unchecked (saved without a CRC-32: "
                         "safetensors blobs, or torch.save with compute_crc32=False)")
        click.echo(f"{_checked_line(result.tensors_equal, result.crc_checked_chunks if crc else None)}\n"
                   f"  {len(result.files)} file(s) of {result.output} match {result.checkpoint}: "
                   f"{format_size(result.bytes_compared)} compared in {result.seconds:.2f} s, "
                   f"peak RSS {format_size(result.peak_rss_bytes)}{crc_text}")
        for line in result.checked:
            click.echo(f"  {line}")


@cli.command()
@click.argument("sources", nargs=-1)
@_options("batch")
@_fail_cleanly(keeps_staging=True)
def batch(sources, as_json, **option_values):
    """Convert many checkpoints (SOURCES: folders, quoted globs), each in its own process; a rerun skips or
    resumes them. Exit 1 if one failed."""
    from .runs import batch as batching
    options, run, where = (ConvertOptions.take(option_values), RunOptions.take(option_values),
                           BatchOptions.take(option_values))
    if run.resume and run.discard_partial:
        raise OptionsError("--resume keeps interrupted conversions and --discard-partial deletes them: pass one")
    quiet, progress = run.quiet, run.progress
    if progress is None:
        progress = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if progress else CollectingReporter()
    try:
        report = batching.convert_many(sources, where.output_template, options, from_file=where.from_file,
                                       jobs=where.jobs, max_memory=where.max_memory, workers=run.workers,
                                       crc=run.crc, verify=run.verify, overwrite=run.overwrite, reporter=reporter,
                                       ray=where.ray_address, overwrite_any=run.overwrite_any,
                                       discard_partial=run.discard_partial)
    finally:
        reporter.close()
    failed = report.failed
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), error=(f"{len(failed)} checkpoint(s) failed" if failed else None),
                                   exit_code=1 if failed else 0), indent=2))
    elif not quiet:
        # --ray: the driver's peak is not the writers'; each checkpoint's shard tasks measured their own
        tasks = any(i.task_peak_rss_bytes for i in report.items)
        task_head = f" {'task RSS':>10}" if tasks else ""
        click.echo(f"{'status':9} {'size':>10} {'seconds':>8} {'MB/s':>7} {'peak RSS':>10}{task_head}  "
                   "checkpoint -> output")
        for i in report.items:
            task_rss = f" {format_size(i.task_peak_rss_bytes) if i.task_peak_rss_bytes else '-':>10}" if tasks else ""
            click.echo(f"{i.status:9} {format_size(i.bytes):>10} {i.seconds:8.2f} {i.mb_per_s:7.0f} "
                       f"{format_size(i.peak_rss_bytes) if i.peak_rss_bytes else '-':>10}{task_rss}  "
                       f"{printable(i.source)} -> {printable(i.output)}")
        for note in report.notes:
            click.echo(f"note: {printable(note)}", err=True)
        counts = ", ".join(f"{n} {k}" for k, n in report.to_dict()["counts"].items())
        click.echo(f"{len(report.items)} checkpoint(s) in {report.seconds:.1f} s ({counts}); {report.jobs} job(s)")
    for i in failed:
        where = "" if i.error.startswith(i.source) else f"{printable(i.source)}: "
        click.echo(f"error: {where}{i.error}", err=True)
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@_options("inspect")
@_fail_cleanly
def inspect(checkpoint_dir, as_json):
    """Show what a DCP checkpoint holds: tensors, dtypes, shapes, how each is sharded, non-tensor entries.
    Exit 2 when it is not a checkpoint streamconv can read (the message says why)."""
    info = api.inspect(checkpoint_dir)
    if as_json:
        click.echo(json.dumps(dict(info, error=None, exit_code=0), indent=2))
        return
    if info.get("found"):
        click.echo(info["found"])
    click.echo(f"{printable(info['checkpoint'])}: {info['tensor_count']} tensors, {format_size(info['tensor_bytes'])} in "
               f"{len(info['files'])} file(s); written by torch {info['torch_version_hint']}")
    if info.get("format"):
        click.echo(info["format"])
    if info.get("transform"):
        click.echo(info["transform"])
    # Names come from the checkpoint: a lone surrogate or a control character is printed escaped.
    click.echo("top-level keys: " + ", ".join(f"{printable(k)} ({n})" for k, n in info["top_level_keys"].items()))
    click.echo("bytes by dtype: " + ", ".join(f"{k} {format_size(v)}" for k, v in info["bytes_by_dtype"].items()))
    if info["source_format"]["note"]:
        click.echo(info["source_format"]["note"])
    for t in info["tensors"]:
        click.echo(f"  {printable(t['name'])}  {t['dtype']} {t['shape']}  {t['layout']}")
    if info["non_tensor_entries"]:
        click.echo(f"non-tensor entries ({len(info['non_tensor_entries'])}): "
                   + ", ".join(printable(n) for n in info["non_tensor_entries"][:8])
                   + (" ..." if len(info["non_tensor_entries"]) > 8 else ""))


def run() -> object:
    """The command line in `sys.argv` run to its end: the exit code (click ends every command with sys.exit).
    cli.main installs the interrupt handlers first and exits with it."""
    try:
        cli(prog_name="streamconv")
        code = 0
    except SystemExit as exc:
        code = exc.code
    try:
        sys.stdout.flush()  # short output still in the buffer meets a closed pipe here, not at interpreter exit
    except BrokenPipeError:
        _stdout_to_devnull()
    return code
