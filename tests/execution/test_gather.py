"""The executor's gather path against torch, in memory and on a real Megatron-Core checkpoint.

* Random tensors cut into random chunk grids (as FSDP/TP would store them), converted through adapters that permute
  RoPE rows, split a grouped qkv and a [gate; up] weight and unstack a layer dim, with buffers small enough to cut
  heads across bands, with and without a cast: every output equals torch's ops on the whole tensor, bit for bit.
* The Megatron-Core fixture (`../shared/fixtures/megatron_gpt_tp1`, made on a GPU), detected and mapped to Hugging
  Face Llama by the `megatron-gpt` adapter (unstack, `qkv_grouped`, `half`): its tensors equal torch's ops on
  `dcp_to_torch_save`'s reconstruction and its logits Megatron's own (atol 1e-5). The random-chunking test above
  covers tensor-parallel splits of the same tensors (rows of query groups, halves of fc1, columns of proj).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from streamconv.planning import trainers
from streamconv.source.blob_reader import BlobReader
from streamconv.execution.executor import Executor
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.output.sink import MemorySink
from streamconv.planning.transforms import Heads
from tests.support.memory_checkpoints import make_checkpoint

MEGATRON = trainers.MEGATRON_GPT


def torch_megatron_to_hf(sd, heads: Heads, layers: int):
    per = heads.n_heads // heads.n_kv_heads
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
           "model.norm.weight": sd["decoder.final_layernorm.weight"], "lm_head.weight": sd["output_layer.weight"]}
    for i in range(layers):
        qkv = sd["decoder.layers.self_attention.linear_qkv.weight"][i]
        g = qkv.view(heads.n_kv_heads, per + 2, heads.head_dim, -1)
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = g[:, :per].reshape(-1, qkv.shape[-1])
        out[p + "self_attn.k_proj.weight"] = g[:, per].reshape(-1, qkv.shape[-1])
        out[p + "self_attn.v_proj.weight"] = g[:, per + 1].reshape(-1, qkv.shape[-1])
        out[p + "self_attn.o_proj.weight"] = sd["decoder.layers.self_attention.linear_proj.weight"][i]
        gate, up = torch.chunk(sd["decoder.layers.mlp.linear_fc1.weight"][i], 2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd["decoder.layers.mlp.linear_fc2.weight"][i]
        out[p + "input_layernorm.weight"] = sd["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i]
        out[p + "post_attention_layernorm.weight"] = sd["decoder.layers.mlp.linear_fc1.layer_norm_weight"][i]
    return {k: v.contiguous() for k, v in out.items()}


def torch_rope(w, n):
    return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def run(meta, reader, stored, options, buffer_bytes):
    plan = build_plan(meta, options)
    ex = Executor(BlobReader(reader, stored), stored, buffer_bytes)
    out = {}
    from safetensors.torch import load
    for shard in plan.shards:
        sink = MemorySink(shard.nbytes)
        ex.write_shard(shard, sink)
        out.update(load(bytes(sink.data)))
    return plan, out


def as_torch(a):
    return torch.from_numpy(np.ascontiguousarray(a))


@st.composite
def megatron_case(draw):
    n_kv = draw(st.integers(1, 2))
    heads = Heads(n_kv * draw(st.integers(1, 3)), n_kv, 2 * draw(st.integers(1, 3)))
    layers, hidden, ffn = draw(st.integers(1, 3)), draw(st.integers(1, 6)), 2 * draw(st.integers(1, 4))
    shapes = {"decoder.layers.self_attention.linear_qkv.weight": (layers, (heads.n_heads + 2 * n_kv) * heads.head_dim,
                                                                  hidden),
              "decoder.layers.mlp.linear_fc1.weight": (layers, ffn, hidden),
              "decoder.layers.self_attention.linear_proj.weight": (layers, hidden, heads.n_heads * heads.head_dim)}
    cuts = {n: [draw(st.lists(st.integers(0, s), max_size=2)) for s in shape] for n, shape in shapes.items()}
    return heads, layers, shapes, cuts, draw(st.sampled_from([4, 12, 64, 4096])), draw(st.booleans())


@given(megatron_case())
@settings(max_examples=60, deadline=None)
def test_megatron_style_gathers_equal_torch(case):
    heads, layers, shapes, cuts, buffer_bytes, cast = case
    rng = np.random.default_rng(0)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    meta, reader, stored = make_checkpoint(arrays, cuts)
    options = PlanOptions(max_shard_bytes=10**9, source_format=MEGATRON.name, heads=heads,
                          dtype="bfloat16" if cast else "keep")
    _, got = run(meta, reader, stored, options, buffer_bytes)
    per = heads.n_heads // heads.n_kv_heads
    want = {}
    for i in range(layers):
        qkv = as_torch(arrays["decoder.layers.self_attention.linear_qkv.weight"][i])
        g = qkv.view(heads.n_kv_heads, per + 2, heads.head_dim, -1)
        p = f"model.layers.{i}."
        want[p + "self_attn.q_proj.weight"] = g[:, :per].reshape(-1, qkv.shape[-1])
        want[p + "self_attn.k_proj.weight"] = g[:, per].reshape(-1, qkv.shape[-1])
        want[p + "self_attn.v_proj.weight"] = g[:, per + 1].reshape(-1, qkv.shape[-1])
        want[p + "self_attn.o_proj.weight"] = as_torch(arrays["decoder.layers.self_attention.linear_proj.weight"][i])
        gate, up = torch.chunk(as_torch(arrays["decoder.layers.mlp.linear_fc1.weight"][i]), 2)
        want[p + "mlp.gate_proj.weight"], want[p + "mlp.up_proj.weight"] = gate, up
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert torch.equal(got[name].view(torch.int16 if cast else torch.int32),
                           w.to(torch.bfloat16 if cast else torch.float32).view(torch.int16 if cast else torch.int32)), name


@st.composite
def rope_case(draw):
    n_kv = draw(st.integers(1, 3))
    heads = Heads(n_kv * draw(st.integers(1, 3)), n_kv, 2 * draw(st.integers(1, 4)))
    cols = draw(st.integers(1, 7))
    shapes = {"layers.0.attention.wq.weight": (heads.n_heads * heads.head_dim, cols),
              "layers.0.attention.wk.weight": (heads.n_kv_heads * heads.head_dim, cols),
              "tok_embeddings.weight": (5, cols), "layers.0.feed_forward.w1.weight": (3, cols)}
    cuts = {n: [draw(st.lists(st.integers(0, s), max_size=3)) for s in shape] for n, shape in shapes.items()}
    return heads, shapes, cuts, draw(st.sampled_from([4, 8, 24, 100, 4096])), draw(st.booleans())


@given(rope_case())
@settings(max_examples=80, deadline=None)
def test_rope_gathers_equal_torch_at_any_chunking_and_buffer(case):
    heads, shapes, cuts, buffer_bytes, cast = case
    rng = np.random.default_rng(1)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    meta, reader, stored = make_checkpoint(arrays, cuts)
    options = PlanOptions(max_shard_bytes=10**9, heads=heads, dtype="bfloat16" if cast else "keep")
    plan, got = run(meta, reader, stored, options, buffer_bytes)
    assert plan.source_format == "torchtitan-llama"
    for src, dst, n in (("wq", "q_proj", heads.n_heads), ("wk", "k_proj", heads.n_kv_heads)):
        want = torch_rope(as_torch(arrays[f"layers.0.attention.{src}.weight"]), n)
        mine = got[f"model.layers.0.self_attn.{dst}.weight"]
        if cast:
            assert torch.equal(mine.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))
        else:
            assert torch.equal(mine, want)


def test_megatron_fixture_converts_to_megatrons_model(shared_fixtures_dir, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import LlamaForCausalLM

    from streamconv import api
    case = shared_fixtures_dir / "megatron_gpt_tp1"
    report = api.convert(str(case / "ckpt"), str(tmp_path / "hf"), config_from=str(case / "base"))
    assert report.tensors == 3 + 9 * 3
    assert any(n.startswith("source format: megatron-gpt (") for n in report.notes), report.notes
    dcp_to_torch_save(case / "ckpt", tmp_path / "ref.pt")
    sd = torch.load(tmp_path / "ref.pt", weights_only=False)
    want = torch_megatron_to_hf(sd, Heads(4, 2, 16), 3)
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    expected = torch.load(case / "logits.pt")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.allclose(logits, expected["logits"].to(logits.dtype), atol=1e-5)


def test_rope_tables_are_skipped_and_unmapped_tensors_refused():
    from streamconv.errors import UnsupportedFeatureError
    rng = np.random.default_rng(2)
    arrays = {"tok_embeddings.weight": rng.standard_normal((5, 4)).astype(np.float32),
              "layers.0.attention.wq.weight": rng.standard_normal((8, 4)).astype(np.float32),
              "layers.0.feed_forward.w1.weight": rng.standard_normal((3, 4)).astype(np.float32),
              "freqs_cis": (rng.standard_normal((6, 2)) + 1j).astype(np.complex64)}
    meta, reader, stored = make_checkpoint(arrays, {n: [[] for _ in a.shape] for n, a in arrays.items()})
    plan = build_plan(meta, PlanOptions(heads=Heads(2, 2, 4)))
    assert {s.fqn: s.reason for s in plan.skipped}["freqs_cis"].startswith("RoPE table")
    assert sorted(t.name for t in plan.tensors) == ["model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight",
                                                   "model.layers.0.self_attn.q_proj.weight"]
    arrays["layers.0.attention.lora_a.weight"] = arrays["tok_embeddings.weight"]
    meta, reader, stored = make_checkpoint(arrays, {n: [[] for _ in a.shape] for n, a in arrays.items()})
    with pytest.raises(UnsupportedFeatureError, match="lora_a"):
        build_plan(meta, PlanOptions(heads=Heads(2, 2, 4)))
    assert build_plan(meta, PlanOptions(heads=Heads(2, 2, 4), exclude=("*lora*",))).tensors


def test_bands_of_tiny_runs_are_cut_short():
    """Every other element of a 1-D tensor (RoPE on a bias) is a run of one element: bands stay at
    MAX_RUNS_PER_BAND runs, whatever the buffer, and the result is still torch's permutation."""
    from streamconv.planning import transforms as tf
    from streamconv.planning.plan import TensorPlan

    n = 4 * 2 * 5000                                      # 4 heads of 10000 rows
    arrays = {"bias": np.arange(n, dtype=np.float32)}
    meta, reader, stored = make_checkpoint(arrays, {"bias": [[n // 3]]})
    chunks = meta.tensors[0].chunks
    takes = tf.takes_from_rows("bias", (n,), tf.rope_half_split(n, 4))
    groups = tf.cut_all(takes, {"bias": ((n,), chunks)})
    tf.check_gather("bias", (n,), takes, groups)
    pieces = tf.flatten(groups)
    plan = TensorPlan(name="b", source_fqn="bias", src_dtype="float32", dst_dtype="float32", shape=(n,),
                      chunks=tf.distinct_chunks(pieces), begin=0, nbytes=n * 4, pieces=pieces)
    calls = []
    read_into = reader.read_into
    reader.read_into = lambda path, offset, buffers: (calls.append(len(buffers)), read_into(path, offset, buffers))
    sink = MemorySink(n * 4)
    Executor(BlobReader(reader, stored), stored, 32 * 2**20).write_tensor(plan, sink)
    want = torch.arange(n, dtype=torch.float32).view(4, -1, 2).transpose(1, 2).reshape(n)
    assert torch.equal(torch.frombuffer(sink.data, dtype=torch.float32), want)
    assert max(calls) <= 1 << 14, max(calls)     # without the cap: one read of 26,667 buffers
