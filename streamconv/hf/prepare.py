"""From a checkpoint and the user's options to an HF-ready conversion: config found, `--dtype auto` resolved,
names mapped onto the reference layout, tied duplicates chosen for dropping. Reads config.json and
safetensors headers only; the planner stays pure and sees only ordinary `PlanOptions`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .. import dtypes, trainers
from ..trainers import megatron
from ..model import CheckpointMetadata
from ..plan import ConversionPlan, PlanOptions, select, source_format
from . import layouts, sidecars, tied

NOTE_LIST_LIMIT = 8   # names listed in a note before "... and N more"


@dataclass(frozen=True)
class HFSetup:
    options: PlanOptions                        # dtype resolved, layout renames appended, tied heads dropped
    config: Optional[sidecars.HFConfig]         # None: weights only
    sidecar_files: Tuple[str, ...]              # what will be copied from config.folder
    layout: Optional[str]                       # label of the mapping applied, when there was a reference
    tied: Tuple[tied.TiedPair, ...]             # heads dropped; each is checked against its embedding
    reference: Optional[Dict[str, layouts.Shape]]
    notes: Tuple[str, ...]

    @property
    def dropped_heads(self) -> Tuple[str, ...]:
        return tuple(p.head for p in self.tied)


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:NOTE_LIST_LIMIT])
    return shown + (f" ... and {len(names) - NOTE_LIST_LIMIT} more" if len(names) > NOTE_LIST_LIMIT else "")


def _resolve_dtype(requested: str, config: Optional[sidecars.HFConfig], notes: List[str]) -> str:
    if requested != "auto":
        return requested
    declared = config.dtype if config else None
    if declared in dtypes.CASTABLE:
        notes.append(f"--dtype auto: {declared}, from config.json")
        return declared
    why = f"config.json declares {declared!r}" if declared else (
        "config.json declares no dtype" if config else "no config")
    notes.append(f"--dtype auto: {why}; floating tensors keep the checkpoint's dtypes")
    return "keep"


def _megatron_format(checkpoint_dir: str, options: PlanOptions, notes: List[str]) -> PlanOptions:
    """A Megatron-Core folder (metadata.json says torch_dist) is read with the megatron-gpt layout unless the user
    chose one: a Megatron model that is not a Llama-family GPT is then refused, naming its tensors, rather than
    written under Megatron's names."""
    folder = megatron.recognise(checkpoint_dir)
    if folder is None:
        return options
    notes.append(folder.note)
    if options.source_format != "auto":
        return options
    return dataclasses.replace(options, source_format=trainers.MEGATRON_GPT.name,
                               source_format_reason=f"a Megatron-Core {folder.sharded_backend} checkpoint")


def prepare(meta: CheckpointMetadata, options: PlanOptions, checkpoint_dir: str, *,
            config_from: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> HFSetup:
    notes: List[str] = []
    source = sidecars.find_config_dir(checkpoint_dir, config_from, os.environ if env is None else env)
    notes.append(source.note)
    config = sidecars.load_config(source.folder) if source.folder else None
    files: Tuple[str, ...] = ()
    if config is not None:
        files = tuple(sidecars.sidecar_names(config.folder))
        tokenizer_note = sidecars.missing_tokenizer_note(files, config.folder)
        if tokenizer_note:
            notes.append(tokenizer_note)

    options = dataclasses.replace(options, dtype=_resolve_dtype(options.dtype, config, notes))
    options = _megatron_format(checkpoint_dir, options, notes)
    if config is not None and options.heads is None:    # trainer adapters permute q/k rows per head
        options = dataclasses.replace(options, heads=trainers.heads_from_config(config.data))
    selected, _, _, _ = select(meta, options)
    shapes = {name: tuple(entry.shape) for entry, name in selected}
    adapter = source_format(meta, options).adapter
    if adapter is not None and config is not None and not (options.include or options.exclude):   # whole models
        checked = trainers.check_llama_shapes(shapes, config.data, adapter)
        if checked:
            notes.append(checked)

    reference = layouts.reference_weights(config.folder) if config is not None else None
    layout_label = None
    if reference is not None:
        mapping, hits = layouts.choose_mapping(shapes, reference, config.model_type)
        layout_label = mapping.label
        if mapping.layout is not None:
            notes.append(f"names follow the reference layout: {mapping.label} "
                         f"({hits} of {len(shapes)} names match {config.folder})")
            options = dataclasses.replace(options, renames=options.renames + mapping.rules())
            shapes = {mapping.apply(n): s for n, s in shapes.items()}
    elif config is not None:
        notes.append(f"{config.folder} holds no weights to take names from; names are the checkpoint's")

    pairs, tied_notes = tied.find_tied_pairs(shapes, config.tie_word_embeddings if config else None, reference)
    notes.extend(tied_notes)
    if pairs:
        options = dataclasses.replace(options, drop=options.drop + tuple(p.head for p in pairs))
        for p in pairs:
            shapes.pop(p.head, None)
            notes.append(f"tied word embeddings: {p.head} not written (transformers rebuilds it from {p.embedding}); "
                         "convert checks that the two are equal")

    if reference is not None:
        cmp = layouts.compare_names(shapes, reference)
        if cmp.unmatched:
            notes.append(f"{len(cmp.unmatched)} output name(s) match nothing in the reference: {_listing(cmp.unmatched)}")
        if cmp.missing:
            notes.append(f"{len(cmp.missing)} reference name(s) not in the output: {_listing(cmp.missing)}")
        for name, ours, theirs in cmp.shape_mismatches[:NOTE_LIST_LIMIT]:
            notes.append(f"{name}: shape {list(ours)} here, {list(theirs)} in the reference")
    return HFSetup(options=options, config=config, sidecar_files=files, layout=layout_label, tied=pairs,
                   reference=reference, notes=tuple(notes))


def config_dtype(conversion: ConversionPlan) -> Optional[str]:
    """The dtype config.json should declare: the output's floating dtype (the one with most bytes if mixed)."""
    by_bytes: Dict[str, int] = {}
    for t in conversion.tensors:
        info = dtypes.BY_NAME.get(t.dst_dtype)
        if info is not None and info.is_floating:
            by_bytes[t.dst_dtype] = by_bytes.get(t.dst_dtype, 0) + t.nbytes
    return max(by_bytes, key=by_bytes.get) if by_bytes else None


def compare_with_reference(setup: HFSetup, conversion: ConversionPlan) -> layouts.NameComparison:
    """The planned output against the reference (empty comparison when there is none)."""
    if setup.reference is None:
        return layouts.NameComparison((), (), ())
    return layouts.compare_names({t.name: tuple(t.shape) for t in conversion.tensors}, setup.reference)
