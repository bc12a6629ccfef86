"""What each output tensor is called: decided once, in ordered stages, and every name remembers which stage made it.

The stages, in the order they apply:

| stage      | what it does                                                      | who decides                   |
|------------|-------------------------------------------------------------------|-------------------------------|
| checkpoint | the state-dict key inside the model subtree (optimizer state and  | the checkpoint, `--subtree`   |
|            | non-tensor entries are skipped)                                   |                               |
| wrappers   | segments torch.compile / FSDP1 / DDP insert (`_orig_mod.`) removed | `names.WRAPPER_SEGMENTS`      |
| adapter    | a trainer's names mapped to Hugging Face's, one tensor maybe into | `trainers`, `--source-format` |
|            | several                                                           |                               |
| layout     | prefixes swapped to the reference model's layout (Mllama live ->  | `hf/prepare` from config.json |
|            | hub)                                                              | and the reference's weights   |
| rename     | the user's `--rename` rules, one after another                    | `--rename`                    |
| filter     | `--include` / `--exclude`, by checkpoint key or output name       | `--include`, `--exclude`      |
| tied       | a tied `lm_head.weight` left out (transformers rebuilds it)       | `hf/tied` from config.json    |

`source_names` runs the first three (the walk over the checkpoint's entries: once per conversion); each later stage
is a method returning a new `Naming`, so hf/prepare can choose the layout from the adapter's names without running
the first stages again. A name that cannot be written, two tensors given one name, or a name the reference does not
have is blamed on the stage that made it (`Named.made_by`), with that stage's own fix.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from . import names, trainers
from ..errors import CheckpointError, OptionsError, ReferenceMismatchError, UnsupportedFeatureError
from ..model import CheckpointMetadata, LeftOut, TensorEntry

# Step numbers: the position of a stage in the pipeline. Rename rule i is RENAME + i.
CHECKPOINT, WRAPPERS, ADAPTER, LAYOUT, RENAME = 0, 1, 2, 3, 4

# Statuses of a named tensor that is not written (`Named.status`); "" is written.
EXCLUDED = "excluded"
TIED = "tied duplicate"

# How many times `source_names` ran in this process: tests check that a conversion names its tensors once.
calls = {"source_names": 0}


@dataclass(frozen=True)
class Skipped:
    fqn: str
    reason: str                 # "optimizer state", "non-tensor", "excluded", "outside model subtree"


@dataclass(frozen=True)
class Step:
    """One stage changing a name: which step of the pipeline, who it was (for messages), the name after it."""
    number: int
    by: str
    name: str


@dataclass(frozen=True)
class Named:
    """One output tensor and how its name came about. `entry` may be a `transforms.Derived` (an adapter's output)."""
    entry: TensorEntry
    fqn: str                        # the checkpoint key it is read from
    steps: Tuple[Step, ...]         # the first is the checkpoint's own name; then each stage that changed it
    status: str = ""                # "": written; else EXCLUDED or TIED

    @property
    def name(self) -> str:
        return self.steps[-1].name

    @property
    def state_dict_name(self) -> str:
        return self.steps[0].name

    @property
    def made_by(self) -> str:
        """Which stage gave the output name, for messages: e.g. "--rename 'a=b'"."""
        return self.steps[-1].by

    def name_at(self, number: int) -> str:
        """The name as it was after pipeline step `number`."""
        return [s for s in self.steps if s.number <= number][-1].name

    def step_at(self, number: int) -> Optional[Step]:
        return next((s for s in self.steps if s.number == number), None)

    def renamed(self, number: int, by: str, name: str) -> "Named":
        return self if name == self.name else replace(self, steps=self.steps + (Step(number, by, name),))

    def adapted(self, by: str, name: str, entry: TensorEntry) -> "Named":
        """`renamed` by the adapter, reading `entry`: made directly, as a DeepSeek-V3 makes 44,544 of them."""
        steps = self.steps if name == self.name else self.steps + (Step(ADAPTER, by, name),)
        return Named(entry, self.fqn, steps, self.status)


@dataclass(frozen=True)
class Naming:
    """Every model tensor of a checkpoint with its output name, in checkpoint order, and what was skipped."""
    tensors: Tuple[Named, ...]
    skipped: Tuple[Skipped, ...]         # entries that never got a name: optimizer state, non-tensors, RoPE tables
    subtree: Optional[str]
    source_format: str                   # the trainer adapter applied, "hf": none
    source_note: str                     # why, for reports
    adapter: Optional[trainers.Adapter] = None
    last_step: int = ADAPTER

    @property
    def written(self) -> Tuple[Named, ...]:
        return tuple(t for t in self.tensors if not t.status)

    @property
    def selected(self) -> List[Tuple[TensorEntry, str]]:
        return [(t.entry, t.name) for t in self.written]

    @property
    def all_skipped(self) -> Tuple[Skipped, ...]:
        return self.skipped + tuple(Skipped(t.fqn, t.status) for t in self.tensors if t.status)

    @property
    def renamed(self) -> Tuple[Tuple[str, str], ...]:
        """(checkpoint key, output name) of the written tensors whose name is not their state-dict name
        (unwrapping the subtree, "model.", alone is not a rename)."""
        return tuple((t.fqn, t.name) for t in self.written if t.name != t.state_dict_name)

    def unfiltered(self) -> List[str]:
        """The output names without --include/--exclude: tells a deliberate omission from a wrong mapping."""
        return [t.name for t in self.tensors if t.status != TIED]

    def made_by(self) -> Dict[str, str]:
        """{output name: the stage that made it} of the written tensors, for messages."""
        return {t.name: t.made_by for t in self.written}

    # -- the stages after the adapter -------------------------------------------------------------------------

    def _mapped(self, number: int, by: str, rename) -> "Naming":
        return replace(self, tensors=tuple(t.renamed(number, by, rename(t.name)) for t in self.tensors),
                       last_step=number)

    def with_layout(self, layout: Optional["PrefixMap"]) -> "Naming":
        if layout is None or not layout.pairs:
            return replace(self, last_step=LAYOUT)
        return self._mapped(LAYOUT, layout.by, layout.apply)

    def with_renames(self, rules: Sequence[names.RenameRule]) -> "Naming":
        out = replace(self, last_step=max(self.last_step, LAYOUT))
        for i, rule in enumerate(rules):
            out = out._mapped(RENAME + i, f"--rename '{names.printable(rule.text)}'", rule.apply)
        return out

    def filtered(self, include: Sequence[str], exclude: Sequence[str]) -> "Naming":
        return replace(self, tensors=tuple(
            replace(t, status=EXCLUDED) if not t.status and not names.is_selected((t.fqn, t.name), include, exclude)
            else t for t in self.tensors))

    def dropping(self, heads: Iterable[str]) -> "Naming":
        """Tied heads left out; heads an earlier call dropped and `heads` does not name are written again."""
        heads = set(heads)
        def status(t: Named) -> str:
            if t.status == EXCLUDED:
                return t.status
            return TIED if t.name in heads else ""
        return replace(self, tensors=tuple(t if status(t) == t.status else replace(t, status=status(t))
                                           for t in self.tensors))

    def checked(self) -> "Naming":
        """Refuse a written name no safetensors reader would load, and two tensors written under one name,
        blaming the stage that made the name."""
        seen: Dict[str, Named] = {}
        for t in self.written:
            _check_name(t)
            if t.name in seen:
                _refuse_collision(seen[t.name], t, self.last_step)
            seen[t.name] = t
        return self


@dataclass(frozen=True)
class PrefixMap:
    """The reference-layout stage as data: (old prefix, new prefix) pairs, the longest match replaced once."""
    pairs: Tuple[Tuple[str, str], ...]
    by: str                              # e.g. "the reference layout 'mllama live->hub' (from /ref/config.json)"

    def apply(self, name: str) -> str:
        best = max((old for old, _ in self.pairs if name.startswith(old)), key=len, default=None)
        return name if best is None else dict(self.pairs)[best] + name[len(best):]


def name_tensors(meta: CheckpointMetadata, options, *, layout: Optional[PrefixMap] = None) -> Naming:
    """Every stage, for callers without a reference model (the planner's own tests, `build_plan` alone)."""
    return (source_names(meta, options).with_layout(layout).with_renames(options.renames)
            .filtered(options.include, options.exclude).dropping(options.drop).checked())


# -- stages 1-3: the checkpoint's names, wrappers removed, the trainer adapter -----------------------------------


def _top_key(entry: TensorEntry) -> str:
    return str(entry.path[0]) if entry.path else entry.fqn.split(".", 1)[0]


def _source_name(entry: TensorEntry, subtree: Optional[str]) -> str:
    """The state-dict name inside the selected subtree: ('model', 'layers.0.w') -> 'layers.0.w'."""
    if subtree is not None and len(entry.path) >= 2:
        return ".".join(str(p) for p in entry.path[1:])
    if subtree is not None and entry.fqn.startswith(subtree + "."):
        return entry.fqn[len(subtree) + 1:]
    return entry.fqn


def _subtree(meta: CheckpointMetadata, options) -> Optional[str]:
    return options.subtree if options.subtree is not None else names.model_subtree(t.path for t in meta.tensors)


def _model_tensors(meta: CheckpointMetadata, options, subtree: Optional[str], skipped: List[Skipped]) -> List[Named]:
    """The model's tensors named by stages 1 and 2; the rest go to `skipped`."""
    wrappers = f"removing wrapper segments ({', '.join(names.WRAPPER_SEGMENTS)})"
    model = []
    for entry in meta.tensors:
        top = _top_key(entry)
        if subtree is not None and top != subtree:
            reason = "optimizer state" if top.startswith("optim") else f"outside '{subtree}'"
            skipped.append(Skipped(entry.fqn, reason))
            continue
        if subtree is None and top in names.NON_MODEL_KEYS and len(entry.path) >= 2:
            skipped.append(Skipped(entry.fqn, "optimizer state" if top.startswith("optim") else f"'{top}' state"))
            continue
        named = Named(entry, entry.fqn, (Step(CHECKPOINT, "the checkpoint's own key", _source_name(entry, subtree)),))
        if options.strip_wrappers:
            named = named.renamed(WRAPPERS, wrappers, names.strip_wrappers(named.name))
        model.append(named)
    return model


def left_out_while_decoding(options) -> LeftOut:
    """What `_model_tensors` skips whatever else the checkpoint holds, as a `model.LeftOut` decoding can use before
    any path is known: a tensor under a top-level key of `names.NON_MODEL_KEYS` (optimizer and trainer state) with
    a path of two or more elements is skipped with or without a model subtree, unless `--subtree` names that key."""
    return LeftOut(frozenset(key for key in names.NON_MODEL_KEYS if key != options.subtree))


def checkpoint_names(meta: CheckpointMetadata, options) -> Tuple[List[Named], List[Skipped]]:
    """Stages 1 and 2 alone, as (model tensors, skipped): what folder discovery counts to tell a model's folder
    from an optimizer's. Not a naming: no adapter, renames or filters."""
    skipped: List[Skipped] = [Skipped(b.fqn, "non-tensor") for b in meta.byte_entries]
    return _model_tensors(meta, options, _subtree(meta, options), skipped), skipped


def resolve_source_format(meta: CheckpointMetadata, options, model: Sequence[Named]) -> trainers.Resolution:
    tops = [_top_key(e) for e in meta.tensors] + [str(b.path[0]) if b.path else b.fqn.split(".", 1)[0]
                                                   for b in meta.byte_entries]
    return trainers.resolve([t.name for t in model], tops, options.source_format, options.source_format_reason,
                            getattr(options, "expert_layout", trainers.EXPERT_LAYOUTS[0]))


def source_format(meta: CheckpointMetadata, options) -> trainers.Resolution:
    """Which trainer's names the checkpoint uses (`--source-format`, or detected from the model's names)."""
    return resolve_source_format(meta, options, _model_tensors(meta, options, _subtree(meta, options), []))


def source_names(meta: CheckpointMetadata, options) -> Naming:
    """Stages 1-3. Refuses a model the adapter cannot hold (UnsupportedFeatureError) unless the user's
    --include/--exclude leave those tensors out."""
    calls["source_names"] += 1
    subtree = _subtree(meta, options)
    skipped: List[Skipped] = [Skipped(b.fqn, "non-tensor") for b in meta.byte_entries]
    model = _model_tensors(meta, options, subtree, skipped)
    resolution = resolve_source_format(meta, options, model)
    adapter = resolution.adapter
    if adapter is not None:
        model = _adapted(adapter, model, options, skipped, resolution)
    return Naming(tensors=tuple(model), skipped=tuple(skipped), subtree=subtree, source_format=resolution.name,
                  source_note=resolution.note, adapter=adapter)


def _adapted(adapter: trainers.Adapter, model: Sequence[Named], options, skipped: List[Skipped],
             resolution: trainers.Resolution) -> List[Named]:
    def wanted(fqn: str) -> bool:
        return names.is_selected((fqn,), options.include, options.exclude)
    if adapter.unsupported:
        # Refuse a model the layout cannot hold before asking for what mapping it would need (head counts).
        foreign = [t.fqn for t in model if adapter.skip_reason(t.name) is None
                   and not any(r.match(t.name) for r in adapter.rules) and wanted(t.fqn)]
        if foreign:
            _refuse_features(adapter, foreign)
    why = ("detected from the checkpoint's module names" if options.source_format == "auto"
           else options.source_format_reason or "--source-format")
    by = f"the {adapter.name} adapter ({why})"
    out: List[Named] = []
    unmapped: List[str] = []
    parts: Dict[str, List[Named]] = {}     # outputs of `join` rules (fused experts), merged below
    for t in model:
        reason = adapter.skip_reason(t.name)
        if reason is not None:
            skipped.append(Skipped(t.fqn, reason))
            continue
        made = [(rule, name, entry) for rule in adapter.rules for m in [rule.match(t.name)] if m is not None
                for name, entry in trainers.outputs(rule, m, t.entry, options.heads)]
        if not made:
            unmapped.append(t.fqn)
        for rule, name, entry in made:
            named = t.adapted(by, name, entry)
            if rule.join and not wanted(t.fqn):     # an excluded part is missing, not silently joined
                continue
            if rule.join and name in parts:
                parts[name].append(named)
                continue
            if rule.join:
                parts[name] = [named]
            out.append(named)
    out = [replace(n, entry=trainers.joined(n.name, [p.entry for p in parts[n.name]])) if n.name in parts
           and parts[n.name][0] is n else n for n in out]
    skipped.extend(Skipped(fqn, "excluded") for fqn in unmapped if not wanted(fqn))
    unmapped = [fqn for fqn in unmapped if wanted(fqn)]
    if unmapped:
        listed = ", ".join(unmapped[:8]) + (f" ... and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        raise UnsupportedFeatureError(
            f"{len(unmapped)} checkpoint tensor(s) have no mapping in the {resolution.name} layout: {listed}. "
            "--exclude them, or convert with --source-format hf to keep the checkpoint's names")
    return out


def _refuse_features(adapter: trainers.Adapter, unmapped: List[str]) -> None:
    """UnsupportedFeatureError naming the architecture features (MoE, MLA...) the unmapped tensors belong to."""
    by_feature: Dict[str, List[str]] = {}
    for fqn in unmapped:
        by_feature.setdefault(adapter.feature_of(fqn) or "tensors with no mapping", []).append(fqn)
    lines = [f"{feature}: {', '.join(found[:4])}" + (f" ... and {len(found) - 4} more" if len(found) > 4 else "")
             for feature, found in by_feature.items()]
    raise UnsupportedFeatureError(
        f"this {adapter.trainer} checkpoint uses what the {adapter.name} layout ({adapter.family}) cannot hold; "
        "nothing was written:\n  " + "\n  ".join(lines) + "\n"
        + ("" if adapter.expert_layout else "Only dense Llama-family GPT models (RMSNorm, SwiGLU, RoPE, GQA/MQA) "
           "are converted; ") + "--source-format hf writes the checkpoint's own tensors unmapped.")


# -- blame ---------------------------------------------------------------------------------------------------------


def _fix(number: int) -> str:
    """What to do about a name made by step `number`."""
    if number >= RENAME:
        return "change that --rename rule or --exclude the tensor"
    if number == LAYOUT:
        return ("--exclude the tensor, or pass --config-from the model this checkpoint was trained from (--no-config "
                "keeps the checkpoint's names)")
    if number == ADAPTER:
        return "--exclude the tensor, or convert with --source-format hf to keep the checkpoint's names"
    return "give it another name with --rename REGEX=REPLACEMENT or leave it out with --exclude"


def _error(number: int):
    """The error class for a name made by step `number`: the user's rules are a usage error; the reference's
    layout a reference mismatch; the checkpoint's own names (and what its trainer's adapter makes of them) a
    checkpoint error."""
    if number >= RENAME:
        return OptionsError
    return ReferenceMismatchError if number == LAYOUT else CheckpointError


def _check_name(t: Named) -> None:
    problem = names.name_problem(t.name)
    if problem is None:
        return
    first = next(s for s in t.steps if names.name_problem(s.name) is not None)     # where it went wrong
    raise _error(first.number)(
        f"checkpoint key {names.shown(t.fqn)} gives the output name {names.shown(t.name)} (made by {first.by}), "
        f"which a safetensors file cannot hold: {problem}; {_fix(first.number)}")


def _refuse_collision(a: Named, b: Named, last_step: int) -> None:
    """Two tensors would be written under one name, and a reader would see only one of them."""
    number = next(n for n in range(last_step + 1) if a.name_at(n) == b.name_at(n))     # where they met
    step = a.step_at(number) or b.step_at(number)
    by = step.by if step is not None else "the checkpoint's own keys"
    fix = "--exclude one of them by its checkpoint key"
    if number >= RENAME:
        fix = "change that --rename rule, or " + fix
    elif number in (LAYOUT, ADAPTER):
        fix += ", or " + _fix(number).split(", or ")[-1]
    raise _error(number)(
        f"checkpoint keys {names.shown(a.fqn)} and {names.shown(b.fqn)} both become {names.shown(b.name)} "
        f"(made by {by}); {fix}")
