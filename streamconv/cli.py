"""Command line: `streamconv convert | plan | inspect`. The only place that prints or picks exit codes."""
from __future__ import annotations

import functools
import json
import signal
import sys

import click

from . import api
from .errors import StreamconvError
from .report import CollectingReporter, Reporter, TqdmReporter
from .sizes import format_size
from .trainers import SOURCE_FORMATS


def _terminate(signum, frame):
    # A job scheduler's SIGTERM ends the run like Ctrl-C, so the staging folder is removed on the way out.
    raise KeyboardInterrupt


def _fail_cleanly(fn):
    """Turn library errors into one-line messages and their exit codes; never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return fn(*args, **kwargs)
        except StreamconvError as exc:
            click.echo(f"error: {exc}", err=True)
            if kwargs.get("as_json"):
                # Scripts reading --json get the failure on stdout too, in the same shape every time.
                click.echo(json.dumps({"error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code}))
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: partial output removed", err=True)
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return wrapper


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
                          "the config's dtype when one is given). Integer and bool tensors are never cast."),
        click.option("--config-from", "config_from", default=None, metavar="DIR", type=click.Path(),
                     help="A Hugging Face model folder or hub snapshot (the base model): copy its config, generation "
                          "config, tokenizer and processor files, set config.json's dtype to the output's, name "
                          "tensors as its weights are named, and drop lm_head.weight when it ties embeddings. "
                          "Default: the model_name of train_params.yaml in CHECKPOINT_DIR, when it is a local "
                          "folder or in the local Hugging Face cache."),
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
                     help="Whose names and row layout the checkpoint has: auto (detect torchtitan / torchtune Llama "
                          "from its module names), hf (keep names as they are), or a trainer layout. Trainer "
                          "layouts are mapped to Hugging Face Llama names, q/k rows permuted to HF's RoPE order; "
                          "that needs the head counts from --config-from."),
        click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout."),
    ]
    for d in reversed(decorators):
        fn = d(fn)
    return fn


def _options(max_shard_size, buffer_size, dtype, include, exclude, renames, subtree, source_format="auto"):
    return api.make_options(max_shard_size=max_shard_size, buffer_size=buffer_size, include=include,
                            exclude=exclude, dtype=dtype, renames=renames, subtree=subtree,
                            source_format=source_format)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
              help="Before committing, read every written shard back and compare it with the checkpoint (reads the "
                   "checkpoint twice).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@_fail_cleanly
def convert(checkpoint_dir, output_dir, max_shard_size, buffer_size, dtype, config_from, include, exclude, renames,
            subtree, source_format, as_json, overwrite, workers, verify, quiet):
    """Convert CHECKPOINT_DIR (a DCP folder) into OUTPUT_DIR (safetensors shards).

    The output is written to a hidden staging folder beside OUTPUT_DIR and renamed into place only when
    complete; an error or Ctrl-C leaves nothing that looks finished. Only the model's weights are written:
    optimizer state and non-tensor entries are skipped.
    """
    options = _options(max_shard_size, buffer_size, dtype, include, exclude, renames, subtree, source_format)
    interactive = sys.stderr.isatty() and not as_json and not quiet
    reporter: Reporter = TqdmReporter() if interactive else CollectingReporter()
    try:
        report = api.convert(checkpoint_dir, output_dir, options, overwrite=overwrite, reporter=reporter,
                             config_from=config_from, workers=workers, verify=verify)
    finally:
        reporter.close()
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
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
         source_format, as_json):
    """Dry run: show the files, tensor names and predicted peak memory `convert` would produce.

    Reads only `.metadata` (and the config folder's JSON files and safetensors headers); writes nothing.
    """
    notes = CollectingReporter()
    conversion = api.plan(checkpoint_dir, _options(max_shard_size, buffer_size, dtype, include, exclude,
                                                   renames, subtree, source_format),
                          config_from=config_from, reporter=notes)
    summary = conversion.to_dict()
    if as_json:
        click.echo(json.dumps(dict(summary, notes=notes.notes), indent=2))
        return
    for shard in conversion.shards:
        click.echo(f"{shard.filename}  {format_size(shard.nbytes)}  {len(shard.tensors)} tensors")
    for t in conversion.tensors:
        cast = f" (from {t.src_dtype})" if t.is_cast else ""
        click.echo(f"  {t.name}  {t.dst_dtype}{cast} {list(t.shape)}  "
                   f"{len(t.chunks)} chunk(s), {'copy' if t.is_row_contiguous else 'blocks'}")
    skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "nothing"
    click.echo(f"total {format_size(conversion.total_bytes)} in {len(conversion.shards)} file(s); "
               f"skipped: {skipped}; predicted peak memory {format_size(conversion.peak_bytes)}")
    for note in notes.notes:
        click.echo(f"  {note}")


@cli.command()
@click.argument("checkpoint_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON report on stdout.")
@_fail_cleanly
def inspect(checkpoint_dir, as_json):
    """Show what a DCP checkpoint holds: tensors, dtypes, shapes, how each is sharded, non-tensor entries."""
    info = api.inspect(checkpoint_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['checkpoint']}: {info['tensor_count']} tensors, {format_size(info['tensor_bytes'])} in "
               f"{len(info['files'])} file(s); written by torch {info['torch_version_hint']}")
    if info.get("format"):
        click.echo(info["format"])
    click.echo("top-level keys: " + ", ".join(f"{k} ({n})" for k, n in info["top_level_keys"].items()))
    click.echo("bytes by dtype: " + ", ".join(f"{k} {format_size(v)}" for k, v in info["bytes_by_dtype"].items()))
    for t in info["tensors"]:
        click.echo(f"  {t['name']}  {t['dtype']} {t['shape']}  {t['layout']}")
    if info["non_tensor_entries"]:
        click.echo(f"non-tensor entries ({len(info['non_tensor_entries'])}): "
                   + ", ".join(info["non_tensor_entries"][:8])
                   + (" ..." if len(info["non_tensor_entries"]) > 8 else ""))


def main():
    cli(prog_name="streamconv")


if __name__ == "__main__":
    main()
