"""Tensor names: from checkpoint keys to output names, and the order they are written in.

All functions are pure. Rules are data (tuples of prefixes and regexes), applied in one place.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union

from .errors import OptionsError

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
            re.compile(pattern)
        except re.error as exc:
            raise OptionsError(f"--rename {text!r}: bad regular expression: {exc}") from None
        return RenameRule(pattern, m.group(2))

    def apply(self, name: str) -> str:
        return re.sub(self.pattern, self.replacement, name)


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


_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> Tuple[Union[int, str], ...]:
    """Sort key that puts layers.2 before layers.10."""
    # re.split with a capturing group alternates text, digits, text, ... so tuples compare like with like.
    return tuple(int(part) if i % 2 else part for i, part in enumerate(_DIGITS.split(name)))


def model_subtree(paths: Iterable[Tuple]) -> Optional[str]:
    """'model' when the state dict was saved as {"model": ..., "optim": ...} (llama-recipes, accelerate).

    planner_data paths are the nested dict keys: a nested model gives ('model', 'layers.0.w'); a flat
    state dict gives ('model.layers.0.w',), which must not be mistaken for the wrapper.
    """
    for path in paths:
        if len(path) >= 2 and path[0] == "model":
            return "model"
    return None
