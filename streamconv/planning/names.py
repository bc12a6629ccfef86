"""Tensor names: from checkpoint keys to output names, and the order they are written in.

All functions are pure. Rules are data (tuples of prefixes and regexes), applied in one place.
"""
from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

from ..errors import OptionsError

# Segments that wrappers (torch.compile, FSDP1, activation checkpointing, DDP/DataParallel) insert into
# parameter names. They are never part of a Hugging Face name, wherever they appear.
WRAPPER_SEGMENTS: Tuple[str, ...] = (
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "module",
)

# Top-level keys of a training checkpoint that hold no model weights.
NON_MODEL_KEYS: Tuple[str, ...] = (
    "optim", "optimizer", "optimizer_state", "lr_scheduler", "scheduler", "train_state", "trainer_state",
    "dataloader", "rng", "rng_state", "extra_state",
)


def strip_wrappers(name: str, segments: Sequence[str] = WRAPPER_SEGMENTS) -> str:
    """'_orig_mod.model._fsdp_wrapped_module.layers.0.w' -> 'model.layers.0.w'.

    `module` is only stripped as a leading segment (DDP's `module.`); elsewhere it may be a genuine
    submodule name, as in some vision towers.
    """
    parts = name.split(".")
    kept = []
    for i, part in enumerate(parts):
        if part in segments and i < len(parts) - 1 and (part != "module" or not kept):
            continue
        kept.append(part)
    return ".".join(kept)


@dataclass(frozen=True)
class RenameRule:
    pattern: str
    replacement: str

    @staticmethod
    def parse(text: str) -> "RenameRule":
        """'REGEX=REPLACEMENT' (the first '=' splits; escape a literal '=' in the regex as '\\=')."""
        m = re.match(r"^((?:[^=\\]|\\.)*)=(.*)$", text)
        if not m or not m.group(1):
            raise OptionsError(f"--rename {text!r}: write REGEX=REPLACEMENT, e.g. '^model\\.=' or 'lm_head=output'")
        pattern = m.group(1).replace("\\=", "=")
        try:
            compiled = re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:    # a{99999999999} overflows, deep (((...))) recurses
            raise OptionsError(f"--rename {text!r}: bad regular expression: {exc}") from None
        try:
            # Substituting into an empty string compiles the replacement template: a group reference the
            # pattern does not have fails here, at parse time, rather than half-way through planning.
            compiled.sub(m.group(2), "")
        except (re.error, IndexError) as exc:
            raise OptionsError(
                f"--rename {text!r}: bad replacement: {exc}; refer to groups the pattern has (\\1, \\g<name>) "
                "and write a literal backslash as \\\\") from None
        return RenameRule(pattern, m.group(2))

    def apply(self, name: str) -> str:
        return re.sub(self.pattern, self.replacement, name)

    @property
    def text(self) -> str:
        """The rule as --rename takes it (a literal '=' in the pattern escaped): parse(rule.text) == rule."""
        return f"{self.pattern.replace('=', chr(92) + '=')}={self.replacement}"


def apply_renames(name: str, rules: Iterable[RenameRule]) -> str:
    for rule in rules:
        name = rule.apply(name)
    return name


def matches_any(names: Sequence[str], globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, g) for n in names for g in globs)


def is_selected(names: Sequence[str], include: Sequence[str], exclude: Sequence[str]) -> bool:
    """A tensor is kept if any of its names matches an include glob (or there are none) and none
    matches an exclude glob. `names` holds both the checkpoint key and the output name, so users can
    filter by either."""
    if include and not matches_any(names, include):
        return False
    return not matches_any(names, exclude)


_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> Tuple[Union[Tuple[int, str, str], str], ...]:
    """Sort key that puts layers.2 before layers.10."""
    # re.split with a capturing group alternates text, digits, text, ... so tuples compare like with like.
    # A number compares by (digit count, digits) without int(): a name may hold thousands of digits, past
    # int()'s limit. The raw text breaks ties between 01 and 1.
    def number(digits: str) -> Tuple[int, str, str]:
        value = digits.lstrip("0")
        return (len(value), value, digits)
    return tuple(number(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))


# -- names a safetensors file can hold ---------------------------------------------------------------------

# The key safetensors reserves in every header for the file's string metadata.
RESERVED_NAME = "__metadata__"


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a tensor name in a safetensors header that every reader loads, or None if it can.

    Refused: the empty name, the reserved `__metadata__`, text that is not valid UTF-8 (lone surrogates, which
    Python strings can hold but JSON parsers reject), and control characters (a name is also a line in logs
    and in `inspect`'s output).
    """
    if not name:
        return "the name is empty"
    if name == RESERVED_NAME:
        return f"{RESERVED_NAME!r} is the key safetensors reserves for the header's metadata"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"it is not valid UTF-8 (lone surrogate {name[exc.start]!r} at position {exc.start})"
    for i, ch in enumerate(name):
        if ch <= "\x1f" or "\x7f" <= ch <= "\x9f":    # Unicode category Cc: C0, DEL and C1 controls
            return f"it holds the control character {ch!r} at position {i}"
    return None


def shown(text: str, limit: int = 160) -> str:
    """repr() of an untrusted name for an error message, cut to about `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text):,} characters)"


def printable(text: str) -> str:
    """`text` safe to print on any terminal: lone surrogates and control characters backslash-escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


# -- the staging folder beside the output ------------------------------------------------------------------

NAME_MAX_BYTES = 255   # longest file name (one path component) on ext4, xfs, btrfs, tmpfs, APFS


def staging_name(base: str, tag: str = "streamconv", suffix: str = ".partial", reserve_bytes: int = 4) -> str:
    """The hidden staging folder's name for an output folder named `base`: `.{base}.{tag}{suffix}`.

    Any legal `base` (up to 255 bytes) must give a legal staging name with `reserve_bytes` to spare (the commit
    renames the old output to `<staging>.old`). When it would be too long, `base` is cut at a character
    boundary and a hash of the whole `base` is put in, so two long names that share a prefix still get two
    staging folders. Deterministic: the same `base` always gives the same name.
    """
    fixed = f".{tag}{suffix}"
    limit = NAME_MAX_BYTES - reserve_bytes - len(os.fsencode(fixed)) - 1     # - 1 for the leading dot
    encoded = os.fsencode(base)
    if len(encoded) <= limit:
        return f".{base}{fixed}"
    import hashlib      # here, not at the top: OpenSSL costs ~3 MiB of RSS, and short names never need it
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    keep = limit - len(digest) - 1
    cut = base[:keep]
    while len(os.fsencode(cut)) > keep:     # multi-byte characters: drop whole characters
        cut = cut[:-1]
    return f".{cut}~{digest}{fixed}"


def model_subtree(paths: Iterable[Tuple]) -> Optional[str]:
    """'model' when the state dict was saved as {"model": ..., "optim": ...} (llama-recipes, accelerate).

    planner_data paths are the nested dict keys: a nested model gives ('model', 'layers.0.w'); a flat
    state dict gives ('model.layers.0.w',), which must not be mistaken for the wrapper.
    """
    for path in paths:
        if len(path) >= 2 and path[0] == "model":
            return "model"
    return None
