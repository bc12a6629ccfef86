"""The checkpoint writers the suite relies on: each checkpoint exists, torch reads back exactly what was meant,
and the chunk layouts really are the ones each parallelism is supposed to produce (read with torch's own
`FileSystemReader.read_metadata`)."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from tests.support import dcp_writers
from tests.support.dcp_writers import load_expected, reference_state_dict, spawn
from streamconv.demo_checkpoint import DEMO_CONFIG, WorkerError

NAMES = list(dcp_writers.CHECKPOINTS)
Q = "model.model.layers.0.self_attn.q_proj.weight"
GATE = "model.model.layers.0.attn_gate"


def metadata(path):
    return FileSystemReader(str(path)).read_metadata()


def tensors(md):
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def chunks(md, key):
    """[(offsets, sizes)] as listed in the metadata (rank order, not sorted)."""
    return [(tuple(c.offsets), tuple(c.sizes)) for c in md.state_dict_metadata[key].chunks]


def split_dims(meta: TensorStorageMetadata):
    """Dimensions along which the chunks cut the tensor."""
    return tuple(d for d in range(len(meta.size))
                 if any(c.offsets[d] != 0 or c.sizes[d] != meta.size[d] for c in meta.chunks))


def layout_summary(md) -> Counter:
    """{(number of chunks, split dims, has an empty chunk): number of tensors}."""
    return Counter((len(m.chunks), split_dims(m), any(0 in c.sizes for c in m.chunks) and m.size.numel() > 0)
                   for m in tensors(md).values())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def distcp_files(path):
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".distcp"))


# ------------------------------------------------------------------------------------------------------------
# every checkpoint


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_is_complete(dcp_checkpoints, name):
    path = dcp_checkpoints[name]
    assert sorted(p.name for p in path.iterdir()) == [".metadata"] + distcp_files(path)
    assert dcp_writers.expected_path(path).is_file()
    md = metadata(path)
    assert md.version == "1.0.0"
    assert {info.relative_path for info in md.storage_data.values()} == set(distcp_files(path))


@pytest.mark.parametrize("name", NAMES)
def test_torch_reads_back_the_expected_tensors_bit_exact(dcp_checkpoints, name):
    path = dcp_checkpoints[name]
    ref, expected = reference_state_dict(path), load_expected(path)
    assert sorted(ref) == sorted(expected)
    for key, want in expected.items():
        got = ref[key]
        assert (got.dtype, tuple(got.shape)) == (want.dtype, tuple(want.shape)), key
        assert torch.equal(bits(got), bits(want)), key
    assert set(ref) == set(tensors(metadata(path)))


@pytest.mark.parametrize("name", NAMES)
def test_chunks_cover_every_element_once(dcp_checkpoints, name):
    for key, meta in tensors(metadata(dcp_checkpoints[name])).items():
        hits = np.zeros(tuple(meta.size), dtype=np.int32)
        for c in meta.chunks:
            assert all(o + s <= n for o, s, n in zip(c.offsets, c.sizes, meta.size)), key
            hits[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] += 1
        assert (hits == 1).all(), key


def test_layout_summary(dcp_checkpoints):
    """What each parallelism looks like on disk; the key features are asserted, the table is printed with -s
    (captured otherwise: it does not belong in the middle of `make test`'s dots)."""
    summary = {name: layout_summary(metadata(path)) for name, path in dcp_checkpoints.items()}
    print("\nchunk layouts: {(chunks, split dims, has empty chunk): tensors}")
    for name, counts in summary.items():
        print(f"  {name:16s} {dict(sorted(counts.items()))}")
    assert summary["fsdp2"][(3, (0,), False)] > 0 and summary["fsdp2"][(2, (0,), True)] == 2  # gates
    # size-1 gates and their exp_avg/exp_avg_sq are one chunk each (no empty chunk), as are the 29 0-d steps
    assert summary["fsdp1"][(1, (), False)] == 2 * 3 + 29 and not any(e for _, _, e in summary["fsdp1"])
    assert summary["tp"][(2, (1,), False)] == 4 and summary["tp"][(2, (0,), False)] > 0
    assert summary["tp"][(1, (), False)] == 7  # norms and gates, replicated
    assert summary["mesh2d"][(4, (0, 1), False)] == 4  # o_proj, down_proj: 2x2 grids
    assert summary["mesh2d"][(4, (0,), False)] > 0  # _StridedShard(0) + Shard(0)
    assert summary["dtensor_1d"][(2, (2,), False)] == 1
    assert summary["dtensor_2d"][(4, (0, 1), False)] == 2 and summary["dtensor_2d"][(4, (0,), False)] == 1


# ------------------------------------------------------------------------------------------------------------
# per layout


def test_fsdp2_uneven_chunks_and_empty_gate_chunk(dcp_checkpoints):
    md = metadata(dcp_checkpoints["fsdp2"])
    assert chunks(md, Q) == [((0, 0), (22, 64)), ((22, 0), (22, 64)), ((44, 0), (20, 64))]
    assert [s for _, s in chunks(md, "model.model.embed_tokens.weight")] == [(335, 64), (335, 64), (333, 64)]
    assert chunks(md, GATE) == [((0,), (1,)), ((1,), (0,))]
    assert distcp_files(dcp_checkpoints["fsdp2"]) == ["__0_0.distcp", "__1_0.distcp", "__2_0.distcp"]


def test_fsdp2_writer_options(dcp_checkpoints):
    base = metadata(dcp_checkpoints["fsdp2"])
    threads = metadata(dcp_checkpoints["fsdp2_threads"])
    assert distcp_files(dcp_checkpoints["fsdp2_threads"]) == [f"__{r}_{t}.distcp" for r in range(3) for t in (0, 1)]
    assert {k: chunks(threads, k) for k in tensors(threads)} == {k: chunks(base, k) for k in tensors(base)}

    multi = metadata(dcp_checkpoints["fsdp2_multifile"])
    paths = Counter(info.relative_path for info in multi.storage_data.values())
    assert set(paths.values()) == {1}  # one file per item
    assert all(info.offset == 0 for info in multi.storage_data.values())


def test_fsdp2_optimizer_state(dcp_checkpoints):
    md = metadata(dcp_checkpoints["fsdp2_optim"])
    params = [k for k in tensors(md) if k.startswith("model.")]
    assert len(params) == 29
    for key in params:
        fqn = key[len("model."):]
        for state in ("exp_avg", "exp_avg_sq"):
            assert chunks(md, f"optim.state.{fqn}.{state}") == chunks(md, key)
        assert chunks(md, f"optim.state.{fqn}.step") == [((), ())]
    groups = {k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    assert {"optim.param_groups.0.lr", "optim.param_groups.0.betas", "optim.param_groups.0.params"} <= groups

    stepped, initial = reference_state_dict(dcp_checkpoints["fsdp2_optim"]), load_expected(dcp_checkpoints["fsdp2"])
    for key in params:
        assert not torch.equal(stepped[key], initial[key]), f"{key} did not move in the AdamW step"
        assert stepped[f"optim.state.{key[len('model.'):]}.exp_avg"].abs().sum() > 0, key


def test_fsdp1_sharded_state_dict(dcp_checkpoints):
    md = metadata(dcp_checkpoints["fsdp1"])
    assert chunks(md, Q) == [((0, 0), (22, 64)), ((22, 0), (22, 64)), ((44, 0), (20, 64))]
    assert chunks(md, GATE) == [((0,), (1,))]  # ShardedTensor: ranks without data write nothing
    assert chunks(md, "optim.state.model.layers.0.attn_gate.exp_avg") == [((0,), (1,))]
    # Same flat keys as the FSDP2 checkpoint of the same model.
    assert set(tensors(md)) == set(tensors(metadata(dcp_checkpoints["fsdp2_optim"])))


def test_tp_colwise_rowwise(dcp_checkpoints):
    md = metadata(dcp_checkpoints["tp"])
    assert chunks(md, "model.model.layers.0.mlp.gate_proj.weight") == [((0, 0), (86, 64)), ((86, 0), (85, 64))]
    assert chunks(md, "model.model.layers.0.mlp.down_proj.weight") == [((0, 0), (64, 86)), ((0, 86), (64, 85))]
    assert chunks(md, "model.model.layers.0.self_attn.o_proj.weight") == [((0, 0), (64, 32)), ((0, 32), (64, 32))]
    assert chunks(md, "model.model.embed_tokens.weight") == [((0, 0), (502, 64)), ((502, 0), (501, 64))]
    assert chunks(md, "model.model.norm.weight") == [((0,), (64,))]

    raw = metadata(dcp_checkpoints["dtensor_1d"])
    assert chunks(raw, "model.cube_dim1.weight") == [((0, 0, 0), (3, 86, 5)), ((0, 86, 0), (3, 85, 5))]
    assert chunks(raw, "model.cube_dim2.weight") == [((0, 0, 0), (3, 5, 86)), ((0, 0, 86), (3, 5, 85))]
    assert chunks(raw, "model.one_row.weight") == [((0, 0), (1, 4)), ((1, 0), (0, 4))]
    assert chunks(raw, "model.replicated.weight") == [((0, 0), (7, 9))]


def test_mesh2d_grid_and_strided_shard(dcp_checkpoints):
    md = metadata(dcp_checkpoints["mesh2d"])
    assert sorted(chunks(md, "model.model.layers.0.self_attn.o_proj.weight")) == [
        ((0, 0), (32, 32)), ((0, 32), (32, 32)), ((32, 0), (32, 32)), ((32, 32), (32, 32))]
    # FSDP over Colwise TP: _StridedShard on dp, listed in rank order (dp0tp0, dp0tp1, dp1tp0, dp1tp1).
    assert chunks(md, Q) == [((0, 0), (16, 64)), ((32, 0), (16, 64)), ((16, 0), (16, 64)), ((48, 0), (16, 64))]
    assert chunks(md, "model.model.layers.0.mlp.gate_proj.weight") == [
        ((0, 0), (43, 64)), ((86, 0), (43, 64)), ((43, 0), (43, 64)), ((129, 0), (42, 64))]

    raw = metadata(dcp_checkpoints["dtensor_2d"])
    assert chunks(raw, "model.grid.weight") == [
        ((0, 0), (5, 86)), ((0, 86), (5, 85)), ((5, 0), (5, 86)), ((5, 86), (5, 85))]
    assert chunks(raw, "model.nested.weight") == [((0, 0), (4, 6)), ((4, 0), (3, 6)), ((7, 0), (3, 6)),
                                                  ((10, 0), (3, 6))]
    assert chunks(raw, "model.replicated.bias") == [((0,), (11,))]


def test_dtypes(dcp_checkpoints):
    md = tensors(metadata(dcp_checkpoints["mixed_dtypes"]))
    dtypes = {k: str(v.properties.dtype).replace("torch.", "") for k, v in md.items()}
    assert {dtypes[f"model.{k}"] for k in ("proj_fp32.weight", "proj_bf16.weight", "embed_fp16.weight",
                                          "position_ids", "causal_mask")} == {
        "float32", "bfloat16", "float16", "int64", "bool"}
    assert dtypes["model.sharded_bool"] == "bool" and split_dims(md["model.sharded_bool"]) == (1,)
    assert dtypes["model.sharded_int64"] == "int64" and len(md["model.sharded_int64"].chunks) == 3
    assert "model.not_saved" not in md

    exotic = tensors(metadata(dcp_checkpoints["exotic_dtypes"]))
    assert {str(v.properties.dtype).replace("torch.", "") for v in exotic.values()} == {
        "float64", "float8_e4m3fn", "float8_e5m2", "int32", "int16", "int8", "uint8", "uint16", "float32"}
    assert tuple(exotic["model.scalar_float32"].size) == () and tuple(exotic["model.empty_float32"].size) == (0, 5)


# ------------------------------------------------------------------------------------------------------------
# the launcher and the demo


def test_spawn_returns_each_rank_value(tmp_path):
    assert spawn("fail_on_rank", 3, tmp_path, bad_rank=-1) == [0, 1, 2]


def test_spawn_raises_with_the_worker_traceback(tmp_path):
    with pytest.raises(WorkerError, match=r"(?s)rank 1 traceback.*ValueError: boom on rank 1"):
        spawn("fail_on_rank", 3, tmp_path, bad_rank=1)


def test_spawn_kills_a_hung_rank(tmp_path):
    with pytest.raises(WorkerError, match="rank 1: still running"):
        spawn("hang_on_rank", 2, tmp_path, bad_rank=1, timeout_s=3)


def test_demo_checkpoint(demo_checkpoint):
    ckpt = demo_checkpoint.ckpt_dir
    assert distcp_files(ckpt) == [f"__{r}_0.distcp" for r in range(4)]
    assert sorted(p.name for p in demo_checkpoint.config_dir.iterdir()) == ["config.json", "generation_config.json"]
    config = json.loads((demo_checkpoint.config_dir / "config.json").read_text())
    assert {k: config[k] for k in DEMO_CONFIG} == DEMO_CONFIG and config["dtype"] == "float32"
    params = yaml.safe_load((ckpt / "train_params.yaml").read_text())
    assert params["enable_fsdp"] == "True" and params["checkpoint_type"] == "StateDictType.SHARDED_STATE_DICT"

    md = metadata(ckpt)
    up = "model.model.layers.1.mlp.up_proj.weight"
    assert [s for _, s in chunks(md, up)] == [(43, 64)] * 4  # 172 over 4 ranks
    assert [s for _, s in chunks(md, "model.lm_head.weight")] == [(251, 64)] * 3 + [(250, 64)]
    ref = reference_state_dict(ckpt)
    assert ref["model.model.embed_tokens.weight"].shape == (DEMO_CONFIG["vocab_size"], DEMO_CONFIG["hidden_size"])
    assert ref["optim.state.model.layers.1.mlp.up_proj.weight.exp_avg"].abs().sum() > 0
    assert len(ref) == demo_checkpoint.num_tensors


def test_shared_fixtures_are_beside_the_repo(shared_fixtures_dir):
    for name in ("fsdp2_llama_tied", "fsdp1_mllama_optim"):
        assert (shared_fixtures_dir / name / "ckpt" / ".metadata").is_file()
        assert (shared_fixtures_dir / name / "ref" / "model.safetensors").is_file()


def test_demo_refuses_a_non_empty_folder(tmp_path):
    from streamconv.demo_checkpoint import write_demo_checkpoint
    from streamconv.errors import OptionsError

    (tmp_path / "something").write_text("x")
    with pytest.raises(OptionsError, match="not empty"):
        write_demo_checkpoint(tmp_path)
