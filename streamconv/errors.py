"""One error hierarchy for the library. Only the command line (commands.py, exits.py) turns these into exit codes
and text.

Every message should name what was wrong (file, tensor), what was expected vs found, and the fix.
"""
from __future__ import annotations


class StreamconvError(Exception):
    """Base class of every error streamconv raises on purpose."""

    exit_code = 1


class CheckpointError(StreamconvError):
    """The checkpoint is missing, malformed, truncated or uses a feature we cannot read."""

    exit_code = 2


class UnsafePickleError(CheckpointError):
    """A pickle in the checkpoint referenced something outside the allow-list. Nothing was imported."""


class UnsupportedFeatureError(CheckpointError):
    """The checkpoint is well formed but uses a feature streamconv does not convert (e.g. zstd transforms)."""


class CorruptChunkError(CheckpointError):
    """A chunk's bytes in a .distcp file do not match the CRC-32 torch.save recorded for them."""

    def __init__(self, message: str, *, file: str = "", tensor: str = "", begin: int = 0, end: int = 0,
                 recorded: int = 0, computed: int = 0):
        super().__init__(message)
        self.file, self.tensor, self.begin, self.end = file, tensor, begin, end
        self.recorded, self.computed = recorded, computed


class CoverageError(CheckpointError):
    """A tensor's chunks leave gaps, overlap, or run outside its global shape."""


class OptionsError(StreamconvError):
    """A bad option value (size string, glob, dtype, rename rule...)."""

    exit_code = 64  # EX_USAGE


class OutputError(StreamconvError):
    """The destination cannot be written (exists and not empty, no space, permission...)."""

    exit_code = 73  # EX_CANTCREAT


class VerificationError(StreamconvError):
    """Converted output does not match the checkpoint."""

    exit_code = 3


class ReferenceMismatchError(StreamconvError):
    """The output's tensor names or shapes do not match the reference model's weights (`--config-from` or the
    config found through train_params.yaml), or the reference's config does not fit the checkpoint (head counts
    that do not divide the q/k rows, another layer count): a wrong base model is exit 4 whatever the checkpoint's
    layout. Raised before anything is written. For names and shapes `--allow-unmatched` turns it into a note; a
    trainer layout's row permutation cannot be undone with the wrong head counts, so that case always refuses."""

    exit_code = 4


class ResourceError(StreamconvError):
    """The system ran out of a resource the run needs (open files...); the message names the limit to raise."""

    exit_code = 71  # EX_OSERR
