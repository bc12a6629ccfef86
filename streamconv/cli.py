"""Command line: `streamconv convert | plan | inspect`. The only place that prints or picks exit codes."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
from typing import Optional

import click

from . import api
from .errors import OptionsError, StreamconvError
from .help_sections import SectionedCommand
from .planning.options import ConvertOptions
from .runs.report import CollectingReporter, Reporter, TqdmReporter
from .planning.names import printable
from .sizes import format_size


# SIGTERM (job schedulers) and SIGHUP (a closed terminal or ssh session) end a run like Ctrl-C does.
_INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_received = {"signal": None}


def _on_signal(signum, frame):
    # Only the first signal interrupts: schedulers often send several (SIGTERM then SIGINT, or one per
    # process group member), and a second KeyboardInterrupt would break the cleanup the first one started.
    if _received["signal"] is None:
        _received["signal"] = signum
        raise KeyboardInterrupt


def _emit_failure(message: str, kind: str, exit_code: int, as_json: bool) -> None:
    # backslashreplace: a path or name holding a lone surrogate must not turn the message into a traceback
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    click.echo(message if message.startswith(("error:", "interrupted", "streamconv:")) else f"error: {message}",
               err=True)
    if as_json:
        # Scripts reading --json get every failure on stdout too, in the same shape every time.
        click.echo(json.dumps({"error": message, "kind": kind, "exit_code": exit_code}))


INTERNAL_ERROR_HINT = "this is a bug in streamconv; please report it with the command you ran and this line"


def _internal_error(exc: BaseException, as_json: bool) -> None:
    """Last resort: one line, exit 1, never a traceback."""
    detail = " ".join(str(exc).split())[:300]
    _emit_failure(f"streamconv: internal error ({type(exc).__name__}: {detail}); {INTERNAL_ERROR_HINT}",
                  "InternalError", 1, as_json)
    sys.exit(1)


def _interrupted(as_json: bool, resume: bool, batch: bool = False) -> None:
    kept = ("the staging folder is kept: run the same command with --resume to continue" if resume
            else "nothing was committed and the partial output was removed")
    if batch:
        kept = "finished checkpoints are committed, the others' staging folders kept: run the same command to continue"
    _emit_failure(f"interrupted: {kept}", "Interrupted", 130, as_json)
    sys.exit(130)


class InterruptedAfterCommit(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM/SIGHUP) after the output was committed: the run is interrupted, the output complete."""

    def __init__(self, output: str):
        super().__init__(output)
        self.output = output


def _fail_cleanly(fn):
    """Turn library errors into one-line messages and their exit codes; never a traceback."""
    keeps_staging = fn.__name__ == "batch"      # batch always resumes: an interrupt keeps staging folders
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        _received["signal"] = None
        previous = {s: signal.signal(s, _on_signal) for s in _INTERRUPT_SIGNALS}
        try:
            return fn(*args, **kwargs)
        except StreamconvError as exc:
            if _received["signal"] is not None:
                _interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
            _emit_failure(str(exc), type(exc).__name__, exc.exit_code, as_json)
            sys.exit(exc.exit_code)
        except InterruptedAfterCommit as exc:
            _emit_failure(f"interrupted after the commit: {exc.output} is complete and in place (only this "
                          "report was cut short); nothing needs to be run again", "Interrupted", 130, as_json)
            sys.exit(130)
        except (KeyboardInterrupt, click.exceptions.Abort):
            _interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
        except (click.exceptions.Exit, click.ClickException, BrokenPipeError):
            raise       # usage errors and a closed stdout are handled by _Group
        except Exception as exc:
            if _received["signal"] is not None:     # whatever the interrupt broke on its way out
                _interrupted(as_json, bool(kwargs.get("resume")), keeps_staging)
            _internal_error(exc, as_json)
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
            _interrupted(as_json, "--resume" in args)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except Exception as exc:
            _internal_error(exc, as_json)
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


def _click_option(f, hidden: bool = False) -> "click.Option":
    """One click option from a `ConvertOptions` field's metadata (flag, help, how it parses)."""
    m = f.metadata
    kwargs = dict(help=m["help"], metavar=m["metavar"], show_default=m["show_default"], hidden=hidden or None)
    if m["is_flag"]:
        kwargs.update(is_flag=True)
    elif m["multiple"]:
        kwargs.update(multiple=True)
    else:
        kwargs.update(default=f.default)
    if m["choices"]:
        kwargs.update(type=click.Choice(m["choices"]))
    elif m["path"]:
        kwargs.update(type=click.Path())
    return click.option(m["flag"], f.name, **{k: v for k, v in kwargs.items() if v is not None})


def _plan_options(fn, hide=()):
    """Options shared by `convert`, `plan`, `verify` and `batch`: the fields of `ConvertOptions`, then --json.
    `hide`: accepted (scripts pass them) but not listed in --help, where they do not apply."""
    decorators = [_click_option(f, f.name in hide) for f in dataclasses.fields(ConvertOptions)]
    decorators.append(click.option("--json", "as_json", is_flag=True,
                                   help="Print a machine-readable JSON report on stdout."))
    for d in reversed(decorators):
        fn = d(fn)
    return fn


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
      streamconv plan ckpt/ --max-shard-size 2GB  # dry run: files, names, predicted memory
      streamconv convert ckpt/ hf_model/          # write model-0000N-of-0000M.safetensors + index
    """


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.argument("output_dir", type=click.Path())
@_plan_options
@click.option("--overwrite", is_flag=True,
              help="Replace OUTPUT_DIR when it holds a streamconv output (its streamconv.json record) of other weights "
                   "or options.")
@click.option("--overwrite-any", is_flag=True,
              help="Replace OUTPUT_DIR whatever it holds (a folder streamconv did not write: its files are lost).")
@click.option("--workers", default=api.DEFAULT_WORKERS, show_default=True, type=click.IntRange(1, 64),
              help="Threads writing shards side by side; they share --buffer-size.")
@click.option("--verify", is_flag=True,
              help="Before committing, check the written folder as `streamconv verify` does: every tensor read back "
                   "and compared with the checkpoint, index and headers checked, chunk CRC-32s checked (reads the "
                   "checkpoint twice).")
@click.option("--crc/--no-crc", default=None,
              help="Check each chunk's CRC-32 (recorded by torch.save in the .distcp file) as it is read, so a "
                   "corrupt checkpoint fails (exit 2) instead of converting into wrong weights. Costs ~0.2 s of "
                   "CPU per GB. Default: on with --verify, else off.")
@click.option("--resume", is_flag=True,
              help="Continue a conversion into OUTPUT_DIR that was killed: keep its finished shards (each checked "
                   "against its size and checksum) and write the rest. Needs the same options and an unchanged "
                   "checkpoint. On failure or Ctrl-C the staging folder is kept for another --resume.")
@click.option("--discard-partial", is_flag=True,
              help="Delete the staging folder an interrupted conversion into OUTPUT_DIR left, and start over.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--progress/--no-progress", default=None,
              help="Show a progress bar on stderr. Default: only when stderr is a terminal and neither --json nor "
                   "--quiet is given.")
@_fail_cleanly
def convert(checkpoint_dir, output_dir, as_json, overwrite, overwrite_any, workers, verify, crc, resume,
            discard_partial, quiet, progress, **option_values):
    """Convert CHECKPOINT_DIR (a DCP folder) into OUTPUT_DIR (safetensors shards).

    CHECKPOINT_DIR may also be a run folder holding one DCP folder with model weights (accelerate's state/, a
    Trainer checkpoint-N/, torchtitan's checkpoint/ with one step-N/): the note says which was taken. When it
    holds several, they are listed and none is taken.

    The output is written to a hidden staging folder beside OUTPUT_DIR, fsynced, and renamed into place
    only when complete; an error or Ctrl-C leaves nothing that looks finished. OUTPUT_DIR may not be the
    checkpoint folder or hold it (a subfolder of it is fine), nor the current folder or a mount point (write
    into a new folder inside it). Only the model's weights are written:
    optimizer state and non-tensor entries are skipped.
    """
    options = ConvertOptions.take(option_values)
    if progress is None:
        progress = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if progress else CollectingReporter()
    try:
        try:
            report = api.convert(checkpoint_dir, output_dir, options, overwrite=overwrite, reporter=reporter,
                                 workers=workers, verify=verify, crc=crc, resume=resume,
                                 discard_partial=discard_partial, overwrite_any=overwrite_any)
        finally:
            reporter.close()
        _echo_convert_report(report, as_json, quiet, verify=verify, crc=crc)
    except KeyboardInterrupt:
        if reporter.committed_output is not None:     # the output is in place: say so, whatever was cut short
            raise InterruptedAfterCommit(reporter.committed_output) from None
        raise


def _echo_convert_report(report, as_json: bool, quiet: bool, *, verify: bool, crc: Optional[bool]) -> None:
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
                   f"(predicted {format_size(report.predicted_peak_bytes)})\n"
                   f"  skipped: {skipped}; cast: {cast}; renamed: {report.renamed}\n"
                   f"  copied: {', '.join(report.copied_files) or 'nothing'}; "
                   f"dropped tied: {', '.join(report.dropped_tied) or 'none'}")
        checked = _checked_line(report.verified_tensors if verify else None,
                                report.crc_checked_chunks if (crc if crc is not None else verify or api.DEFAULT_CRC) else None)
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


def _kept_text(kept_bytes: int) -> str:
    """Say what the MB/s counts when --resume kept shards (their bytes were not written by this run)."""
    return f" written by this run; {format_size(kept_bytes)} kept from the interrupted one" if kept_bytes else ""


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@_plan_options
@click.option("--workers", default=api.DEFAULT_WORKERS, show_default=True, type=click.IntRange(1, 64),
              help="As for convert: the writer threads the predicted peak memory is for.")
@click.option("--quiet", "-q", is_flag=True, help="Print only the summary line (no files, tensors or notes).")
@_fail_cleanly
def plan(checkpoint_dir, as_json, workers, quiet, **option_values):
    """Dry run: show the files, which tensor goes into each, and the predicted peak memory `convert` would
    produce.

    Reads only `.metadata` (and the config folder's JSON files and safetensors headers); writes nothing. Takes
    convert's options that decide the output or its memory; not those about writing it (--overwrite, --resume,
    --discard-partial), checking it (--verify, --crc) or showing progress (--progress).
    """
    notes = CollectingReporter()
    conversion = api.plan(checkpoint_dir, ConvertOptions.take(option_values), reporter=notes, workers=workers)
    summary = conversion.to_dict()
    if as_json:
        click.echo(json.dumps(dict(summary, notes=notes.notes, error=None, exit_code=0), indent=2))
        return
    for shard in conversion.shards if not quiet else ():
        click.echo(f"{shard.filename}  {format_size(shard.nbytes)}  {len(shard.tensors)} tensors:")
        for t in shard.tensors:     # in the file's order: each tensor under the file it goes into
            cast = f" (from {t.src_dtype})" if t.is_cast else ""
            click.echo(f"  {printable(t.name)}  {t.dst_dtype}{cast} {list(t.shape)}  {len(t.chunks)} chunk(s), "
                       f"{'copy' if t.is_row_contiguous else ('gather' if t.pieces else 'blocks')}")
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "nothing"
    click.echo(f"total {format_size(conversion.total_bytes)} in {len(conversion.shards)} file(s); "
               f"skipped: {skipped}; predicted peak memory {format_size(conversion.peak_bytes)} "
               f"({workers} worker(s))")
    for note in notes.notes if not quiet else ():
        click.echo(f"  {note}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path())
@click.argument("output_dir", type=click.Path())
@functools.partial(_plan_options, hide=("max_shard_size",))    # tensors are found by name: sizes do not matter
@click.option("--crc/--no-crc", default=True, show_default=True,
              help="Check every read chunk's CRC-32, as recorded by torch.save in its .distcp file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only problems.")
@_fail_cleanly
def verify(checkpoint_dir, output_dir, as_json, crc, quiet, **option_values):
    """Check OUTPUT_DIR (a converted folder) against CHECKPOINT_DIR without converting again.

    An output with a record (streamconv.json, written by every conversion) needs no options: verify takes the
    ones it was made with from the record (an option given that contradicts it is an error, exit 64), checks that
    it was made from this checkpoint's content, and that every file the record lists (config, tokenizer, index)
    is there with its size and CRC-32. For an output without a record, pass the naming and dtype options the
    conversion used (--dtype, --rename, --include/--exclude, --subtree, --config-from). Streams both sides with
    --buffer-size of memory, one output file open at a time. Checks the file names transformers loads
    (model.safetensors, or model-NNNNN-of-NNNNN.safetensors with an index), the index (every weight once, every
    file present, total_size), that every shard is a regular file whose header follows the safetensors rules
    (read by streamconv itself; the safetensors package is not needed) with the __metadata__ streamconv
    writes, that no shard holds a tensor the index does not list, and every tensor's dtype, shape and bytes;
    reports missing, extra and differing tensors (name and first differing element). Prints one line saying
    what was verified. Exit 0 when all match, 3 when the output differs, 2 when a checkpoint chunk fails its
    CRC-32; an output that cannot be read is not a difference (its own exit code).
    """
    from .verification.compare import CorruptSourceError, OutputDiffersError
    options = ConvertOptions.take(option_values)
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
@click.option("--output-template", "-o", required=True, metavar="TEMPLATE",
              help="Where each checkpoint's output goes: {name} is its folder name, {parent} the folder above it, "
                   "{step} the digits at the end of its name, e.g. 'hf/{parent}-{step}'.")
@click.option("--from-file", "from_file", default=None, metavar="LIST", type=click.Path(dir_okay=False),
              help="Also convert the folders or globs listed in LIST, one a line ('#' comments allowed).")
@_plan_options
@click.option("--jobs", "-j", default=None, type=click.IntRange(1, 256),
              help="Checkpoints converted side by side, each in its own process. Default: one per output device.")
@click.option("--max-memory", "max_memory", default=None, metavar="SIZE",
              help="Keep the sum of the running jobs' predicted peak memory within SIZE (e.g. 8GiB); a checkpoint "
                   "predicted to need more fails without starting.")
@click.option("--workers", default=api.DEFAULT_WORKERS, show_default=True, type=click.IntRange(1, 64),
              help="Threads writing shards side by side within each job; they share --buffer-size.")
@click.option("--verify", is_flag=True, help="Check every output before committing it, as convert --verify does.")
@click.option("--crc/--no-crc", default=None, help="Check each chunk's CRC-32 as it is read (as for convert).")
@click.option("--overwrite", is_flag=True,
              help="Replace outputs that hold a streamconv output of other weights or options; without it an output "
                   "already converted from the same checkpoint content with the same plan is skipped and any other "
                   "non-empty output fails its checkpoint.")
@click.option("--overwrite-any", is_flag=True,
              help="Replace outputs whatever they hold (folders streamconv did not write: their files are lost).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Write each checkpoint's shards as Ray tasks (pip install 'streamconv[ray]'): --ray alone starts "
                   "a local cluster, --ray ADDRESS joins one (e.g. ray://head:10001 or head:6379). Workers must see "
                   "the same storage paths.")
@click.option("--resume", is_flag=True,
              help="Continue interrupted checkpoints from their staging folders, keeping finished shards. This is "
                   "what batch always does; the flag is accepted so that convert's advice works here too.")
@click.option("--discard-partial", is_flag=True,
              help="Delete the staging folder an interrupted conversion left, for every checkpoint that has one, "
                   "and convert those checkpoints from the start (e.g. after changing options).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or table; print only failures.")
@click.option("--progress/--no-progress", default=None,
              help="Show one progress bar for the batch on stderr. Default: only on a terminal without --json or "
                   "--quiet.")
@_fail_cleanly
def batch(sources, output_template, from_file, as_json, jobs, max_memory, workers, verify, crc, overwrite,
          overwrite_any, ray_address, resume, discard_partial, quiet, progress, **option_values):
    """Convert many checkpoints: SOURCES are folders or globs (quote them: 'runs/*/checkpoint-*').

    Each checkpoint is planned first (from .metadata), then converted as `convert --resume` would, in a process
    of its own. An output that is already complete and matches its plan (every shard's size and header, the
    index) is skipped, so a rerun continues where the last one stopped; an interrupted one resumes shard by
    shard. A checkpoint that fails does not stop the others; the exit code is 1 when any failed (the table and
    --json report say which and why).
    """
    from .runs import batch as batching
    if resume and discard_partial:
        raise OptionsError("--resume keeps interrupted conversions and --discard-partial deletes them: pass one")
    options = ConvertOptions.take(option_values)
    if progress is None:
        progress = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if progress else CollectingReporter()
    try:
        report = batching.convert_many(sources, output_template, options, from_file=from_file, jobs=jobs,
                                       max_memory=max_memory, workers=workers, crc=crc, verify=verify,
                                       overwrite=overwrite, reporter=reporter, ray=ray_address,
                                       overwrite_any=overwrite_any, discard_partial=discard_partial)
    finally:
        reporter.close()
    failed = report.failed
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), error=(f"{len(failed)} checkpoint(s) failed" if failed else None),
                                   exit_code=1 if failed else 0), indent=2))
    elif not quiet:
        click.echo(f"{'status':9} {'size':>10} {'seconds':>8} {'MB/s':>7} {'peak RSS':>10}  checkpoint -> output")
        for i in report.items:
            click.echo(f"{i.status:9} {format_size(i.bytes):>10} {i.seconds:8.2f} {i.mb_per_s:7.0f} "
                       f"{format_size(i.peak_rss_bytes) if i.peak_rss_bytes else '-':>10}  "
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
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout.")
@_fail_cleanly
def inspect(checkpoint_dir, as_json):
    """Show what a DCP checkpoint holds: tensors, dtypes, shapes, how each is sharded, non-tensor entries."""
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


def main():
    # For the whole process, not only inside a command: once interrupted and on the way out, more signals
    # (schedulers send several) must not turn exit 130 into "killed by signal" or a KeyboardInterrupt
    # printed during interpreter shutdown. `_on_signal` ignores every signal after the first.
    for s in _INTERRUPT_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        try:
            cli(prog_name="streamconv")
            code = 0
        except SystemExit as exc:  # click always ends with sys.exit
            code = exc.code
        try:
            sys.stdout.flush()  # short output still in the buffer meets a closed pipe here, not at interpreter exit
        except BrokenPipeError:
            _stdout_to_devnull()
    finally:
        if _received["signal"] is not None:
            # Python resets its handlers to the default while shutting down: ignore instead.
            for s in _INTERRUPT_SIGNALS:
                signal.signal(s, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
