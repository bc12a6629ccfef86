"""When the base folder holds only config.json: the names and shapes that config's model loads, and the output
held to them. A folder that differs would load in transformers with weights missing (randomly initialised) or
ignored, behind a warning few people read; so a mismatch, or a model we cannot describe, is exit 4
(ReferenceMismatchError) before anything is written, unless the user asks for it with `--allow-unmatched`.

Where the truth comes from, in order:
* `tables` — the families streamconv describes as data (Llama), for a config they describe completely; needs
  neither torch nor transformers;
* `meta_probe` — transformers itself, building the model on the meta device in a child process; the layouts it
  reports are the ones its own loader takes with nothing missing or unexpected (per-expert or fused MoE experts).

The error says which stage would fix a mismatch: a trainer adapter (`--source-format`) for a trainer's own
names, `--rename` for a prefix that is off, the right `--config-from` for another architecture.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import ReferenceMismatchError
from ..planning import trainers
from . import meta_probe, tables, verdict
from .sidecars import HFConfig

Shape = Tuple[int, ...]

# A trainer's own module names, as evidence that an adapter (not --rename) is the missing stage.
TRAINER_SPELLINGS: Tuple[Tuple[str, str], ...] = (
    (r"(?:^|\.)layers\.\d+\.(?:moe|feed_forward)\.(?:experts|router|shared_experts?)\.", "torchtitan (MoE)"),
    (r"(?:^|\.)layers\.\d+\.attention\.(?:qkv_linear\.)?w[qkvo]\.", "torchtitan"),
    (r"(?:^|\.)layers\.\d+\.feed_forward\.w[123]\.", "torchtitan"),
    (r"(?:^|\.)layers\.\d+\.attn\.(?:q_proj|output_proj)\.|\.(?:sa|mlp)_norm\.scale$", "torchtune"),
    (r"^tok_embeddings\.", "torchtitan or torchtune"),
    (r"^(?:decoder\.layers|embedding\.word_embeddings)\.", "Megatron-Core"),
)
PREFIX_SCAN_LIMIT = 5000     # unmatched names examined for a common prefix change


@dataclass(frozen=True)
class Expected:
    source: str                                          # where the truth came from, for notes
    model_class: str
    layouts: Tuple[Tuple[str, Dict[str, Shape]], ...]    # (label, {name: shape}); any one of them loads
    optional: frozenset = frozenset()                    # may be absent: tied to another weight
    ignored_extra: Tuple[str, ...] = ()                  # regexes of names transformers ignores when present


def expected_for(config: HFConfig, env: Optional[Mapping[str, str]] = None) -> Expected:
    """The config's model, from a table or from transformers. meta_probe.ProbeFailed when neither can say."""
    table = tables.table_for(config.data)
    if table is not None:
        weights, optional = tables.expected_weights(table, config.data)
        return Expected(f"streamconv's {table.model_type} table (checked against transformers {table.checked_with})",
                        table.model_class, (("as save_pretrained writes it", weights),), optional)
    answer = meta_probe.ask(config.data, env)
    return Expected(f"transformers {answer.transformers_version} on the meta device", answer.model_class,
                    answer.layouts, answer.optional, answer.ignored_extra)


def _judge(shapes: Dict[str, Shape], layout: Dict[str, Shape], expected: Expected,
           unfiltered: Iterable[str]) -> Tuple[verdict.Verdict, List[str]]:
    """The output against one layout; also the output names transformers would ignore (allowed, noted)."""
    wanted = {n: s for n, s in layout.items() if n in shapes or n not in expected.optional}
    ignored = [n for n in shapes if n not in layout
               and any(re.search(p, n) for p in expected.ignored_extra)]
    output = {n: s for n, s in shapes.items() if n not in ignored}
    return verdict.judge(output, wanted, tie=False, unfiltered=unfiltered), ignored


def _size(found: verdict.Verdict) -> int:
    return len(found.unmatched) + len(found.missing) + len(found.shape_mismatches)


def check(shapes: Dict[str, Shape], config: HFConfig, *, unfiltered: Iterable[str] = (), source_format: str = "hf",
          allow_unmatched: bool = False, env: Optional[Mapping[str, str]] = None) -> List[str]:
    """Notes saying what was proven; ReferenceMismatchError when the output is not what the config's model loads
    or that cannot be proven (notes instead with `allow_unmatched`). `source_format`: the adapter that named the
    output ("hf": none), for the hint."""
    where = f"{config.folder}/config.json"
    try:
        expected = expected_for(config, env)
    except meta_probe.ProbeFailed as exc:
        reason = f"{exc} ({exc.kind})"
        if allow_unmatched:
            return [f"--allow-unmatched: names not checked against {where}'s model: {reason}"]
        raise ReferenceMismatchError(cannot_prove_message(config, where, exc)) from None
    unfiltered = list(unfiltered)
    judged = [(label, *_judge(shapes, layout, expected, unfiltered)) for label, layout in expected.layouts]
    label, found, ignored = min(judged, key=lambda j: _size(j[1]))
    head = f"{expected.model_class} built from {where} by {expected.source}"
    notes = [f"{n} is not a weight of {expected.model_class}; transformers ignores it on load" for n in ignored]
    if found.ok:
        return notes + [f"{len(shapes)} output names and shapes are those of a {head}, {label}"]
    if allow_unmatched:
        return notes + [f"--allow-unmatched: the output is not the {head}: {line}" for line in found.lines()]
    layout = dict(expected.layouts)[label]
    fixes = stage_hints(found, source_format, expected, config,
                        matches_after=lambda old, new: _renamed_matches(shapes, layout, expected, unfiltered, old, new))
    raise ReferenceMismatchError(
        f"the output is not the model {where} describes ({head}; compared with its names {label}); nothing was "
        "written:\n  " + "\n  ".join(found.lines()) + "\nTo fix: " + "; or ".join(fixes) + ".")


def cannot_prove_message(config: HFConfig, where: str, exc: meta_probe.ProbeFailed) -> str:
    known = ", ".join(t.model_type for t in tables.TABLES)
    why = {
        "no-transformers": f"transformers (with torch) is not installed here, and streamconv's own tables cover only "
                           f"{known}; install them (`pip install transformers torch`) so the model can be built on "
                           "the meta device",
        "unknown-model-type": "upgrade transformers to a release that has this architecture, or point --config-from "
                              "at the base model's own folder",
    }.get(exc.kind, "")
    fixes = ([why] if why else []) + [
        "give --config-from the base model's folder with its weights (*.safetensors: their names are the "
        "reference)", "add --allow-unmatched to write the folder without this proof, at your own risk"]
    return (f"cannot prove that the output's names and shapes are what {where}'s model (model_type "
            f"{str(config.model_type)[:60]!r}) loads: {exc}; nothing was written.\nTo fix: " + "; or ".join(fixes)
            + ".")


def _trainer_of(names: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(trainer, example name) when the names look like a trainer's own module names."""
    for pattern, trainer in TRAINER_SPELLINGS:
        hit = next((n for n in names if re.search(pattern, n)), None)
        if hit:
            return trainer, hit
    return None


def _tails(name: str) -> List[Tuple[str, str]]:
    """(prefix, rest) for every split of `name` at a dot, the whole name (prefix '') first."""
    parts = name.split(".")
    return [(".".join(parts[:k]) + ("." if k else ""), ".".join(parts[k:])) for k in range(len(parts))]


def prefix_rule(unmatched: Sequence[str], missing: Sequence[str]) -> Optional[Tuple[str, str, int]]:
    """(old prefix, new prefix, names it fixes) of the one prefix change that maps the most output names onto
    missing ones, when it fixes at least half of the unmatched names."""
    by_tail: Dict[str, str] = {}
    for m in missing:
        for prefix, rest in _tails(m):
            by_tail.setdefault(rest, prefix)
    votes: Counter = Counter()
    for u in unmatched[:PREFIX_SCAN_LIMIT]:
        for old, rest in _tails(u):
            new = by_tail.get(rest)
            if new is not None and new != old:
                votes[(old, new)] += 1
                break
    if not votes:
        return None
    (old, new), count = votes.most_common(1)[0]
    return (old, new, count) if count * 2 >= min(len(unmatched), PREFIX_SCAN_LIMIT) else None


def _renamed_matches(shapes: Dict[str, Shape], layout: Dict[str, Shape], expected: Expected,
                     unfiltered: Sequence[str], old: str, new: str) -> bool:
    """Would `--rename '^old=new'` make the output the layout's model (no name or shape off; only what
    --include/--exclude left out still missing)? A prefix shared by some names can point them at the names of
    another architecture's layers (a Qwen3-MoE's experts of layer 0 onto a DeepSeek-V3's layer 2), fixing a few
    and breaking others: such a rule is no fix."""
    def rename(name: str) -> str:
        return new + name[len(old):] if name.startswith(old) else name
    renamed = {rename(n): s for n, s in shapes.items()}
    if len(renamed) < len(shapes):      # two names made one: the rename would be refused
        return False
    found, _ = _judge(renamed, layout, expected, [rename(n) for n in unfiltered])
    return not found.unmatched and not found.shape_mismatches and set(found.missing) <= set(found.excluded)


def stage_hints(found: verdict.Verdict, source_format: str, expected: Expected, config: HFConfig,
                matches_after: Callable[[str, str], bool] = lambda old, new: True) -> List[str]:
    """Which stage would fix the mismatch, most specific first. `matches_after(old, new)`: whether renaming
    the prefix `old` to `new` would make the output match; a rename is suggested only then."""
    if not found.unmatched and not found.shape_mismatches and set(found.missing) == set(found.excluded):
        return ["to write a partial model on purpose, add --allow-unmatched (transformers will initialise the "
                "left-out weights randomly when it loads the folder)"]
    hints = []
    trainer = _trainer_of(found.unmatched)
    if trainer and source_format == trainers.AS_IS:
        adapters = ", ".join(a.name for a in trainers.ADAPTERS)
        hints.append(f"the names look like {trainer[0]}'s own module names (e.g. {trainer[1]}): a trainer adapter "
                     f"maps them to Hugging Face's (--source-format, one of {adapters}); none of these was detected "
                     "on this checkpoint, so none may map this model family yet")
    elif source_format != trainers.AS_IS:
        hints.append(f"the {source_format} adapter's output is not this config's model (a {expected.model_class}): "
                     "check that --config-from is the base model this checkpoint was trained from")
    rule = prefix_rule(found.unmatched, found.missing)
    if rule and not matches_after(rule[0], rule[1]):
        rule = None
    if rule:
        old, new, count = rule
        hints.append(f"{count} name(s) differ only by a prefix: --rename '^{re.escape(old)}={new}'")
    if not trainer and not rule and source_format == trainers.AS_IS:
        like = (f"whose weights are named like {found.missing[0]}" if found.missing else
                f"which has no {found.unmatched[0]}" if found.unmatched else "whose shapes differ")
        hints.append(f"the config builds a {expected.model_class} (model_type {str(config.model_type)[:60]!r}), "
                     f"{like}: check that --config-from is the base model this checkpoint was trained from")
    hints.append("give --config-from the base model's folder with its weights (their names are then the reference)")
    hints.append("add --allow-unmatched to write the folder anyway (transformers would load it with the missing "
                 "weights randomly initialised)")
    return hints
