"""The options, defined once, as three objects:

* `ConvertOptions` — what a user chooses about the output (sizes as text, dtype names, globs, rename rules, where
  the config comes from). Public. Frozen and picklable, so a batch job or a Ray task receives exactly the options
  the driver planned with.
* `RunOptions` — how a run goes, not what it writes (writer threads, checks, what to do with an existing or
  interrupted output, progress). Public, frozen.
* `plan.PlanOptions` — what the program derives from the first (sizes in bytes, rules parsed, `--dtype auto`
  resolved, the trainer adapter's head counts, the names decided by `naming`, tied heads dropped). Internal: the
  planner's input, built by `ConvertOptions.plan_options` and `hf.prepare`.

Each field's metadata carries its command-line spelling, help text and which commands take it; `commands.py` turns them
into click options (this module imports no click, so a worker process does not pay for it). docs/options.md is
the long form of the help; tests check the two name the same flags.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from .. import dtypes
from . import names
from ..errors import OptionsError
from ..fs.paths import user_path
from .plan import PlanOptions
from ..sizes import parse_size
from .trainers import EXPERT_LAYOUTS, SOURCE_FORMATS


# The commands that take every ConvertOptions field.
CONVERT_COMMANDS = ("convert", "plan", "verify", "batch")


def _opt(default: Any, flag: str, help: str, *, metavar: Optional[str] = None, multiple: bool = False,
         is_flag: bool = False, choices: Tuple[str, ...] = (), path: bool = False, show_default: bool = False,
         commands: Tuple[str, ...] = CONVERT_COMMANDS, hidden_in: Tuple[str, ...] = (),
         int_range: Optional[Tuple[int, int]] = None, short: Optional[str] = None,
         help_in: Optional[Dict[str, str]] = None, default_in: Optional[Dict[str, Any]] = None,
         required: bool = False, flag_value: Any = None, file: bool = False):
    """A field with its command-line form. `flag` "--a/--no-a" is an on/off pair (default None: decided later).
    `commands`: the commands that take it; `hidden_in`: accepted there (scripts pass it) but not in --help, where
    it does not apply. `help_in` / `default_in`: another help text or default on one command."""
    meta = {"flag": flag, "help": help, "metavar": metavar, "multiple": multiple, "is_flag": is_flag,
            "choices": choices, "path": path, "show_default": show_default, "commands": commands,
            "hidden_in": hidden_in, "int_range": int_range, "short": short, "help_in": help_in or {},
            "default_in": default_in or {}, "required": required, "flag_value": flag_value, "file": file}
    return field(default=default, metadata=meta)


class _FlagFields:
    """What the three option objects share: their fields are the flags, so a click command's keyword arguments
    build one (`take`)."""

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def take(cls, values: Dict[str, Any]):
        """Pop this object's fields out of `values` (a click command's keyword arguments) and build it."""
        return cls(**{name: values.pop(name) for name in cls.field_names() if name in values})


@dataclass(frozen=True)
class ConvertOptions(_FlagFields):
    """What `convert`, `plan`, `verify` and `batch` are told; the field order is the order of `--help`."""
    max_shard_size: str = _opt(
        "5GB", "--max-shard-size", metavar="SIZE", show_default=True, hidden_in=("verify",),  # (found by name)
        help="Largest output file.")
    buffer_size: str = _opt(
        "32MiB", "--buffer-size", metavar="SIZE", show_default=True,
        help="Working memory; peak: this + 40 MiB.")
    dtype: str = _opt(
        "keep", "--dtype", metavar="DTYPE",
        help="keep (default), bfloat16, float16, float32, auto")
    config_from: Optional[str] = _opt(
        None, "--config-from", metavar="DIR", path=True,
        help="Base model: config, tokenizer, names to match.")
    no_config: bool = _opt(
        False, "--no-config", is_flag=True,
        help="Never look for the base model beyond --config-from.")
    allow_unmatched: bool = _opt(
        False, "--allow-unmatched", is_flag=True,
        help="Write even if names differ from the base model.")
    include: Tuple[str, ...] = _opt(
        (), "--include", metavar="GLOB", multiple=True,
        help="Only tensors whose key or name matches.")
    exclude: Tuple[str, ...] = _opt((), "--exclude", metavar="GLOB", multiple=True,
                                    help="Skip matching tensors.")
    renames: Tuple[str, ...] = _opt(
        (), "--rename", metavar="REGEX=REPLACEMENT", multiple=True,
        help="Rewrite output names (in order).")
    subtree: Optional[str] = _opt(
        None, "--subtree", metavar="KEY",
        help="Top-level key holding the model.")
    source_format: str = _opt(
        "auto", "--source-format", choices=SOURCE_FORMATS, metavar="NAME",
        help=", ".join(SOURCE_FORMATS) + ".")     # the first, auto, is the default (3 lines: the help fits a screen)
    expert_layout: str = _opt(
        EXPERT_LAYOUTS[0], "--expert-layout", choices=EXPERT_LAYOUTS, metavar="LAYOUT",
        help=f"MoE experts: {EXPERT_LAYOUTS[0]} (default) or {EXPERT_LAYOUTS[1]}.")

    def __post_init__(self):
        for f in fields(self):
            if f.metadata["multiple"]:
                value = getattr(self, f.name)
                if isinstance(value, str):      # include="*.x" would otherwise be read letter by letter
                    value = (value,)
                object.__setattr__(self, f.name, tuple(value))
        if self.config_from is not None:    # "" would silently mean "no --config-from"
            object.__setattr__(self, "config_from", user_path(self.config_from, "--config-from"))
        self.plan_options()     # refuse bad sizes, dtypes and rules now, not in a worker an hour later

    def plan_options(self) -> PlanOptions:
        """The planner's view: sizes in bytes, dtype and rename rules parsed. "auto" dtype stays: the API
        resolves it from the config before planning."""
        return PlanOptions(
            max_shard_bytes=parse_size(self.max_shard_size, option="--max-shard-size"),
            buffer_bytes=parse_size(self.buffer_size, option="--buffer-size"),
            include=self.include, exclude=self.exclude, dtype=dtypes.parse_output_dtype(self.dtype),
            renames=tuple(names.RenameRule.parse(r) for r in self.renames), subtree=self.subtree,
            source_format=self.source_format, expert_layout=self.expert_layout)


# Whether a conversion checks each chunk's CRC-32 unless told (`--verify` turns it on). Off: on the 2gb benchmark
# the pass costs ~0.2 s of CPU per GB (a read of page-cached data plus zlib.crc32), 20-80% of the wall time on
# this 2-core machine, far above the 5% that would make it a free default. `verify` checks CRCs by default.
DEFAULT_CRC = False
# None: the writer count is chosen from the CPUs and --buffer-size (planning/workers.py `choose_workers`).
DEFAULT_WORKERS = None
_WRITES = ("convert", "batch")      # the commands that write an output


@dataclass(frozen=True)
class RunOptions(_FlagFields):
    """How a run goes, not what it writes: the same options give the same output bytes whatever these are."""
    workers: Optional[int] = _opt(
        DEFAULT_WORKERS, "--workers", metavar="N", int_range=(1, 64), commands=("convert", "plan", "batch"),
        help="Writer threads (default: one per CPU, as --buffer-size allows).",
        help_in={"plan": "As for convert: the writer threads the predicted peak memory is for.",
                 "batch": "Writer threads per job."})
    verify: bool = _opt(
        False, "--verify", is_flag=True, commands=_WRITES,
        help="Before the commit, check as `verify` does.",
        help_in={"batch": "Check each output as `verify` does."})
    crc: Optional[bool] = _opt(
        None, "--crc/--no-crc", commands=("convert", "verify", "batch"), default_in={"verify": True},
        help="Check chunk CRC-32s (default: with --verify).",
        help_in={"verify": "Check each chunk's CRC-32 as it is read."})
    overwrite: bool = _opt(
        False, "--overwrite", is_flag=True, commands=_WRITES,
        help="Replace an output streamconv wrote.",
        help_in={"batch": "Replace outputs streamconv wrote."})
    overwrite_any: bool = _opt(
        False, "--overwrite-any", is_flag=True, commands=_WRITES,
        help="Replace OUTPUT_DIR whatever it holds.",
        help_in={"batch": "Replace outputs whatever they hold."})
    resume: bool = _opt(
        False, "--resume", is_flag=True, commands=_WRITES,
        help="Continue a killed conversion, keeping shards.",
        hidden_in=("batch",))     # accepted there: batch always resumes (docs/batch.md)
    discard_partial: bool = _opt(
        False, "--discard-partial", is_flag=True, commands=_WRITES,
        help="Delete what a killed conversion left.")
    progress: Optional[bool] = _opt(
        None, "--progress/--no-progress", commands=_WRITES,
        help="Progress bar (default: on a terminal).")
    quiet: bool = _opt(
        False, "--quiet", short="-q", is_flag=True,
        help="No progress bar or summary.",
        help_in={"plan": "Print only the summary line.", "verify": "No progress bar; print only problems.",
                 "batch": "Print only failures."})
    storage_options: Optional[str] = _opt(
        # (not a batch flag: its --help is a screen already; batch reads the provider's variables, docs/remote.md)
        None, "--storage-options", metavar="JSON", commands=("convert", "plan", "verify", "inspect"),
        help="fsspec options for URLs (docs/remote.md).")

    @property
    def check_crc(self) -> bool:
        """Whether chunk CRC-32s are checked: `crc` when given, else with --verify (DEFAULT_CRC otherwise)."""
        return self.crc if self.crc is not None else self.verify or DEFAULT_CRC

    @classmethod
    def given(cls, run: Optional["RunOptions"], **keywords) -> "RunOptions":
        """The run options an API call means: `run`, or the keywords (the API's older spelling), not both."""
        defaults = cls()
        changed = sorted(k for k, v in keywords.items() if v != getattr(defaults, k))
        if run is None:
            return cls(**keywords)
        if changed:
            raise OptionsError(f"run options given twice: pass either run=RunOptions(...) or the keyword(s) "
                               f"{', '.join(changed)}, not both")
        return run


@dataclass(frozen=True)
class BatchOptions(_FlagFields):
    """What `batch` is told beyond one conversion's options: where outputs go, how many run at once, where."""
    output_template: Optional[str] = _opt(
        None, "--output-template", short="-o", metavar="TEMPLATE", required=True, commands=("batch",),
        help="e.g. 'hf/{parent}-{step}' (docs/batch.md).")
    from_file: Optional[str] = _opt(
        None, "--from-file", metavar="LIST", file=True, commands=("batch",),
        help="Also the sources listed in LIST, one a line.")
    jobs: Optional[int] = _opt(
        None, "--jobs", short="-j", metavar="N", int_range=(1, 256), commands=("batch",),
        help="Checkpoints side by side.")
    max_memory: Optional[str] = _opt(
        None, "--max-memory", metavar="SIZE", commands=("batch",),
        help="Cap on the jobs' predicted peak memory.")
    ray_address: Optional[str] = _opt(
        None, "--ray", metavar="[ADDRESS]", flag_value="local", commands=("batch",),
        help="Ray tasks (local, or join ADDRESS).")


def command_fields(command: str):
    """The fields of the options objects `command` takes, in --help order (sections group them there)."""
    return [f for cls in (BatchOptions, ConvertOptions, RunOptions) for f in fields(cls)
            if command in f.metadata["commands"]]


_DEFAULTS = {f.name: f.default for f in fields(ConvertOptions) if f.default is not MISSING}
# The fields the planner's PlanOptions does not hold: how the config is found and checked.
CONFIG_FIELDS = ("config_from", "no_config", "allow_unmatched")


def resolve(options, keywords: Mapping[str, Any], **config) -> Tuple[PlanOptions, ConvertOptions]:
    """The options an API call means, from `options` (a ConvertOptions, a PlanOptions, or None) and its
    keywords (ConvertOptions fields). Options given twice are an error, never silently dropped:
    `plan(ckpt, PlanOptions(), max_shard_size="2GB")` raises instead of planning 5 GB shards.
    `config` holds the API's own config keywords (config_from, no_config, allow_unmatched)."""
    unknown = sorted(set(keywords) - set(ConvertOptions.field_names()))
    if unknown:
        raise OptionsError(f"unknown option(s) {', '.join(unknown)}; the options are "
                           f"{', '.join(ConvertOptions.field_names())}")
    given_config = {k: v for k, v in config.items() if v != _DEFAULTS[k]}
    if options is None:
        user = ConvertOptions(**dict(keywords, **given_config))
        return user.plan_options(), user
    if keywords:
        raise OptionsError(f"options given twice: pass either an options object or the keyword(s) "
                           f"{', '.join(sorted(keywords))}, not both (the keywords would be ignored)")
    if isinstance(options, ConvertOptions):
        clash = {k: v for k, v in given_config.items() if getattr(options, k) != _DEFAULTS[k]
                 and getattr(options, k) != v}
        if clash:
            raise OptionsError(f"options given twice with different values: {', '.join(sorted(clash))}")
        user = replace(options, **given_config) if given_config else options
        return user.plan_options(), user
    if isinstance(options, PlanOptions):
        # The planner's own view (tests, advanced callers): the config keywords still come from the call.
        user = ConvertOptions(**given_config)
        return options, user
    raise OptionsError(f"options must be a ConvertOptions or PlanOptions, not {type(options).__name__}")
