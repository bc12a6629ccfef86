"""Planner tests: metadata built by hand (no files), literal expected plans, and properties."""
import json

import pytest
from hypothesis import given, settings, strategies as st

from streamconv.planning.coverage import check_coverage, dedup_chunks
from streamconv.errors import CoverageError, OptionsError
from streamconv.model import BytesEntry, CheckpointMetadata, Chunk
from streamconv.planning.names import RenameRule, natural_key, strip_wrappers
from streamconv.planning.plan import PlanOptions, build_plan
from tests.support.plan_builders import dim0_chunks, loc, tensor


def llama_like_meta():
    return CheckpointMetadata(
        tensors=(
            tensor("model.lm_head.weight", (10, 4), chunks=dim0_chunks(10, 4, 3)),
            tensor("model.model.layers.10.w", (4, 4)),
            tensor("model.model.layers.2.w", (4, 4)),
            tensor("model.model.embed_tokens.weight", (10, 4), chunks=dim0_chunks(10, 4, 3)),
            tensor("model.model.norm.weight", (4,), dtype="bfloat16"),
            tensor("optim.state.model.norm.weight.exp_avg", (4,), path=("optim", "state", "model.norm.weight",
                                                                         "exp_avg")),
        ),
        byte_entries=(BytesEntry("optim.param_groups.0.lr", loc(0), ("optim", "param_groups", 0, "lr")),),
    )


def test_literal_plan_single_file():
    plan = build_plan(llama_like_meta())
    assert plan.subtree == "model"
    assert [s.filename for s in plan.shards] == ["model.safetensors"]
    shard = plan.shards[0]
    # fp32 before bf16 (alignment), then natural name order: layers.2 before layers.10.
    assert [t.name for t in shard.tensors] == [
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.2.w", "model.layers.10.w", "model.norm.weight"]
    header_len = int.from_bytes(shard.header[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(shard.header[8:])
    assert header["__metadata__"] == {"format": "pt"}
    assert header["lm_head.weight"] == {"dtype": "F32", "shape": [10, 4], "data_offsets": [0, 160]}
    assert header["model.embed_tokens.weight"]["data_offsets"] == [160, 320]
    assert header["model.layers.2.w"]["data_offsets"] == [320, 384]
    assert header["model.layers.10.w"]["data_offsets"] == [384, 448]
    assert header["model.norm.weight"] == {"dtype": "BF16", "shape": [4], "data_offsets": [448, 456]}
    first = shard.tensors[0]
    assert first.begin == len(shard.header) and first.nbytes == 160
    assert shard.nbytes == len(shard.header) + 456
    assert plan.total_bytes == 456
    assert plan.index() is None
    assert {s.reason for s in plan.skipped} == {"optimizer state", "non-tensor"}
    assert first.chunks == dim0_chunks(10, 4, 3) and first.is_row_contiguous


def test_literal_plan_sharded_by_budget():
    plan = build_plan(llama_like_meta(), PlanOptions(max_shard_bytes=200))
    assert [s.filename for s in plan.shards] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert [[t.name for t in s.tensors] for s in plan.shards] == [
        ["lm_head.weight"],
        ["model.embed_tokens.weight"],
        ["model.layers.2.w", "model.layers.10.w", "model.norm.weight"]]
    index = plan.index()
    assert index["metadata"] == {"total_size": 456}
    assert index["weight_map"]["model.norm.weight"] == "model-00003-of-00003.safetensors"
    assert list(index["weight_map"]) == ["lm_head.weight", "model.embed_tokens.weight", "model.layers.2.w",
                                         "model.layers.10.w", "model.norm.weight"]


def test_cast_plan_halves_float_bytes_and_keeps_ints():
    meta = CheckpointMetadata(tensors=(tensor("model.w", (3, 5)), tensor("model.ids", (7,), dtype="int64")))
    plan = build_plan(meta, PlanOptions(dtype="bfloat16"))
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["w"].dst_dtype == "bfloat16" and by_name["w"].nbytes == 30
    assert by_name["ids"].dst_dtype == "int64" and by_name["ids"].nbytes == 56


def test_flat_state_dict_keeps_names_and_strips_wrappers():
    meta = CheckpointMetadata(tensors=(
        tensor("model.layers.0._orig_mod.w", (2,), path=("model.layers.0._orig_mod.w",)),
        tensor("module._fsdp_wrapped_module.lm_head.weight", (2,),
               path=("module._fsdp_wrapped_module.lm_head.weight",)),
    ))
    plan = build_plan(meta)
    assert plan.subtree is None
    assert sorted(t.name for t in plan.tensors) == ["lm_head.weight", "model.layers.0.w"]


def test_include_exclude_and_rename():
    meta = llama_like_meta()
    plan = build_plan(meta, PlanOptions(include=("*layers*",), exclude=("*.10.*",),
                                        renames=(RenameRule.parse(r"^model\.=base."),)))
    assert [t.name for t in plan.tensors] == ["base.layers.2.w"]


def test_rename_collision_is_an_options_error():
    with pytest.raises(OptionsError, match="both become"):
        build_plan(llama_like_meta(), PlanOptions(renames=(RenameRule.parse(r"layers\.\d+=layers.X"),)))


def test_bad_rename_and_options():
    with pytest.raises(OptionsError):
        RenameRule.parse("no-equals-sign")
    with pytest.raises(OptionsError):
        RenameRule.parse("([=x")
    with pytest.raises(OptionsError):
        PlanOptions(buffer_bytes=10)


def test_strip_wrappers_keeps_inner_module_segments():
    assert strip_wrappers("module.vision.module.proj") == "vision.module.proj"
    assert strip_wrappers("_orig_mod.model._checkpoint_wrapped_module.mlp.w") == "model.mlp.w"


def test_natural_key_orders_layers_numerically():
    assert sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_key) == ["l.1.w", "l.2.w", "l.10.w"]


def test_gap_is_a_coverage_error_naming_the_tensor():
    chunks = dim0_chunks(10, 4, 3)[:2]
    meta = CheckpointMetadata(tensors=(tensor("model.w", (10, 4), chunks=chunks),))
    with pytest.raises(CoverageError, match="'model.w'.*cover 32 of 40"):
        build_plan(meta)


def test_overlap_is_a_coverage_error():
    chunks = (Chunk((0, 0), (6, 4), loc(0)), Chunk((5, 0), (5, 4), loc(1)))
    with pytest.raises(CoverageError, match="overlap"):
        check_coverage("w", (10, 4), chunks)


def test_out_of_bounds_is_a_coverage_error():
    with pytest.raises(CoverageError, match="outside"):
        check_coverage("w", (4,), (Chunk((2,), (3,), loc(0)),))


def test_replicated_and_empty_chunks_are_dropped():
    a = Chunk((0, 0), (2, 2), loc(0))
    chunks = (a, Chunk((0, 0), (2, 2), loc(1)), Chunk((2, 0), (0, 2), loc(2)))
    assert dedup_chunks(chunks) == (a,)


# -- properties -------------------------------------------------------------------------------------

def grid_chunks(shape, cuts):
    """Split `shape` into a grid: cuts[d] is a sorted list of cut points inside dim d."""
    import itertools
    bounds = [[0] + sorted(set(c)) + [s] for c, s in zip(cuts, shape)]
    ranges = [[(lo, hi) for lo, hi in zip(b, b[1:]) if hi > lo] for b in bounds]
    out = []
    for i, box in enumerate(itertools.product(*ranges)):
        out.append(Chunk(tuple(lo for lo, _ in box), tuple(hi - lo for lo, hi in box), loc(i % 4, i)))
    return out


@st.composite
def tensor_entries(draw, index):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    cuts = [draw(st.lists(st.integers(1, max(1, s - 1)), max_size=3)) if s > 1 else [] for s in shape]
    chunks = grid_chunks(shape, cuts)
    dup = draw(st.booleans())
    if dup:
        chunks = chunks + chunks[:1]   # a replicated chunk
    order = draw(st.permutations(chunks))
    dtype = draw(st.sampled_from(["float32", "bfloat16", "int64", "float16"]))
    return tensor(f"model.layers.{index}.w", shape, dtype=dtype, chunks=tuple(order))


@st.composite
def metas(draw):
    n = draw(st.integers(1, 8))
    return CheckpointMetadata(tensors=tuple(draw(tensor_entries(i)) for i in range(n)))


@settings(max_examples=150, deadline=None)
@given(meta=metas(), budget=st.integers(1, 2000), reverse=st.booleans())
def test_plan_properties(meta, budget, reverse):
    if reverse:
        meta = CheckpointMetadata(tensors=tuple(reversed(meta.tensors)))
    plan = build_plan(meta, PlanOptions(max_shard_bytes=budget))
    # Every tensor planned exactly once, every element covered exactly once (volumes add up, no overlap).
    assert sorted(t.source_fqn for t in plan.tensors) == sorted(t.fqn for t in meta.tensors)
    for t in plan.tensors:
        check_coverage(t.name, t.shape, t.chunks)
    # Shards within budget unless a single tensor is larger.
    for shard in plan.shards:
        assert shard.data_nbytes <= budget or len(shard.tensors) == 1
        pos = len(shard.header)
        for t in shard.tensors:
            assert t.begin == pos
            pos += t.nbytes
    # Deterministic: independent of input order.
    again = build_plan(CheckpointMetadata(tensors=tuple(sorted(meta.tensors, key=lambda t: t.fqn))),
                       PlanOptions(max_shard_bytes=budget))
    assert [(s.filename, s.header) for s in again.shards] == [(s.filename, s.header) for s in plan.shards]


def test_renamed_lists_real_renames_not_the_subtree_unwrap():
    meta = CheckpointMetadata(tensors=(
        tensor("model.layers.0.w", (2,)),
        tensor("model._orig_mod.layers.1.w", (2,)),
    ))
    plan = build_plan(meta, PlanOptions(renames=(RenameRule.parse(r"layers\.0\.=blocks.0."),)))
    assert dict(plan.renamed) == {"model.layers.0.w": "blocks.0.w", "model._orig_mod.layers.1.w": "layers.1.w"}


def column_chunks(rows, cols, parts):
    """Tensor-parallel Shard(1): `parts` column blocks at offsets (0, c)."""
    step = cols // parts
    return tuple(Chunk((0, c), (rows, step), loc(i, 0, rows * step * 4)) for i, c in enumerate(range(0, cols, step)))


def test_predicted_peak_counts_the_buffer_a_tensor_touches():
    """Literal peaks: FSDP copies hold no buffer (nor numpy, nor an IO step: they go file to file in the kernel); a
    column-block tensor holds its bytes and one block's staging, up to each writer's share of the buffer, and no IO
    step (read straight into the buffer); a cast holds the wider of its input and output, and an IO step."""
    from streamconv.planning import plan as p
    from streamconv.planning.proven import pieces_packed
    copies = CheckpointMetadata(tensors=(tensor("model.a", (64, 1024), chunks=dim0_chunks(64, 1024, 4)),),
                                byte_entries=())
    blocks = CheckpointMetadata(tensors=(tensor("model.b", (64, 1024), chunks=column_chunks(64, 1024, 4)),),
                                byte_entries=())
    per_chunk = p.PER_CHUNK_BYTES if pieces_packed() else p.GENERAL_PER_CHUNK_BYTES   # (make test-no-fast-paths)
    base = p.BASE_RSS_BYTES + 4 * per_chunk
    assert build_plan(copies).peak_bytes == base
    # One tensor: one writer runs, whatever the default, so one IO step (as far as its 256 KiB of float32 reach).
    step = 256 * 1024
    assert step < p.IO_STEP_BYTES_PER_WRITER
    assert build_plan(copies, PlanOptions(dtype="bfloat16")).peak_bytes == base + step + p.NUMPY_RSS_BYTES + 256 * 1024
    plan = build_plan(blocks, PlanOptions(buffer_bytes=2**20))
    (t,) = plan.tensors
    assert p.buffer_need_bytes(t) == 256 * 1024 + 64 * 1024               # the tensor and one block staged
    assert plan.peak_bytes == base + p.NUMPY_RSS_BYTES + 320 * 1024
    small = build_plan(blocks, PlanOptions(buffer_bytes=128 * 1024))      # the buffer is the limit
    assert small.peak_bytes == base + p.NUMPY_RSS_BYTES + 128 * 1024
    four = p.with_writers(small, 4)
    assert four.peak_bytes == small.peak_bytes and four.workers == 4
    two = CheckpointMetadata(tensors=blocks.tensors + (tensor("model.c", (8, 8)),), byte_entries=())
    one_writer, two_writers = (p.with_writers(build_plan(two, PlanOptions(buffer_bytes=2**20)), w) for w in (1, 2))
    # A second writer adds nothing: the one assembled tensor is one writer's, the other tensor (a plain copy)
    # touches no buffer, and neither holds an IO step.
    assert two_writers.peak_bytes == one_writer.peak_bytes
    other = tensor("model.d", (64, 1024), chunks=column_chunks(64, 1024, 4))
    both = CheckpointMetadata(tensors=blocks.tensors + (other,), byte_entries=())
    one_writer, two_writers = (p.with_writers(build_plan(both, PlanOptions(buffer_bytes=2**20)), w) for w in (1, 2))
    # Two assembled tensors: each writer may touch the largest need from its own half of the buffer.
    assert two_writers.peak_bytes - one_writer.peak_bytes == 320 * 1024
    # Without copy_file_range/preadv each running writer holds one plain step; one tensor runs one writer
    # (tests/memory/test_zstd_strided_memory.py's strided case measured 38.7 MiB whatever --workers said).
    plain = step       # PLAIN_STEP_BYTES_PER_WRITER, as far as the 256 KiB tensors reach
    assert p.PLAIN_STEP_BYTES_PER_WRITER > step
    assert p.with_plain_io(four, 4).peak_bytes - four.peak_bytes == plain
    assert p.with_plain_io(two_writers, 2).peak_bytes - two_writers.peak_bytes == 2 * plain


def test_io_steps_are_predicted_for_the_writers_that_hold_one():
    """A writer holds an IO step outside the buffer when its tensors need one on the fast paths (a cast's work
    arrays, a zstd chunk's decoded pieces, pieces copied one step at a time); a run that checks CRCs, verifies or
    copies chunks without a recorded CRC gives every writer one (`with_io_step_each`, once)."""
    from streamconv.planning import plan as p
    step = 256 * 1024       # a step touches as much as the largest tensor (float32 64 x 1024) when that is < 1 MiB
    copies = [tensor(f"model.w{i}", (64, 1024), chunks=dim0_chunks(64, 1024, 4)) for i in range(3)]
    plain = p.with_writers(build_plan(CheckpointMetadata(tensors=tuple(copies), byte_entries=())), 3)
    assert not any(p.holds_io_step(t) for t in plain.tensors)
    each = p.with_io_step_each(plain, 3)
    assert each.peak_bytes - plain.peak_bytes == 3 * step and each.io_step_each
    assert p.with_io_step_each(each, 3) is each
    assert p.with_writers(each, 1).peak_bytes - p.with_writers(plain, 1).peak_bytes == step
    # --dtype bfloat16 casts the float32 tensor only (integers are kept): one writer of three holds a step
    ints = [tensor(f"model.i{i}", (64, 1024), dtype="int64", chunks=dim0_chunks(64, 1024, 4)) for i in range(2)]
    mixed = build_plan(CheckpointMetadata(tensors=(copies[0], *ints), byte_entries=()), PlanOptions(dtype="bfloat16"))
    assert [p.holds_io_step(t) for t in mixed.tensors] == [False, False, True]     # (in name order)
    assert p.with_writers(mixed, 3).peak_bytes == p.with_writers(mixed, 1).peak_bytes
    int64_step = 512 * 1024
    three = p.with_writers(mixed, 3)
    assert p.with_io_step_each(three, 3).peak_bytes - three.peak_bytes == 2 * int64_step
    # A tensor of 1 MiB or more: a whole step.
    big = build_plan(CheckpointMetadata(tensors=(tensor("model.big", (512, 1024), chunks=dim0_chunks(512, 1024, 4)),),
                                        byte_entries=()))
    assert p.with_io_step_each(big, 1).peak_bytes - big.peak_bytes == p.IO_STEP_BYTES_PER_WRITER


def test_predicted_peak_counts_left_out_chunks_at_what_decoding_keeps():
    """Optimizer state is decoded but never planned, cut or located: its chunks cost EXCLUDED_CHUNK_BYTES each in
    the prediction, a written tensor's PER_CHUNK_BYTES (at 1T scale with AdamW: 964k such chunks, 220 MiB)."""
    from streamconv.planning import plan as p
    model = tensor("model.a", (64, 1024), chunks=dim0_chunks(64, 1024, 4))
    moments = tuple(tensor(f"optim.state.model.a.{k}", (64, 1024), chunks=dim0_chunks(64, 1024, 8),
                           path=("optim", "state", "model.a", k)) for k in ("exp_avg", "exp_avg_sq"))
    alone = build_plan(CheckpointMetadata(tensors=(model,), byte_entries=()))
    with_optim = build_plan(CheckpointMetadata(tensors=(model,) + moments, byte_entries=()))
    assert [t.name for t in with_optim.tensors] == ["a"]
    assert [s.reason for s in with_optim.skipped] == ["optimizer state"] * 2
    assert with_optim.peak_bytes - alone.peak_bytes == 16 * p.EXCLUDED_CHUNK_BYTES
