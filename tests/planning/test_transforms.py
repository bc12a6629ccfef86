"""Transforms as data, at the planner level: row maps equal torch's ops on real tensors, and pieces cut along any
chunking cover every output element exactly once and read the element torch's op puts there."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamconv.planning import transforms as tf
from streamconv.errors import CoverageError, ReferenceMismatchError
from streamconv.model import BlobLocation, Chunk
from streamconv.planning.trainers.adapter import row_map
from tests.support.pieces import assemble


def apply_rows(row_map, source):
    out = torch.empty((tf.rows_out(row_map),) + tuple(source.shape[1:]), dtype=source.dtype)
    for r in row_map:
        out[r.dst:r.dst + r.count] = source[r.src:r.src + (r.count - 1) * r.step + 1:r.step]
    return out


def torch_rope(w, n_heads):      # the permutation of torchtitan's `_permute` / torchtune's `tune_to_hf`
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("n_heads,head_dim", [(1, 2), (4, 16), (3, 8), (8, 128)])
def test_rope_half_split_is_torchs_permutation(n_heads, head_dim):
    w = torch.randn(n_heads * head_dim, 5)
    assert torch.equal(apply_rows(tf.rope_half_split(n_heads * head_dim, n_heads), w), torch_rope(w, n_heads))
    # the inverse map undoes it
    back = apply_rows(tf.rope_interleave(n_heads * head_dim, n_heads), torch_rope(w, n_heads))
    assert torch.equal(back, w)


def test_rope_refuses_odd_geometry():
    # head counts come from the reference config: a wrong base model, exit 4 (ReferenceMismatchError)
    with pytest.raises(ReferenceMismatchError, match="head counts"):
        tf.rope_half_split(12, 5)
    with pytest.raises(ReferenceMismatchError, match="even head size"):
        tf.rope_half_split(12, 4)


@pytest.mark.parametrize("n_heads,n_kv,hd", [(4, 2, 16), (8, 1, 4), (6, 6, 2), (12, 4, 8)])
def test_qkv_parts_equal_torch_split(n_heads, n_kv, hd):
    heads = tf.Heads(n_heads, n_kv, hd)
    cols = 3
    fused = torch.randn(tf.qkv_rows(heads), cols)
    # grouped per query group (Megatron linear_qkv, torchtitan FusedQKVLinear)
    g = fused.view(n_kv, n_heads // n_kv + 2, hd, cols)
    want = {"q": g[:, :-2].reshape(-1, cols), "k": g[:, -2].reshape(-1, cols), "v": g[:, -1].reshape(-1, cols)}
    for part, expected in want.items():
        assert torch.equal(apply_rows(tf.qkv_part(part, heads, grouped=True), fused), expected)
    # concatenated [q; k; v]
    q, k, v = torch.split(fused, [n_heads * hd, n_kv * hd, n_kv * hd])
    for part, expected in zip("qkv", (q, k, v)):
        assert torch.equal(apply_rows(tf.qkv_part(part, heads, grouped=False), fused), expected)
    # composed: RoPE on the q rows of a grouped qkv
    rope_q = row_map((("qkv_grouped", "q"), ("rope", "q")), tf.qkv_rows(heads), heads, "w")
    assert torch.equal(apply_rows(rope_q, fused), torch_rope(want["q"], n_heads))
    gate, up = torch.chunk(torch.randn(10, 3), 2)
    both = torch.cat([gate, up])
    assert torch.equal(apply_rows(tf.half(10, 0), both), gate) and torch.equal(apply_rows(tf.half(10, 1), both), up)


# -- pieces over arbitrary chunkings ---------------------------------------------------------------------------


def grid_chunks(shape, cuts):
    bounds = [[0] + sorted(set(c)) + [s] for c, s in zip(cuts, shape)]
    ranges = [[(lo, hi) for lo, hi in zip(b, b[1:]) if hi > lo] for b in bounds]
    return [Chunk(tuple(lo for lo, _ in box), tuple(hi - lo for lo, hi in box), BlobLocation(f"f{i}", i, 1))
            for i, box in enumerate(itertools.product(*ranges))]


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["rope", "qkv", "half", "unstack_qkv", "unstack", "whole"]))
    n_kv = draw(st.integers(1, 3))
    heads = tf.Heads(n_kv * draw(st.integers(1, 3)), n_kv, 2 * draw(st.integers(1, 3)))
    cols = draw(st.integers(1, 5))
    layers = draw(st.integers(1, 3))
    if kind == "rope":
        shape, steps, lead = (heads.n_heads * heads.head_dim, cols), (("rope", "q"),), ()
    elif kind == "qkv":
        shape, steps, lead = (tf.qkv_rows(heads), cols), ((("qkv_grouped", draw(st.sampled_from("qkv")))),
                                                            ("rope", "kv")), ()
        if steps[0][1] == "q":
            steps = (steps[0], ("rope", "q"))
        elif steps[0][1] == "v":
            steps = steps[:1]
    elif kind == "half":
        shape, steps, lead = (2 * draw(st.integers(1, 6)), cols), (("half", str(draw(st.integers(0, 1)))),), ()
    elif kind == "unstack_qkv":
        shape, steps = (layers, tf.qkv_rows(heads), cols), (("qkv_grouped", draw(st.sampled_from("qkv"))),)
        lead = (draw(st.integers(0, layers - 1)),)
    elif kind == "unstack":
        shape, steps, lead = (layers, draw(st.integers(1, 6))), (), (draw(st.integers(0, layers - 1)),)
    else:
        shape, steps, lead = (draw(st.integers(1, 7)), cols), (), ()
    cuts = [draw(st.lists(st.integers(0, s), max_size=3)) for s in shape]
    return shape, steps, lead, heads, cuts


@given(cases())
@settings(max_examples=300, deadline=None)
def test_pieces_cover_the_output_exactly_once_and_match_torch(case):
    shape, steps, lead, heads, cuts = case
    source = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    rows = row_map(steps, shape[len(lead)], heads, "w") if len(shape) > len(lead) else None
    takes = tf.takes_from_rows("w", shape, rows, lead=lead)
    out_shape = tf.output_shape_of_rows(shape, rows, lead=lead)
    groups = tf.cut_all(takes, {"w": (shape, grid_chunks(shape, cuts))})
    tf.check_gather("w", out_shape, takes, groups)
    pieces = tf.flatten(groups)
    tf.check_pieces("w", out_shape, pieces)
    out, hits = assemble(pieces, out_shape, source)
    assert (hits == 1).all()
    sub = torch.from_numpy(source[lead] if lead else source)
    assert torch.equal(torch.from_numpy(out), torch_reference(steps, sub, heads))


def torch_reference(steps, w, heads):
    """The same steps done with torch ops on the whole tensor (independently of the row maps)."""
    for kind, arg in steps:
        if kind == "rope":
            w = torch_rope(w, heads.n_heads if arg == "q" else heads.n_kv_heads)
        elif kind == "qkv_grouped":
            per = heads.n_heads // heads.n_kv_heads
            g = w.reshape(heads.n_kv_heads, per + 2, heads.head_dim, *w.shape[1:])
            part = {"q": g[:, :per], "k": g[:, per], "v": g[:, per + 1]}[arg]
            w = part.reshape(-1, *w.shape[1:])
        elif kind == "half":
            w = torch.chunk(w, 2)[int(arg)]
    return w


def test_check_pieces_refuses_gaps_and_overlaps():
    shape = (4, 2)
    chunk = grid_chunks(shape, [[], []])[0]
    full = tf.Piece(chunk, (0, 0), (0, 0), (4, 2))
    tf.check_pieces("w", shape, [full])
    with pytest.raises(CoverageError, match="overlap"):
        tf.check_pieces("w", shape, [full, tf.Piece(chunk, (0, 0), (1, 0), (1, 2))])
    with pytest.raises(CoverageError, match="cover 4 of 8"):
        tf.check_pieces("w", shape, [tf.Piece(chunk, (0, 0), (0, 0), (2, 2))])
    with pytest.raises(CoverageError, match="outside its chunk"):
        tf.check_pieces("w", shape, [tf.Piece(chunk, (1, 0), (0, 0), (4, 2))])
    with pytest.raises(CoverageError, match="outside its chunk"):
        tf.check_pieces("w", (2, 2), [tf.Piece(chunk, (0, 0), (0, 0), (2, 2), src_step=4)])


def test_check_gather_refuses_overlapping_takes_and_short_sources():
    shape = (4, 2)
    chunks = grid_chunks(shape, [[2], []])
    whole = tf.Take("w", (0, 0), (0, 0), (4, 2))
    tf.check_gather("w", shape, [whole], tf.cut_all([whole], {"w": (shape, chunks)}))
    a, b = tf.Take("w", (0, 0), (0, 0), (3, 2)), tf.Take("w", (1, 0), (2, 0), (2, 2))
    with pytest.raises(CoverageError, match="overlap"):
        tf.check_gather("w", shape, [a, b], tf.cut_all([a, b], {"w": (shape, chunks)}))
    half = tf.Take("w", (0, 0), (0, 0), (2, 2))
    with pytest.raises(CoverageError, match="fills 4 of 8"):
        tf.check_gather("w", shape, [half], tf.cut_all([half], {"w": (shape, chunks)}))
    # the source holds only rows 0..1: the take reads past its stored chunks
    short = grid_chunks((2, 2), [[], []])
    with pytest.raises(CoverageError, match="cover 4 of the 8"):
        tf.check_gather("w", shape, [whole], tf.cut_all([whole], {"w": ((2, 2), short)}))


def test_rope_over_fsdp_chunks_makes_two_pieces_per_head_and_chunk():
    heads, cols = tf.Heads(8, 2, 16), 4
    shape = (heads.n_heads * heads.head_dim, cols)
    chunks = grid_chunks(shape, [[64], []])
    takes = tf.takes_from_rows("w", shape, tf.rope_half_split(shape[0], heads.n_heads))
    pieces = tf.pieces_for(takes, {"w": (shape, chunks)})
    assert len(pieces) == 2 * heads.n_heads      # chunk edges fall on head edges
    assert {p.src_step for p in pieces} == {2}
    assert not any(tf.is_contiguous_piece(p, shape) for p in pieces)


def test_stack_along_a_new_leading_dim_equals_torch_stack():
    rows, cols = 6, 3
    sources = {f"w{i}": torch.randn(rows, cols) for i in range(3)}
    chunks = {n: grid_chunks((rows, cols), [[2, 5], [1]]) for n in sources}
    takes = [tf.Take(n, (0, 0), (i, 0, 0), (1, rows, cols)) for i, n in enumerate(sources)]
    pieces = tf.pieces_for(takes, {n: ((rows, cols), chunks[n]) for n in sources})
    out_shape = (3, rows, cols)
    tf.check_pieces("stacked", out_shape, pieces)
    out = torch.zeros(out_shape)
    for p in pieces:
        name = next(n for n, cs in chunks.items() if p.chunk in cs and any(p.chunk is c for c in cs))
        c = p.chunk
        block = sources[name][c.offsets[0]:c.offsets[0] + c.sizes[0], c.offsets[1]:c.offsets[1] + c.sizes[1]]
        r0, c0 = p.src_start
        out[p.dst_start[0], p.dst_start[1]:p.dst_start[1] + p.sizes[1], p.dst_start[2]:p.dst_start[2] + p.sizes[2]] = \
            block[r0:r0 + p.sizes[1], c0:c0 + p.sizes[2]]
    assert torch.equal(out, torch.stack(list(sources.values())))
