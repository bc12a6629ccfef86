"""Does the planned output match the reference model's weights, name for name and shape for shape?

A folder whose names differ from its config's model still loads in transformers: the weights it lacks are
randomly initialised and the ones it has extra are ignored, behind a warning few people read. So when a reference
is known (`--config-from`, or the base model found through train_params.yaml), any mismatch stops the conversion
before a byte is written (`ReferenceMismatchError`, exit 4), unless the user asks for it with `--allow-unmatched`.

Two absences are not mismatches: a tied `lm_head.weight` that transformers rebuilds from the embedding, and —
only explained, still an error — tensors the user's own --include/--exclude left out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import ReferenceMismatchError
from . import layouts, tied

LIST_LIMIT = 8   # names listed per line before "... and N more"


@dataclass(frozen=True)
class Verdict:
    unmatched: Tuple[str, ...]          # output names the reference does not have
    missing: Tuple[str, ...]            # reference names the output does not have (tied heads excused)
    excluded: Tuple[str, ...]           # the part of `missing` that --include/--exclude left out
    shape_mismatches: Tuple[Tuple[str, Tuple[int, ...], Tuple[int, ...]], ...]
    rebuilt_heads: Tuple[str, ...]      # reference heads absent here that transformers rebuilds (tied)
    # (stage, how many of `unmatched` it named): which naming stage made the names the reference lacks
    unmatched_by: Tuple[Tuple[str, int], ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.unmatched or self.missing or self.shape_mismatches)

    def lines(self) -> List[str]:
        """One line per kind of mismatch, each listing at most LIST_LIMIT names with the total count."""
        out = []
        if self.unmatched:
            out.append(f"{len(self.unmatched)} output name(s) not in the reference: {listing(self.unmatched)}")
            out.extend(f"{count} of those made by {by}" for by, count in self.unmatched_by)
        if self.missing:
            out.append(f"{len(self.missing)} reference weight(s) not in the output: {listing(self.missing)}")
        if self.excluded:
            out.append(f"{len(self.excluded)} of those are in the checkpoint but left out by --include/--exclude: "
                       f"{listing(self.excluded)}")
        if self.shape_mismatches:
            shown = "; ".join(f"{n} {list(ours)} here, {list(theirs)} in the reference"
                              for n, ours, theirs in self.shape_mismatches[:LIST_LIMIT])
            more = len(self.shape_mismatches) - LIST_LIMIT
            out.append(f"{len(self.shape_mismatches)} shape mismatch(es): {shown}"
                       + (f" ... and {more} more" if more > 0 else ""))
        return out


def listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    return shown + (f" ... and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else "")


def _rebuilt_from_embedding(head: str, output: Iterable[str], tie: Optional[bool]) -> bool:
    """`head` is a tied output projection transformers rebuilds from an embedding the output has.
    A config silent about tying counts as tied: that is transformers' own default."""
    if tie is False:
        return False
    suffix = next((s for s in tied.HEAD_SUFFIXES if head.endswith(s)), None)
    if suffix is None:
        return False
    prefix = head[:-len(suffix)]
    return any(n.startswith(prefix) and n.endswith(s) for n in output for s in tied.EMBEDDING_SUFFIXES)


def judge(output: Dict[str, Tuple[int, ...]], reference: Dict[str, layouts.Shape], *, tie: Optional[bool],
          unfiltered: Iterable[str] = (), made_by: Optional[Dict[str, str]] = None) -> Verdict:
    """Output {name: shape} against the reference's. `unfiltered`: the output names the checkpoint gives
    without the user's --include/--exclude, to tell a deliberate omission from a wrong mapping. `made_by`:
    {output name: the naming stage that made it}, so a wrong name is blamed on its stage."""
    cmp = layouts.compare_names(output, reference)
    rebuilt = tuple(n for n in cmp.missing if _rebuilt_from_embedding(n, output, tie))
    missing = tuple(n for n in cmp.missing if n not in rebuilt)
    available = set(unfiltered)
    return Verdict(unmatched=cmp.unmatched, missing=missing,
                   excluded=tuple(n for n in missing if n in available),
                   shape_mismatches=cmp.shape_mismatches, rebuilt_heads=rebuilt,
                   unmatched_by=_count_by(cmp.unmatched, made_by or {}))


def _count_by(unmatched: Sequence[str], made_by: Dict[str, str]) -> Tuple[Tuple[str, int], ...]:
    counts: Dict[str, int] = {}
    for name in unmatched:
        if name in made_by:
            counts[made_by[name]] = counts.get(made_by[name], 0) + 1
    return tuple(counts.items())


def enforce(verdict: Verdict, reference_folder: str, layout_label: str, *, allow_unmatched: bool) -> List[str]:
    """Notes to report when the output matches (or mismatches are allowed); ReferenceMismatchError otherwise."""
    notes = [f"{n} not written: the reference ties it to the embedding, transformers rebuilds it on load"
             for n in verdict.rebuilt_heads]
    if verdict.ok:
        return notes
    if allow_unmatched:
        return notes + [f"--allow-unmatched: the output does not match {reference_folder}: {line}"
                        for line in verdict.lines()]
    only_excluded = not verdict.unmatched and not verdict.shape_mismatches and set(verdict.missing) == set(
        verdict.excluded)
    if only_excluded:
        fix = ("to write a partial model on purpose, add --allow-unmatched (transformers will initialise the "
               "left-out weights randomly when it loads the folder)")
    else:
        fix = ("check that the reference is the model this checkpoint was trained from, map names with "
               "--rename REGEX=REPLACEMENT, or add --allow-unmatched to write the folder anyway (transformers would "
               "load it with the missing weights randomly initialised)")
    raise ReferenceMismatchError(
        f"the output does not match the reference model {reference_folder} (names {layout_label}); "
        "nothing was written:\n  " + "\n  ".join(verdict.lines()) + f"\nTo fix: {fix}.")
