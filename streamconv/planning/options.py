"""The user-facing conversion options, defined once.

`ConvertOptions` is what a user chooses (sizes as text, dtype names, globs, rename rules, where the config comes
from). The CLI's flags (`cli._plan_options`), the API keywords (`streamconv.convert(..., max_shard_size="2GB")`)
and `PlanOptions`, the planner's resolved view (sizes in bytes, parsed rules), are all derived from it. It is a
frozen, picklable value, so a batch job or a Ray task receives exactly the options the driver planned with.

Each field's metadata carries its command-line spelling and help text; `cli.py` turns them into click options
(this module imports no click, so a worker process does not pay for it).
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
from .trainers import SOURCE_FORMATS


def _opt(default: Any, flag: str, help: str, *, metavar: Optional[str] = None, multiple: bool = False,
         is_flag: bool = False, choices: Tuple[str, ...] = (), path: bool = False, show_default: bool = False):
    meta = {"flag": flag, "help": help, "metavar": metavar, "multiple": multiple, "is_flag": is_flag,
            "choices": choices, "path": path, "show_default": show_default}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ConvertOptions:
    """What `convert`, `plan`, `verify` and `batch` are told; the field order is the order of `--help`."""
    max_shard_size: str = _opt(
        "5GB", "--max-shard-size", show_default=True,
        help="Largest output file, e.g. 5GB, 2GiB, 500MB. A single tensor larger than this gets a file of its own.")
    buffer_size: str = _opt(
        "32MiB", "--buffer-size", show_default=True,
        help="Working memory for assembling and casting tensors (e.g. 16MiB). Peak memory is about this plus "
             "~40 MiB, whatever the model size.")
    dtype: str = _opt(
        "keep", "--dtype", show_default=True,
        help="Output dtype for floating tensors: keep, bfloat16, float16, float32 (or auto, which takes the config's "
             "dtype when one is given). Integer and bool tensors are never cast. Bits are torch's tensor.to with "
             "one thread: values and infinities always identical, a NaN stays NaN (its payload may differ from a "
             "multi-threaded torch's).")
    config_from: Optional[str] = _opt(
        None, "--config-from", metavar="DIR", path=True,
        help="A Hugging Face model folder or hub snapshot (the base model): copy its config, generation config, "
             "tokenizer and processor files, set config.json's dtype to the output's, name tensors as its weights "
             "are named (an output that does not match them is an error, exit 4), and drop lm_head.weight when it "
             "ties embeddings. Default: the model_name of train_params.yaml in CHECKPOINT_DIR, when it is a local "
             "folder or in the local Hugging Face cache.")
    no_config: bool = _opt(
        False, "--no-config", is_flag=True,
        help="Write weights only unless --config-from is given: do not look for the base model through "
             "train_params.yaml or the local Hugging Face cache, so the output never depends on what happens to "
             "be there.")
    allow_unmatched: bool = _opt(
        False, "--allow-unmatched", is_flag=True,
        help="Write the output even when its tensor names or shapes do not match the reference model's weights "
             "(--config-from or found); without it that is an error (exit 4) before anything is written.")
    include: Tuple[str, ...] = _opt(
        (), "--include", metavar="GLOB", multiple=True,
        help="Only tensors whose checkpoint key or output name matches (repeatable), e.g. '*.layers.0.*'.")
    exclude: Tuple[str, ...] = _opt((), "--exclude", metavar="GLOB", multiple=True,
                                    help="Skip matching tensors (repeatable).")
    renames: Tuple[str, ...] = _opt(
        (), "--rename", metavar="REGEX=REPLACEMENT", multiple=True,
        help="Rewrite output names with a regular expression (repeatable, applied in order).")
    subtree: Optional[str] = _opt(
        None, "--subtree", metavar="KEY",
        help="Top-level key holding the model. Default: 'model' when the checkpoint was saved as "
             "{'model': ..., 'optim': ...}, else the whole state dict.")
    source_format: str = _opt(
        "auto", "--source-format", choices=SOURCE_FORMATS, show_default=True,
        help="Whose names and row layout the checkpoint has: auto (detect torchtitan / torchtune Llama, "
             "torchtitan Qwen3 / Qwen3-MoE or a Megatron-Core GPT from its module names), hf (keep names as they "
             "are), or a trainer layout. Trainer layouts are mapped to Hugging Face names, q/k rows permuted to "
             "HF's RoPE order, fused weights split (that needs the head counts from --config-from), grouped "
             "experts unstacked per expert.")

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
            source_format=self.source_format)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def take(cls, values: Dict[str, Any]) -> "ConvertOptions":
        """Pop this object's fields out of `values` (a click command's keyword arguments) and build it."""
        return cls(**{name: values.pop(name) for name in cls.field_names() if name in values})


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
