"""Megatron-Core Mixture-of-Experts, QK-norm and qkv-bias checkpoints to Hugging Face Qwen3-MoE / Qwen2-MoE.

* megatron-core itself (0.16, `GPTModel` with local MoE layer specs, `dist_checkpointing.save`) on CPU gloo ranks
  (`tests/support/megatron_moe.py`): Qwen3-MoE-shaped (QK-norm, routed experts) at TP 1, expert parallel 2, and
  TP 2 with tied embeddings and a vocabulary padded from 250 to 256 rows (trimmed to the config's);
  Qwen2-MoE-shaped (qkv bias, gated shared expert, a dense first layer so Megatron writes per-layer keys) at TP 2;
  Qwen3-MoE saved with `singleton_local_shards` (per-expert keys, GLU halves apart) at TP 2; dense Qwen3
  (QK-norm) at TP 2 and Qwen2 (qkv bias) at TP 1.
  Each converts with only `--config-from BASE` (config.json alone) into a folder whose tensors equal the torch-op
  mapping of torch's own reconstruction bit for bit and whose `from_pretrained` logits equal Megatron's own
  forward (atol 1e-5, fp32). Marker `megatron` (`make test-megatron`).
* The planner alone (no files, in `make test`): the megatron-gpt adapter's pieces over any grid of stored chunks
  (TP, EP, both) of every MoE tensor, followed with numpy, give each output exactly once and equal to the torch-op
  mapping.
"""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file

from streamconv.cli import cli
from tests.planning.test_transforms import assemble    # follows planned pieces with numpy
from tests.support import megatron_moe as mm
from tests.support import megatron_writers as mw


def convert(ckpt, out, base, *extra):
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(out), "--config-from", str(base), "--json", "-q",
                                      *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def torch_reconstruction(ckpt, tmp):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(ckpt, tmp / "reference.pt")
    return torch.load(tmp / "reference.pt", weights_only=False)


def assert_bit_exact(out, expected):
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


REAL = {
    "qwen3-moe-tp1": mm.MoESpec(),
    "qwen3-moe-tp2-padded-vocab-tied": mm.MoESpec(tp=2, vocab=250, padded_vocab=256, tied=True),
    "qwen3-moe-ep2": mm.MoESpec(ep=2),
    "qwen2-moe-tp2-dense-first": mm.MoESpec(family="qwen2_moe", tp=2, shared=48, dense_first=True),
    "qwen3-moe-tp2-singleton": mm.MoESpec(tp=2, singleton=True),
    "qwen3-dense-tp2": mm.MoESpec(family="qwen3", tp=2, experts=0),
    "qwen2-dense-tp1": mm.MoESpec(family="qwen2", experts=0),
}
MODEL_CLASS = {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}


@pytest.mark.megatron
@pytest.mark.skipif(not mw.megatron_available(), reason="megatron-core not installed (pip install megatron-core)")
@pytest.mark.parametrize("case", list(REAL))
def test_real_megatron_moe(tmp_path, case):
    spec = REAL[case]
    ckpt = mm.build_real_moe(tmp_path / "real", spec)
    base = mm.hf_config(tmp_path / "real", spec)
    out = tmp_path / "hf"
    report = convert(ckpt, out, base, "--buffer-size", "64KiB")
    model_class = MODEL_CLASS[spec.family]
    assert any(f"names and shapes are those of a {model_class}" in n for n in report["notes"]), report["notes"]
    reference = torch_reconstruction(ckpt, tmp_path)
    if spec.singleton:      # one key per layer and expert, GLU halves apart
        assert reference["decoder.layers.1.mlp.experts.experts.3.linear_fc1.weight_v"].shape == (32, 64)
    elif spec.dense_first:  # layers not all alike: Megatron wrote one key per layer
        assert "decoder.layers.1.mlp.experts.experts.linear_fc1.weight" in reference
    elif spec.experts:
        assert reference["decoder.layers.mlp.experts.experts.linear_fc1.weight"].shape == (2, 4, 64, 64)
    assert_bit_exact(out, mm.megatron_to_hf_moe(reference, spec))
    if spec.padded_vocab:
        assert reference["embedding.word_embeddings.weight"].shape[0] == spec.padded_vocab
        assert any(n.startswith("padded vocabulary: embedding.word_embeddings.weight has 256 rows")
                   for n in report["notes"]), report["notes"]

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == model_class
    ref = torch.load(str(ckpt) + ".logits.pt", weights_only=True)
    with torch.no_grad():
        logits = model(ref["input_ids"]).logits
    assert torch.allclose(logits, ref["logits"], atol=1e-5), (logits - ref["logits"]).abs().max()


# -- the planner alone: any TP / EP chunk grid of the MoE tensors, no files --------------------------------------


def _random_moe_state(spec: mm.MoESpec, stacked: bool, seed: int):
    """Megatron keys of a Qwen2-MoE-shaped model (qkv bias, QK-norm too, shared expert), stacked or per layer."""
    g = torch.Generator().manual_seed(seed)
    h, e, f, s, layers = mm.HIDDEN // 8, spec.experts, spec.moe_ffn // 8, spec.shared // 8, mm.LAYERS
    qkv = (mm.HEADS + 2 * spec.groups) * mm.HEAD_DIM
    per_layer = {"self_attention.linear_qkv.weight": (qkv, h), "self_attention.linear_qkv.bias": (qkv,),
                 "self_attention.linear_proj.weight": (h, mm.HEADS * mm.HEAD_DIM),
                 "self_attention.q_layernorm.weight": (mm.HEAD_DIM,),
                 "self_attention.k_layernorm.weight": (mm.HEAD_DIM,),
                 "self_attention.linear_qkv.layer_norm_weight": (h,), "mlp.linear_fc1.layer_norm_weight": (h,),
                 "mlp.router.weight": (e, h), "mlp.experts.experts.linear_fc1.weight": (e, 2 * f, h),
                 "mlp.experts.experts.linear_fc2.weight": (e, h, f), "mlp.shared_experts.linear_fc1.weight": (2 * s, h),
                 "mlp.shared_experts.linear_fc2.weight": (h, s), "mlp.shared_experts.gate_weight": (1, h)}
    sd = {"embedding.word_embeddings.weight": torch.randn(spec.vocab, h, generator=g),
          "output_layer.weight": torch.randn(spec.vocab, h, generator=g),
          "decoder.final_layernorm.weight": torch.randn(h, generator=g)}
    for key, shape in per_layer.items():
        if stacked:
            sd["decoder.layers." + key] = torch.randn(layers, *shape, generator=g)
        else:
            for i in range(layers):
                sd[f"decoder.layers.{i}.{key}"] = torch.randn(*shape, generator=g)
    return sd


@st.composite
def chunk_grids(draw):
    """A spec and, per dim size, how many equal parts the stored chunks split it into (TP, EP, both)."""
    spec = mm.MoESpec(family="qwen2_moe", groups=draw(st.sampled_from([1, 2, 4])), experts=draw(st.sampled_from([2, 4])),
                      moe_ffn=8 * draw(st.sampled_from([2, 4])), shared=8 * draw(st.sampled_from([2, 4])), vocab=8)
    return spec, draw(st.booleans()), draw(st.sampled_from([1, 2])), draw(st.integers(0, 2**16))


def _grid(shape, parts: int, seed: int):
    """Chunks (offsets, sizes) splitting every dim of `shape` divisible by `parts` into `parts` pieces, a random
    subset of dims split (the rest whole)."""
    rng = np.random.default_rng(seed)
    split = [parts > 1 and n % parts == 0 and rng.random() < 0.6 for n in shape]
    axes = [[(i * (n // parts), n // parts) for i in range(parts)] if cut else [(0, n)]
            for n, cut in zip(shape, split)]
    return [tuple(zip(*box)) for box in itertools.product(*axes)]


@given(chunk_grids())
@settings(max_examples=30, deadline=None)
def test_planned_moe_pieces_over_any_chunk_grid_equal_the_torch_mapping(case):
    from streamconv.model import BlobLocation, Chunk, TensorEntry
    from streamconv.planning import transforms as tf
    from streamconv.planning.trainers import MEGATRON_GPT, outputs

    spec, stacked, parts, seed = case
    state = _random_moe_state(spec, stacked, seed)
    heads = tf.Heads(mm.HEADS, spec.groups, mm.HEAD_DIM)
    got = {}
    for key, full in state.items():
        chunks = tuple(Chunk(tuple(o), tuple(s), BlobLocation("__0_0.distcp", i, 1))
                       for i, (o, s) in enumerate(_grid(full.shape, parts, seed)))
        entry = TensorEntry(key, "float32", tuple(full.shape), chunks)
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
    expected = mm.megatron_to_hf_moe(state, spec)
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert np.array_equal(got[name], want.numpy()), name


def test_a_stacked_expert_tensor_is_proven_once_and_each_expert_found_by_lookup(monkeypatch):
    """[L, E, 2F, H] with one chunk per layer, expert and half (Megatron's SequentialMLP at any EP degree) feeds
    L x E x 2 outputs: its chunks are proven to tile it once per plan (not once per output, which made a
    48-layer, 128-expert tensor take minutes to plan), and each output's chunks come from one lookup by
    (layer, expert). Literal plan of one expert: its gate rows are one piece, copied file to file."""
    from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, TensorEntry
    from streamconv.planning import proven as proven_module
    from streamconv.planning import transforms as tf
    from streamconv.planning.plan import PlanOptions, build_plan

    layers, experts, ffn, hidden = 3, 8, 4, 2
    key = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    chunks = tuple(Chunk((i, e, half * ffn, 0), (1, 1, ffn, hidden), BlobLocation(f"__{e % 2}_0.distcp", 0, 1))
                   for i in range(layers) for e in range(experts) for half in (0, 1))
    meta = CheckpointMetadata(tensors=(TensorEntry(key, "float32", (layers, experts, 2 * ffn, hidden), chunks),))
    proofs, lookups = [], []
    real_check = proven_module.check_coverage
    monkeypatch.setattr(proven_module, "check_coverage", lambda fqn, *a: (proofs.append(fqn), real_check(fqn, *a)))
    real_candidates = tf.LeadIndex.candidates
    monkeypatch.setattr(tf.LeadIndex, "candidates",
                        lambda self, box: (lookups.append(1), real_candidates(self, box))[1])
    plan = build_plan(meta, PlanOptions(heads=tf.Heads(4, 2, 16), source_format="megatron-gpt"))
    assert len(plan.tensors) == layers * experts * 2
    assert proofs == [key] and len(lookups) == layers * experts * 2
    gate = next(t for t in plan.tensors if t.name == "model.layers.2.mlp.experts.5.gate_proj.weight")
    assert [(p.chunk.offsets, p.src_start, p.dst_start, p.sizes) for p in gate.pieces] == [
        ((2, 5, 0, 0), (0, 0, 0, 0), (0, 0), (ffn, hidden))]
    assert tf.is_contiguous_piece(gate.pieces[0], gate.shape)
