"""streamconv: streaming, low-memory conversion of PyTorch Distributed Checkpoints to safetensors."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every public name, and the module it lives in: each is imported on first use (PEP 562), so `import streamconv`
# imports nothing else. The command line's start-up needs that: its entry (cli.py) installs the interrupt
# handlers before anything heavy is imported (a Ctrl-C then exits 130 with one line), and the package's
# `__init__` runs before it. `streamconv.convert` and friends import the API on first use, as before on import.
_HOMES = {
    **dict.fromkeys(("convert", "inspect", "plan", "verify", "build_plan"), "api"),
    # the user's options and the run's; what the program derives from them (`planning.plan.PlanOptions`) is
    # internal (`build_plan` takes a ConvertOptions; the planner's own `planning.plan.build_plan` the PlanOptions)
    **dict.fromkeys(("ConvertOptions", "RunOptions"), "planning.options"),
    "ConversionPlan": "planning.plan",
    # batch's machinery (job processes, Ray, globbing) is not part of a script that converts one checkpoint
    "convert_many": "runs.batch",
    # the error classes, so that `except streamconv.VerificationError` works as the README's snippet says
    **dict.fromkeys(("StreamconvError", "CheckpointError", "OptionsError", "OutputError", "VerificationError",
                     "ReferenceMismatchError", "ResourceError"), "errors"),
}
__all__ = ["convert", "inspect", "plan", "verify", "build_plan", "ConversionPlan", "RunOptions",
           "ConvertOptions", "convert_many", "StreamconvError", "CheckpointError", "OptionsError", "OutputError",
           "VerificationError", "ReferenceMismatchError", "ResourceError"]


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'streamconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value     # (once: later lookups find it here)
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
