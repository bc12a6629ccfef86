"""Tensor transforms as data: every output tensor is a gather of boxes of stored source chunks. Pure, no IO.

Three layers, each a value:

* row maps — `RowRun(src, dst, count, step)`: output rows dst..dst+count come from source rows src, src+step, ...
  The few named operations build them: `rope_half_split` (RoPE interleaved -> half-split rows, per head),
  `qkv_part` (a fused q/k/v weight, concatenated or grouped per query group, GQA/MQA-aware), `half` (gate/up),
  `row_slice`, and `compose` to chain them (e.g. RoPE on the q rows of a fused qkv).
* `Take` — a box of the output that comes from a box of one *source tensor* (global coordinates). A row map on a
  source (after optionally fixing its leading index: unstack) gives one take per run.
* `Transposed` — an output that is its source with dims permuted (torchtitan GPT-OSS's [E, 2F, D] expert weights
  as transformers' [E, D, 2F]): no takes, its chunks are the source's in output coordinates, and the executor reads
  each chunk as stored and puts it in place permuted (`execution/strided.py`), band by band.
* `Piece` — a take cut along the source's stored chunks: output box + stored chunk + where inside the chunk.
  This is what the executor copies (`gather.write_pieces`). `check_gather` proves the pieces cover the output
  exactly once (the proof of `coverage.check_coverage`, over takes and pieces); `check_pieces` is the pairwise
  version for arbitrary pieces.

Geometry shared by takes and pieces:
* the box has the output's dims: `dst_start` and `sizes` have one entry per output dim;
* the source may have more dims (unstack: a [L, rows, cols] source feeding a [rows, cols] output) or fewer (stack):
  the two align on their trailing dims. The source's extra leading dims are fixed at `src_start` (size 1); the
  output's extra leading dims have size 1;
* `src_step` strides the box's first source-aligned dim (the row dim): RoPE takes every other row.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..errors import CoverageError, OptionsError, ReferenceMismatchError
from ..model import Chunk, TensorEntry, numel, row_major_strides

Shape = Tuple[int, ...]




# -- row maps: the named operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class RowRun:
    """Output rows dst .. dst+count-1 are source rows src, src+step, ..., src+(count-1)*step."""

    src: int
    dst: int
    count: int
    step: int = 1


RowMap = Tuple[RowRun, ...]


def identity_rows(n_rows: int) -> RowMap:
    return (RowRun(0, 0, n_rows),) if n_rows else ()


def row_slice(start: int, count: int) -> RowMap:
    """Rows start .. start+count-1 of the source, as output rows 0 .. count-1."""
    return (RowRun(start, 0, count),) if count else ()


def rope_half_split(n_rows: int, n_heads: int, *, what: str = "weight") -> RowMap:
    """RoPE interleaved -> half-split row order, per head: torch's
    `w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(n_rows, cols)` (the permutation of Hugging
    Face's `convert_llama_weights_to_hf`, torchtitan's `state_dict_adapter._permute` and torchtune's `tune_to_hf`).

    Output row h*hd + j*hd/2 + i is source row h*hd + 2i + j: per head, two runs of every other row."""
    if n_heads <= 0 or n_rows % n_heads or (n_rows // n_heads) % 2:
        raise ReferenceMismatchError(
            f"{what}: {n_rows} rows cannot be {n_heads} RoPE heads of an even head size; check the head counts in "
            "the reference config (num_attention_heads, num_key_value_heads, head_dim)")
    head_dim = n_rows // n_heads
    half = head_dim // 2
    return tuple(RowRun(h * head_dim + j, h * head_dim + j * half, half, step=2)
                 for h in range(n_heads) for j in (0, 1))


def rope_interleave(n_rows: int, n_heads: int, *, what: str = "weight") -> RowMap:
    """The inverse of `rope_half_split` (Hugging Face -> interleaved): output row h*hd + 2i + j is source row
    h*hd + j*hd/2 + i. One run per row (the tests check the round trip with it)."""
    forward = rope_half_split(n_rows, n_heads, what=what)
    runs = []
    for r in forward:
        for k in range(r.count):
            runs.append(RowRun(r.dst + k, r.src + k * r.step, 1))
    return tuple(sorted(runs, key=lambda r: r.dst))


@dataclass(frozen=True)
class Heads:
    """Attention geometry from the reference config: what RoPE and fused-qkv splits need."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    # The config's vocab_size (None: not given): a trainer's padded embedding rows beyond it are dropped.
    vocab_size: Optional[int] = None

    def __post_init__(self):
        if min(self.n_heads, self.n_kv_heads, self.head_dim) <= 0 or self.n_heads % self.n_kv_heads:
            raise ReferenceMismatchError(f"bad attention geometry in the reference config {self}: heads must be "
                                         "positive and a multiple of kv heads; is --config-from the base model?")


def qkv_part(part: str, heads: Heads, *, grouped: bool) -> RowMap:
    """The rows of `part` ("q", "k" or "v") in a fused q/k/v weight.

    grouped=False: [all q rows; all k rows; all v rows] (HF-style concatenation, phi3 `qkv_proj`).
    grouped=True: per query group g, [q rows of its n_heads/n_kv_heads heads; its k rows; its v rows]
    (Megatron-Core `linear_qkv`, torchtitan's `FusedQKVLinear` buffer). MQA is n_kv_heads = 1."""
    hd, groups = heads.head_dim, heads.n_kv_heads
    per_group = heads.n_heads // groups
    q_rows, kv_rows = heads.n_heads * hd, groups * hd
    if not grouped:
        start, count = {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}[part]
        return row_slice(start, count)
    group_rows = (per_group + 2) * hd
    if part == "q":
        return tuple(RowRun(g * group_rows, g * per_group * hd, per_group * hd) for g in range(groups))
    offset = per_group * hd + (0 if part == "k" else hd)
    return tuple(RowRun(g * group_rows + offset, g * hd, hd) for g in range(groups))


def qkv_rows(heads: Heads) -> int:
    return (heads.n_heads + 2 * heads.n_kv_heads) * heads.head_dim


def half(n_rows: int, index: int, *, what: str = "weight") -> RowMap:
    """Half `index` (0 or 1) of a weight fused along dim 0, e.g. [gate; up] (`w13`, `gate_up_proj`, Megatron
    `linear_fc1`)."""
    if n_rows % 2:
        raise OptionsError(f"{what}: {n_rows} rows cannot be split into two equal halves (gate/up)")
    return row_slice(index * n_rows // 2, n_rows // 2)


def compose(outer: RowMap, inner: RowMap) -> RowMap:
    """`outer` applied to the output of `inner`: output row r = inner(outer(r)). Strided runs stay strided."""
    out: List[RowRun] = []
    inner_sorted = sorted(inner, key=lambda r: r.dst)
    starts = [r.dst for r in inner_sorted]
    for o in outer:
        k = 0
        while k < o.count:
            mid = o.src + k * o.step
            i = bisect.bisect_right(starts, mid) - 1
            if i < 0 or mid >= inner_sorted[i].dst + inner_sorted[i].count:
                raise ValueError(f"row map composition: row {mid} is not produced by the inner map")
            run = inner_sorted[i]
            # outer rows k, k+1, ... stay inside this inner run while mid < run.dst + run.count
            n = min(o.count - k, (run.dst + run.count - 1 - mid) // o.step + 1)
            out.append(RowRun(run.src + (mid - run.dst) * run.step, o.dst + k, n, o.step * run.step))
            k += n
    return tuple(out)


def rows_out(row_map: RowMap) -> int:
    return sum(r.count for r in row_map)


# -- takes and pieces -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Take:
    """Output box [dst_start, dst_start + sizes) from source tensor `source` (a checkpoint key), starting at
    `src_start` (global source coordinates). See the module docstring for dims and `src_step`."""

    source: str
    src_start: Tuple[int, ...]
    dst_start: Tuple[int, ...]
    sizes: Tuple[int, ...]
    src_step: int = 1


@dataclass(frozen=True)
class Piece:
    """Output box [dst_start, dst_start + sizes) from stored chunk `chunk`, starting at `src_start` inside it
    (chunk-local element index, one entry per chunk dim)."""

    chunk: Chunk
    src_start: Tuple[int, ...]
    dst_start: Tuple[int, ...]
    sizes: Tuple[int, ...]
    src_step: int = 1

    @property
    def numel(self) -> int:
        return numel(self.sizes)


def takes_from_rows(source: str, source_shape: Shape, row_map: RowMap, *,
                    lead: Tuple[int, ...] = ()) -> Tuple[Take, ...]:
    """Takes that gather rows of `source` (after fixing its leading indices `lead`: unstack) into an output whose
    dims are the source's remaining dims, rows numbered by the row map."""
    rest = tuple(source_shape[len(lead) + 1:])
    zeros = (0,) * len(rest)
    return tuple(Take(source, tuple(lead) + (r.src,) + zeros, (r.dst,) + zeros, (r.count,) + rest, r.step)
                 for r in row_map if r.count)


def whole(source: str, source_shape: Shape, *, lead: Tuple[int, ...] = ()) -> Tuple[Take, ...]:
    """The source (or its sub-tensor at leading indices `lead`) as it is."""
    shape = tuple(source_shape[len(lead):])
    if not shape:
        return (Take(source, tuple(lead), (), ()),)
    return takes_from_rows(source, source_shape, identity_rows(shape[0]), lead=lead)


def output_shape_of_rows(source_shape: Shape, row_map: RowMap, *, lead: Tuple[int, ...] = ()) -> Shape:
    return (rows_out(row_map),) + tuple(source_shape[len(lead) + 1:])


def _row_axis(n_src: int, n_dst: int) -> Tuple[int, int]:
    """(box dim, source dim) of the strided row dim: the box's first source-aligned dim."""
    extra = n_src - n_dst
    box_dim = max(0, -extra)
    return box_dim, box_dim + extra


class ChunkIndex:
    """One source's stored chunks, sorted along one dim so a take finds the chunks it crosses by bisection."""

    def __init__(self, chunks: Sequence[Chunk], dim: int):
        self.dim = dim
        self.chunks = sorted(chunks, key=lambda c: (c.offsets[dim] if c.offsets else 0))
        self.starts = [c.offsets[dim] if c.offsets else 0 for c in self.chunks]
        self.longest = max((c.sizes[dim] if c.sizes else 1 for c in self.chunks), default=0)

    def crossing(self, lo: int, hi: int) -> Sequence[Chunk]:
        """Chunks whose extent in `dim` meets [lo, hi)."""
        first = bisect.bisect_left(self.starts, lo - self.longest + 1)
        last = bisect.bisect_left(self.starts, hi)
        return self.chunks[first:last]

    def candidates(self, box: Sequence[Tuple[int, int, int]]) -> Sequence[Chunk]:
        """Chunks that may meet a source box ((start, count, step) per source dim)."""
        start, count, step = box[self.dim]
        return self.crossing(start, start + (count - 1) * step + 1)


class LeadIndex:
    """A source's chunks by their offsets in the leading dims a take fixes (unstacking [L, E, ...]: one output per
    layer and expert), when every chunk spans a single index of those dims: a take finds its chunks in one
    lookup, where a `ChunkIndex` on one dim would return a whole layer's experts for each of them."""

    def __init__(self, chunks: Sequence[Chunk], n_lead: int):
        self.n_lead = n_lead
        self.by_lead: Dict[Tuple[int, ...], List[Chunk]] = {}
        for c in chunks:
            self.by_lead.setdefault(tuple(c.offsets[:n_lead]), []).append(c)

    @staticmethod
    def fits(chunks: Sequence[Chunk], n_lead: int) -> bool:
        return n_lead > 1 and all(len(c.sizes) > n_lead and all(s == 1 for s in c.sizes[:n_lead]) for c in chunks)

    def candidates(self, box: Sequence[Tuple[int, int, int]]) -> Sequence[Chunk]:
        return self.by_lead.get(tuple(start for start, _, _ in box[:self.n_lead]), ())


# A piece as `cut_boxes` gives it: (the chunk or box it reads, src_start, dst_start, sizes, src_step).
Cut = Tuple[object, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], int]


def cut_boxes(take: Take, source_shape: Shape, index) -> List[Cut]:
    """The pieces of `take` as tuples: its source box intersected with every stored box it crosses. The index holds
    anything with `offsets` and `sizes` (a `Chunk`, or a planner's row of a source's table); each tuple names the
    one it reads."""
    n_src, n_dst = len(source_shape), len(take.sizes)
    extra = n_src - n_dst
    if extra < 0 and any(s != 1 for s in take.sizes[:-extra]):
        raise ValueError(f"take from {take.source!r}: stacked output dims must have size 1")
    if not n_src:   # 0-d source: one whole chunk
        return [(c, (), take.dst_start, take.sizes, 1) for c in index.chunks]
    row_box, row_src = _row_axis(n_src, n_dst)
    step = take.src_step
    piece_step = step if row_box < n_dst else 1
    # The source box per source dim as (start, count, step); fixed leading dims have count 1.
    box = []
    for sd in range(n_src):
        k = sd - extra
        count = take.sizes[k] if k >= 0 else 1
        box.append((take.src_start[sd], count, step if sd == row_src else 1))
    pieces = []
    for c in index.candidates(box):
        src_local, dst, sizes = [], list(take.dst_start), list(take.sizes)
        for sd, (start, count, st) in enumerate(box):
            c0, c1 = c.offsets[sd], c.offsets[sd] + c.sizes[sd]
            i_lo = max(0, -((start - c0) // st))         # ceil((c0 - start) / st)
            i_hi = min(count, -((start - c1) // st))     # ceil((c1 - start) / st)
            if i_lo >= i_hi:
                break
            src_local.append(start + i_lo * st - c0)
            k = sd - extra
            if k >= 0:
                dst[k] += i_lo
                sizes[k] = i_hi - i_lo
        else:
            pieces.append((c, tuple(src_local), tuple(dst), tuple(sizes), piece_step))
    return pieces


def cut(take: Take, source_shape: Shape, index) -> List[Piece]:
    """The pieces of `take`: its source box intersected with every stored chunk it crosses."""
    return [Piece(*found) for found in cut_boxes(take, source_shape, index)]


def cut_all(takes: Sequence[Take], sources: Dict[str, Tuple[Shape, Sequence[Chunk]]],
            indexes: Optional[Dict[Tuple[str, int, int], object]] = None, cutter=cut) -> List[list]:
    """Each take cut along its source's chunks (deduplicated, proven to tile the source, by the caller).
    `indexes`: the sources' chunk indexes, kept by the caller across the outputs of one source (a stacked
    source has one output per layer or expert). `cutter`: `cut` (Pieces) or `cut_boxes` (tuples)."""
    indexes = {} if indexes is None else indexes
    out: List[List[Piece]] = []
    for take in takes:
        shape, chunks = sources[take.source]
        extra = len(shape) - len(take.sizes)
        key = (take.source, id(chunks), extra)
        if key not in indexes:
            # Unstacked sources are indexed by the leading dims a take fixes; others by the row dim.
            if LeadIndex.fits(chunks, extra):
                indexes[key] = LeadIndex(chunks, extra)
            else:
                dim = 0 if not shape or extra > 0 else _row_axis(len(shape), len(take.sizes))[1]
                indexes[key] = ChunkIndex(chunks, dim)
        out.append(cutter(take, shape, indexes[key]))
    return out


def flatten(groups: Iterable[Sequence[Piece]]) -> Tuple[Piece, ...]:
    return tuple(sorted((p for g in groups for p in g), key=lambda p: p.dst_start))


def pieces_for(takes: Sequence[Take], sources: Dict[str, Tuple[Shape, Sequence[Chunk]]]) -> Tuple[Piece, ...]:
    return flatten(cut_all(takes, sources))


# -- geometry used by the executor and the proof --------------------------------------------------------------


def piece_strides(piece: Piece, out_shape: Shape) -> Tuple[List[int], List[int], int]:
    """(output strides, source strides, source base) in elements, one stride per box dim; the source base is the
    element index of the piece's first element inside its chunk."""
    chunk_strides = row_major_strides(piece.chunk.sizes)
    base = sum(i * s for i, s in zip(piece.src_start, chunk_strides))
    return row_major_strides(out_shape), _source_strides(chunk_strides, piece.src_step, len(out_shape)), base


def _source_strides(chunk_strides: Sequence[int], src_step: int, n_dst: int) -> List[int]:
    """The source stride of each box dim of a piece read from a chunk of these strides with this row step."""
    extra = len(chunk_strides) - n_dst
    row_box, _ = _row_axis(len(chunk_strides), n_dst)
    src = []
    for k in range(n_dst):
        sd = k + extra
        stride = chunk_strides[sd] if sd >= 0 else 0
        src.append(stride * (src_step if k == row_box else 1))
    return src


def run_split(sizes: Sequence[int], dst_strides: Sequence[int], src_strides: Sequence[int]) -> Tuple[int, int]:
    """(k, run_elements): dims k.. of the box are one contiguous run in both output and source; dims before k
    are iterated. Size-1 dims merge whatever their strides."""
    run = 1
    k = len(sizes)
    while k > 0:
        size = sizes[k - 1]
        if size != 1 and (dst_strides[k - 1] != run or src_strides[k - 1] != run):
            break
        run *= size
        k -= 1
    return k, run


def is_contiguous_piece(piece: Piece, out_shape: Shape) -> bool:
    """True when the piece is one contiguous byte run of both the output and its chunk (copy straight through)."""
    return is_contiguous_geometry(piece.chunk.sizes, piece.sizes, piece.src_step, out_shape)


def is_contiguous_geometry(chunk_sizes: Sequence[int], sizes: Sequence[int], src_step: int, out_shape: Shape) -> bool:
    """`is_contiguous_piece` of a piece of these `sizes` and row step read from a chunk of `chunk_sizes`: all it
    depends on."""
    src = _source_strides(row_major_strides(chunk_sizes), src_step, len(out_shape))
    k, _ = run_split(sizes, row_major_strides(out_shape), src)
    return all(s == 1 for s in sizes[:k])


def _describe(piece: Piece) -> str:
    c = piece.chunk
    return (f"output box at {list(piece.dst_start)} sizes {list(piece.sizes)} from chunk at {list(c.offsets)} "
            f"({c.location.relative_path})")


def _check_bounds(name: str, shape: Shape, p: Piece) -> None:
    """The piece's output box lies in `shape` and its source box (with the row step) inside its chunk."""
    ndim = len(shape)
    if len(p.dst_start) != ndim or len(p.sizes) != ndim or len(p.src_start) != len(p.chunk.sizes):
        raise CoverageError(f"tensor {name!r}: {_describe(p)} has the wrong number of dims for {list(shape)}")
    for d, (o, s, full) in enumerate(zip(p.dst_start, p.sizes, shape)):
        if o < 0 or s <= 0 or o + s > full:
            raise CoverageError(f"tensor {name!r}: {_describe(p)} runs outside {list(shape)} in dim {d}")
    n_src = len(p.chunk.sizes)
    extra = n_src - ndim
    row_box, _ = _row_axis(n_src, ndim)
    for sd, (start, size) in enumerate(zip(p.src_start, p.chunk.sizes)):
        k = sd - extra
        extent = 1 if k < 0 else (p.sizes[k] - 1) * (p.src_step if k == row_box else 1) + 1
        if start < 0 or start + extent > size:
            raise CoverageError(f"tensor {name!r}: {_describe(p)} reads outside its chunk {list(p.chunk.sizes)}")


def _first_overlap(boxes: Sequence[Tuple[Tuple[int, ...], Tuple[int, ...], object]]):
    """Two of (start, sizes, label) boxes that overlap, or None. Sorted sweep along dim 0."""
    ordered = sorted(boxes, key=lambda b: b[0])
    for i, (a0, asz, a) in enumerate(ordered):
        for b0, bsz, b in ordered[i + 1:]:
            if a0 and b0[0] >= a0[0] + asz[0]:
                break
            if all(ao < bo + bs and bo < ao + az for ao, az, bo, bs in zip(a0, asz, b0, bsz)):
                return a, b
    return None


def check_pieces(name: str, shape: Shape, pieces: Sequence[Piece]) -> None:
    """Raise CoverageError unless `pieces` lie inside their chunks and cover `shape` exactly once (in bounds, no
    two overlapping, volumes adding up), as `coverage.check_coverage` proves for chunks. Pairwise: for any pieces;
    the planner uses the cheaper `check_gather`."""
    for p in pieces:
        _check_bounds(name, shape, p)
    clash = _first_overlap([(p.dst_start, p.sizes, p) for p in pieces])
    if clash:
        raise CoverageError(f"tensor {name!r}: pieces overlap: {_describe(clash[0])} and {_describe(clash[1])}")
    covered = sum(p.numel for p in pieces)
    if covered != numel(shape):
        raise CoverageError(f"tensor {name!r}: pieces cover {covered} of {numel(shape)} elements of {list(shape)}; "
                            "the transform's source rows do not fill the output")


def check_gather(name: str, shape: Shape, takes: Sequence[Take], groups: Sequence[Sequence[Piece]]) -> None:
    """The same proof for pieces cut from takes (`groups[i]` from `takes[i]`), in time linear in the pieces: every
    piece in bounds; the takes' output boxes in bounds, disjoint and adding up to the output; each take's pieces
    adding up to the take. Pieces of one take come from disjoint chunks (the sources' chunks were proven to tile
    them) through a one-to-one box map, so they are disjoint too: every element is written exactly once."""
    check_takes(name, shape, takes)
    for t, group in zip(takes, groups):
        for p in group:
            _check_bounds(name, shape, p)
        check_take_filled(name, t, sum(p.numel for p in group))


def check_takes(name: str, shape: Shape, takes: Sequence[Take]) -> None:
    """The takes' part of `check_gather`: their output boxes in bounds, disjoint and adding up to the output."""
    for t in takes:
        if len(t.sizes) != len(shape) or any(o < 0 or s <= 0 or o + s > full
                                             for o, s, full in zip(t.dst_start, t.sizes, shape)):
            raise CoverageError(f"tensor {name!r}: a take from {t.source!r} at {list(t.dst_start)} sizes "
                                f"{list(t.sizes)} runs outside {list(shape)}")
    clash = _first_overlap([(t.dst_start, t.sizes, t) for t in takes])
    if clash:
        raise CoverageError(f"tensor {name!r}: takes from {clash[0].source!r} and {clash[1].source!r} overlap at "
                            f"{list(clash[0].dst_start)} / {list(clash[1].dst_start)}")
    total = sum(numel(t.sizes) for t in takes)
    if total != numel(shape):
        raise CoverageError(f"tensor {name!r}: the transform fills {total} of {numel(shape)} elements of "
                            f"{list(shape)}")


def check_take_filled(name: str, take: Take, covered: int) -> None:
    """The elements `take`'s pieces cover (`covered`) are the take's: its source holds all it reads."""
    if covered != numel(take.sizes):
        raise CoverageError(f"tensor {name!r}: the stored chunks of {take.source!r} cover "
                            f"{covered} of the {numel(take.sizes)} elements read at "
                            f"{list(take.src_start)}; the source is shorter than the transform expects")


def distinct_chunks(pieces: Iterable[Piece]) -> Tuple[Chunk, ...]:
    seen: Dict[Chunk, None] = {}
    for p in pieces:
        seen.setdefault(p.chunk, None)
    return tuple(seen)



@dataclass(frozen=True)
class Derived(TensorEntry):
    """An output tensor made by a transform: its own shape, the source entries it reads and the takes that fill
    it. It is a `TensorEntry` (fqn: the source key; chunks: the sources' chunks) so name selection treats it like
    any tensor; the planner turns its takes into pieces."""

    sources: Tuple[TensorEntry, ...] = ()
    takes: Tuple[Take, ...] = ()


@dataclass(frozen=True)
class Transposed(TensorEntry):
    """An output tensor that is its source with its dims permuted: output dim k is source dim `axes[k]`. Its
    chunks are the source's chunks in output coordinates (offsets and sizes permuted, the same bytes), so coverage
    and sharding prove and place it like any tensor; only the executor knows each chunk's bytes are in the source's
    dim order."""

    axes: Tuple[int, ...] = ()


def transposed(entry: TensorEntry, axes: Sequence[int]) -> Transposed:
    """`entry` with its dims in the order `axes` (a permutation of its dims)."""
    axes = tuple(axes)
    if sorted(axes) != list(range(len(entry.shape))):
        raise ValueError(f"tensor {entry.fqn!r}: {list(axes)} is not a permutation of its {len(entry.shape)} dims")

    def permute(values):
        return tuple(values[a] for a in axes)
    chunks = tuple(Chunk(permute(c.offsets), permute(c.sizes), c.location) for c in entry.chunks)
    return Transposed(fqn=entry.fqn, dtype=entry.dtype, shape=permute(entry.shape), chunks=chunks, path=entry.path,
                      axes=axes)
