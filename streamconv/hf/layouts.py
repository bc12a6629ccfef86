"""Which names a model folder uses for the same weights, and how to go from the checkpoint's to the reference's.

Some architectures changed module names between transformers releases. A Llama 3.2 Vision (Mllama) model
trained with a recent transformers has `model.language_model.layers.…`, `model.vision_model.…`,
`lm_head.weight` in its state dict (the *live* layout), while hub checkpoints, `save_pretrained` and vLLM use
`language_model.model.layers.…`, `vision_model.…`, `language_model.lm_head.weight` (the *hub* layout).

Each mapping is data: pairs of (live prefix, hub prefix). Which direction applies is not guessed from
versions: the reference folder's own weight names (safetensors headers or index, read as JSON) decide, by
how many checkpoint names each candidate maps onto a reference name.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import CheckpointError
from ..fs import location
from ..planning.names import RenameRule
from ..safetensors_format import MAX_HEADER_BYTES
from ..safetensors_format import LENGTH, decode_body, header_length, pop_metadata

# MAX_HEADER_BYTES is the format's one limit (safetensors_format.py), named here so a test can see this module
# reads the reference's headers under it and has no limit of its own.
__all__ = ["MAX_HEADER_BYTES", "Shape", "Layout", "LAYOUTS", "DIRECTIONS", "LayoutMapping", "rule_order",
           "sequential_safe", "candidates", "reference_weights", "choose_mapping", "NameComparison", "compare_names"]

Shape = Optional[Tuple[int, ...]]   # None when only the name is known (a .bin index)


@dataclass(frozen=True)
class Layout:
    name: str
    model_types: Tuple[str, ...]              # config.json model_type values it applies to
    prefixes: Tuple[Tuple[str, str], ...]     # (live prefix, hub prefix); the longest match applies


_LLAVA_FAMILY = (("model.language_model.", "language_model.model."),
                 ("model.vision_tower.", "vision_tower."),
                 ("model.multi_modal_projector.", "multi_modal_projector."),
                 ("model.image_newline", "image_newline"),
                 ("lm_head.", "language_model.lm_head."))

LAYOUTS: Tuple[Layout, ...] = (
    Layout("mllama", ("mllama",),
           (("model.language_model.", "language_model.model."),
            ("model.vision_model.", "vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("lm_head.", "language_model.lm_head."))),
    Layout("llava", ("llava", "llava_next", "llava_next_video", "llava_onevision", "vipllava", "paligemma",
                     "aya_vision", "mistral3", "gemma3", "internvl", "got_ocr2"), _LLAVA_FAMILY),
    Layout("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"),
           (("model.language_model.", "model."),
            ("model.visual.", "visual."))),
)

DIRECTIONS = ("live->hub", "hub->live")


@dataclass(frozen=True)
class LayoutMapping:
    """One candidate: a layout in one direction (or the identity, layout None)."""

    layout: Optional[Layout]
    direction: str = ""

    @property
    def label(self) -> str:
        return "as in the checkpoint" if self.layout is None else f"{self.layout.name} {self.direction}"

    @property
    def pairs(self) -> Tuple[Tuple[str, str], ...]:
        if self.layout is None:
            return ()
        if self.direction == "live->hub":
            return self.layout.prefixes
        return tuple((hub, live) for live, hub in self.layout.prefixes)

    def apply(self, name: str) -> str:
        """One pass: the longest matching prefix is replaced."""
        best = max((old for old, _ in self.pairs if name.startswith(old)), key=len, default=None)
        if best is None:
            return name
        return dict(self.pairs)[best] + name[len(best):]

    def rules(self) -> Tuple[RenameRule, ...]:
        """The same mapping as planner rename rules, which apply one after another to the previous result:
        ordered so that no rule sees another's output and a longer prefix goes before a shorter one."""
        return tuple(RenameRule("^" + re.escape(old), new.replace("\\", "\\\\"))
                     for old, new in rule_order(self.pairs))


def _must_precede(a: Tuple[str, str], b: Tuple[str, str]) -> bool:
    """Rule `a` has to run before rule `b`: b's output could start with a's prefix, or a's prefix is a
    longer version of b's."""
    (old_a, _), (old_b, new_b) = a, b
    feeds = new_b.startswith(old_a) or old_a.startswith(new_b)
    return feeds or (old_a != old_b and old_a.startswith(old_b))


def rule_order(pairs: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """`pairs` ordered for sequential application (a topological order of `_must_precede`)."""
    remaining, ordered = list(pairs), []
    while remaining:
        ready = [p for p in remaining if not any(_must_precede(q, p) for q in remaining if q is not p)]
        if not ready:
            raise ValueError(f"prefix rules {remaining} feed each other in a cycle; no order applies them once")
        ordered.append(ready[0])
        remaining.remove(ready[0])
    return ordered


def sequential_safe(pairs: Sequence[Tuple[str, str]]) -> bool:
    """True when applying `pairs` in this order, each to the previous result, equals one longest-prefix pass."""
    return all(not _must_precede(b, a) for i, a in enumerate(pairs) for b in pairs[i + 1:])


def candidates(model_type: Optional[str]) -> List[LayoutMapping]:
    """Identity first, then the config's own architecture, then every other layout."""
    own = [lay for lay in LAYOUTS if model_type in lay.model_types]
    rest = [lay for lay in LAYOUTS if lay not in own]
    return [LayoutMapping(None)] + [LayoutMapping(lay, d) for lay in own + rest for d in DIRECTIONS]


# -- reading the reference's names ------------------------------------------------------------------------


def _safetensors_header(where: location.Folder, name: str) -> Dict[str, Shape]:
    path = where.join(name)
    try:    # a FIFO or device is refused, not read (location reads regular files only)
        entry = where.entry(name)
        if entry is None:
            raise FileNotFoundError(f"{path}: no such file")
        n, problem = header_length(where.read(name, 0, LENGTH.size), entry.size)
        if problem:
            raise CheckpointError(f"{path}: {problem}; the reference's weights file is damaged")
        body = decode_body(where.read(name, LENGTH.size, n))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors header: {exc}") from None
    pop_metadata(body)     # the reference's own metadata says nothing about names or shapes
    return {k: tuple(v.get("shape", ())) for k, v in body.items() if isinstance(v, dict)}


def reference_weights(folder: str) -> Optional[Dict[str, Shape]]:
    """{name: shape} of the weights in a model folder, from safetensors headers (or a .bin index's names).

    None when the folder holds no weights we can list without loading them.
    """
    where = location.at(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = where.join(index_name)
        index = _file_entry(where, index_name)
        if index is not None:
            try:
                weight_map = json.loads(where.read(index_name, 0, index.size))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{path}: cannot read weight_map: {exc}") from None
            out: Dict[str, Shape] = {name: None for name in weight_map}
            if index_name.startswith("model.safetensors"):
                for shard in sorted(set(weight_map.values())):
                    if isinstance(shard, str) and _file_entry(where, shard) is not None:
                        out.update(_safetensors_header(where, shard))
            return out
    files = sorted(f for f in where.names() if f.endswith(".safetensors"))
    if not files:
        return None
    out = {}
    for name in files:
        out.update(_safetensors_header(where, name))
    return out


def _file_entry(where: location.Folder, name: str) -> Optional[location.Entry]:
    """`name` in `where` when it is a regular file (what os.path.isfile said), else None."""
    try:
        entry = where.entry(name)
    except (OSError, ValueError):
        return None
    return entry if entry is not None and entry.kind == location.FILE else None


# -- choosing ---------------------------------------------------------------------------------------------


def choose_mapping(names: Iterable[str], reference: Iterable[str], model_type: Optional[str]) -> Tuple[LayoutMapping, int]:
    """The candidate that maps the most checkpoint names onto reference names, and how many it maps.
    Ties go to the identity, then to the config's own architecture."""
    names, ref = list(names), set(reference)
    best: Optional[Tuple[int, LayoutMapping]] = None
    for mapping in candidates(model_type):
        hits = sum(1 for name in names if mapping.apply(name) in ref)
        if best is None or hits > best[0]:
            best = (hits, mapping)
    assert best is not None
    return best[1], best[0]


@dataclass(frozen=True)
class NameComparison:
    unmatched: Tuple[str, ...]      # output names the reference does not have
    missing: Tuple[str, ...]        # reference names the output does not have
    shape_mismatches: Tuple[Tuple[str, Tuple[int, ...], Tuple[int, ...]], ...]  # (name, ours, reference's)


def compare_names(output: Dict[str, Tuple[int, ...]], reference: Dict[str, Shape]) -> NameComparison:
    """Output {name: shape} against the reference's, name for name."""
    return NameComparison(
        unmatched=tuple(sorted(n for n in output if n not in reference)),
        missing=tuple(sorted(n for n in reference if n not in output)),
        shape_mismatches=tuple((n, tuple(s), tuple(reference[n])) for n, s in sorted(output.items())
                               if reference.get(n) is not None and tuple(reference[n]) != tuple(s)))
