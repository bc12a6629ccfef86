"""From a checkpoint and the user's options to an HF-ready conversion: config found, `--dtype auto` resolved,
the names decided once (`planning.naming`: the checkpoint's, the trainer adapter's, then the reference layout chosen
from those, the user's renames and filters, the tied drop), and the result checked name for name against the
reference's weights (`verdict`: a mismatch fails before anything is written, naming the stage that made each
wrong name). Reads config.json and safetensors headers only; the planner stays pure.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Tuple

from .. import dtypes
from ..planning import trainers
from ..model import CheckpointMetadata
from ..planning import naming
from ..planning.plan import ConversionPlan, PlanOptions
from ..planning.trainers import megatron
from . import sidecars, tied

if TYPE_CHECKING:   # (layouts is imported where a reference asks for it: not at every conversion's start-up)
    from . import layouts


@dataclass(frozen=True)
class HFSetup:
    options: PlanOptions                        # dtype resolved, names decided (`.naming`), tied heads dropped
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


def _megatron_format(checkpoint_dir: str, meta: CheckpointMetadata, options: PlanOptions,
                     notes: List[str]) -> PlanOptions:
    """A Megatron-Core folder (metadata.json says torch_dist) is read with a Megatron layout unless the user chose
    one (megatron-mla when its names have multi-latent attention, else megatron-gpt): a Megatron model neither
    holds is then refused, naming its tensors, rather than written under Megatron's names."""
    folder = megatron.recognise(checkpoint_dir)
    if folder is None:
        return options
    notes.append(folder.note)
    if options.source_format != "auto":
        return options
    return dataclasses.replace(options, source_format=trainers.megatron_adapter(t.fqn for t in meta.tensors).name,
                               source_format_reason=f"a Megatron-Core {folder.sharded_backend} checkpoint")


def _adapter_config_notes(adapter: Optional[trainers.Adapter], config: Optional[sidecars.HFConfig]) -> List[str]:
    """The adapter's check of the config.json written beside its names, for what names cannot show (DeepSeek-V3's
    RoPE channel order): a note, or ReferenceMismatchError before anything is written."""
    if adapter is None or adapter.config_check is None or config is None:
        return []
    note = adapter.config_check(config.data)
    return [note] if note else []


def _layout_stage(named: naming.Naming, reference, config, notes: List[str]):
    """(names with the reference layout applied, the layout's label or None): the layout whose mapping of the
    adapter's names (all of them, before --rename and the filters) hits the most reference weights."""
    if reference is None:       # (a config.json alone is checked after the names are made: expected.check)
        return named.with_layout(None), None
    from . import layouts
    mapping, hits = layouts.choose_mapping([t.name for t in named.tensors], reference, config.model_type)
    if mapping.layout is None:
        return named.with_layout(None), mapping.label
    notes.append(f"names follow the reference layout: {mapping.label} "
                 f"({hits} of {len(named.tensors)} names match {config.folder})")
    by = f"the reference layout {mapping.label!r} (chosen by the weights in {config.folder})"
    return named.with_layout(naming.PrefixMap(mapping.pairs, by)), mapping.label


def _base_model(checkpoint_dir: str, config_from: Optional[str], env: Mapping[str, str], no_config: bool,
                notes: List[str]) -> Tuple[Optional[sidecars.HFConfig], Tuple[str, ...]]:
    """The base model's config (None without one) and the side files to copy beside the weights; what was
    found where goes into `notes`."""
    source = sidecars.find_config_dir(checkpoint_dir, config_from, env, no_config=no_config)
    notes.append(source.note)
    if not source.folder:
        return None, ()
    config = sidecars.load_config(source.folder)
    if config.folder != source.folder:
        notes.append(f"{source.folder} is a Hugging Face cache entry; its snapshot {config.folder} is used")
    files = tuple(sidecars.sidecar_names(config.folder))
    tokenizer_note = sidecars.missing_tokenizer_note(files, config.folder)
    if tokenizer_note:
        notes.append(tokenizer_note)
    return config, files


def prepare(meta: CheckpointMetadata, options: PlanOptions, checkpoint_dir: str, *,
            config_from: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
            allow_unmatched: bool = False, no_config: bool = False) -> HFSetup:
    """Raises ReferenceMismatchError when there is a reference and the output would not match its weights
    (unless `allow_unmatched`). `no_config`: never look for a config beyond `config_from`."""
    notes: List[str] = []
    config, files = _base_model(checkpoint_dir, config_from, os.environ if env is None else env, no_config, notes)
    options = dataclasses.replace(options, dtype=_resolve_dtype(options.dtype, config, notes))
    options = _megatron_format(checkpoint_dir, meta, options, notes)
    if config is not None and options.heads is None:    # trainer adapters permute q/k rows per head
        options = dataclasses.replace(options, heads=trainers.heads_from_config(config.data))
    named = naming.source_names(meta, options)      # the checkpoint's names and the adapter's: once
    notes.extend(_adapter_config_notes(named.adapter, config))
    reference = None
    if config is not None:
        from . import layouts
        reference = layouts.reference_weights(config.folder)
    named, layout_label = _layout_stage(named, reference, config, notes)
    named = named.with_renames(options.renames).filtered(options.include, options.exclude).checked()
    shapes = {t.name: tuple(t.entry.shape) for t in named.written}
    if named.adapter is not None:
        notes.extend(trainers.vocab_trims(named.adapter, [(t.name_at(naming.WRAPPERS), t.entry) for t in named.written]))
    if named.adapter is not None and config is not None and not (options.include or options.exclude):   # whole models
        checked = trainers.check_llama_shapes(shapes, config.data, named.adapter)
        if checked:
            notes.append(checked)

    if reference is None and config is not None:    # config.json only: its model's names, from a table or
        # (imported here, as verdict below: a conversion without a base model never needs them; start-up time)
        from . import expected, tables
        notes.extend(expected.check(                # transformers on the meta device (exit 4 else)
            shapes, config, unfiltered=named.unfiltered(), allow_unmatched=allow_unmatched,
            source_format=named.adapter.name if named.adapter is not None else trainers.AS_IS, env=env))
        if tables.table_for(config.data) is None:   # asking transformers imported more here: predicted
            options = dataclasses.replace(options, meta_probed=True)

    pairs, tied_notes = tied.find_tied_pairs(shapes, config.tie_word_embeddings if config else None, reference)
    notes.extend(tied_notes)
    if pairs:
        options = dataclasses.replace(options, drop=options.drop + tuple(p.head for p in pairs))
        named = named.dropping(options.drop)
        for p in pairs:
            shapes.pop(p.head, None)
            notes.append(f"tied word embeddings: {p.head} not written (transformers rebuilds it from {p.embedding}); "
                         "convert checks that the two are equal")
    options = dataclasses.replace(options, naming=named)

    if reference is not None:
        from . import verdict
        found = verdict.judge(shapes, reference, tie=config.tie_word_embeddings, unfiltered=named.unfiltered(),
                              made_by=named.made_by())
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
    from . import layouts
    if setup.reference is None:
        return layouts.NameComparison((), (), ())
    return layouts.compare_names({t.name: tuple(t.shape) for t in conversion.tensors}, setup.reference)
