"""torchtitan 0.3 Qwen3-MoE checkpoints (its own model code, FSDP2 on 2 gloo ranks, saved model-only as its
CheckpointManager does; and expert parallel 2 by torchtitan's own `parallelize_qwen3`) to Hugging Face
`Qwen3MoeForCausalLM`, end to end (marker `trainers`: `make
test-trainers`). See `trainer_moe_writers.py` for how each checkpoint is made.

Truth: the gathered trained state dict mapped to HF with torch ops (grouped experts unbound per expert), bit for
bit; torchtitan's own `Qwen3StateDictAdapter.to_hf` agrees; transformers loads the folder with no key missing or
unexpected, and its logits equal the torchtitan model's own (computed with fp32 experts).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.support import trainer_moe_writers as mw
from tests.support import trainer_writers as tw
from streamconv.cli import cli

pytestmark = pytest.mark.trainers

BIAS = "*.moe.expert_bias_E"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    if not tw.torchtitan_available():
        pytest.skip("torchtitan 0.3 is not importable (make test-trainers installs it)")
    root = tmp_path_factory.mktemp("qwen3moe")
    # fp32 without the load-balancing bias (load_balance_coeff=None), FSDP2 or expert parallel 2 (torchtitan's own
    # parallelize_qwen3); bf16 export with the bias (torchtitan's default)
    return {"fp32": mw.build(root / "fp32", load_balance=False),
            "ep2": mw.build(root / "ep2", load_balance=False, expert_parallel=2),
            "bf16": mw.build(root / "bf16", export_dtype="bfloat16", load_balance=True),
            "deepseek_v3": mw.build(root / "dsv3", family="deepseek_v3")}


def convert(*args):
    return CliRunner().invoke(cli, ["convert", *map(str, args), "--json", "-q"])


def hf_logits(folder, architecture="Qwen3MoeForCausalLM"):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == architecture
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        return model.eval()(mw.ids()).logits.float()


def assert_same_model(case_dir, out):
    ref = mw.to_hf(torch.load(case_dir / "trained.pt"))
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name
    export = torch.load(case_dir / "hf_export.pt")        # torchtitan's own to_hf agrees, name for name
    assert sorted(export) == sorted(ref)
    assert all(torch.equal(export[n].to(ref[n].dtype), ref[n]) for n in ref)
    # the experts really are different planes of the grouped tensor
    e0, e1 = (got[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] for e in (0, 1))
    assert e0.shape == (mw.QWEN3_MOE["hidden_size"], mw.QWEN3_MOE["moe_intermediate_size"]) and not torch.equal(e0, e1)
    torch.testing.assert_close(hf_logits(out), torch.load(case_dir / "logits.pt"), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["fp32", "ep2"])
def test_qwen3_moe_converts_with_only_config_from(made, tmp_path, case):
    case_dir = made[case]
    out = tmp_path / "hf"
    result = convert(case_dir / "ckpt", out, "--config-from", case_dir / "base")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert any("source format: torchtitan-qwen3 (detected" in n and "mlp.experts.{e}.gate_proj" in n
               for n in notes), notes
    assert_same_model(case_dir, out)


def test_expert_bias_is_refused_then_excluded(made, tmp_path):
    """torchtitan's default keeps a load-balancing bias Qwen3-MoE cannot hold: refused by feature, nothing
    written; excluded on purpose it converts (the bias is zero here: no load-balancing hook ran)."""
    case_dir = made["bf16"]
    result = convert(case_dir / "ckpt", tmp_path / "refused", "--config-from", case_dir / "base")
    assert result.exit_code == 2, result.output
    error = result.output
    assert "load-balancing expert bias" in error and "layers.1.moe.expert_bias_E" in error
    assert f"--exclude '{BIAS}'" in error
    error = " ".join(error.split())     # what to do, and why: only a zero bias may be left out
    assert "adds it to the scores when it picks each token's top-k experts" in error, error
    assert "If it is all zeros" in error and "If it was trained, excluding it writes a model that sends some " \
        "tokens to other experts" in error, error
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "hf"
    result = convert(case_dir / "ckpt", out, "--config-from", case_dir / "base", "--exclude", BIAS)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["skipped"].get("excluded") == 2, result.output
    assert load_file(out / "model.safetensors")["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert_same_model(case_dir, out)


def test_a_trained_expert_bias_routes_tokens_elsewhere_so_only_a_zero_one_may_be_excluded(made, tmp_path):
    """Why the bias is refused rather than dropped: torchtitan's router adds expert_bias_E to the scores before
    top-k (`TokenChoiceTopKRouter.forward`), Hugging Face Qwen3-MoE's takes top-k of the softmax alone and has no
    tensor for it. The converted folder (bias excluded) gives torchtitan's logits while the bias is zero, and other
    logits once the bias has moved: no Qwen3MoeForCausalLM of these weights is the trained model then."""
    case_dir = made["bf16"]
    out = tmp_path / "hf"
    assert convert(case_dir / "ckpt", out, "--config-from", case_dir / "base", "--exclude", BIAS).exit_code == 0
    state = {k: v.float() for k, v in torch.load(case_dir / "trained.pt").items()}
    biases = [k for k in state if k.endswith("moe.expert_bias_E")]
    assert biases and all(not state[k].any() for k in biases)       # no load-balancing hook ran: zero
    converted = hf_logits(out)
    torch.testing.assert_close(converted, mw.fp32_logits(mw.qwen3_moe_config(True), state), rtol=0, atol=1e-5)
    experts = mw.QWEN3_MOE["num_experts"]
    moved = dict(state, **{k: torch.linspace(-0.2, 0.2, experts) for k in biases})   # as training moves it
    trained = mw.fp32_logits(mw.qwen3_moe_config(True), moved)
    assert (trained - converted).abs().max() > 1e-2, (trained - converted).abs().max()


def test_inspect_and_plan_name_the_family_and_expert_layout(made):
    ckpt, base = made["fp32"] / "ckpt", made["fp32"] / "base"
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(ckpt)]).output)["source_format"]
    assert info["name"] == "torchtitan-qwen3" and "Qwen3MoeForCausalLM" in info["family"]
    assert info["expert_layout"].startswith("per-expert mlp.experts.{e}.gate_proj/up_proj/down_proj")
    result = CliRunner().invoke(cli, ["plan", str(ckpt), "--config-from", str(base), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["source_format"] == "torchtitan-qwen3"
    assert any("per-expert" in n for n in plan["notes"]), plan["notes"]
    # expert 3 of layer 0 is one [F, D] plane of the dim-0 FSDP shard on rank 1: one piece, no load
    t = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.mlp.experts.3.up_proj.weight")
    assert t["source"] == "layers.0.moe.routed_experts.inner_experts.w3_EFD" and t["pieces"] == 1
    assert t["shape"] == [mw.QWEN3_MOE["moe_intermediate_size"], mw.QWEN3_MOE["hidden_size"]]


def test_deepseek_v3_converts_with_only_config_from(made, tmp_path):
    """torchtitan's own DeepSeek-V3 (MLA with q LoRA, a dense first layer, shared experts, group-limited sigmoid
    routing with a load-balancing bias moved off zero) to `DeepseekV3ForCausalLM`."""
    case_dir = made["deepseek_v3"]
    out = tmp_path / "hf"
    result = convert(case_dir / "ckpt", out, "--config-from", case_dir / "base")
    assert result.exit_code == 0, result.output
    assert any("source format: torchtitan-deepseek-v3 (detected" in n for n in json.loads(result.output)["notes"])
    ref = mw.to_hf(torch.load(case_dir / "trained.pt"), "deepseek_v3")
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(got[n], ref[n])]
    export = torch.load(case_dir / "hf_export.pt")        # torchtitan's own to_hf agrees
    assert sorted(export) == sorted(ref) and all(torch.equal(export[n], ref[n]) for n in ref)
    assert got["model.layers.1.mlp.gate.e_score_correction_bias"].abs().max() > 0
    assert "model.layers.0.mlp.gate_proj.weight" in got and "model.layers.0.mlp.gate.weight" not in got
    # MLA in transformers runs its ops in another order than torchtitan's: equal within fp32 rounding
    torch.testing.assert_close(hf_logits(out, "DeepseekV3ForCausalLM"), torch.load(case_dir / "logits.pt"),
                               rtol=0, atol=1e-4)


def _mismatched_config(kind: str, folder):
    """A config.json whose architecture's names the tiny Qwen3-MoE checkpoint does not have."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen3MoeConfig
    c = mw.QWEN3_MOE
    config = {"deepseek_v3": lambda: DeepseekV3Config(**mw.DEEPSEEK_V3),
              "dense_llama": lambda: LlamaConfig(**{k: c[k] for k in (
                  "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size")}),
              "qwen3_moe_8_experts": lambda: Qwen3MoeConfig(**{**c, "num_experts": 8})}[kind]()
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind,why", [
    ("deepseek_v3", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"),     # a reference weight not made
    ("dense_llama", "model.layers.0.mlp.experts.0.gate_proj.weight"),          # an expert the config has no place for
    ("qwen3_moe_8_experts", "model.layers.0.mlp.gate.weight [4, 64] here, [8, 64] in the reference"),
])
def test_moe_checkpoint_with_a_config_that_does_not_match_is_exit_4_and_writes_nothing(made, tmp_path, kind, why):
    """The names the adapter makes are proven against what the config's architecture loads: a DeepSeek-V3 config,
    a dense Llama one or the same family with another expert count is refused before anything is written, and the
    message blames the stage that would fix it (the adapter's output vs --config-from), never a --rename that
    would not make the names match."""
    base = _mismatched_config(kind, tmp_path / "base")
    out = tmp_path / "out"
    result = convert(made["fp32"] / "ckpt", out, "--config-from", base)
    assert result.exit_code == 4, result.output
    assert not out.exists() and not list(tmp_path.glob(".*out*")), list(tmp_path.iterdir())
    error = " ".join(result.output.split())
    assert why in error, error
    assert "--rename" not in error, error       # no prefix change makes these names another architecture's
    assert "torchtitan-qwen3" in error and "Is --config-from the base model" in error or (
        "the torchtitan-qwen3 adapter's output is not this config's model" in error
        and "check that --config-from is the base model" in error), error
    assert "Traceback" not in result.output


def fused(state, family="qwen3"):
    """`to_hf` with the experts in transformers 5's in-memory layout, with torch ops: [w1; w3] on the ffn dim."""
    out = {n: w for n, w in mw.to_hf(state, family).items() if ".mlp.experts." not in n}
    for key, grouped in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.moe\.routed_experts\.inner_experts\.w1_EFD", key)
        if m:
            base = key[:-len("w1_EFD")]
            out[f"model.layers.{m[1]}.mlp.experts.gate_up_proj"] = torch.cat([grouped, state[base + "w3_EFD"]], 1)
            out[f"model.layers.{m[1]}.mlp.experts.down_proj"] = state[base + "w2_EDF"]
    return out


@pytest.mark.parametrize("case,architecture", [("fp32", "Qwen3MoeForCausalLM"), ("ep2", "Qwen3MoeForCausalLM"),
                                               ("deepseek_v3", "DeepseekV3ForCausalLM")])
def test_fused_expert_layout_loads_in_transformers_with_the_same_logits(made, tmp_path, case, architecture):
    """`--expert-layout fused`: experts.gate_up_proj [E, 2F, D] / experts.down_proj [E, D, F], the layout
    transformers 5.25 holds in memory; it loads it as it is, with the trainer's logits."""
    case_dir, out = made[case], tmp_path / "hf"
    result = convert(case_dir / "ckpt", out, "--config-from", case_dir / "base", "--expert-layout", "fused")
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert any("routed experts: fused mlp.experts.gate_up_proj [E, 2F, D]" in n for n in notes), notes
    assert any("(as the model holds it in memory)" in n for n in notes), notes
    family = "deepseek_v3" if case == "deepseek_v3" else "qwen3"
    ref = fused(torch.load(case_dir / "trained.pt"), family)
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[n], ref[n]) for n in ref), [n for n in ref if not torch.equal(got[n], ref[n])]
    torch.testing.assert_close(hf_logits(out, architecture), torch.load(case_dir / "logits.pt"), rtol=0,
                               atol=1e-4 if case == "deepseek_v3" else 1e-5)
