"""The planner: checkpoint metadata + options in, a complete `ConversionPlan` out. Pure: no IO.

Everything is fixed here before the first byte is written: which tensors, their output names and
dtypes, which shard file each goes to, every shard's safetensors header and every tensor's byte range.
The executor only follows the plan, shard by shard, so a shard can be (re)built on its own.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .. import dtypes, safetensors_format
from . import names, trainers
from .coverage import check_coverage, dedup_chunks
from ..errors import CheckpointError, OptionsError, UnsupportedFeatureError
from ..model import CheckpointMetadata, Chunk, TensorEntry, numel
from ..safetensors_format import MAX_HEADER_BYTES
from .transforms import Derived, Heads, Piece, check_gather, cut_all, distinct_chunks, flatten, is_contiguous_piece

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9          # as huggingface_hub's "5GB"
DEFAULT_BUFFER_BYTES = 32 * 2**20
MIN_BUFFER_BYTES = 64 * 2**10
# Resident memory of the converter itself (interpreter, numpy, click, tqdm) before any buffer, measured on
# CPython 3.11; used only to predict the peak. In a freshly installed venv the shared libraries (numpy's,
# OpenBLAS) are mapped with ~5 MiB more resident than after they have been paged a while: counted here.
BASE_RSS_BYTES = 44 * 2**20
# Transient reads outside the buffer, per writer: the plain IO paths' 1 MiB steps (fastpaths.PREAD_STEP_BYTES),
# a comparing sink's pieces, a resume record's CRC read-back. `build_plan` predicts for the default writer
# count; `with_writers` for another.
IO_STEP_BYTES_PER_WRITER = 2**20
DEFAULT_WRITERS = 2
IO_STEPS_BYTES = DEFAULT_WRITERS * IO_STEP_BYTES_PER_WRITER
# Rough resident cost of one chunk's metadata and plan entries (dataclasses, tuples, dict slots).
PER_CHUNK_BYTES = 1500

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlanOptions:
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    buffer_bytes: int = DEFAULT_BUFFER_BYTES
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    # "keep" or a castable dtype name. "auto" is resolved by the API from the config before planning;
    # left unresolved (no config) it plans as "keep".
    dtype: str = "keep"
    renames: Tuple[names.RenameRule, ...] = ()
    # None: take the "model" subtree when the checkpoint was saved as {"model": ..., "optim": ...}.
    subtree: Optional[str] = None
    strip_wrappers: bool = True
    # Output names not written because transformers rebuilds them: tied duplicates (`lm_head.weight`).
    drop: Tuple[str, ...] = ()
    # Which trainer's names and row layouts the checkpoint has: "auto" (detect), "hf" (as is) or an adapter name
    # (see `trainers`). Adapters that permute or split rows need the attention geometry, from the config.
    source_format: str = "auto"
    heads: Optional[Heads] = None
    # Why `source_format` was set when the user did not set it (a Megatron folder's metadata.json), for the note.
    source_format_reason: str = ""

    def __post_init__(self):
        if self.max_shard_bytes <= 0:
            raise OptionsError("--max-shard-size must be positive")
        if self.buffer_bytes < MIN_BUFFER_BYTES:
            raise OptionsError(f"--buffer-size must be at least {MIN_BUFFER_BYTES // 1024} KiB")
        if self.dtype not in ("keep", "auto") and self.dtype not in dtypes.CASTABLE:
            raise OptionsError(f"dtype {self.dtype!r}: plan with keep, auto or one of {', '.join(dtypes.CASTABLE)}")


@dataclass(frozen=True)
class TensorPlan:
    name: str                   # output name
    source_fqn: str             # key in the checkpoint
    src_dtype: str
    dst_dtype: str
    shape: Tuple[int, ...]
    chunks: Tuple[Chunk, ...]   # deduplicated, sorted by offsets, proven to cover `shape` exactly once
    begin: int                  # absolute byte offset in the shard file
    nbytes: int                 # bytes in the output
    # Empty: each chunk sits at its own offsets in the output. Else the output is a gather of these pieces of
    # `chunks` (a transform: RoPE rows, a split, an unstack), proven to cover `shape` exactly once.
    pieces: Tuple[Piece, ...] = ()

    @property
    def end(self) -> int:
        return self.begin + self.nbytes

    @property
    def is_cast(self) -> bool:
        return self.src_dtype != self.dst_dtype

    @property
    def is_row_contiguous(self) -> bool:
        """True when every chunk is one contiguous byte run of the output (FSDP's dim-0 shards),
        so its bytes can be copied straight through without assembling blocks."""
        if self.pieces:
            return all(is_contiguous_piece(p, self.shape) for p in self.pieces)
        return all(_is_contiguous_box(c, self.shape) for c in self.chunks)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes               # 8-byte length + JSON, space-padded to a multiple of 8
    tensors: Tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)

    @property
    def data_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Skipped:
    fqn: str
    reason: str                 # "optimizer state", "non-tensor", "excluded", "outside model subtree"


@dataclass(frozen=True)
class ConversionPlan:
    shards: Tuple[ShardPlan, ...]
    options: PlanOptions
    skipped: Tuple[Skipped, ...]
    # (checkpoint key, output name) where wrappers were stripped or rename rules applied
    renamed: Tuple[Tuple[str, str], ...]
    subtree: Optional[str]
    peak_bytes: int                         # predicted peak resident memory of the converter
    source_format: str = "hf"               # the trainer adapter applied (`trainers.resolve`), "hf": none
    source_note: str = ""                   # why, for reports

    @property
    def tensors(self) -> Tuple[TensorPlan, ...]:
        return tuple(t for s in self.shards for t in s.tensors)

    @property
    def total_bytes(self) -> int:
        """Sum of tensor bytes, as `total_size` in the HF index."""
        return sum(s.data_nbytes for s in self.shards)

    @property
    def files_nbytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def skipped_counts(self) -> Dict[str, int]:
        """{reason: how many entries} for reports."""
        return _count_reasons(self.skipped)

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1

    def index(self) -> Optional[dict]:
        """The `model.safetensors.index.json` content, or None when there is a single file."""
        if not self.sharded:
            return None
        weight_map = {t.name: s.filename for s in self.shards for t in s.tensors}
        return {"metadata": {"total_size": self.total_bytes},
                "weight_map": dict(sorted(weight_map.items(), key=lambda kv: names.natural_key(kv[0])))}

    def to_dict(self) -> dict:
        return {
            "shards": [{"file": s.filename, "bytes": s.nbytes, "tensors": len(s.tensors)} for s in self.shards],
            "tensors": [{"name": t.name, "file": s.filename, "source": t.source_fqn, "shape": list(t.shape),
                         "dtype": t.dst_dtype,
                         "source_dtype": t.src_dtype, "chunks": len(t.chunks),
                         "assembly": "copy" if t.is_row_contiguous else ("gather" if t.pieces else "blocks"),
                         "pieces": len(t.pieces)}
                        for s in self.shards for t in s.tensors],
            "total_bytes": self.total_bytes,
            "files_bytes": self.files_nbytes,
            "max_shard_bytes": self.options.max_shard_bytes,
            "buffer_bytes": self.options.buffer_bytes,
            "predicted_peak_bytes": self.peak_bytes,
            "subtree": self.subtree,
            "skipped": self.skipped_counts,
            "renamed": len(self.renamed),
            "source_format": self.source_format,
        }



def _is_contiguous_box(chunk: Chunk, shape: Sequence[int]) -> bool:
    """A box is one contiguous run of the row-major tensor iff, past its first dim of size > 1,
    it spans every remaining dim in full."""
    dims = len(shape)
    first = 0
    while first < dims and chunk.sizes[first] == 1:
        first += 1
    return all(chunk.sizes[d] == shape[d] for d in range(first + 1, dims))


def _count_reasons(skipped: Sequence[Skipped]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return counts


def _source_name(entry: TensorEntry, subtree: Optional[str]) -> str:
    """The state-dict name inside the selected subtree: ('model', 'layers.0.w') -> 'layers.0.w'."""
    if subtree is not None and len(entry.path) >= 2:
        return ".".join(str(p) for p in entry.path[1:])
    if subtree is not None and entry.fqn.startswith(subtree + "."):
        return entry.fqn[len(subtree) + 1:]
    return entry.fqn


def _top_key(entry: TensorEntry) -> str:
    return str(entry.path[0]) if entry.path else entry.fqn.split(".", 1)[0]


def _output_dtype(src: str, requested: str) -> str:
    info = dtypes.BY_NAME.get(src)
    if requested in ("keep", "auto") or info is None or not info.is_floating or src.startswith("float8"):
        return src
    return requested


def _model_entries(meta: CheckpointMetadata, options: PlanOptions, subtree: Optional[str], skipped: List[Skipped]):
    """[(entry, state-dict name, name with wrappers stripped)] of the model's tensors; the rest go to `skipped`."""
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
        state_dict_name = _source_name(entry, subtree)
        name = names.strip_wrappers(state_dict_name) if options.strip_wrappers else state_dict_name
        model.append((entry, state_dict_name, name))
    return model


def _subtree(meta: CheckpointMetadata, options: PlanOptions) -> Optional[str]:
    return options.subtree if options.subtree is not None else names.model_subtree(t.path for t in meta.tensors)


def source_format(meta: CheckpointMetadata, options: PlanOptions) -> trainers.Resolution:
    """Which trainer's names the checkpoint uses (`--source-format`, or detected from the model's names)."""
    model = _model_entries(meta, options, _subtree(meta, options), [])
    tops = [_top_key(e) for e in meta.tensors] + [str(b.path[0]) if b.path else b.fqn.split(".", 1)[0]
                                                   for b in meta.byte_entries]
    return trainers.resolve([n for _, _, n in model], tops, options.source_format, options.source_format_reason)


def _adapted(resolution: trainers.Resolution, entry: TensorEntry, name: str, options: PlanOptions,
             skipped: List[Skipped], unmapped: List[TensorEntry]) -> List[Tuple[str, TensorEntry]]:
    """(output name, entry) pairs for one model tensor: itself, or what the trainer adapter's rules make of it."""
    adapter = resolution.adapter
    if adapter is None:
        return [(name, entry)]
    reason = adapter.skip_reason(name)
    if reason is not None:
        skipped.append(Skipped(entry.fqn, reason))
        return []
    out: List[Tuple[str, TensorEntry]] = []
    for rule in adapter.rules:
        m = rule.match(name)
        if m is not None:
            out.extend(trainers.outputs(rule, m, entry, options.heads))
    if not out:
        unmapped.append(entry)
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


def select(meta: CheckpointMetadata, options: PlanOptions, *, check_names: bool = True):
    """Pick the tensors to convert and name them. Returns (selected [(entry, name)], skipped, renamed, subtree).

    With a trainer adapter, an entry may be a `transforms.Derived` (its output shape, and the takes that fill it).
    `check_names=False` only counts and names (folder discovery, the names before --include/--exclude):
    unwritable or colliding names, and tensors the adapter cannot map, are refused when a plan is built, after the
    user's --include/--exclude/--rename had their say."""
    subtree = _subtree(meta, options)
    selected: List[Tuple[TensorEntry, str]] = []
    skipped: List[Skipped] = [Skipped(b.fqn, "non-tensor") for b in meta.byte_entries]
    renamed: List[Tuple[str, str]] = []
    resolution = source_format(meta, options)
    unmapped: List[TensorEntry] = []
    model = _model_entries(meta, options, subtree, skipped)
    adapter = resolution.adapter
    if adapter is not None and adapter.unsupported and check_names:
        # Refuse a model the layout cannot hold before asking for what mapping it would need (head counts).
        # Only when planning for real: counting names without the user's --exclude must not refuse what it drops.
        foreign = [e.fqn for e, _, n in model if adapter.skip_reason(n) is None
                   and not any(r.match(n) for r in adapter.rules) and names.is_selected((e.fqn,), options.include,
                                                                                      options.exclude)]
        if foreign:
            _refuse_features(adapter, foreign)
    seen: Dict[str, Tuple[str, str]] = {}     # output name -> (checkpoint key, name before renames)
    for entry, state_dict_name, base in model:
        for unrenamed, out_entry in _adapted(resolution, entry, base, options, skipped, unmapped):
            name = names.apply_renames(unrenamed, options.renames)
            if not names.is_selected((entry.fqn, name), options.include, options.exclude):
                skipped.append(Skipped(entry.fqn, "excluded"))
                continue
            if name in options.drop:
                skipped.append(Skipped(entry.fqn, "tied duplicate"))
                continue
            if check_names:
                _check_name(entry.fqn, unrenamed, name)
                if name in seen:
                    _refuse_collision(seen[name], (entry.fqn, unrenamed), name)
            seen[name] = (entry.fqn, unrenamed)
            if name != state_dict_name:     # unwrapping the subtree ("model.") alone is not a rename
                renamed.append((entry.fqn, name))
            selected.append((out_entry, name))
    skipped.extend(Skipped(e.fqn, "excluded") for e in unmapped
                   if not names.is_selected((e.fqn,), options.include, options.exclude))
    unmapped = [e for e in unmapped if names.is_selected((e.fqn,), options.include, options.exclude)]
    if unmapped and check_names:
        listed = ", ".join(e.fqn for e in unmapped[:8]) + (f" ... and {len(unmapped) - 8} more" if len(unmapped) > 8 else "")
        raise UnsupportedFeatureError(
            f"{len(unmapped)} checkpoint tensor(s) have no mapping in the {resolution.name} layout: {listed}. "
            "--exclude them, or convert with --source-format hf to keep the checkpoint's names")
    return selected, tuple(skipped), tuple(renamed), subtree


def _check_name(fqn: str, unrenamed: str, name: str) -> None:
    """Refuse an output name no safetensors reader would load. Blame the checkpoint when its own key (wrappers
    stripped) is already unusable, else the rename rules that produced the name."""
    problem = names.name_problem(name)
    if problem is None:
        return
    if name == unrenamed or names.name_problem(unrenamed) is not None:
        raise CheckpointError(
            f"checkpoint key {names.shown(fqn)} gives the output name {names.shown(name)}, which a safetensors "
            f"file cannot hold: {problem}; give it another name with --rename REGEX=REPLACEMENT or leave it out "
            "with --exclude")
    raise OptionsError(
        f"the rename rules turn checkpoint key {names.shown(fqn)} ({names.shown(unrenamed)}) into "
        f"{names.shown(name)}, which a safetensors file cannot hold: {problem}; change the --rename rule")


def _refuse_collision(first: Tuple[str, str], second: Tuple[str, str], name: str) -> None:
    """Two tensors would be written under one name, and a reader would see only one of them."""
    (fqn_a, unrenamed_a), (fqn_b, unrenamed_b) = first, second
    both = f"checkpoint keys {names.shown(fqn_a)} and {names.shown(fqn_b)} both become {names.shown(name)}"
    if unrenamed_a == unrenamed_b:
        raise CheckpointError(
            f"{both} once wrapper segments ({', '.join(names.WRAPPER_SEGMENTS)}) are removed; --exclude one of "
            "them by its checkpoint key")
    raise OptionsError(f"{both} after the rename rules; adjust --rename or --exclude one of them")


def _header(tensors: Sequence[Tuple[str, str, Tuple[int, ...], int, int]]) -> bytes:
    """safetensors header for (name, dtype, shape, begin, end) with offsets relative to the data section."""
    header = safetensors_format.build_header(
        [(name, dtypes.BY_NAME[dtype].safetensors, shape, begin, end) for name, dtype, shape, begin, end in tensors])
    if len(header) - safetensors_format.LENGTH.size > MAX_HEADER_BYTES:
        raise OptionsError(
            f"a shard's header would be {len(header) - safetensors_format.LENGTH.size:,} bytes ({len(tensors):,} "
            f"tensors), more than the {MAX_HEADER_BYTES:,} safetensors readers accept; lower --max-shard-size to "
            "spread them over more files")
    return header


def shard_filename(number: int, count: int) -> str:
    """The name of shard `number` (from 1) of `count`, as huggingface_hub names them; one file is SINGLE_FILE_NAME."""
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def _assign_shards(items: Sequence[Tuple[TensorEntry, str, str, int]], max_shard_bytes: int):
    """Greedy, in name order: start a new shard when the next tensor would overflow the current one
    (a tensor larger than the budget gets a shard of its own). Same rule as huggingface_hub."""
    groups: List[List[Tuple[TensorEntry, str, str, int]]] = [[]]
    current = 0
    for item in items:
        nbytes = item[3]
        if groups[-1] and current + nbytes > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(item)
        current += nbytes
    return [g for g in groups if g] or [[]]


def build_plan(meta: CheckpointMetadata, options: PlanOptions = PlanOptions()) -> ConversionPlan:
    selected, skipped, renamed, subtree = select(meta, options)
    items = []
    for entry, name in selected:
        dtypes.lookup(entry.dtype, where=f"tensor {entry.fqn!r}")
        dst = _output_dtype(entry.dtype, options.dtype)
        nbytes = numel(entry.shape) * dtypes.BY_NAME[dst].itemsize
        items.append((entry, name, dst, nbytes))
    items.sort(key=lambda it: names.natural_key(it[1]))

    groups = _assign_shards(items, options.max_shard_bytes)
    shards: List[ShardPlan] = []
    for i, group in enumerate(groups):
        filename = SINGLE_FILE_NAME if len(groups) == 1 else shard_filename(i + 1, len(groups))
        # Within a file, widest items first keep every tensor aligned to its item size (as safetensors does).
        group = sorted(group, key=lambda it: (-dtypes.BY_NAME[it[2]].itemsize, names.natural_key(it[1])))
        rel, pos = [], 0
        for entry, name, dst, nbytes in group:
            rel.append((name, dst, tuple(entry.shape), pos, pos + nbytes))
            pos += nbytes
        header = _header(rel)
        tensors = []
        for (entry, name, dst, nbytes), (_, _, _, begin, _) in zip(group, rel):
            chunks, pieces = _chunks_and_pieces(entry, name)
            tensors.append(TensorPlan(name=name, source_fqn=entry.fqn, src_dtype=entry.dtype, dst_dtype=dst,
                                      shape=tuple(entry.shape), chunks=chunks, begin=len(header) + begin,
                                      nbytes=nbytes, pieces=pieces))
        shards.append(ShardPlan(filename=filename, header=header, tensors=tuple(tensors)))

    n_chunks = sum(len(t.chunks) for t in meta.tensors) + sum(len(t.pieces) for s in shards for t in s.tensors)
    peak = BASE_RSS_BYTES + IO_STEPS_BYTES + options.buffer_bytes + n_chunks * PER_CHUNK_BYTES
    resolution = source_format(meta, options)
    return ConversionPlan(shards=tuple(shards), options=options, skipped=skipped, renamed=renamed,
                          subtree=subtree, peak_bytes=peak, source_format=resolution.name,
                          source_note=resolution.note)


def with_writers(conversion: ConversionPlan, writers: int) -> ConversionPlan:
    """The plan with its predicted peak for `writers` threads (`--workers`) instead of DEFAULT_WRITERS: they
    share the buffer, but each has its own transient IO steps. No more writers run than there are tensors."""
    running = max(1, min(writers, len(conversion.tensors)))
    extra_bytes = (running - DEFAULT_WRITERS) * IO_STEP_BYTES_PER_WRITER
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes)


def _chunks_and_pieces(entry: TensorEntry, name: str) -> Tuple[Tuple[Chunk, ...], Tuple[Piece, ...]]:
    """A plain tensor's chunks, proven to tile it; or a transformed tensor's pieces, proven to tile the output
    (each source's chunks proven to tile the source first)."""
    if not isinstance(entry, Derived):
        chunks = dedup_chunks(entry.chunks)
        check_coverage(entry.fqn, entry.shape, chunks)
        return chunks, ()
    sources = {}
    for src in entry.sources:
        chunks = dedup_chunks(src.chunks)
        check_coverage(src.fqn, src.shape, chunks)
        if src.dtype != entry.dtype:
            raise OptionsError(f"{name!r} gathers tensors of different dtypes ({src.dtype}, {entry.dtype})")
        sources[src.fqn] = (tuple(src.shape), chunks)
    groups = cut_all(entry.takes, sources)
    check_gather(name, tuple(entry.shape), entry.takes, groups)
    pieces = flatten(groups)
    return distinct_chunks(pieces), pieces
