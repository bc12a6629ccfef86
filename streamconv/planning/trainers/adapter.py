"""What an adapter is: a trainer's state-dict names mapped to Hugging Face names, with row transforms, as data.

A `Rule` matches a source name (regex, whole name) and names one output (`re` template: `\\1` for groups,
`{layer}` or `{expert}` for the index of an unstacked leading dim). Its `steps` are named row operations applied
in order to the source's rows (see `transforms.py`):

| step           | arg             | what                                                                 |
|----------------|-----------------|----------------------------------------------------------------------|
| `rope`         | `q` / `kv`      | interleaved -> half-split RoPE rows, per head (q or kv head count)  |
| `qkv`          | `q` / `k` / `v` | that part of a [q; k; v] concatenation                               |
| `qkv_grouped`  | `q` / `k` / `v` | that part of a per-query-group [q..; k; v] fused weight (Megatron)  |
| `half`         | `0` / `1`       | first / second half of the rows ([gate; up])                        |
| `vocab`        | `rows`          | the first vocab_size rows (the config's): a padded vocabulary trimmed|

A rule with `join` (dim, index, parts) makes its source part `index` of `parts` equal parts of the output along
`dim`; the other parts come from other sources' rules with the same target, merged into one output by
`joined` (torchtitan's `w1_EFD` and `w3_EFD` as transformers' fused `experts.gate_up_proj` [E, 2F, D]). The
planner proves the parts tile the output, so a missing part is refused, never left as zeros.

A rule with `transpose` writes the source with its last two dims swapped (torchtitan GPT-OSS's [E, out, in]
expert weights as transformers' [E, in, out]): a `transforms.Transposed` output, read chunk by chunk and put in
place permuted while streaming, never loaded whole. It takes no steps and no unstack.

Several rules may match one source (a fused qkv gives three outputs). `unstack` makes one output per index of
the source's leading dim (Megatron's layer-stacked tensors, torchtitan's grouped experts `[E, F, D]`: each
output is a plane of the stored chunks, copied like any other piece, never loaded whole); `unstack=2` one per
index pair of the two leading dims, `{layer}` the first and `{expert}` the second (Megatron's layer-stacked
experts `[L, E, 2F, H]`). A rule with no steps and no unstack is a rename: the tensor keeps the plain copy path.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

from .. import transforms
from ...errors import CheckpointError, OptionsError, ReferenceMismatchError
from ...model import TensorEntry, numel
from ..transforms import Heads, RowMap

Step = Tuple[str, str]
# Routed experts: one tensor per expert, as save_pretrained writes them (the default), or fused as transformers 5
# holds them in memory. An adapter with one layout only (GPT-OSS: fused) keeps it whatever is asked.
EXPERT_LAYOUTS = ("per-expert", "fused")


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str
    steps: Tuple[Step, ...] = ()
    unstack: int = 0        # leading dims unstacked (True: 1)
    transpose: bool = False
    join: Tuple[int, int, int] = ()

    def match(self, name: str) -> Optional[re.Match]:
        return re.fullmatch(self.pattern, name)


@dataclass(frozen=True)
class Adapter:
    name: str                                  # what --source-format takes, e.g. "torchtitan-llama"
    trainer: str                               # for notes, e.g. "torchtitan"
    rules: Tuple[Rule, ...]
    # Every regex must match some model name for the adapter to be detected...
    signature: Tuple[str, ...] = ()
    # ... and none of these any name (a Qwen3 has Llama's names plus QK-norm: it is not a Llama).
    absent: Tuple[str, ...] = ()
    # (regex, reason): model entries that are not weights of the HF model (RoPE tables).
    skip: Tuple[Tuple[str, str], ...] = ()
    # (regex, architecture feature): names of features the target model cannot hold (MoE experts, MLA), so a
    # refusal names the feature rather than only the tensors.
    unsupported: Tuple[Tuple[str, str], ...] = ()
    # What converting does, for the detection note.
    describes: str = ("names mapped to Hugging Face Llama, q/k rows permuted from interleaved to half-split RoPE "
                      "order")
    # The Hugging Face model family the names are mapped to, and how routed experts are laid out in the output
    # ("" for dense-only adapters), for inspect/plan and refusals.
    family: str = "Hugging Face Llama"
    expert_layout: str = ""
    # The rules of the fused expert layout (transformers' in-memory `experts.gate_up_proj` / `experts.down_proj`),
    # replacing the per-expert rules (targets with `{expert}`) when the user asks for it, and its description.
    fused_rules: Tuple[Rule, ...] = ()
    fused_layout: str = ""
    # What the names cannot show but the config.json written beside them must agree with (DeepSeek-V3's RoPE
    # channel order): given the config's data, a note saying what was checked, or ReferenceMismatchError.
    config_check: Optional[Callable[[dict], Optional[str]]] = None

    def with_expert_layout(self, layout: str) -> "Adapter":
        """This adapter writing routed experts in `layout` ("per-expert" or "fused"); itself when it has only one."""
        if layout not in EXPERT_LAYOUTS:
            raise OptionsError(f"--expert-layout {layout!r}: use one of {', '.join(EXPERT_LAYOUTS)}")
        if layout == "per-expert" or not self.fused_rules:
            return self
        rules = tuple(r for r in self.rules if "{expert}" not in r.target) + self.fused_rules
        return replace(self, rules=rules, expert_layout=self.fused_layout,
                       describes=self.describes.replace(self.expert_layout, self.fused_layout), fused_rules=())

    @property
    def needs_heads(self) -> bool:
        return any(step[0] != "half" for rule in self.rules for step in rule.steps)

    def skip_reason(self, name: str) -> Optional[str]:
        return next((why for pattern, why in self.skip if re.fullmatch(pattern, name)), None)

    def feature_of(self, name: str) -> Optional[str]:
        return next((what for pattern, what in self.unsupported if re.fullmatch(pattern, name)), None)

    def detects(self, names: List[str]) -> bool:
        return (bool(self.signature) and all(any(re.fullmatch(s, n) for n in names) for s in self.signature)
                and not any(re.fullmatch(a, n) for a in self.absent for n in names))


def _step_rows(step: Step, n_rows: int, heads: Optional[Heads], what: str) -> RowMap:
    kind, arg = step
    if kind == "half":
        return transforms.half(n_rows, int(arg), what=what)
    if kind == "vocab":     # rows beyond the config's vocab_size are padding (fewer: the shape check refuses)
        vocab = heads.vocab_size if heads is not None else None
        return transforms.row_slice(0, n_rows if vocab is None else min(n_rows, vocab))
    if heads is None:
        raise OptionsError(
            f"{what}: undoing the trainer's layout ({kind} {arg}) needs the model's attention head counts; pass "
            "--config-from BASE, the Hugging Face folder of the base model (its config.json gives "
            "num_attention_heads, num_key_value_heads, head_dim)")
    if kind == "rope":
        n_heads = heads.n_heads if arg == "q" else heads.n_kv_heads
        if n_rows != n_heads * heads.head_dim:
            raise ReferenceMismatchError(
                f"{what}: {n_rows} rows, but the config says {n_heads} {'query' if arg == 'q' else 'key/value'} "
                f"heads of size {heads.head_dim} ({n_heads * heads.head_dim} rows); is --config-from the base "
                "model of this checkpoint?")
        return transforms.rope_half_split(n_rows, n_heads, what=what)
    if kind in ("qkv", "qkv_grouped"):
        if n_rows != transforms.qkv_rows(heads):
            raise ReferenceMismatchError(
                f"{what}: {n_rows} rows, but q/k/v of {heads.n_heads}/{heads.n_kv_heads} heads of size "
                f"{heads.head_dim} have {transforms.qkv_rows(heads)}; is --config-from the base model?")
        return transforms.qkv_part(arg, heads, grouped=kind == "qkv_grouped")
    raise ValueError(f"unknown row step {kind!r}")


def vocab_trims(adapter: Adapter, written: List[Tuple[str, TensorEntry]]) -> List[str]:
    """Notes for the outputs whose padded vocabulary rows a `vocab` step dropped. `written`: (the name the
    adapter matched, the output's entry)."""
    notes = []
    for source_name, entry in written:
        sources = getattr(entry, "sources", ())
        if not sources or not entry.shape or entry.shape[0] >= sources[0].shape[0]:
            continue
        if any(("vocab", "rows") in r.steps for r in adapter.rules if r.match(source_name)):
            notes.append(f"padded vocabulary: {entry.fqn} has {sources[0].shape[0]} rows, config.json's vocab_size "
                         f"is {entry.shape[0]}; rows {entry.shape[0]}..{sources[0].shape[0] - 1} (the trainer's "
                         "padding, e.g. Megatron's --make-vocab-size-divisible-by) are not written")
    return notes


def row_map(steps: Tuple[Step, ...], n_rows: int, heads: Optional[Heads], what: str) -> RowMap:
    """The steps chained: the first applies to the source's rows, each next one to the previous output."""
    current = transforms.identity_rows(n_rows)
    for step in steps:
        current = transforms.compose(_step_rows(step, transforms.rows_out(current), heads, what), current)
    return current


def _index_values(lead: Tuple[int, ...]) -> Tuple[str, str]:
    """What `{layer}` and `{expert}` become for the unstacked indices `lead`: one index names whichever the target
    has; two are `{layer}` then `{expert}`."""
    if len(lead) == 2:
        return str(lead[0]), str(lead[1])
    index = str(lead[0]) if lead else ""
    return index, index


def _indexed(target: str, lead: Tuple[int, ...]) -> str:
    """The target with the unstacked indices filled in (`_index_values`)."""
    layer, expert = _index_values(lead)
    return target.replace("{layer}", layer).replace("{expert}", expert)


_INDEX_HOLE = re.compile(r"\{layer\}|\{expert\}")


def _indexed_names(target: str, m: re.Match, leads) -> List[str]:
    """`m.expand(_indexed(target, lead))` for each of `leads`, the template parsed once rather than once per name
    (44,544 unstacked experts in a DeepSeek-V3: most of naming's time): the pieces between the index holes are
    expanded once and joined around each lead's indices. A piece ending in a backslash (and digits) would make an
    escape with the index after it: such a target is expanded name by name, as written."""
    pieces, holes = _INDEX_HOLE.split(target), _INDEX_HOLE.findall(target)
    if any(re.search(r"\\\d*$", piece) for piece in pieces[:-1]):
        return [m.expand(_indexed(target, lead)) for lead in leads]
    expanded = [m.expand(piece) for piece in pieces]
    names = []
    for lead in leads:
        layer, expert = _index_values(lead)
        parts = [expanded[0]]
        for hole, piece in zip(holes, expanded[1:]):
            parts.append(layer if hole == "{layer}" else expert)
            parts.append(piece)
        names.append("".join(parts))
    return names


def outputs(rule: Rule, m: re.Match, entry: TensorEntry, heads: Optional[Heads]) -> List[Tuple[str, TensorEntry]]:
    """(output name, entry) pairs one rule makes of one source: the entry itself for a rename, else a
    `transforms.Derived` carrying the takes."""
    target = rule.target
    if rule.join:
        dim, index, parts = rule.join
        shape = tuple(s * parts if d == dim else s for d, s in enumerate(entry.shape))
        zeros = (0,) * len(entry.shape)
        at = tuple(index * entry.shape[dim] if d == dim else 0 for d in range(len(entry.shape)))
        take = transforms.Take(entry.fqn, zeros, at, tuple(entry.shape))
        return [(m.expand(target), transforms.Derived(fqn=entry.fqn, dtype=entry.dtype, shape=shape,
                                                      chunks=entry.chunks, path=entry.path, sources=(entry,),
                                                      takes=(take,)))]
    if rule.transpose:
        n = len(entry.shape)
        if n < 2:
            raise ReferenceMismatchError(f"tensor {entry.fqn!r} {list(entry.shape)}: the trainer layout swaps its "
                                         "last two dims, but it has fewer than two; is this the trainer's checkpoint?")
        return [(m.expand(target), transforms.transposed(entry, tuple(range(n - 2)) + (n - 1, n - 2)))]
    if not rule.steps and not rule.unstack:
        return [(m.expand(target), entry)]
    n_lead = int(rule.unstack)
    if len(entry.shape) < n_lead:
        raise CheckpointError(f"tensor {entry.fqn!r} has shape {list(entry.shape)}, but the {target!r} rule "
                              f"unstacks {n_lead} leading dims; is this checkpoint from the trainer it looks like?")
    leads = list(itertools.product(*(range(n) for n in entry.shape[:n_lead])))
    out = []
    for lead, name in zip(leads, _indexed_names(target, m, leads)):
        source_rows = entry.shape[len(lead)] if len(entry.shape) > len(lead) else None
        if source_rows is None:     # a scalar per layer: nothing to permute
            takes = transforms.whole(entry.fqn, entry.shape, lead=lead)
            shape = ()
        else:
            rows = row_map(rule.steps, source_rows, heads, f"tensor {entry.fqn!r} -> {name!r}")
            takes = transforms.takes_from_rows(entry.fqn, entry.shape, rows, lead=lead)
            shape = transforms.output_shape_of_rows(entry.shape, rows, lead=lead)
        out.append((name, transforms.Derived(fqn=entry.fqn, dtype=entry.dtype, shape=shape, chunks=entry.chunks,
                                             path=entry.path, sources=(entry,), takes=takes)))
    return out


def joined(name: str, parts: List[TensorEntry]) -> TensorEntry:
    """The outputs `join` rules made under one name, as one tensor (their sources and takes together). Parts with
    other shapes or at the same place, or too few to fill it, are refused; the planner then proves that they tile
    the output."""
    first = parts[0]
    filled = sum(numel(t.sizes) for p in parts for t in p.takes)
    if filled < numel(first.shape):
        raise ReferenceMismatchError(
            f"{name!r} is joined from several checkpoint tensors, but only {', '.join(p.fqn for p in parts)} "
            f"{'is' if len(parts) == 1 else 'are'} in the checkpoint and selected ({filled} of "
            f"{numel(first.shape)} elements); convert with --expert-layout per-expert, or check that the checkpoint "
            "is complete and --exclude leaves every part")
    for other in parts[1:]:
        if tuple(other.shape) != tuple(first.shape) or any(
                t.dst_start == u.dst_start for t in first.takes for u in other.takes):
            raise ReferenceMismatchError(
                f"{name!r} would be made of {first.fqn!r} and {other.fqn!r}, which are not the parts of one "
                f"tensor ({list(first.shape)} vs {list(other.shape)}); is this the trainer's checkpoint?")
    return replace(first, sources=tuple(s for p in parts for s in p.sources),
                   takes=tuple(t for p in parts for t in p.takes), chunks=tuple(c for p in parts for c in p.chunks))
