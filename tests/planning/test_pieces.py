"""planning/pieces.py: a transformed tensor's pieces kept as a `PieceTable` (and its chunks as a view of its source's
`ChunkTable`), and the general form (tuples of `Piece` and `Chunk`, STREAMCONV_NO_FAST_PATHS=1) as the tested
fallback: both plan every real checkpoint to the same pieces, chunks, headers and fingerprints."""
from __future__ import annotations

import pickle
import tracemalloc

import pytest

import streamconv
from benchmarks import metadata_scale
from streamconv.model import ChunkTable
from streamconv.output import ledger
from streamconv.planning import plan as planning
from streamconv.planning.pieces import PieceTable
from streamconv.source.io import DirectoryReader
from streamconv.source.metadata import load_metadata
from tests.support import dcp_writers


def _both(monkeypatch, make):
    """(packed plan, general plan) of `make()`, the general one planned with STREAMCONV_NO_FAST_PATHS=1 (the packed
    one with it 0: `make test-no-fast-paths` sets it for the whole run)."""
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "0")
    packed = make()
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "1")
    assert not planning.pieces_packed()
    general = make()
    monkeypatch.delenv("STREAMCONV_NO_FAST_PATHS")
    return packed, general


def _assert_same_plan(packed, general) -> None:
    assert [s.filename for s in packed.shards] == [s.filename for s in general.shards]
    for a, b in zip(packed.shards, general.shards):
        assert a.header == b.header
        assert ledger.shard_fingerprint(a) == ledger.shard_fingerprint(b)
        for ta, tb in zip(a.tensors, b.tensors, strict=True):
            assert isinstance(tb.pieces, tuple) and not isinstance(tb.chunks, ChunkTable) or not tb.pieces
            assert list(ta.pieces) == list(tb.pieces), ta.name          # every piece, chunk included
            assert list(ta.chunks) == list(tb.chunks), ta.name
            assert (ta.is_row_contiguous, ta.assembly, ta.is_compressed) == (
                tb.is_row_contiguous, tb.assembly, tb.is_compressed), ta.name
            assert ta == tb
    assert ledger.plan_fingerprint(packed) == ledger.plan_fingerprint(general)
    a, b = packed.to_dict(), general.to_dict()
    assert a.pop("predicted_peak_bytes") == packed.peak_bytes and b.pop("predicted_peak_bytes") == general.peak_bytes
    assert a == b
    # the general form predicts its own per-chunk cost (plan.GENERAL_PER_CHUNK_BYTES), and differs in nothing else
    extra = general.peak_bytes - packed.peak_bytes
    per_chunk = planning.GENERAL_PER_CHUNK_BYTES - planning.PER_CHUNK_BYTES
    assert extra > 0 and extra % per_chunk == 0, (extra, per_chunk)
    assert packed.index() == general.index()


@pytest.mark.parametrize("name", list(dcp_writers.CHECKPOINTS))
def test_every_layout_plans_the_same_packed_and_general(dcp_checkpoints, name, monkeypatch):
    path = dcp_checkpoints[name]
    packed, general = _both(monkeypatch, lambda: streamconv.plan(str(path), no_config=True))
    _assert_same_plan(packed, general)


EXPERTS, FFN, DIM = 4, 16, 8
MOE_PREFIX = "layers.0.moe.routed_experts.inner_experts."


def write_small_experts(rank, world_size, out_dir):
    """torchtitan's grouped experts, FSDP-sharded on the expert dim (w1, w3) and on the model dim (w2: every
    expert is pieces of both ranks' chunks)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(0)
    full = {"w1_EFD": torch.rand(EXPERTS, FFN, DIM, generator=gen), "w3_EFD": torch.rand(EXPERTS, FFN, DIM, generator=gen),
            "w2_EDF": torch.rand(EXPERTS, DIM, FFN, generator=gen)}
    state = {MOE_PREFIX + name: DTensor.from_local(w.chunk(world_size, dim=1 if name == "w2_EDF" else 0)[rank].clone(),
                                                   mesh, [Shard(1 if name == "w2_EDF" else 0)], run_check=False)
             for name, w in full.items()}
    state["layers.0.moe.router.gate.weight"] = torch.ones(EXPERTS, DIM)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def transformed(tmp_path_factory):
    """Real torch-written checkpoints whose outputs are gathers of pieces: torchtitan Llama under tensor
    parallelism (RoPE rows of column-split q/k) and torchtitan's grouped MoE experts (unstacked)."""
    from streamconv.demo_checkpoint import run_distributed
    from tests.support import trainer_writers

    root = tmp_path_factory.mktemp("transformed")
    llama = trainer_writers.build(root / "llama-tp", "torchtitan", "tp")
    run_distributed("tests.planning.test_pieces:write_small_experts", 2, dict(out_dir=str(root / "moe")))
    return {"rope": lambda: streamconv.plan(str(llama / "ckpt"), config_from=str(llama / "base")),
            "experts": lambda: streamconv.plan(str(root / "moe"), source_format="torchtitan-qwen3", no_config=True)}


@pytest.mark.parametrize("case", ["rope", "experts"])
def test_transformed_tensors_plan_the_same_packed_and_general(transformed, case, monkeypatch):
    packed, general = _both(monkeypatch, transformed[case])
    _assert_same_plan(packed, general)
    tables = [t for t in packed.tensors if isinstance(t.pieces, PieceTable)]
    assert len(tables) >= 4 and all(isinstance(t.chunks, ChunkTable) for t in tables)
    assert sum(len(t.pieces) for t in packed.tensors) == sum(len(t.pieces) for t in general.tensors)
    if case == "experts":
        assert len(tables) == 3 * EXPERTS and {len(t.pieces) for t in tables} == {1, 2}


@pytest.fixture(scope="module")
def many_pieces(tmp_path_factory):
    """DeepSeek-V3's layout scaled down (benchmarks/metadata_scale.py): 3 layers, 64 experts over EP 8 x FSDP 8,
    so each of the 384 expert outputs gathers 8 pieces, as at full scale."""
    out = tmp_path_factory.mktemp("pieces") / "ckpt"
    metadata_scale.write(out, layers=3, dense_layers=1, experts=64, ep=8, fsdp=8)
    return load_metadata(DirectoryReader(out))


def _planned_bytes(meta):
    """(plan, bytes the plan keeps, most bytes held while planning), traced."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conversion = planning.build_plan(meta)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return conversion, kept - before, peak - before


def test_a_many_piece_plan_keeps_its_pieces_as_rows_not_objects(many_pieces, monkeypatch):
    """The plan holds no Piece objects: its memory per piece is a row of numbers plus its share of the tensor's
    own objects. The general form (a Piece and its tuples each, the chunks as objects) keeps more than twice as
    much; materialising every tensor's pieces for the whole plan at once would too."""
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "0")
    conversion, kept, peak = _planned_bytes(many_pieces)
    pieces = sum(len(t.pieces) for t in conversion.tensors)
    assert pieces == 8 * 64 * 3 * 2          # 8 pieces for each of 64 experts' 3 weights in 2 MoE layers
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "1")
    general, general_kept, _ = _planned_bytes(many_pieces)
    assert sum(len(t.pieces) for t in general.tensors) == pieces
    # measured (CPython 3.11): 211 bytes a piece packed, the tensors' own objects included; 544 in general form
    assert kept / pieces < 250 and general_kept > 2 * kept, (kept / pieces, general_kept / pieces)
    assert peak - kept < general_kept - kept        # planning never held every tensor's pieces as objects
    experts = [t for t in conversion.tensors if isinstance(t.pieces, PieceTable)]
    assert len(experts) == 64 * 3 * 2
    table = experts[0].pieces
    assert len(table.rows) == len(table) * (2 + 3 + 2 * 2)      # 9 numbers a piece: chunk, step, 3 + 2 + 2 dims


def test_a_piece_table_is_a_sequence_of_its_pieces_and_pickles(many_pieces, monkeypatch):
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "0")
    conversion = planning.build_plan(many_pieces)
    t = next(t for t in conversion.tensors if isinstance(t.pieces, PieceTable))
    pieces = tuple(t.pieces)
    assert t.pieces == pieces and t.pieces[-1] == pieces[-1] and t.pieces[1:3] == pieces[1:3]
    assert {p.chunk for p in pieces} == set(t.chunks) and len(t.chunks) == 8
    with pytest.raises(IndexError):
        t.pieces[len(pieces)]
    again = pickle.loads(pickle.dumps(t))       # Ray ships plans to its tasks
    assert again == t and list(again.pieces) == list(pieces) and again.is_row_contiguous == t.is_row_contiguous
