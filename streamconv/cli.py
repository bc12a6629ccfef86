"""Command line: `streamconv convert | plan | inspect`. The only place that prints or picks exit codes."""
from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

from . import api
from .errors import OptionsError, StreamconvError
from .report import CollectingReporter, Reporter, TqdmReporter
from .names import printable
from .sizes import format_size
from .trainers import SOURCE_FORMATS


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


def _interrupted(as_json: bool, resume: bool) -> None:
    kept = ("the staging folder is kept: run the same command with --resume to continue" if resume
            else "nothing was committed and the partial output was removed")
    _emit_failure(f"interrupted: {kept}", "Interrupted", 130, as_json)
    sys.exit(130)


def _fail_cleanly(fn):
    """Turn library errors into one-line messages and their exit codes; never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        _received["signal"] = None
        previous = {s: signal.signal(s, _on_signal) for s in _INTERRUPT_SIGNALS}
        try:
            return fn(*args, **kwargs)
        except StreamconvError as exc:
            if _received["signal"] is not None:
                _interrupted(as_json, bool(kwargs.get("resume")))
            _emit_failure(str(exc), type(exc).__name__, exc.exit_code, as_json)
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.exceptions.Abort):
            _interrupted(as_json, bool(kwargs.get("resume")))
        except (click.exceptions.Exit, click.ClickException, BrokenPipeError):
            raise       # usage errors and a closed stdout are handled by _Group
        except Exception as exc:
            if _received["signal"] is not None:     # whatever the interrupt broke on its way out
                _interrupted(as_json, bool(kwargs.get("resume")))
            _internal_error(exc, as_json)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return wrapper


class _Group(click.Group):
    """Usage errors exit 64 (EX_USAGE, as README says) instead of click's 2, which README gives to a bad
    checkpoint; with --json they print the same one-object failure as every other error."""

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


def _plan_options(fn):
    """Options shared by `convert` and `plan`."""
    decorators = [
        click.option("--max-shard-size", default="5GB", show_default=True,
                     help="Largest output file, e.g. 5GB, 2GiB, 500MB. A single tensor larger than this gets a file "
                          "of its own."),
        click.option("--buffer-size", default="32MiB", show_default=True,
                     help="Working memory for assembling and casting tensors (e.g. 16MiB). Peak memory is about "
                          "this plus ~40 MiB, whatever the model size."),
        click.option("--dtype", default="keep", show_default=True,
                     help="Output dtype for floating tensors: keep, bfloat16, float16, float32 (or auto, which takes "
                          "the config's dtype when one is given). Integer and bool tensors are never cast. Bits "
                          "are torch's tensor.to with one thread: values and infinities always identical, a NaN "
                          "stays NaN (its payload may differ from a multi-threaded torch's)."),
        click.option("--config-from", "config_from", default=None, metavar="DIR", type=click.Path(),
                     help="A Hugging Face model folder or hub snapshot (the base model): copy its config, generation "
                          "config, tokenizer and processor files, set config.json's dtype to the output's, name "
                          "tensors as its weights are named (an output that does not match them is an error, exit "
                          "4), and drop lm_head.weight when it ties embeddings. "
                          "Default: the model_name of train_params.yaml in CHECKPOINT_DIR, when it is a local "
                          "folder or in the local Hugging Face cache."),
        click.option("--no-config", "no_config", is_flag=True,
                     help="Write weights only unless --config-from is given: do not look for the base model "
                          "through train_params.yaml or the local Hugging Face cache, so the output never depends "
                          "on what happens to be there."),
        click.option("--allow-unmatched", "allow_unmatched", is_flag=True,
                     help="Write the output even when its tensor names or shapes do not match the reference "
                          "model's weights (--config-from or found); without it that is an error (exit 4) before "
                          "anything is written."),
        click.option("--include", multiple=True, metavar="GLOB",
                     help="Only tensors whose checkpoint key or output name matches (repeatable), e.g. "
                          "'*.layers.0.*'."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Skip matching tensors (repeatable)."),
        click.option("--rename", "renames", multiple=True, metavar="REGEX=REPLACEMENT",
                     help="Rewrite output names with a regular expression (repeatable, applied in order)."),
        click.option("--subtree", default=None, metavar="KEY",
                     help="Top-level key holding the model. Default: 'model' when the checkpoint was saved as "
                          "{'model': ..., 'optim': ...}, else the whole state dict."),
        click.option("--source-format", "source_format", default="auto", show_default=True,
                     type=click.Choice(SOURCE_FORMATS),
                     help="Whose names and row layout the checkpoint has: auto (detect torchtitan / torchtune Llama or "
                          "a Megatron-Core GPT from its module names), hf (keep names as they are), or a trainer "
                          "layout. Trainer "
                          "layouts are mapped to Hugging Face Llama names, q/k rows permuted to HF's RoPE order, fused "
                          "weights split; that needs the head counts from --config-from."),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _options(max_shard_size, buffer_size, dtype, include, exclude, renames, subtree, source_format="auto"):
    return api.make_options(max_shard_size=max_shard_size, buffer_size=buffer_size, include=include,
                            exclude=exclude, dtype=dtype, renames=renames, subtree=subtree,
                            source_format=source_format)



@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@_plan_options
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists and is not empty.")
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
def convert(checkpoint_dir, output_dir, max_shard_size, buffer_size, dtype, config_from, include, exclude, renames,
            subtree, source_format, as_json, overwrite, workers, verify, crc, resume, discard_partial, quiet,
            progress, no_config=False, allow_unmatched=False):
    """Convert CHECKPOINT_DIR (a DCP folder) into OUTPUT_DIR (safetensors shards).

    CHECKPOINT_DIR may also be a run folder holding one DCP folder with model weights (accelerate's state/, a
    Trainer checkpoint-N/, torchtitan's checkpoint/ with one step-N/): the note says which was taken. When it
    holds several, they are listed and none is taken.

    The output is written to a hidden staging folder beside OUTPUT_DIR, fsynced, and renamed into place
    only when complete; an error or Ctrl-C leaves nothing that looks finished. OUTPUT_DIR may not be the
    checkpoint folder or hold it (a subfolder of it is fine). Only the model's weights are written:
    optimizer state and non-tensor entries are skipped.
    """
    options = _options(max_shard_size, buffer_size, dtype, include, exclude, renames, subtree, source_format)
    if progress is None:
        progress = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if progress else CollectingReporter()
    try:
        report = api.convert(checkpoint_dir, output_dir, options, overwrite=overwrite, reporter=reporter,
                             config_from=config_from, workers=workers, verify=verify, crc=crc,
                             allow_unmatched=allow_unmatched, no_config=no_config, resume=resume,
                             discard_partial=discard_partial)
    finally:
        reporter.close()
    if as_json:
        click.echo(json.dumps(dict(report.to_dict(), error=None, exit_code=0), indent=2))
    elif not quiet:
        skipped = ", ".join(f"{n} {why}" for why, n in report.skipped.items()) or "nothing"
        cast = ", ".join(f"{n} {k}" for k, n in report.cast.items()) or "none"
        click.echo(f"wrote {report.tensors} tensors into {report.shards} file(s) in {report.output}\n"
                   f"  {format_size(report.bytes_written)} in {report.seconds:.2f} s ({report.mb_per_s:.0f} MB/s), "
                   f"peak RSS {format_size(report.peak_rss_bytes)} "
                   f"(predicted {format_size(report.predicted_peak_bytes)})\n"
                   f"  skipped: {skipped}; cast: {cast}; renamed: {report.renamed}\n"
                   f"  copied: {', '.join(report.copied_files) or 'nothing'}; "
                   f"dropped tied: {', '.join(report.dropped_tied) or 'none'}")
        for note in report.notes:
            click.echo(f"  {note}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
@_plan_options
@_fail_cleanly
def plan(checkpoint_dir, max_shard_size, buffer_size, dtype, config_from, include, exclude, renames, subtree,
         source_format, as_json, no_config=False, allow_unmatched=False):
    """Dry run: show the files, tensor names and predicted peak memory `convert` would produce.

    Reads only `.metadata` (and the config folder's JSON files and safetensors headers); writes nothing.
    """
    notes = CollectingReporter()
    conversion = api.plan(checkpoint_dir, _options(max_shard_size, buffer_size, dtype, include, exclude,
                                                   renames, subtree, source_format),
                          config_from=config_from, reporter=notes,
                          allow_unmatched=allow_unmatched, no_config=no_config)
    summary = conversion.to_dict()
    if as_json:
        click.echo(json.dumps(dict(summary, notes=notes.notes, error=None, exit_code=0), indent=2))
        return
    for shard in conversion.shards:
        click.echo(f"{shard.filename}  {format_size(shard.nbytes)}  {len(shard.tensors)} tensors")
    for t in conversion.tensors:
        cast = f" (from {t.src_dtype})" if t.is_cast else ""
        click.echo(f"  {t.name}  {t.dst_dtype}{cast} {list(t.shape)}  "
                   f"{len(t.chunks)} chunk(s), {'copy' if t.is_row_contiguous else ('gather' if t.pieces else 'blocks')}")
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "nothing"
    click.echo(f"total {format_size(conversion.total_bytes)} in {len(conversion.shards)} file(s); "
               f"skipped: {skipped}; predicted peak memory {format_size(conversion.peak_bytes)}")
    for note in notes.notes:
        click.echo(f"  {note}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@_plan_options
@click.option("--crc/--no-crc", default=True, show_default=True,
              help="Check every read chunk's CRC-32, as recorded by torch.save in its .distcp file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only problems.")
@_fail_cleanly
def verify(checkpoint_dir, output_dir, max_shard_size, buffer_size, dtype, config_from, include, exclude, renames,
           subtree, source_format, as_json, crc, quiet, no_config=False, allow_unmatched=False):
    """Check OUTPUT_DIR (a converted folder) against CHECKPOINT_DIR without converting again.

    Pass the naming and dtype options the conversion used (--dtype, --rename, --include/--exclude, --subtree,
    --config-from); tensors are found by name, so --max-shard-size does not matter. Streams both sides with
    --buffer-size of memory. Checks the index (every weight once, every file present, total_size), that every
    shard's header loads with the safetensors library, that no shard holds a tensor the index does not list,
    and every tensor's dtype, shape and bytes; reports missing, extra and differing tensors (name and first
    differing element). Exit 0 when all match, 3 when the output differs, 2 when a checkpoint chunk fails
    its CRC-32.
    """
    from .verification import CorruptSourceError, OutputDiffersError
    options = _options(max_shard_size, buffer_size, dtype, include, exclude, renames, subtree, source_format)
    interactive = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if interactive else CollectingReporter()
    try:
        result = api.verify(checkpoint_dir, output_dir, options, config_from=config_from, reporter=reporter, crc=crc,
                            allow_unmatched=allow_unmatched, no_config=no_config)
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
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        crc_text = (f"; {result.crc_checked_chunks} chunk CRC-32s ok ({format_size(result.crc_checked_bytes)})"
                    if crc else "; CRC-32s not checked")
        if result.crc_unrecorded_chunks:
            crc_text += f", {result.crc_unrecorded_chunks} chunk(s) saved without a CRC"
        click.echo(f"ok: {result.tensors_equal} tensors in {len(result.files)} file(s) of {result.output} match "
                   f"{result.checkpoint}\n  {format_size(result.bytes_compared)} compared in {result.seconds:.2f} s, "
                   f"peak RSS {format_size(result.peak_rss_bytes)}{crc_text}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
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
