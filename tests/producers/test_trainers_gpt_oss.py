"""torchtitan 0.3 GPT-OSS checkpoints (its own `GptOssModel`, FSDP2 or expert parallel 2 on 2 gloo ranks, saved
model-only as its CheckpointManager does) to Hugging Face `GptOssForCausalLM`, end to end (marker `trainers`: `make test-trainers`).
See `trainer_gptoss_writers.py` for how the checkpoint is made.

Truth: the gathered trained state dict mapped to HF with torch ops (expert weights transposed), bit for bit;
transformers loads the folder with no key missing or unexpected, and its logits equal the torchtitan model's own
(fp32 experts, attention sinks applied). torchtitan's own `GptOssStateDictAdapter.to_hf` is not the reference: in
0.3.0 it drops every routed-expert tensor, which the test shows.
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.support import trainer_gptoss_writers as gw
from tests.support import trainer_writers as tw
from streamconv.cli import cli

pytestmark = pytest.mark.trainers

GATE_UP = "model.layers.1.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    if not tw.torchtitan_available():
        pytest.skip("torchtitan 0.3 is not importable (make test-trainers installs it)")
    root = tmp_path_factory.mktemp("gptoss")
    return {"fp32": gw.build(root / "fp32"), "bf16": gw.build(root / "bf16", export_dtype="bfloat16"),
            "ep2": gw.build(root / "ep2", expert_parallel=2)}


@pytest.mark.parametrize("case", ["fp32", "bf16", "ep2"])
def test_gpt_oss_converts_with_only_config_from(made, tmp_path, case):
    """fp32, `export_dtype=bfloat16` (the weights rounded; the logits are the rounded model's, in fp32), and expert
    parallel 2 (torchtitan's own `parallelize_gptoss`: each rank saves its half of the experts)."""
    if case == "ep2":
        info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(made[case] / "ckpt")]).output)
        grouped = [t for t in info["tensors"] if t["name"].endswith(("mlp1_weight_EGD", "mlp2_weight_EDF"))]
        assert len(grouped) == 4 and all(t["layout"] == "2 chunks, dim 0" for t in grouped), grouped
    made, out = made[case], tmp_path / "hf"
    result = CliRunner().invoke(cli, ["convert", str(made / "ckpt"), str(out), "--config-from", str(made / "base"),
                                      "--verify", "--json", "-q"])
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert any("source format: torchtitan-gpt-oss (detected" in n and "gate_up_proj [E, D, 2F]" in n
               for n in notes), notes
    assert any("output names and shapes are those of a GptOssForCausalLM" in n for n in notes), notes
    ref = gw.to_hf(torch.load(made / "trained.pt"))
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    assert got[GATE_UP].dtype == getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "ep2": "float32"}[case])
    assert all(got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]) for n in ref), [
        n for n in ref if not torch.equal(got[n], ref[n])]
    c = gw.GPT_OSS
    experts, dim, ffn = c["num_local_experts"], c["hidden_size"], c["intermediate_size"]
    assert got[GATE_UP].shape == (experts, dim, 2 * ffn)
    assert got["model.layers.1.mlp.experts.down_proj"].shape == (experts, ffn, dim)
    assert got["model.layers.1.self_attn.sinks"].abs().max() > 0 and got["model.layers.1.mlp.router.bias"].shape == (
        experts,)
    # torchtitan's own export agrees on everything it keeps, and keeps no routed expert
    export = torch.load(made / "hf_export.pt")
    assert not [n for n in export if ".experts." in n] and [n for n in ref if ".experts." in n]
    assert all(torch.equal(export[n], ref[n]) for n in export)
    model, info = _load(out)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with torch.no_grad():
        logits = model.eval()(gw.mw.ids()).logits.float()
    torch.testing.assert_close(logits, torch.load(made / "logits.pt"), rtol=0, atol=1e-5)


def _load(folder):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == "GptOssForCausalLM"
    return model, info


def test_inspect_and_plan_name_the_family_and_the_transposed_experts(made):
    ckpt, base = made["fp32"] / "ckpt", made["fp32"] / "base"
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(ckpt)]).output)["source_format"]
    assert info["name"] == "torchtitan-gpt-oss" and "GptOssForCausalLM" in info["family"]
    assert info["expert_layout"].startswith("fused mlp.experts.gate_up_proj [E, D, 2F]")
    result = CliRunner().invoke(cli, ["plan", str(ckpt), "--config-from", str(base), "--json"])
    assert result.exit_code == 0, result.output
    t = next(t for t in json.loads(result.output)["tensors"] if t["name"] == GATE_UP)
    # the FSDP2 shards of [E, 2F, D] on dim 0, each read as stored and put in place transposed
    assert t["source"] == "layers.1.moe.routed_experts.inner_experts.mlp1_weight_EGD" and t["assembly"] == "transpose"
    c = gw.GPT_OSS
    assert t["shape"] == [c["num_local_experts"], c["hidden_size"], 2 * c["intermediate_size"]]
