"""Which folder holds the model: from the folder a user points at to the model's DCP checkpoint folder.

Trainers put the DCP folder below the run folder users remember:

| trainer | the model's DCP folder |
|---|---|
| accelerate `save_state` (FSDP `SHARDED_STATE_DICT`) | `state/pytorch_model_fsdp_0/`, optimizer in `state/optimizer_0/` |
| transformers `Trainer` (FSDP) | `output_dir/checkpoint-N/pytorch_model_fsdp_0/` (+ `optimizer_0/`) |
| torchtitan | `dump_folder/checkpoint/step-N/` |
| torchtune (DCP) | `output_dir/dist_epoch_N/` |

`find_checkpoint(root)` leaves a DCP folder as it is. Otherwise it lists the folders below `root` (a few levels,
a bounded number of directories), reads the `.metadata` of each DCP folder found (never a data file), and takes
the one folder holding model weights. It refuses when that is not clear — several checkpoints (steps, epochs,
several models) are listed one line each, newest named, and none is taken: converting an older step by
accident gives a plausible wrong model. A folder holding only optimizer state is never converted; the error
names the sibling that holds the model.

`classify` and `decide` are pure (metadata and a listing in, a decision out); `scan` does the listing.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .checkpoint import load
from ..errors import CheckpointError
from ..fs import location
from ..fs.remote import is_url
from ..model import CheckpointMetadata
from ..planning.names import natural_key
from ..planning.naming import checkpoint_names
from ..planning.plan import PlanOptions
from ..source import flavors, hf_shards

MAX_DEPTH = 3               # accelerate's project_dir/checkpoints/checkpoint_N/pytorch_model_fsdp_0 is 3 down
MAX_DIRS_LISTED = 400       # directories listed before giving up on a huge tree
MAX_METADATA_READS = 16     # DCP folders whose .metadata is read; more than that is ambiguous anyway
LIST_LIMIT = 12             # candidates shown one per line before "... and N more"

# A path component numbering a checkpoint: step-20, checkpoint-500, checkpoint_3, global_step100, dist_epoch_2.
_NUMBERED = re.compile(r"(?:^|[_-])(step|checkpoint|epoch|iter|iteration)[-_]?(\d+)$", re.IGNORECASE)
# Top-level keys of a flattened optimizer state dict saved on its own (get_optimizer_state_dict's layout).
_OPTIMIZER_TOPS = ("state", "param_groups")
# Which trainer leaves a folder of this name, for the note.
_TRAINER_HINTS = ((re.compile(r"pytorch_model_fsdp_\d+$"), "accelerate / transformers Trainer"),
                  (re.compile(r"step-\d+$"), "torchtitan"),
                  (re.compile(r"dist_epoch_\d+$"), "torchtune"))


@dataclass(frozen=True)
class Holding:
    """What a DCP folder's tensors are, by the planner's own selection."""

    model_tensors: int
    optimizer_tensors: int
    other_tensors: int

    @property
    def kind(self) -> str:
        if self.model_tensors:
            return "model"
        return "optimizer" if self.optimizer_tensors else "other"

    def describe(self) -> str:
        parts = [f"{self.model_tensors} model tensors"] if self.model_tensors else []
        if self.optimizer_tensors:
            parts.append(f"{self.optimizer_tensors} optimizer tensors")
        if self.other_tensors:
            parts.append(f"{self.other_tensors} other")
        if not self.model_tensors:
            return ("optimizer state only" if self.optimizer_tensors else "no model weights") + (
                f" ({', '.join(parts)})" if parts else "")
        return ", ".join(parts)


@dataclass(frozen=True)
class Found:
    """A DCP folder below the root."""

    path: str                           # relative to the root, '/'-separated
    holding: Optional[Holding] = None   # None: .metadata not read (too many folders) or unreadable
    problem: str = ""                   # why it was not read

    @property
    def step(self) -> Optional[Tuple[str, int]]:
        """('step', 20) from the deepest numbered component (checkpoint-500/pytorch_model_fsdp_0 -> 500)."""
        for part in reversed(self.path.split("/")):
            m = _NUMBERED.search(part)
            if m:
                return m.group(1).lower(), int(m.group(2))
        return None


@dataclass(frozen=True)
class Decision:
    chosen: Optional[str]   # relative path of the model's DCP folder; None: refused
    message: str            # the note (chosen) or the error (refused)


def _is_optimizer_name(name: str) -> bool:
    return name.split(".", 1)[0] in _OPTIMIZER_TOPS


def classify(meta: CheckpointMetadata) -> Holding:
    """Counts tensors as the planner would select them (default options), a flattened optimizer state dict
    saved at top level (`state.<param>.exp_avg`) counting as optimizer state. Names are taken as stored
    (`source_format="hf"`): counting needs no trainer adapter, nor the head counts some adapters need."""
    selected, skipped = checkpoint_names(meta, PlanOptions(source_format="hf"))
    optimizer = sum(1 for s in skipped if s.reason == "optimizer state")
    model = 0
    for named in selected:
        if _is_optimizer_name(named.name):
            optimizer += 1
        else:
            model += 1
    tensor_fqns = {t.fqn for t in meta.tensors}
    other = sum(1 for s in skipped if s.reason != "optimizer state" and s.fqn in tensor_fqns)
    return Holding(model, optimizer, other)


def _line(root: str, f: Found) -> str:
    step = f.step
    what = f.holding.describe() if f.holding else (f.problem or "not read")
    return f"  {os.path.join(root, f.path)}  ({f'{step[0]} {step[1]}: ' if step else ''}{what})"


def _lines(root: str, found: Sequence[Found]) -> List[str]:
    shown = [_line(root, f) for f in found[:LIST_LIMIT]]
    if len(found) > LIST_LIMIT:
        shown.append(f"  ... and {len(found) - LIST_LIMIT} more")
    return shown


def _hint(path: str) -> str:
    last = path.split("/")[-1]
    return next((f" ({who} layout)" for pattern, who in _TRAINER_HINTS if pattern.search(last)), "")


def decide(root: str, found: Sequence[Found], *, truncated: bool = False) -> Optional[Decision]:
    """The model's DCP folder among `found` (below `root`), or a refusal listing the candidates.
    None when nothing was found: `root` is simply not a checkpoint."""
    if not found:
        return None
    found = sorted(found, key=lambda f: natural_key(f.path))
    models = [f for f in found if f.holding is not None and f.holding.kind == "model"]
    unread = [f for f in found if f.holding is None]
    optimizer = [f for f in found if f.holding is not None and f.holding.kind == "optimizer"]
    if len(models) == 1 and not unread and not truncated:
        chosen = models[0]
        note = (f"checkpoint folder: {os.path.join(root, chosen.path)}{_hint(chosen.path)}, the only DCP folder "
                f"under {root} holding model weights ({chosen.holding.model_tensors} tensors)")
        if optimizer:
            note += "; optimizer state only, not converted: " + ", ".join(os.path.join(root, f.path)
                                                                           for f in optimizer)
        return Decision(chosen.path, note)
    if not models and not unread:
        lines = [f"{root} holds no model weights: the checkpoint folders under it hold only optimizer or "
                 "training state:"] + _lines(root, found)
        lines.append("accelerate and transformers' Trainer save the model beside optimizer_0/, in "
                     "pytorch_model_fsdp_0/; point at the folder that holds the model.")
        return Decision(None, "\n".join(lines))
    candidates = models + unread
    lines = [f"{root} is not a DCP folder, and it holds {len(candidates)} checkpoint folders that may hold the "
             "model; none was taken (converting the wrong one gives a plausible wrong model):"]
    lines += _lines(root, candidates)
    if optimizer:
        lines.append("optimizer state only: " + ", ".join(os.path.join(root, f.path) for f in optimizer[:LIST_LIMIT])
                     + (f" ... and {len(optimizer) - LIST_LIMIT} more" if len(optimizer) > LIST_LIMIT else ""))
    numbered = [f for f in candidates if f.step is not None]
    if numbered:
        newest = max(numbered, key=lambda f: f.step[1])
        lines.append(f"The newest is {newest.step[0]} {newest.step[1]}: pass {os.path.join(root, newest.path)} "
                     "to convert it.")
    else:
        lines.append("Pass the one to convert.")
    if truncated:
        lines.append(f"(The search stopped after {MAX_DIRS_LISTED} folders; there may be more.)")
    return Decision(None, "\n".join(lines))


# -- IO: directory listings and .metadata files only ------------------------------------------------------


def is_dcp_folder(path: str) -> bool:
    """A checkpoint folder of any flavor (`source.flavors` decides; a broken one counts: reading it says why)."""
    return flavors.is_checkpoint_folder(path)


def read_holding(path: str) -> Holding:
    """Classify one DCP folder from its `.metadata` (CheckpointError when it cannot be read)."""
    reader, meta = load(path)
    with reader:
        return classify(meta)


def scan(root: str, *, max_depth: int = MAX_DEPTH, exclude: Iterable[str] = ()) -> Tuple[List[Found], bool]:
    """DCP folders below `root` (breadth first, not below a DCP folder, hidden folders skipped), each
    classified from its .metadata while at most MAX_METADATA_READS were read. Returns (found, truncated)."""
    where = location.at(root)
    skip = {_normal(where.join(e)) for e in exclude}
    found: List[Found] = []
    queue: List[Tuple[str, int]] = [("", 0)]
    listed = 0
    truncated = False
    while queue:
        rel, depth = queue.pop(0)
        if listed >= MAX_DIRS_LISTED:
            truncated = True
            break
        listed += 1
        try:
            subdirs = sorted((n for n in location.at(where.join(rel) if rel else root).folders()
                              if not n.startswith(".")), key=natural_key)
        except OSError:
            continue
        for name in subdirs:
            sub = f"{rel}/{name}" if rel else name
            full = where.join(sub)
            if _normal(full) in skip:
                continue
            if is_dcp_folder(full):
                found.append(Found(sub))
            elif depth + 1 < max_depth:
                queue.append((sub, depth + 1))
    read: List[Found] = []
    for i, f in enumerate(found):
        if i >= MAX_METADATA_READS:
            read.append(Found(f.path, None, f"not read: more than {MAX_METADATA_READS} checkpoint folders"))
            continue
        try:
            read.append(Found(f.path, read_holding(where.join(f.path))))
        except CheckpointError as exc:
            read.append(Found(f.path, None, "unreadable: " + str(exc).splitlines()[0][:160]))
    return read, truncated


def find_checkpoint(root: str) -> Tuple[str, Optional[str]]:
    """(the DCP folder to convert, a note saying which was taken and why, or None when `root` is one).

    Raises CheckpointError listing the candidates when the model's folder is not clear. When nothing below
    `root` is a DCP folder, returns `root` unchanged: reading it then explains what a DCP folder is.
    """
    if not location.at(root).is_dir() or is_dcp_folder(root):
        return root, None
    found, truncated = scan(root)
    decision = decide(root, found, truncated=truncated)
    if decision is None or (decision.chosen is not None and _consolidated_from(root, decision.chosen)):
        return root, None
    if decision.chosen is None:
        raise CheckpointError(decision.message)
    return location.at(root).join(decision.chosen), decision.message


def _normal(path: str) -> str:
    return path.rstrip("/") if is_url(path) else os.path.normpath(path)


def _consolidated_from(root: str, chosen: str) -> bool:
    """True when `root` is a model torch consolidated from the per-rank shards in `chosen`
    (HuggingFaceStorageWriter(enable_consolidation=True) writes both): `root` is then explained, not converted."""
    try:
        return (hf_shards.holds_safetensors(root)
                and flavors.detect(os.path.join(root, chosen)) is flavors.hf_per_rank.FLAVOR)
    except CheckpointError:
        return False


def refuse_optimizer_only(meta: CheckpointMetadata, checkpoint_dir: str) -> None:
    """CheckpointError when `checkpoint_dir` holds optimizer state and no model weights, naming the sibling
    folders (beside it, read the same bounded way) that hold the model."""
    holding = classify(meta)
    if holding.kind != "optimizer":
        return
    folder = _normal(checkpoint_dir)
    if os.path.basename(folder) in (os.curdir, os.pardir):
        folder = os.path.abspath(folder)
    parent, name = location.parent_and_name(folder)
    parent = parent or os.curdir     # shown as the user wrote it, when relative
    siblings, _ = scan(parent, max_depth=1, exclude=[name])
    models = [f for f in siblings if f.holding is not None and f.holding.kind == "model"]
    lines = [f"{checkpoint_dir} holds only optimizer state ({holding.optimizer_tensors} optimizer tensors), no model "
             "weights to convert."]
    if len(models) == 1:
        lines.append(f"The model is in the folder beside it: {os.path.join(parent, models[0].path)} "
                     f"({models[0].holding.describe()}); convert that one.")
    elif models:
        lines.append("Folders beside it that hold model weights (pass one):")
        lines += _lines(parent, models)
    else:
        lines.append(f"No folder beside it in {parent} holds model weights. accelerate and transformers' Trainer "
                     "save the model in pytorch_model_fsdp_0/ next to optimizer_0/; was it copied?")
    raise CheckpointError("\n".join(lines))
