"""Megatron-Core multi-latent attention (DeepSeek-V3-like) checkpoints to Hugging Face `DeepseekV3ForCausalLM`.

megatron-core itself (0.16, `GPTModel` with `MLATransformerConfig` and the local MLA layer specs,
`dist_checkpointing.save`) on CPU gloo ranks (`tests/support/megatron_mla.py`): q LoRA with a dense first layer
(per-layer keys) at TP 1, no q LoRA at TP 2, every layer MoE (stacked keys) at expert parallel 2; sigmoid routing
with a trained expert bias, group-limited, a shared expert. Each converts with only `--config-from BASE`
(config.json alone) into a folder whose tensors equal the torch-op mapping of torch's own reconstruction bit for
bit, which transformers 5.25 loads with nothing missing, and whose logits equal Megatron's own forward (atol 1e-5,
fp32). The Transformer Engine names (q/kv norms folded into the up-projections) are the EP 2 checkpoint re-saved
by torch's DCP writer under them. Marker `megatron` (`make test-megatron`).
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from streamconv.cli import cli
from streamconv.demo_checkpoint import run_distributed
from tests.producers.test_megatron_moe import assert_bit_exact, convert, torch_reconstruction
from tests.support import megatron_mla as ml
from tests.support import megatron_writers as mw

pytestmark = [pytest.mark.megatron,
              pytest.mark.skipif(not mw.megatron_available(), reason="megatron-core not installed")]

REAL = {
    "q-lora-tp1-dense-first": ml.MLASpec(),
    "no-q-lora-tp2": ml.MLASpec(tp=2, q_lora=False),
    "q-lora-ep2-all-moe": ml.MLASpec(ep=2, dense_first=False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each case's checkpoint, made once for the module: {case: (checkpoint, base folder)}."""
    cache = {}

    def get(case):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            cache[case] = (ml.build_real_mla(root, REAL[case]), ml.hf_config(root, REAL[case]))
        return cache[case]
    return get


def hf_logits(out, ids):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        return model.eval()(ids).logits


def assert_megatrons_logits(out, ckpt):
    ref = torch.load(str(ckpt) + ".logits.pt", weights_only=True)
    logits = hf_logits(out, ref["input_ids"])
    assert torch.allclose(logits, ref["logits"], atol=1e-5), (logits - ref["logits"]).abs().max()


@pytest.mark.parametrize("case", list(REAL))
def test_real_megatron_mla(tmp_path, built, case):
    spec = REAL[case]
    ckpt, base = built(case)
    out = tmp_path / "hf"
    notes = convert(ckpt, out, base, "--buffer-size", "64KiB")["notes"]
    assert any(n.startswith("source format: megatron-mla (a Megatron-Core torch_dist checkpoint)") for n in notes)
    assert any("names and shapes are those of a DeepseekV3ForCausalLM" in n for n in notes), notes
    assert any(n.startswith("rope_interleave: true in config.json") for n in notes), notes
    reference = torch_reconstruction(ckpt, tmp_path)
    layer = "decoder.layers." if not spec.dense_first else "decoder.layers.1."
    assert reference[layer + "mlp.router.expert_bias"].abs().max() > 0       # routing depends on it
    assert (layer + "self_attention.linear_q_down_proj.weight" in reference) == spec.q_lora
    expected = ml.mla_to_hf(reference, spec)
    assert ("model.layers.1.self_attn.q_a_proj.weight" in expected) == spec.q_lora
    assert_bit_exact(out, expected)
    assert_megatrons_logits(out, ckpt)


def test_transformer_engine_names_fold_the_mla_norms_into_the_up_projections(tmp_path, built):
    """The TE MLA spec saves q_layernorm / kv_layernorm as `linear_q_up_proj.layer_norm_weight` /
    `linear_kv_up_proj.layer_norm_weight` (TE needs CUDA): the EP 2 checkpoint's tensors re-saved under those
    names, experts split over 2 ranks, convert to the same folder."""
    ckpt, base = built("q-lora-ep2-all-moe")
    reference = torch_reconstruction(ckpt, tmp_path)
    prefix = "decoder.layers.self_attention."
    te = {k.replace(prefix + "q_layernorm.weight", prefix + "linear_q_up_proj.layer_norm_weight")
           .replace(prefix + "kv_layernorm.weight", prefix + "linear_kv_up_proj.layer_norm_weight"): v
          for k, v in reference.items() if isinstance(v, torch.Tensor)}
    assert prefix + "linear_kv_up_proj.layer_norm_weight" in te and prefix + "kv_layernorm.weight" not in te
    torch.save(te, tmp_path / "te.pt")
    te_ckpt = tmp_path / "te"
    run_distributed("tests.support.megatron_moe:write_moe_layout", 2,
                    dict(out_dir=str(te_ckpt), state_path=str(tmp_path / "te.pt")))
    mw.write_side_files(te_ckpt)
    out = tmp_path / "hf"
    convert(te_ckpt, out, base, "--buffer-size", "64KiB")
    assert_bit_exact(out, ml.mla_to_hf(reference, REAL["q-lora-ep2-all-moe"]))
    assert_megatrons_logits(out, ckpt)


def test_a_config_without_rope_interleave_is_refused(tmp_path, built):
    """transformers' DeepSeek-V3 with rope_interleave false rotates other channel pairs of the same rows (0.05
    logits apart on this model): exit 4, nothing written, the fix named."""
    ckpt, _ = built("q-lora-tp1-dense-first")
    base = ml.hf_config(tmp_path, REAL["q-lora-tp1-dense-first"], rope_interleave=False)
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(out), "--config-from", str(base)])
    assert result.exit_code == 4, result.output
    text = " ".join(result.output.split())
    assert "rope_interleave to False" in text and "set \"rope_interleave\": true" in text, text
    assert not out.exists() and "Traceback" not in result.output
    plan = CliRunner().invoke(cli, ["plan", str(ckpt), "--config-from", str(base), "--json"])
    assert plan.exit_code == 4 and "rope_interleave" in plan.output
    assert not json.dumps(plan.output).count("Traceback")
