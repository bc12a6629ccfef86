"""Trainer checkpoints (torchtitan, torchtune Llama layouts) to Hugging Face models, end to end.

Checkpoints are real DCP folders written by torch's writer on 2 gloo ranks (FSDP2 after one AdamW step, or
DTensor tensor-parallel placements): see `trainer_writers.py` for how each is made and why the trainers themselves
are not run. Each converted tensor is compared bit for bit with the trainer's HF export done with torch ops on
torch's own reconstruction (`dcp_to_torch_save`), and the converted folder's `from_pretrained` logits with the
model built from that export: `torch.equal`.
"""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from tests.support import trainer_writers as tw
from streamconv.cli import cli


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainers")
    cases = {("torchtitan", "fsdp2"), ("torchtitan", "tp"), ("torchtune", "fsdp2")}
    return {case: tw.build(root / f"{case[0]}-{case[1]}", *case) for case in sorted(cases)}


def reference(case_dir, kind):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = case_dir / "reference.pt"
    if not path.exists():
        dcp_to_torch_save(case_dir / "ckpt", path)
    full = torch.load(path, weights_only=False)
    model = full["model"] if "model" in full else {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
    trained = torch.load(case_dir / "trained.pt")
    for k, v in trained.items():          # torch's reconstruction equals the live model's gathered weights
        assert torch.equal(model[k], v), k
    return tw.trainer_to_hf(kind, model)


def convert(args):
    result = CliRunner().invoke(cli, ["convert", *map(str, args), "--json", "-q"])
    return result


def logits(state_or_folder, config_dir):
    from transformers import LlamaConfig, LlamaForCausalLM
    if isinstance(state_or_folder, dict):
        model = LlamaForCausalLM(LlamaConfig.from_pretrained(config_dir))
        model.load_state_dict(state_or_folder, strict=True)
    else:
        model = LlamaForCausalLM.from_pretrained(state_or_folder)
    ids = torch.arange(24).reshape(2, 12) % tw.LLAMA["vocab_size"]
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("kind,layout", [("torchtitan", "fsdp2"), ("torchtitan", "tp"), ("torchtune", "fsdp2")])
def test_trainer_checkpoint_converts_to_the_same_model(made, tmp_path, kind, layout):
    case_dir = made[(kind, layout)]
    out = tmp_path / "hf"
    result = convert([case_dir / "ckpt", out, "--config-from", case_dir / "base"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert any(f"source format: {kind}-llama (detected" in n for n in report["notes"]), report["notes"]
    ref = reference(case_dir, kind)
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name
    # every q/k weight really moved: the permutation is not the identity on these tensors
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           tw.hf_to_trainer(kind, ref)[tw.name_map(kind)["model.layers.0.self_attn.q_proj.weight"]])
    assert torch.equal(logits(str(out), None), logits(ref, case_dir / "base"))

    # --dtype bfloat16: the gathered (permuted) rows are cast bit for bit as torch's .to does
    out16 = tmp_path / "hf16"
    result = convert([case_dir / "ckpt", out16, "--config-from", case_dir / "base", "--dtype", "bfloat16",
                      "--buffer-size", "64KiB", "--verify"])
    assert result.exit_code == 0, result.output
    got16 = load_file(out16 / "model.safetensors")
    for name in ref:
        assert torch.equal(got16[name], ref[name].to(torch.bfloat16)), name


def test_without_a_config_the_permutation_is_refused(made, tmp_path):
    case_dir = made[("torchtitan", "fsdp2")]
    result = convert([case_dir / "ckpt", tmp_path / "out"])
    assert result.exit_code == 64, result.output
    assert "--config-from" in result.output and "head counts" in result.output
    assert not (tmp_path / "out").exists()


def test_wrong_head_counts_are_refused(made, tmp_path):
    case_dir = made[("torchtune", "fsdp2")]
    base = tmp_path / "base"
    base.mkdir()
    config = json.loads((case_dir / "base" / "config.json").read_text())
    config.update(num_attention_heads=8, head_dim=8)      # same row count, other heads: the wrong permutation
    (base / "config.json").write_text(json.dumps(config))
    result = convert([case_dir / "ckpt", tmp_path / "out", "--config-from", base])
    assert result.exit_code == 4, result.output
    assert "k_proj" in result.output and "heads of size 8" in result.output


def test_plan_shows_the_gathers(made):
    case_dir = made[("torchtitan", "tp")]
    result = CliRunner().invoke(cli, ["plan", str(case_dir / "ckpt"), "--config-from", str(case_dir / "base"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["source_format"] == "torchtitan-llama"
    q = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["source"] == "layers.0.attention.wq.weight" and q["assembly"] == "gather" and q["pieces"] == 4 * 2 * 2
    o = next(t for t in plan["tensors"] if t["name"] == "model.layers.0.self_attn.o_proj.weight")
    assert o["assembly"] == "blocks" and o["pieces"] == 0


def test_inspect_names_the_trainer(made):
    result = CliRunner().invoke(cli, ["inspect", str(made[("torchtitan", "fsdp2")] / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "source format: torchtitan-llama (detected" in result.output
    assert "beside the model: dataloader, lr_scheduler, optimizer, train_state" in result.output
    result = CliRunner().invoke(cli, ["inspect", "--json", str(made[("torchtune", "fsdp2")] / "ckpt")])
    assert json.loads(result.output)["source_format"]["name"] == "torchtune-llama"


def test_source_format_hf_keeps_the_trainers_names(made, tmp_path):
    case_dir = made[("torchtune", "fsdp2")]
    result = convert([case_dir / "ckpt", tmp_path / "out", "--source-format", "hf"])
    assert result.exit_code == 0, result.output
    names = set(load_file(tmp_path / "out" / "model.safetensors"))
    assert "layers.0.attn.q_proj.weight" in names and "norm.scale" in names


def test_forcing_the_wrong_trainer_names_the_unmapped_tensors(made, tmp_path):
    case_dir = made[("torchtune", "fsdp2")]
    result = convert([case_dir / "ckpt", tmp_path / "out", "--source-format", "torchtitan-llama",
                      "--config-from", case_dir / "base"])
    assert result.exit_code == 2, result.output
    assert "no mapping in the torchtitan-llama layout" in result.output and "attn.q_proj" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.trainers
def test_real_torchtune_model_class(tmp_path):
    """torchtune's own `llama3` TransformerDecoder, trained one step on tokens under FSDP2, and its own `tune_to_hf`
    as the reference (needs torchtune 0.6 + torchao: `make test-trainers`)."""
    if not tw.torchtune_available():
        pytest.skip("torchtune 0.6 is not importable (make test-trainers installs it)")
    case_dir = tw.build(tmp_path / "tt", "torchtune-real")
    out = tmp_path / "hf"
    result = convert([case_dir / "ckpt", out, "--config-from", case_dir / "base"])
    assert result.exit_code == 0, result.output
    ref = reference(case_dir, "torchtune-real")
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(logits(str(out), None), logits(ref, case_dir / "base"))


@pytest.mark.trainers
def test_real_torchtitan_model_class(tmp_path):
    """torchtitan 0.3's own `Llama3Model` (fused qkv, FSDP2, one step on tokens) and its own
    `Llama3StateDictAdapter.to_hf` as the reference (needs torchtitan: `make test-trainers`)."""
    if not tw.torchtitan_available():
        pytest.skip("torchtitan 0.3 is not importable (make test-trainers installs it)")
    case_dir = tw.build(tmp_path / "titan", "torchtitan-real")
    out = tmp_path / "hf"
    result = convert([case_dir / "ckpt", out, "--config-from", case_dir / "base"])
    assert result.exit_code == 0, result.output
    assert any("source format: torchtitan-llama (detected" in n and "train_state" in n
               for n in json.loads(result.output)["notes"])
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(case_dir / "ckpt", tmp_path / "reference.pt")
    reconstructed = torch.load(tmp_path / "reference.pt", weights_only=False)
    for k, v in torch.load(case_dir / "trained.pt").items():
        assert torch.equal(reconstructed[k], v), k
    ref = torch.load(case_dir / "hf_export.pt")
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(logits(str(out), None), logits(ref, case_dir / "base"))
