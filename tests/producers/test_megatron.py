"""Megatron-Core `torch_dist` checkpoints to Hugging Face Llama, checked against Megatron itself.

* The GPU fixture (`/work/shared/fixtures/megatron_gpt_tp1`, megatron-core 0.16.1, TP 1, GQA 4 heads / 2 groups):
  converted with `--config-from base/`, `from_pretrained` logits equal Megatron's own to atol 1e-5 (fp32), and each
  tensor equals the torch-op mapping (`megatron_writers.megatron_to_hf`) of torch's own reconstruction
  (`dcp_to_torch_save`) bit for bit.
* The same weights re-saved with Megatron's TP=2 sharding by torch's DCP writer on 2 gloo ranks (qkv split per
  query group along dim 1 of the stacked tensor, fc1's gate and up halves split separately, proj/fc2 along the last
  dim, vocab-parallel embedding and output): the same logits, the same tensors.
* MQA (1 query group), tied embeddings, random weights, layers split over 2 ranks (pipeline parallel): bit for bit
  against the torch-op mapping, and logits equal (torch.equal) to the model built from that mapping.
* Refusals: MLA, the router's expert bias, biases other than qkv's, singleton_local_shards keys, an unknown
  tensor, no --config-from (exit 2 / 64); MoE, QK-norm or qkv bias with a Llama config, or a config that does not
  fit (exit 4, as any wrong base model), naming tensors and feature,
  nothing written. `common.pt` is never unpickled (a tripwire pickle proves it).
* megatron-core itself on CPU (TP 1 and 2, GQA/MQA, tied): `test_real_megatron`, behind `make test-megatron`
  (needs `pip install megatron-core`; skipped without it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from tests.support import megatron_writers as mw
from tests.support.pieces import assemble    # follows planned pieces with numpy
from streamconv.cli import cli

FIXTURE = Path("/work/shared/fixtures/megatron_gpt_tp1")
needs_fixture = pytest.mark.skipif(not (FIXTURE / "ckpt" / ".metadata").exists(), reason="GPU fixture not present")
GQA = dict(n_heads=4, n_kv=2, head_dim=16)


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def convert(ckpt, out, base, *extra):
    result = run("convert", ckpt, out, "--config-from", base, "--json", "-q", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def torch_reconstruction(ckpt: Path, tmp: Path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = tmp / f"{ckpt.parent.name}-reference.pt"
    dcp_to_torch_save(ckpt, path)
    return torch.load(path, weights_only=False)


def assert_bit_exact(out: Path, expected):
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def hf_logits(folder_or_state, ids, config_dir=None):
    from transformers import LlamaConfig, LlamaForCausalLM
    if isinstance(folder_or_state, dict):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(config_dir))
        model.load_state_dict(folder_or_state, strict=False)    # tied: lm_head comes from the embedding
        model.tie_weights()
    else:
        model = LlamaForCausalLM.from_pretrained(folder_or_state, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


@needs_fixture
def test_fixture_matches_megatron_logits_and_torch_mapping(tmp_path):
    out = tmp_path / "hf"
    report = convert(FIXTURE / "ckpt", out, FIXTURE / "base")
    notes = " ".join(report["notes"])
    assert "Megatron-Core dist checkpoint" in notes and "common.pt" in notes and "megatron-gpt" in notes
    assert "30 output names and shapes are those of a LlamaForCausalLM built from config.json" in notes
    expected = mw.megatron_to_hf(torch_reconstruction(FIXTURE / "ckpt", tmp_path), **GQA)
    assert_bit_exact(out, expected)
    ref = torch.load(FIXTURE / "logits.pt", weights_only=True)
    logits = hf_logits(out, ref["input_ids"])
    assert torch.allclose(logits, ref["logits"], atol=1e-5), (logits - ref["logits"]).abs().max()


@needs_fixture
def test_fixture_resaved_tp2_by_torch_writer(tmp_path):
    full = torch_reconstruction(FIXTURE / "ckpt", tmp_path)
    state = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
    ckpt = mw.build_layout(tmp_path / "tp2", state, groups=2, world_size=2)
    marker = ckpt.parent / f"{ckpt.name}.common-pt-was-unpickled"
    info = run("inspect", ckpt, "--json")
    assert info.exit_code == 0, info.output
    layout = {t["name"]: t for t in json.loads(info.output)["tensors"]}
    assert layout[mw.QKV]["chunks"] == 3 * 2 and layout[mw.FC1]["chunks"] == 3 * 2 * 2    # really TP-sharded
    assert layout[mw.PROJ]["layout"].endswith("dims 0,2")
    out = tmp_path / "hf"
    convert(ckpt, out, FIXTURE / "base", "--buffer-size", "64KiB")
    assert_bit_exact(out, mw.megatron_to_hf(torch_reconstruction(ckpt, tmp_path), **GQA))
    assert_bit_exact(out, mw.megatron_to_hf(state, **GQA))
    ref = torch.load(FIXTURE / "logits.pt", weights_only=True)
    assert torch.allclose(hf_logits(out, ref["input_ids"]), ref["logits"], atol=1e-5)
    assert not marker.exists(), "common.pt was unpickled"


MQA = dict(layers=2, hidden=48, heads=6, kv=1, head_dim=8, ffn=40, vocab=97, tied=True)


def test_mqa_tied_pipeline_split_bit_exact(tmp_path):
    state = mw.random_megatron(**MQA, seed=3)
    ckpt = mw.build_layout(tmp_path / "mqa", state, groups=1, world_size=2, pp=True)
    base = mw.hf_config(tmp_path / "mqa", **MQA)
    out = tmp_path / "hf"
    convert(ckpt, out, base, "--buffer-size", "64KiB")
    expected = mw.megatron_to_hf(torch_reconstruction(ckpt, tmp_path), n_heads=6, n_kv=1, head_dim=8)
    assert "lm_head.weight" not in expected
    assert_bit_exact(out, expected)
    ids = torch.arange(30).reshape(2, 15) % MQA["vocab"]
    assert torch.equal(hf_logits(out, ids), hf_logits(expected, ids, base))


def _refusal(tmp_path, extra_keys, groups=2, **config):
    cfg = dict(layers=2, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    cfg.update(config)
    state = mw.random_megatron(**cfg)
    ckpt = mw.build_layout(tmp_path / "bad", state, groups=groups, world_size=1, extra_keys=extra_keys)
    base = mw.hf_config(tmp_path / "bad", **cfg)
    out = tmp_path / "hf"
    result = run("convert", ckpt, out, "--config-from", base)
    assert not out.exists() and not any(p.name.startswith(".") and "hf" in p.name for p in tmp_path.iterdir())
    return result


@pytest.mark.parametrize("keys,feature", [
    ({"decoder.layers.mixer.in_proj.weight": [2, 64, 32]}, "a model other than a GPT decoder"),
    ({"decoder.layers.self_attention.linear_proj.bias": [2, 32]}, "biases other than the qkv bias"),
    ({"decoder.layers.mlp.router.expert_bias": [2, 4]}, "the router's expert bias"),
    ({"embedding.position_embeddings.weight": [64, 32]}, "learned absolute position embeddings"),
    ({"decoder.layers.some_new_thing.weight": [2, 4]}, "tensors with no mapping"),
    ({"decoder.layers.7.some_new_thing.weight": [4]}, "tensors with no mapping"),
])
def test_unmapped_features_refused(tmp_path, keys, feature):
    result = _refusal(tmp_path, keys)
    assert result.exit_code == 2, result.output
    assert feature in result.output and "nothing was written" in result.output
    for key in keys:
        assert key in result.output
    assert "Traceback" not in result.output
    # refused for what it is even before the head counts are given
    result = run("convert", tmp_path / "bad" / "ckpt", tmp_path / "hf")
    assert result.exit_code == 2 and feature in result.output, result.output


@pytest.mark.parametrize("keys", [
    {"decoder.layers.self_attention.linear_q_down_proj.weight": [2, 16, 32],
     "decoder.layers.self_attention.linear_kv_down_proj.weight": [2, 16, 32]},
    {"decoder.layers.1.self_attention.linear_kv_down_proj.weight": [16, 32]},
])
def test_attention_of_both_kinds_is_refused_by_either_layout(tmp_path, keys):
    """Multi-latent attention tensors pick the megatron-mla layout (DeepSeek-V3; tests/producers/test_megatron_mla.py
    converts real ones), which cannot hold the fused linear_qkv of the same checkpoint: exit 2 naming it; forced
    to megatron-gpt, the MLA tensors are named instead, with the layout that holds them."""
    result = _refusal(tmp_path, keys)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the megatron-mla layout (Hugging Face DeepseekV3ForCausalLM)" in text, text
    assert "attention with a fused linear_qkv (not multi-latent): --source-format megatron-gpt" in text
    assert mw.QKV in text and "nothing was written" in text and "Traceback" not in result.output
    result = run("convert", tmp_path / "bad" / "ckpt", tmp_path / "hf", "--source-format", "megatron-gpt")
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "multi-latent attention (MLA)" in text and "--source-format megatron-mla" in text
    assert all(key in text for key in keys), text


@pytest.mark.parametrize("keys,missing", [
    ({"decoder.layers.mlp.experts.experts.linear_fc1.weight": [2, 4, 48, 32],
      "decoder.layers.mlp.experts.experts.linear_fc2.weight": [2, 4, 32, 24],
      "decoder.layers.mlp.router.weight": [2, 4, 32]}, "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ({"decoder.layers.self_attention.q_layernorm.weight": [2, 8],
      "decoder.layers.self_attention.k_layernorm.weight": [2, 8]}, "model.layers.0.self_attn.q_norm.weight"),
    ({"decoder.layers.self_attention.linear_qkv.bias": [2, 64]}, "model.layers.0.self_attn.q_proj.bias"),
])
def test_moe_qk_norm_or_bias_with_a_llama_config_is_refused(tmp_path, keys, missing):
    """Mapped now (to Qwen3-MoE / Qwen2-MoE / Qwen3 / Qwen2 names), but a Llama config.json cannot hold them:
    exit 4, naming the tensors the config's model does not have, nothing written."""
    result = _refusal(tmp_path, keys)
    assert result.exit_code == 4, result.output
    assert "does not fit the reference config (Hugging Face Llama)" in result.output and missing in result.output
    assert "give --config-from the config of the model it was trained as" in result.output
    assert "Traceback" not in result.output


def test_optimizer_state_beside_the_model_is_skipped(tmp_path):
    cfg = dict(layers=2, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    state = mw.random_megatron(**cfg)
    extra = {"optimizer.state.exp_avg.embedding.word_embeddings.weight": [64, 32],
             "optimizer.state.fp32_param." + mw.QKV: [2, 64, 32]}
    ckpt = mw.build_layout(tmp_path / "m", state, groups=2, world_size=1, extra_keys=extra)
    report = convert(ckpt, tmp_path / "hf", mw.hf_config(tmp_path / "m", **cfg))
    assert report["skipped"].get("optimizer state") == 2, report["skipped"]
    assert_bit_exact(tmp_path / "hf", mw.megatron_to_hf(state, n_heads=4, n_kv=2, head_dim=8))


def test_needs_head_counts(tmp_path):
    state = mw.random_megatron(layers=1, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    ckpt = mw.build_layout(tmp_path / "m", state, groups=2, world_size=1)
    result = run("convert", ckpt, tmp_path / "hf")
    assert result.exit_code == 64, result.output
    assert "--config-from" in result.output and "num_key_value_heads" in result.output
    assert not (tmp_path / "hf").exists()
    # a config whose head counts do not fit the fused qkv rows is refused, naming the tensor
    base = mw.hf_config(tmp_path / "m", layers=1, hidden=32, heads=4, kv=1, head_dim=8, ffn=24, vocab=64, tied=False)
    result = run("convert", ckpt, tmp_path / "hf", "--config-from", base)
    assert result.exit_code == 4 and mw.QKV in result.output, result.output
    # a config with another layer count is refused (the folder would load with a layer missing)
    base = mw.hf_config(tmp_path / "l", layers=2, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    result = run("convert", ckpt, tmp_path / "hf", "--config-from", base)
    assert result.exit_code == 4 and "num_hidden_layers=2" in result.output, result.output
    assert not (tmp_path / "hf").exists()
    # a config with a larger vocabulary than the embedding's rows is refused (a smaller one: padded_vocab_trimmed)
    base = mw.hf_config(tmp_path / "v", layers=1, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=70, tied=False)
    result = run("convert", ckpt, tmp_path / "hf", "--config-from", base)
    assert result.exit_code == 4 and "model.embed_tokens.weight [64, 32] (config: [70, 32])" in result.output
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_padded_vocab_trimmed_to_the_configs_vocab_size(tmp_path, tied):
    """Megatron pads the vocabulary (to a multiple of 128 x TP): the embedding and output layer rows beyond the
    config's vocab_size are dropped while streaming (a row range of the vocab-parallel chunks), and said."""
    cfg = dict(layers=1, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=tied)
    state = mw.random_megatron(**cfg)
    ckpt = mw.build_layout(tmp_path / "m", state, groups=2, world_size=2)      # TP 2: rows 0-31 and 32-63
    base = mw.hf_config(tmp_path / "m", **dict(cfg, vocab=45))
    report = convert(ckpt, tmp_path / "hf", base, "--buffer-size", "64KiB")
    notes = " ".join(report["notes"])
    assert f"padded vocabulary: {mw.EMBED} has 64 rows, config.json's vocab_size is 45; rows 45..63" in notes
    assert (f"padded vocabulary: {mw.OUTPUT} has 64 rows" in notes) != tied
    expected = mw.megatron_to_hf(state, n_heads=4, n_kv=2, head_dim=8)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in expected:
            expected[name] = expected[name][:45].contiguous()
    assert_bit_exact(tmp_path / "hf", expected)
    ids = torch.arange(30).reshape(2, 15) % 45
    assert torch.equal(hf_logits(tmp_path / "hf", ids), hf_logits(expected, ids, base))


def test_inspect_and_plan_say_megatron_without_reading_common_pt(tmp_path):
    state = mw.random_megatron(layers=2, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    ckpt = mw.build_layout(tmp_path / "m", state, groups=2, world_size=2)
    marker = ckpt.parent / f"{ckpt.name}.common-pt-was-unpickled"
    result = run("inspect", ckpt)
    assert result.exit_code == 0, result.output
    assert "Megatron-Core dist checkpoint (metadata.json: sharded_backend torch_dist" in result.output
    base = mw.hf_config(tmp_path / "m", layers=2, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    result = run("plan", ckpt, "--config-from", base)
    assert result.exit_code == 0, result.output
    assert "model.layers.1.self_attn.k_proj.weight" in result.output and "source format: megatron-gpt" in result.output
    assert not marker.exists()
    # --source-format hf keeps Megatron's own names (the user's explicit choice)
    result = run("convert", ckpt, tmp_path / "raw", "--source-format", "hf", "-q")
    assert result.exit_code == 0, result.output
    assert mw.QKV in load_file(tmp_path / "raw" / "model.safetensors")


def test_other_sharded_backend_refused(tmp_path):
    ckpt = tmp_path / "zarr"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text(json.dumps(dict(mw.METADATA_JSON, sharded_backend="zarr")))
    result = run("inspect", ckpt)
    assert result.exit_code == 2 and "zarr" in result.output and "torch_dist" in result.output, result.output


def test_megatron_saved_plans_in_metadata_are_decoded_safely(tmp_path):
    """megatron-core 0.16 (CPU and multi-rank runs) pickles every rank's SavePlan into `.metadata`
    (`Metadata.all_local_plans`); those classes are allow-listed as inert records."""
    import pickle

    from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType, TensorWriteData
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    state = mw.random_megatron(layers=1, hidden=32, heads=4, kv=2, head_dim=8, ffn=24, vocab=64, tied=False)
    ckpt = mw.build_layout(tmp_path / "m", state, groups=2, world_size=1)
    with open(ckpt / ".metadata", "rb") as f:
        md = pickle.load(f)
    md.all_local_plans = [SavePlan(items=[WriteItem(
        index=MetadataIndex(mw.EMBED, torch.Size([0, 0])), type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([64, 32])),
                                    properties=TensorProperties(dtype=torch.float32), size=torch.Size([64, 32])))],
        usable=True)]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    result = run("inspect", ckpt)
    assert result.exit_code == 0, result.output


def test_allow_list_still_refuses_other_globals(tmp_path):
    """The allow-list still refuses anything else beside those records."""
    from streamconv.errors import UnsafePickleError
    from streamconv.source.safe_pickle import load_metadata_pickle
    import pickle
    bad = pickle.dumps(mw._Tripwire(str(tmp_path / "x")))
    with pytest.raises(UnsafePickleError):
        load_metadata_pickle(bad, source="crafted")
    assert not (tmp_path / "x").exists()


REAL_CASES = [(1, 2, False), (2, 2, False), (1, 1, True), (2, 2, True)]


@pytest.mark.megatron
@pytest.mark.skipif(not mw.megatron_available(), reason="megatron-core not installed (pip install megatron-core)")
@pytest.mark.parametrize("tp,groups,tied", REAL_CASES, ids=[f"tp{t}-groups{g}{'-tied' if w else ''}"
                                                            for t, g, w in REAL_CASES])
def test_real_megatron(tmp_path, tp, groups, tied):
    """megatron-core 0.16 GPTModel (local spec) saved by dist_checkpointing.save on `tp` CPU gloo ranks: the
    converted folder reproduces Megatron's own logits and the torch-op mapping of torch's reconstruction."""
    ckpt = mw.build_real(tmp_path / "real", tp=tp, groups=groups, tied=tied)
    cfg = dict(layers=3, hidden=64, heads=4, kv=groups, head_dim=16, ffn=128, vocab=256, tied=tied)
    base = mw.hf_config(tmp_path / "real", **cfg)
    out = tmp_path / "hf"
    convert(ckpt, out, base, "--buffer-size", "64KiB")
    assert_bit_exact(out, mw.megatron_to_hf(torch_reconstruction(ckpt, tmp_path), n_heads=4, n_kv=groups,
                                            head_dim=16))
    ref = torch.load(str(ckpt) + ".logits.pt", weights_only=True)
    logits = hf_logits(out, ref["input_ids"])
    assert torch.allclose(logits, ref["logits"], atol=1e-5), (logits - ref["logits"]).abs().max()


# -- the planner alone: Megatron's TP layouts at any degree, no files --------------------------------------------


@st.composite
def megatron_geometry(draw):
    tp = draw(st.sampled_from([1, 2, 4]))
    kv = tp * draw(st.integers(1, 2)) if draw(st.booleans()) else 1       # GQA with TP | groups, or MQA
    tp = tp if kv % tp == 0 else 1                                        # Megatron: TP divides the groups
    heads = kv * draw(st.integers(1, 3))
    return dict(layers=draw(st.integers(1, 3)), hidden=draw(st.integers(1, 4)) * tp, heads=heads, kv=kv,
                head_dim=draw(st.sampled_from([2, 4])), ffn=draw(st.integers(1, 3)) * tp, vocab=4 * tp,
                tied=draw(st.booleans())), tp


@given(megatron_geometry())
@settings(max_examples=60, deadline=None)
def test_planned_pieces_of_every_tp_layout_equal_the_torch_mapping(case):
    """The megatron-gpt adapter's pieces over Megatron's TP chunking (`megatron_writers._boxes`), followed with
    numpy, give each output tensor exactly once and equal to the torch-op mapping."""
    from streamconv.planning import transforms as tf
    from streamconv.model import BlobLocation, Chunk, TensorEntry
    from streamconv.planning.trainers import MEGATRON_GPT, outputs

    cfg, tp = case
    state = mw.random_megatron(**cfg)
    heads = tf.Heads(cfg["heads"], cfg["kv"], cfg["head_dim"])
    got = {}
    for key, full in state.items():
        chunks = []
        for rank in range(tp):
            for offs, sizes in mw._boxes(key, full.shape, rank, tp, cfg["kv"], False, tp):
                chunks.append(Chunk(tuple(offs), tuple(sizes), BlobLocation(f"__{rank}_0.distcp", len(chunks), 1)))
        entry = TensorEntry(key, "float32", tuple(full.shape), tuple(chunks))
        for rule in MEGATRON_GPT.rules:
            m = rule.match(key)
            for name, derived in (outputs(rule, m, entry, heads) if m else []):
                if not isinstance(derived, tf.Derived):
                    got[name] = full.numpy()
                    continue
                pieces = tf.pieces_for(derived.takes, {key: (tuple(full.shape), chunks)})
                tf.check_pieces(name, derived.shape, pieces)
                out, hits = assemble(pieces, derived.shape, full.numpy())
                assert (hits == 1).all(), name
                got[name] = out
    expected = mw.megatron_to_hf(state, cfg["heads"], cfg["kv"], cfg["head_dim"])
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert np.array_equal(got[name], want.numpy()), name


def test_tp2_k_proj_pieces_are_one_box_per_query_group():
    """Literal plan: heads 4, groups 2, head dim 8, TP 2 -> each rank's qkv chunk of a layer is one query group
    [q q k v] (32 rows); layer 1's k_proj is rows 16..23 of each rank's chunk."""
    from streamconv.planning import transforms as tf
    from streamconv.model import BlobLocation, Chunk, TensorEntry
    from streamconv.planning.trainers import MEGATRON_GPT, outputs

    shape = (2, 64, 32)
    chunks = tuple(Chunk((layer, 32 * rank, 0), (1, 32, 32), BlobLocation(f"__{rank}_0.distcp", layer, 1))
                   for rank in range(2) for layer in range(2))
    entry = TensorEntry(mw.QKV, "float32", shape, chunks)
    rule = next(r for r in MEGATRON_GPT.rules if r.target.endswith("k_proj.weight"))
    (name, derived), _ = outputs(rule, rule.match(mw.QKV), entry, tf.Heads(4, 2, 8))[1], None
    assert name == "model.layers.1.self_attn.k_proj.weight" and derived.shape == (16, 32)
    pieces = tf.pieces_for(derived.takes, {mw.QKV: (shape, chunks)})
    assert [(p.chunk.offsets, p.src_start, p.dst_start, p.sizes) for p in pieces] == [
        ((1, 0, 0), (0, 16, 0), (0, 0), (8, 32)),
        ((1, 32, 0), (0, 16, 0), (8, 0), (8, 32)),
    ]
    assert all(tf.is_contiguous_piece(p, derived.shape) for p in pieces)    # copied file to file
