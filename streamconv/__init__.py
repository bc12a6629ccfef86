"""streamconv: streaming, low-memory conversion of PyTorch Distributed Checkpoints to safetensors."""
from .api import convert, inspect, make_options, plan, verify
from .runs.batch import convert_many
# The error classes, so that `except streamconv.VerificationError` works as the README's snippet says.
from .errors import (CheckpointError, OptionsError, OutputError, ReferenceMismatchError, ResourceError,
                     StreamconvError, VerificationError)
from .planning.options import ConvertOptions
from .planning.plan import ConversionPlan, PlanOptions, build_plan

__all__ = ["convert", "inspect", "plan", "verify", "make_options", "build_plan", "ConversionPlan", "PlanOptions",
           "ConvertOptions", "convert_many", "StreamconvError", "CheckpointError", "OptionsError", "OutputError",
           "VerificationError", "ReferenceMismatchError", "ResourceError"]
__version__ = "0.1.0"
