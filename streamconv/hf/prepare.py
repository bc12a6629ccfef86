"""From a checkpoint and the user's options to an HF-ready conversion: config found, `--dtype auto` resolved,
names mapped onto the reference layout, tied duplicates chosen for dropping, and the result checked name for name
against the reference's weights (`verdict`: a mismatch fails before anything is written). Reads config.json and
safetensors headers only; the planner stays pure and sees only ordinary `PlanOptions`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from .. import dtypes
from ..planning import trainers
from ..model import CheckpointMetadata
from ..planning.plan import ConversionPlan, PlanOptions, select, source_format
from ..planning.trainers import megatron
from . import expected, layouts, sidecars, tied, verdict


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


def _names_without_filters(meta: CheckpointMetadata, options: PlanOptions) -> List[str]:
    """The output names without the user's --include/--exclude: tells a deliberate omission from a wrong
    mapping. Names are not checked here: an unwritable one may be what the filters leave out."""
    unfiltered = dataclasses.replace(options, include=(), exclude=())
    return [name for _, name in select(meta, unfiltered, check_names=False)[0]]


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
            config_from: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
            allow_unmatched: bool = False, no_config: bool = False) -> HFSetup:
    """Raises ReferenceMismatchError when there is a reference and the output would not match its weights
    (unless `allow_unmatched`). `no_config`: never look for a config beyond `config_from`."""
    notes: List[str] = []
    source = sidecars.find_config_dir(checkpoint_dir, config_from, os.environ if env is None else env,
                                      no_config=no_config)
    notes.append(source.note)
    config = sidecars.load_config(source.folder) if source.folder else None
    if config is not None and config.folder != source.folder:
        notes.append(f"{source.folder} is a Hugging Face cache entry; its snapshot {config.folder} is used")
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
    unfiltered = _names_without_filters(meta, options)
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
            unfiltered = [mapping.apply(n) for n in unfiltered]
    elif config is not None:     # config.json only: its model's names, from a table or transformers (exit 4 else)
        notes.extend(expected.check(shapes, config, unfiltered=unfiltered, allow_unmatched=allow_unmatched,
                                    source_format=adapter.name if adapter is not None else trainers.AS_IS, env=env))

    pairs, tied_notes = tied.find_tied_pairs(shapes, config.tie_word_embeddings if config else None, reference)
    notes.extend(tied_notes)
    if pairs:
        options = dataclasses.replace(options, drop=options.drop + tuple(p.head for p in pairs))
        for p in pairs:
            shapes.pop(p.head, None)
            notes.append(f"tied word embeddings: {p.head} not written (transformers rebuilds it from {p.embedding}); "
                         "convert checks that the two are equal")

    if reference is not None:
        found = verdict.judge(shapes, reference, tie=config.tie_word_embeddings, unfiltered=unfiltered)
        notes.extend(verdict.enforce(found, config.folder, layout_label, allow_unmatched=allow_unmatched))
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
