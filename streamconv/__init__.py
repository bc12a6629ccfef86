"""streamconv: streaming, low-memory conversion of PyTorch Distributed Checkpoints to safetensors."""
from __future__ import annotations

from .api import build_plan, convert, inspect, plan, verify
# The error classes, so that `except streamconv.VerificationError` works as the README's snippet says.
from .errors import (CheckpointError, OptionsError, OutputError, ReferenceMismatchError, ResourceError,
                     StreamconvError, VerificationError)
# The user's options and the run's; what the program derives from them (`planning.plan.PlanOptions`) is internal
# (`build_plan` takes a ConvertOptions; the planner's own `planning.plan.build_plan` takes the PlanOptions).
from .planning.options import ConvertOptions, RunOptions
from .planning.plan import ConversionPlan

__all__ = ["convert", "inspect", "plan", "verify", "build_plan", "ConversionPlan", "RunOptions",
           "ConvertOptions", "convert_many", "StreamconvError", "CheckpointError", "OptionsError", "OutputError",
           "VerificationError", "ReferenceMismatchError", "ResourceError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `convert_many` is looked up on first use (PEP 562): batch's machinery (job processes, Ray, globbing) is
    # not part of the start-up of `streamconv convert` or of a script that converts one checkpoint.
    if name == "convert_many":
        from .runs.batch import convert_many
        return convert_many
    raise AttributeError(f"module 'streamconv' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {"convert_many"})
