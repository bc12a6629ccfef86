"""The planner: checkpoint metadata + options in, a complete `ConversionPlan` out. Pure: no IO.

Everything is fixed here before the first byte is written: which tensors, their output names and
dtypes, which shard file each goes to, every shard's safetensors header and every tensor's byte range.
The executor only follows the plan, shard by shard, so a shard can be (re)built on its own.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field, replace
from typing import Collection, Dict, List, Optional, Sequence, Tuple

from .. import dtypes, safetensors_format
from . import names
from ..errors import OptionsError
from ..model import BlobLocation, CheckpointMetadata, Chunk, ChunkTable, TensorEntry, numel
from .naming import TIED, Naming, Skipped, name_tensors
from .pieces import PieceTable
from ..safetensors_format import MAX_HEADER_BYTES
from .coverage import columns_of
from .proven import Proven, chunks_and_pieces, pieces_packed
from .streams import stream_bytes, streams_kept
from .transforms import Heads, Piece, is_contiguous_piece

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9          # as huggingface_hub's "5GB"
DEFAULT_BUFFER_BYTES = 32 * 2**20
MIN_BUFFER_BYTES = 64 * 2**10
# The predicted peak (`ConversionPlan.peak_bytes`) is the sum of what the converter holds resident at once,
# each part measured with /usr/bin/time (CPython 3.11, numpy 2.4, 2-core VM, 2026-12-07; docs/benchmarks.md):
# * the interpreter with streamconv, click and the stdlib they import, and the decoded metadata and plan
#   (21.3 MiB after `import streamconv.cli` with streamconv's bytecode compiled, 21.9-22.0 compiling it from source
#   at every start as an editable install under PYTHONDONTWRITEBYTECODE does: the same in a freshly installed venv
#   and a used one, 2026-12-07; each verb imports its own machinery), then the report, the sink, a writer thread
#   (RUN_STATE_BYTES). A fresh CI venv's Megatron TP2 run once peaked 0.7 MiB above a prediction with 24 MiB here
#   while numpy was a constant 18 MiB; a just-installed numpy maps up to 17.7 MiB at import and more once used
#   (below), presumably that run's excess, which numpy's measured term now carries. It does not carry it all: a
#   fresh-clone CI run of the same test then peaked at 50.0 MiB against 48.7 predicted with 24 here (47.5 in the
#   same venv 20 minutes later, 40.5 in a used one): file-backed pages of a just-installed venv move the peak by
#   2-3 MiB from run to run, so 2 MiB of margin for them. Nothing imported at start-up may pull in OpenSSL
#   (`hashlib`: 3.6 MiB): tests/memory checks the prediction (tests/support/rss.py) and tests/test_start_up.py
#   the modules. Since the start-up stopped importing what a local run does not use (socket, pickle, the bucket
#   staging, hf.layouts) the verbs and the conversion's modules leave 21.3 MiB resident against 22.2 (an FSDP2 11B
#   slice peaked 25.3-25.4 MiB): kept at 26 all the same, as the fresh-venv margin above was measured once and
#   the IO steps no longer counted on the fast paths (`holds_io_step`) took away what covered it besides
#   (tests/memory in a used venv: 3.1-11.9% above the peaks with 25; 2026-12-07, session 9);
BASE_RSS_BYTES = 26 * 2**20
RUN_STATE_BYTES = 2 * 2**20
# * when streamconv's modules were compiled from source at this start (runs/mapping.py tells which share), what
#   compiling all of them left behind: 21.9-22.0 MiB after `import streamconv.cli` against 21.3, and an FSDP2 11B slice peaked 26.3 MiB against
#   25.9 with bytecode (2-core VM, 2026-12-07);
COMPILE_BYTES = 2**20
# * numpy and its OpenBLAS, imported only when a tensor passes through the buffer (a cast or an assembly): a plan
#   of plain FSDP copies runs without it. What the import maps depends on the page cache, not on numpy: a library
#   file just written (a fresh install) sits in the page cache in large folios, which the kernel maps whole on a
#   fault (Linux 6.18: 15.0 MiB for numpy 2.4 and its OpenBLAS as pip left them, 17.3-17.7 rewritten with 1 MiB
#   writes); read back through faults after it was evicted, in small ones (11.4 MiB for the same files). So
#   `convert`, `plan` and `verify` measure the import in the process (runs/mapping.py, `with_numpy_bytes`), and
#   this constant stands only when they cannot: numpy imported already (by an API caller, whose process then holds
#   it before the run starts) or no /proc;
NUMPY_RSS_BYTES = 18 * 2**20
# * with the import and a first use measured, what numpy maps and allocates afterwards while converting: on the
#   2 GB column-block preset (--buffer-size 8MiB, 2 writers) the run added the buffer and 0.8 MiB (used venv) or
#   1.7 (numpy just written) to what the process held once planned, against this, RUN_STATE_BYTES and the IO
#   steps (2-core VM, 2026-12-07, docs/benchmarks.md);
NUMPY_IN_USE_BYTES = 2**19
# * per writer that holds one, a transient read outside the buffer (`holds_io_step`): a zstd chunk's decoded
#   pieces, a cast's work arrays, a piece copied through one IO step. Not a writer whose tensors go file to file in
#   the kernel (copy_file_range) or are read straight into the buffer (preadv): on those fast paths nothing holds
#   one, and counting one per writer put the short-run and transpose layouts 11-13% above their measured peaks
#   (2-core VM, 2026-12-07). What makes every writer hold one whatever it writes (the plain IO paths' 1 MiB steps,
#   fastpaths.PREAD_STEP_BYTES; the CRC-32 check's piece; --verify; a resumed shard's CRC read-back; copied chunks
#   without a recorded CRC-32, read back when their shard ends) is added by runs/ (`with_plain_io`,
#   `with_io_step_each`). `build_plan` predicts for the default writer count; `with_writers` for another;
IO_STEP_BYTES_PER_WRITER = 2**20
# * --verify: the staged output read back after the writing by one executor into a ComparingSink, which holds three
#   pieces (the output's bytes, the source's, the comparison's flags: output/sink.COMPARE_PIECE_BYTES each, this) and
#   imports numpy whatever the writing did (`with_verify_pass`). Without this term the 2 GB preset peaked at 38.3
#   MiB with --verify against 28.6 predicted (24.8 without --verify; 2-core VM, 2026-12-07);
VERIFY_PIECE_BYTES = 2**20
# * per writer on the plain IO paths (`with_plain_io`): the 1 MiB step read into a bytes object and written from
#   it, and what that leaves allocated: the 2 GB preset (plain copies, 2 writers) peaked at 28.6-29.2 MiB with the
#   fast paths off against 28.7 predicted with 1 MiB here (2-core VM, 2026-12-07); counting a whole IO step per
#   writer on top put small layouts 21-37% above their peaks;
PLAIN_STEP_BYTES_PER_WRITER = 3 * 2**19
DEFAULT_WRITERS = 2
# * when chunks are zstd-compressed, the zstandard module (once) and per writer its decoder with its window
#   (torch's default level), its compressed reads and what its thread's malloc arena keeps of them. Measured peaks
#   (2-core VM, 2026-12-07): tests/memory/test_zstd_strided_memory.py's checkpoint (128 MiB tensors,
#   --buffer-size 4MiB --crc) 45.8 / 48.2 MiB with 1 / 2 writers; the 2 GB zstd benchmark 34.5 / 42.4 / 51.0 MiB
#   with 2 / 4 / 6 writers: 4.2 MiB a writer (its IO step included) there, so the prediction takes 4.5; a writer
#   whose bands read several compressed chunks in turn keeps a stream for each (planning/streams.py: up to
#   STREAM_BYTES each beyond the first);
ZSTD_MODULE_BYTES = 2**20
DECODER_BYTES_PER_WRITER = 7 * 2**19
# * per chunk of `.metadata` and piece of the plan, what `convert` holds for it before its first byte: the decoded
#   metadata (a ChunkTable row and what decoding leaves resident), the plan (a PieceTable row and its tensor's
#   share) and, for a planned chunk, its located blob record (a row of `source.located.LocatedChunks`: 64 bytes of
#   columns, 140 resident with what locating leaves behind at 671B scale). Measured with benchmarks/plan_state.py
#   (VmRSS, 2-core VM, 2026-12-07): 261 bytes on the 671B-scale metadata (481,438 chunks, 356,352 pieces), 260 at
#   1/8 of its layers (59,134 chunks, 30,720 pieces); tests/test_benchmarks.py's small run (4,224 chunks) measured
#   303 in a fresh CI venv and 310-323 in used ones; the rest of 340 is margin;
PER_CHUNK_BYTES = 340
# * the same with the fast paths off (STREAMCONV_NO_FAST_PATHS=1: records decoded by the general machine, pieces as
#   objects, planning/proven.pieces_packed): 499 bytes on that small run (307 of them the decoded metadata);
GENERAL_PER_CHUNK_BYTES = 560
# * per chunk of a tensor the plan leaves out (optimizer state), only what decoding keeps of it: its ChunkTable
#   row (16.5 bytes of columns) and what decoding leaves resident. Measured with benchmarks/plan_state.py (2-core
#   VM, 2026-12-07): decoding the 671B-scale metadata grew RSS by 61 MiB for 481,438 chunks, by 84 MiB with
#   AdamW's 963,901 more (25 bytes each); 64 leaves margin. Such chunks are never planned cut or located;
EXCLUDED_CHUNK_BYTES = 64
# * when the names were checked against transformers' model on the meta device (hf/meta_probe: a config.json with
#   no table, e.g. any MoE family), what asking it imports into this process: hashlib's OpenSSL (its answer
#   cache) and importlib.metadata, 4.7 MiB after `import streamconv.cli` (2026-12-07; a Megatron MoE conversion
#   peaked 2.3 MiB above a prediction without it: tests/memory/test_megatron_moe_memory.py);
META_PROBE_RSS_BYTES = 5 * 2**20
# * the buffer each writer touches: its share of `buffer_bytes`, or less when no tensor needs that much
#   (`buffer_need_bytes`). The buffer is allocated once per writer and touched page by page, so a plan whose
#   largest assembled tensor is 3 MiB holds 3 MiB, whatever --buffer-size says.

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class PlanOptions:
    """What the program derives from the user's options, the planner's input (internal: users pass
    `ConvertOptions`): sizes in bytes, rules parsed, dtype and source format resolved, the names decided."""
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
    # How a trainer adapter writes routed experts: "per-expert" (as save_pretrained does) or "fused"
    # (`trainers.EXPERT_LAYOUTS`).
    expert_layout: str = "per-expert"
    heads: Optional[Heads] = None
    # Why `source_format` was set when the user did not set it (a Megatron folder's metadata.json), for the note.
    source_format_reason: str = ""
    # The names were checked by transformers on the meta device (`META_PROBE_RSS_BYTES` in the predicted peak).
    meta_probed: bool = False
    # The names `hf.prepare` decided from these options and the reference (`naming.Naming`, every stage but the
    # tied drop, which `drop` gives). None: `build_plan` names the tensors itself. Not part of a plan's options.
    naming: Optional[Naming] = field(default=None, compare=False, repr=False)
    # The user's `options.ConvertOptions` these were derived from (set by the API), for the output's record.
    user: Optional[object] = field(default=None, compare=False, repr=False)

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
    chunks: Sequence[Chunk]     # deduplicated, sorted by offsets, proven to cover `shape` exactly once (a tuple or
                                # a ChunkTable view)
    begin: int                  # absolute byte offset in the shard file
    nbytes: int                 # bytes in the output
    # Empty: each chunk sits at its own offsets in the output. Else the output is a gather of these pieces of
    # `chunks` (a transform: RoPE rows, a split, an unstack), proven to cover `shape` exactly once: a tuple or a
    # `PieceTable`, which makes each Piece when asked for (pieces.py).
    pieces: Sequence[Piece] = ()
    # Empty: chunks are stored in the output's dim order. Else output dim k is dim axes[k] of every stored chunk
    # (`transforms.Transposed`; `chunks` are in output coordinates): read as stored, put in place permuted.
    axes: Tuple[int, ...] = ()

    # Decided once from the fields above (`__post_init__`, so `replace` decides again): the writer count is chosen
    # by predicting the peak several times, each asking every tensor. Fields rather than cached properties: a
    # cached property gives each of a 671B plan's 45k tensors a dict of its own (768 bytes).
    is_compressed: bool = field(init=False, compare=False, repr=False)
    is_row_contiguous: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_compressed", self._compressed())
        object.__setattr__(self, "is_row_contiguous", self._row_contiguous())

    @property
    def end(self) -> int:
        return self.begin + self.nbytes

    def _compressed(self) -> bool:
        """True when some chunk is stored through a stream transform (zstd)."""
        if isinstance(self.chunks, ChunkTable):
            return self.chunks.transformed
        return any(c.location.transform_descriptors for c in self.chunks)

    @property
    def is_cast(self) -> bool:
        return self.src_dtype != self.dst_dtype

    def _row_contiguous(self) -> bool:
        """True when every chunk is one contiguous byte run of the output (FSDP's dim-0 shards),
        so its bytes can be copied straight through without assembling blocks."""
        if isinstance(self.pieces, PieceTable):
            return self.pieces.row_contiguous
        if self.pieces:
            return all(is_contiguous_piece(p, self.shape) for p in self.pieces)
        if self.axes:
            return False
        if isinstance(self.chunks, ChunkTable):      # each distinct box size once, found over the table's columns
            ndim = self.chunks.ndim
            sizes = set(zip(*columns_of(self.chunks)[ndim:])) if ndim else {()}
            return all(_is_contiguous_box(s, self.shape) for s in sizes)
        return all(_is_contiguous_box(c.sizes, self.shape) for c in self.chunks)

    def as_stored(self) -> Tuple[Tuple[int, ...], Tuple[Chunk, ...]]:
        """(shape, chunks) as the checkpoint records them: in the source's dim order, not the output's when `axes`."""
        if not self.axes:
            return self.shape, self.chunks
        inverse = [self.axes.index(d) for d in range(len(self.axes))]

        def back(values):
            return tuple(values[i] for i in inverse)
        return back(self.shape), tuple(Chunk(back(c.offsets), back(c.sizes), c.location) for c in self.chunks)

    @property
    def assembly(self) -> str:
        """How the executor builds it, for plan listings."""
        if self.is_row_contiguous:
            return "copy"
        return "gather" if self.pieces else "transpose" if self.axes else "blocks"


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
    workers: int = DEFAULT_WRITERS          # the writer threads `peak_bytes` is predicted for (`with_writers`)
    workers_reason: str = ""                # how that count was chosen (planning/workers.py), for reports
    # What numpy adds to the peak when a tensor passes through the buffer: NUMPY_RSS_BYTES, or the import as this
    # process measured it plus NUMPY_IN_USE_BYTES (`with_numpy_bytes`)
    numpy_bytes: int = NUMPY_RSS_BYTES
    # Every writer holds an IO step, whatever its tensors (`with_io_step_each`); else only those `holds_io_step`
    io_step_each: bool = False

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
                         "assembly": t.assembly,
                         "pieces": len(t.pieces)}
                        for s in self.shards for t in s.tensors],
            "total_bytes": self.total_bytes,
            "files_bytes": self.files_nbytes,
            "max_shard_bytes": self.options.max_shard_bytes,
            "buffer_bytes": self.options.buffer_bytes,
            "predicted_peak_bytes": self.peak_bytes,
            "workers": self.workers,
            "workers_reason": self.workers_reason,
            "subtree": self.subtree,
            "skipped": self.skipped_counts,
            "renamed": len(self.renamed),
            "source_format": self.source_format,
        }



def _is_contiguous_box(sizes: Sequence[int], shape: Sequence[int]) -> bool:
    """A box (of these sizes) is one contiguous run of the row-major tensor iff, past its first dim of size > 1,
    it spans every remaining dim in full."""
    dims = len(shape)
    first = 0
    while first < dims and sizes[first] == 1:
        first += 1
    return all(sizes[d] == shape[d] for d in range(first + 1, dims))


def _count_reasons(skipped: Sequence[Skipped]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return counts


def _output_dtype(src: str, requested: str) -> str:
    info = dtypes.BY_NAME.get(src)
    if requested in ("keep", "auto") or info is None or not info.is_floating or src.startswith("float8"):
        return src
    return requested


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
    named = (options.naming.dropping(options.drop).checked() if options.naming is not None
             else name_tensors(meta, options))
    items = []
    for entry, name in named.selected:
        dtypes.lookup(entry.dtype, where=f"tensor {entry.fqn!r}")
        dst = _output_dtype(entry.dtype, options.dtype)
        nbytes = numel(entry.shape) * dtypes.BY_NAME[dst].itemsize
        items.append((entry, name, dst, nbytes))
    items.sort(key=lambda it: names.natural_key(it[1]))

    groups = _assign_shards(items, options.max_shard_bytes)
    shards: List[ShardPlan] = []
    proven, packed = Proven(Proven.counted([entry for entry, _, _, _ in items])), pieces_packed()
    for i, group in enumerate(groups):
        filename = SINGLE_FILE_NAME if len(groups) == 1 else shard_filename(i + 1, len(groups))
        # Within a file, widest items first keep every tensor aligned to its item size (as safetensors does), in
        # name order within a width: the sort is stable and the group is in name order.
        group = sorted(group, key=lambda it: -dtypes.BY_NAME[it[2]].itemsize)
        rel, pos = [], 0
        for entry, name, dst, nbytes in group:
            rel.append((name, dst, tuple(entry.shape), pos, pos + nbytes))
            pos += nbytes
        header = _header(rel)
        tensors = []
        for (entry, name, dst, nbytes), (_, _, _, begin, _) in zip(group, rel):
            chunks, pieces = chunks_and_pieces(entry, name, proven, packed)
            tensors.append(TensorPlan(name=name, source_fqn=entry.fqn, src_dtype=entry.dtype, dst_dtype=dst,
                                      shape=tuple(entry.shape), chunks=chunks, begin=len(header) + begin,
                                      nbytes=nbytes, pieces=pieces, axes=getattr(entry, "axes", ())))
        shards.append(ShardPlan(filename=filename, header=header, tensors=tuple(tensors)))

    planned = [t for s in shards for t in s.tensors]
    # (a tied duplicate is left out of the output but still read, by the tied-weight check: a full chunk)
    left_out = {s.fqn for s in named.all_skipped if s.reason != TIED}
    n_excluded = sum(len(t.chunks) for t in meta.tensors if t.fqn in left_out)
    n_chunks = (sum(len(t.chunks) for t in meta.tensors if t.fqn not in left_out)
                + sum(len(t.pieces) for t in planned))
    per_chunk_bytes = PER_CHUNK_BYTES if packed else GENERAL_PER_CHUNK_BYTES
    peak = (BASE_RSS_BYTES + n_chunks * per_chunk_bytes + n_excluded * EXCLUDED_CHUNK_BYTES
            + (META_PROBE_RSS_BYTES if options.meta_probed else 0)
            + _writers_bytes(planned, options.buffer_bytes, DEFAULT_WRITERS))
    return ConversionPlan(shards=tuple(shards), options=replace(options, naming=None), skipped=named.all_skipped,
                          renamed=named.renamed, subtree=named.subtree, peak_bytes=peak,
                          source_format=named.source_format, source_note=named.source_note)


def with_writers(conversion: ConversionPlan, writers: int, reason: str = "") -> ConversionPlan:
    """The plan with its predicted peak for `writers` threads (`--workers`) instead of the count it was
    predicted for: they share the buffer, but each has its own transient IO steps. No more writers run than
    there are tensors. `reason`: how the count was chosen (planning/workers.py), for reports."""
    tensors, buffer_bytes, each = conversion.tensors, conversion.options.buffer_bytes, conversion.io_step_each
    extra_bytes = (_writers_bytes(tensors, buffer_bytes, writers, io_step_each=each)
                   - _writers_bytes(tensors, buffer_bytes, conversion.workers, io_step_each=each))
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes, workers=writers,
                   workers_reason=reason)


def writers_peak_bytes(conversion: ConversionPlan, writers: int) -> int:
    """The predicted peak for `writers` threads without the per-chunk metadata (which grows with the checkpoint,
    not with the writers): what the writer count is chosen against (planning/workers.py)."""
    return BASE_RSS_BYTES + _writers_bytes(conversion.tensors, conversion.options.buffer_bytes, writers,
                                           numpy_bytes=conversion.numpy_bytes, io_step_each=conversion.io_step_each)


def with_permuted_chunks(conversion: ConversionPlan, permuted: Collection[BlobLocation],
                         writers: int) -> ConversionPlan:
    """The predicted peak (for `writers`) once locating the chunks found some stored with permuted strides (a
    transposed weight saved as it was): `.metadata` cannot tell, and such a tensor is assembled through the
    buffer (execution/strided.py) where its offsets alone promised a plain copy."""
    if not permuted:
        return conversion
    tensors, buffer_bytes = conversion.tensors, conversion.options.buffer_bytes
    terms = dict(numpy_bytes=conversion.numpy_bytes, io_step_each=conversion.io_step_each)
    extra_bytes = (_writers_bytes(tensors, buffer_bytes, writers, frozenset(permuted), **terms)
                   - _writers_bytes(tensors, buffer_bytes, writers, **terms))
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes)


def uses_numpy(conversion: ConversionPlan) -> bool:
    """True when some tensor passes through the buffer, so the run imports numpy (`numpy_bytes` is in the peak)."""
    return any(buffer_need_bytes(t) for t in conversion.tensors)


def with_numpy_bytes(conversion: ConversionPlan, import_bytes: int) -> ConversionPlan:
    """The plan with numpy counted as this process measured its import (`import_bytes`, runs/mapping.py) rather
    than as NUMPY_RSS_BYTES assumes, when the run imports it."""
    numpy_bytes = import_bytes + NUMPY_IN_USE_BYTES
    extra_bytes = numpy_bytes - conversion.numpy_bytes if uses_numpy(conversion) else 0
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes, numpy_bytes=numpy_bytes)


def with_verify_pass(conversion: ConversionPlan, import_bytes: Optional[int]) -> ConversionPlan:
    """The predicted peak of a run that reads its output back (--verify): the comparison's three pieces
    (VERIFY_PIECE_BYTES each), and numpy (as `import_bytes` measured it in this process, or `numpy_bytes`) when no
    tensor of the writing passed through the buffer, so that nothing counted it yet. On top of the writing: the
    writers' steps stay allocated (malloc keeps them) while the output is read back."""
    numpy_bytes = conversion.numpy_bytes if import_bytes is None else import_bytes + NUMPY_IN_USE_BYTES
    counted_bytes = conversion.numpy_bytes if uses_numpy(conversion) else 0
    extra_bytes = 3 * step_bytes_held(conversion.tensors, VERIFY_PIECE_BYTES) + numpy_bytes - counted_bytes
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes, numpy_bytes=numpy_bytes)


def with_compiled_source(conversion: ConversionPlan, share: float) -> ConversionPlan:
    """The plan with what compiling `share` of streamconv's modules from source at this start left resident (that
    share of COMPILE_BYTES)."""
    return replace(conversion, peak_bytes=conversion.peak_bytes + round(share * COMPILE_BYTES))


def with_io_step_each(conversion: ConversionPlan, writers: int) -> ConversionPlan:
    """The predicted peak (for `writers`) when every writer holds an IO step whatever it writes, not only those
    whose tensors hold one (`holds_io_step`): a run that checks CRC-32s, verifies, resumes, reads or writes object
    storage, or copies chunks whose CRC-32 the checkpoint does not record (read back when their shard ends)."""
    if conversion.io_step_each:
        return conversion
    tensors, buffer_bytes = conversion.tensors, conversion.options.buffer_bytes
    extra_bytes = (_writers_bytes(tensors, buffer_bytes, writers, io_step_each=True)
                   - _writers_bytes(tensors, buffer_bytes, writers))
    return replace(conversion, peak_bytes=conversion.peak_bytes + extra_bytes, io_step_each=True)


def with_plain_io(conversion: ConversionPlan, writers: int) -> ConversionPlan:
    """The predicted peak when the run copies without copy_file_range or reads without preadv (not offered, or
    turned off, or another filesystem): each writer then holds a plain step's bytes object and what copying it
    leaves (PLAIN_STEP_BYTES_PER_WRITER), beside an IO step only if its tensors hold one. As in `_writers_bytes`, no
    more writers run than there are tensors."""
    running = _running_writers(conversion.tensors, writers)
    plain_bytes = running * step_bytes_held(conversion.tensors, PLAIN_STEP_BYTES_PER_WRITER)
    return replace(conversion, peak_bytes=conversion.peak_bytes + plain_bytes)


def step_bytes_held(tensors: Sequence[TensorPlan], step_bytes: int) -> int:
    """What a step of `step_bytes` holds when no tensor is that large: a step reads at most one tensor's bytes, and
    its pages are touched only as far as that (a tiny model's run was predicted 7 MiB above its 36 MiB peak)."""
    return min(step_bytes, max((_read_bytes(t) for t in tensors), default=0))


def _read_bytes(t: TensorPlan) -> int:
    """The larger of a tensor's bytes as stored and as written (a cast's step reads the one, writes the other)."""
    src_item, dst_item = dtypes.BY_NAME[t.src_dtype].itemsize, dtypes.BY_NAME[t.dst_dtype].itemsize
    return t.nbytes // dst_item * max(src_item, dst_item)


def buffer_need_bytes(t: TensorPlan, permuted: Collection[BlobLocation] = frozenset()) -> int:
    """The most buffer one step of `t` can take when the buffer is not the limit (0: it never uses the buffer).
    A plain copy goes file to file in the kernel; a cast passes through the buffer, its output in place over its
    input; an assembly holds a band and, behind it, one chunk's part of the band (the staging of short runs and
    of chunks stored with `permuted` strides)."""
    assembled = not t.is_row_contiguous or bool(permuted and any(c.location in permuted for c in t.chunks))
    if not t.is_cast and not assembled:
        return 0
    src_bytes = numel(t.shape) * dtypes.BY_NAME[t.src_dtype].itemsize
    staging_bytes = 0
    if assembled and not t.pieces:
        staging_bytes = max((numel(c.sizes) for c in t.chunks), default=0) * dtypes.BY_NAME[t.src_dtype].itemsize
    return max(src_bytes + staging_bytes, t.nbytes)


def holds_io_step(t: TensorPlan) -> bool:
    """Whether a writer of `t` holds a transient read outside the buffer even on the fast paths: a zstd chunk's
    decoded pieces and skips (source/blob_reader.py's scratch, kept by the thread), a cast's work arrays
    (execution/cast.py: 576 KiB), pieces copied one IO step at a time (execution/copy.py)."""
    return t.is_compressed or t.is_cast or bool(t.pieces and t.is_row_contiguous)


def _running_writers(tensors: Sequence[TensorPlan], writers: int) -> int:
    """How many of `writers` threads can hold memory at once: one tensor is never split between writers."""
    return max(1, min(writers, len(tensors)))


def _more_streams_bytes(tensors: Sequence[TensorPlan], running: int) -> int:
    """The decoded streams writers keep beyond their one (DECODER_BYTES_PER_WRITER counts it) while they write
    compressed tensors whose bands read several chunks in turn (`streams.streams_kept`), the `running` such
    tensors with the most written at once."""
    more = sorted((streams_kept(t) - 1) * stream_bytes(t) for t in tensors if t.is_compressed)[-running:]
    return sum(more)


def _writers_bytes(tensors: Sequence[TensorPlan], buffer_bytes: int, writers: int,
                   permuted: Collection[BlobLocation] = frozenset(), numpy_bytes: int = NUMPY_RSS_BYTES,
                   io_step_each: bool = False) -> int:
    """What the writers hold beyond the base: the IO steps of those that hold one (each, with `io_step_each`),
    their zstd decoders when chunks are compressed and, when some tensor passes through the buffer, numpy and the
    part of each writer's share of the buffer its tensors touch. A writer's share stays touched as far as its
    largest tensor reached, and writers take distinct tensors, so together they touch at most the `running`
    largest needs (each within a share): one large assembled tensor among small ones costs one share, not one per
    writer. A writer keeps what its steps allocated (malloc's arenas), so each of `running` writers that can meet
    a tensor holding one counts one."""
    running = _running_writers(tensors, writers)
    share_bytes = max(1, buffer_bytes // running)
    needs = heapq.nlargest(running, (min(share_bytes, buffer_need_bytes(t, permuted)) for t in tensors))
    stepping = running if io_step_each else min(running, sum(1 for t in tensors if holds_io_step(t)))
    held = stepping * step_bytes_held(tensors, IO_STEP_BYTES_PER_WRITER)
    if any(t.is_compressed for t in tensors):
        held += ZSTD_MODULE_BYTES + running * DECODER_BYTES_PER_WRITER + _more_streams_bytes(tensors, running)
    if needs and needs[0]:
        held += numpy_bytes + sum(needs)
    return held
