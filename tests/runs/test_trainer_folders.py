"""Trainers' run folders and reference folders: never a silently wrong model.

* The reference check (`hf/verdict.py`): output names or shapes that do not match the reference model's
  weights fail before writing with exit 4, listing both sides; `--allow-unmatched` turns that into notes.
* Finding the model's DCP folder in a run folder (`discover.py`): accelerate's `state/`, a Trainer
  `checkpoint-N/`, a folder of `checkpoint-*` or `step-*` (listed, none taken), an optimizer-only folder.
* `--config-from` done right: a training checkpoint explains that the base model is needed, a hub cache snapshot
  of symlinks works, `--no-config` keeps train_params.yaml and the HF cache out of it.

Pure layers first (verdicts and decisions from literal inputs), then real checkpoints: a tiny HF Llama trained one
step under FSDP2 in gloo ranks, saved by torch's DCP writer with the exact calls accelerate makes, laid out as
accelerate, Trainer and torchtitan lay them out (`run_folder_writers.py` says why the trainers are not run).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamconv import api
from streamconv.runs import discover
from streamconv.cli import cli
from streamconv.errors import CheckpointError, OptionsError, ReferenceMismatchError
from streamconv.hf import sidecars, verdict

# -- the reference check, pure ------------------------------------------------------------------------------


REF = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4),
       "model.layers.0.w": (4, 4)}


def test_a_matching_output_passes_with_no_notes():
    found = verdict.judge(dict(REF), REF, tie=False)
    assert found.ok and verdict.enforce(found, "/ref", "as in the checkpoint", allow_unmatched=False) == []


def test_mismatches_fail_listing_both_sides_and_shapes():
    output = {"model.embed_tokens.weight": (10, 4), "model.final_norm.weight": (4,), "lm_head.weight": (10, 4),
              "model.layers.0.w": (4, 5)}
    found = verdict.judge(output, REF, tie=False)
    assert found.unmatched == ("model.final_norm.weight",) and found.missing == ("model.norm.weight",)
    assert found.shape_mismatches == (("model.layers.0.w", (4, 5), (4, 4)),)
    with pytest.raises(ReferenceMismatchError) as exc:
        verdict.enforce(found, "/ref", "as in the checkpoint", allow_unmatched=False)
    text = str(exc.value)
    assert exc.value.exit_code == 4 and "/ref" in text and "nothing was written" in text
    assert "1 output name(s) not in the reference: model.final_norm.weight" in text
    assert "1 reference weight(s) not in the output: model.norm.weight" in text
    assert "model.layers.0.w [4, 5] here, [4, 4] in the reference" in text
    assert "--allow-unmatched" in text and "--rename" in text
    notes = verdict.enforce(found, "/ref", "x", allow_unmatched=True)
    assert len(notes) == 3 and all(n.startswith("--allow-unmatched") for n in notes)


def test_listings_are_bounded_with_counts():
    output = {f"t.{i}": (1,) for i in range(30)}
    found = verdict.judge(output, REF, tie=False)
    with pytest.raises(ReferenceMismatchError) as exc:
        verdict.enforce(found, "/ref", "x", allow_unmatched=False)
    text = str(exc.value)
    assert "30 output name(s) not in the reference" in text and "... and 22 more" in text
    listed = text.split("not in the reference: ")[1].split(" ... and")[0].split(", ")
    assert len(listed) == verdict.LIST_LIMIT == 8
    assert len(text.splitlines()) < 8


def test_a_tied_head_the_output_lacks_is_rebuilt_not_missing():
    output = {n: s for n, s in REF.items() if n != "lm_head.weight"}
    found = verdict.judge(output, REF, tie=True)
    assert found.ok and found.rebuilt_heads == ("lm_head.weight",)
    assert "rebuilds it" in verdict.enforce(found, "/ref", "x", allow_unmatched=False)[0]
    assert verdict.judge(output, REF, tie=None).ok                     # transformers' default ties
    assert verdict.judge(output, REF, tie=False).missing == ("lm_head.weight",)
    no_embedding = {n: s for n, s in output.items() if n != "model.embed_tokens.weight"}
    assert set(verdict.judge(no_embedding, REF, tie=True).missing) == {"lm_head.weight", "model.embed_tokens.weight"}


def test_weights_left_out_by_include_exclude_are_explained():
    output = {n: s for n, s in REF.items() if n != "model.layers.0.w"}
    found = verdict.judge(output, REF, tie=False, unfiltered=list(REF))
    assert found.missing == found.excluded == ("model.layers.0.w",)
    with pytest.raises(ReferenceMismatchError, match="left out by --include/--exclude: model.layers.0.w") as exc:
        verdict.enforce(found, "/ref", "x", allow_unmatched=False)
    assert "partial model on purpose, add --allow-unmatched" in str(exc.value)


# -- finding the model's folder, pure -----------------------------------------------------------------------


MODEL = discover.Holding(model_tensors=21, optimizer_tensors=0, other_tensors=0)
OPTIM = discover.Holding(model_tensors=0, optimizer_tensors=63, other_tensors=0)


def test_decide_takes_the_only_model_folder_and_names_the_optimizer_one():
    d = discover.decide("state", [discover.Found("optimizer_0", OPTIM), discover.Found("pytorch_model_fsdp_0", MODEL)])
    assert d.chosen == "pytorch_model_fsdp_0"
    assert "state/pytorch_model_fsdp_0 (accelerate / transformers Trainer layout)" in d.message
    assert "the only DCP folder under state holding model weights (21 tensors)" in d.message
    assert "optimizer state only, not converted: state/optimizer_0" in d.message
    assert discover.decide("empty", []) is None


def test_decide_lists_several_steps_and_takes_none():
    found = [discover.Found(f"step-{n}", MODEL) for n in (100, 20, 3)]
    d = discover.decide("checkpoint", found)
    assert d.chosen is None
    lines = d.message.splitlines()
    assert lines[1:4] == ["  checkpoint/step-3  (step 3: 21 model tensors)",
                          "  checkpoint/step-20  (step 20: 21 model tensors)",
                          "  checkpoint/step-100  (step 100: 21 model tensors)"]
    assert lines[-1] == "The newest is step 100: pass checkpoint/step-100 to convert it."


def test_decide_refuses_unread_or_optimizer_only_folders():
    d = discover.decide("run", [discover.Found("a", MODEL), discover.Found("b", None, "not read: too many")])
    assert d.chosen is None and "run/b  (not read: too many)" in d.message
    d = discover.decide("run", [discover.Found("optimizer_0", OPTIM)])
    assert d.chosen is None and "holds no model weights" in d.message and "pytorch_model_fsdp_0" in d.message
    d = discover.decide("run", [discover.Found("m", MODEL)], truncated=True)
    assert d.chosen is None and "stopped after" in d.message


def test_step_numbers_come_from_the_deepest_numbered_folder():
    assert discover.Found("checkpoint-500/pytorch_model_fsdp_0").step == ("checkpoint", 500)
    assert discover.Found("run/dist_epoch_2").step == ("epoch", 2)
    assert discover.Found("checkpoints/checkpoint_7/pytorch_model_fsdp_0").step == ("checkpoint", 7)
    assert discover.Found("pytorch_model_fsdp_0").step is None


def _meta(*keys):
    """Metadata of tensors named by their planner paths (no chunks: classify reads names only)."""
    from streamconv.model import CheckpointMetadata, TensorEntry

    return CheckpointMetadata(tensors=tuple(TensorEntry(".".join(k), "float32", (2,), (), k) for k in keys))


def test_classify_counts_as_the_planner_selects():
    accelerate_optim = _meta(("optimizer", "state", "model.w", "exp_avg"), ("optimizer", "state", "model.w", "step"))
    assert discover.classify(accelerate_optim) == discover.Holding(0, 2, 0)
    flat_optim = _meta(("state.model.w.exp_avg",), ("param_groups.model.w.lr",))
    assert discover.classify(flat_optim).kind == "optimizer"
    titan = _meta(("layers.0.w",), ("tok_embeddings.weight",), ("optimizer", "state", "layers.0.w", "exp_avg"),
                  ("lr_scheduler", "x"))
    assert discover.classify(titan) == discover.Holding(2, 1, 1)


def test_reference_names_without_shapes_are_checked_by_name():
    found = verdict.judge({"a": (2,), "b": (3,)}, {"a": None, "c": None}, tie=False)   # a .bin index: names only
    assert (found.unmatched, found.missing, found.shape_mismatches) == (("b",), ("c",), ())


# -- config sources, pure -----------------------------------------------------------------------------------


def _config_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def test_no_config_ignores_train_params_and_refuses_config_from(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    base = _config_folder(tmp_path / "base")
    (ckpt / "train_params.yaml").write_text(f"model_name: {base}\n")
    env = {"HF_HUB_CACHE": str(tmp_path / "cache")}
    assert sidecars.find_config_dir(str(ckpt), None, env).folder == str(base)
    src = sidecars.find_config_dir(str(ckpt), None, env, no_config=True)
    assert src.folder is None and "--no-config" in src.note and "train_params.yaml" in src.note
    with pytest.raises(OptionsError, match="--no-config and --config-from"):
        sidecars.find_config_dir(str(ckpt), str(base), env, no_config=True)


# -- real checkpoints in trainers' layouts ------------------------------------------------------------------


@pytest.fixture(scope="session")
def written(tmp_path_factory):
    from tests.support import run_folder_writers as trainer_writers

    return trainer_writers.build(tmp_path_factory.mktemp("trainers"))


def _trainer_checkpoint(state: Path, dest: Path) -> Path:
    """A transformers Trainer `checkpoint-N/`: the same two accelerate folders, plus the Trainer's own files."""
    from tests.support import run_folder_writers as trainer_writers

    dest.mkdir(parents=True)
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        shutil.copytree(state / name, dest / name)
    for name in trainer_writers.TRAINER_SIDE_FILES:
        (dest / name).write_bytes(b"{}\n")
    return dest


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _logits_equal(out: Path, written) -> bool:
    from tests.support import hf_writers
    import torch

    model = hf_writers.model_class("llama_untied").from_pretrained(out)
    expected = hf_writers.model_class("llama_untied").from_pretrained(written["base"])
    expected.load_state_dict(torch.load(written["trained"], weights_only=True), strict=True)
    with torch.no_grad():
        batch = hf_writers.inputs("llama_untied", seed=7)
        return torch.equal(model.eval()(**batch).logits, expected.eval()(**batch).logits)


def test_accelerate_state_folder_converts_the_model_and_says_which(written, tmp_path):
    out = tmp_path / "out"
    result = _invoke("convert", written["state"], out, "--config-from", written["base"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["checkpoint"] == str(written["state"] / "pytorch_model_fsdp_0")
    note = report["notes"][0]
    assert f"{written['state'] / 'pytorch_model_fsdp_0'}" in note and "only DCP folder" in note
    assert f"optimizer state only, not converted: {written['state'] / 'optimizer_0'}" in note
    assert report["unmatched_names"] == [] and report["missing_names"] == []
    assert _logits_equal(out, written)


def test_optimizer_folder_says_so_and_names_the_model_folder(written, tmp_path):
    out = tmp_path / "out"
    for verb in (["convert", written["state"] / "optimizer_0", out], ["plan", written["state"] / "optimizer_0"]):
        result = _invoke(*verb)
        assert result.exit_code == CheckpointError.exit_code, result.output
        assert "holds only optimizer state (63 optimizer tensors)" in result.output
        assert f"The model is in the folder beside it: {written['state'] / 'pytorch_model_fsdp_0'}" in result.output
        assert "Traceback" not in result.output
    assert not out.exists()
    result = _invoke("plan", written["state"] / "optimizer_0", "--subtree", "optimizer")   # asked for: planned
    assert result.exit_code == 0 and "state.model.layers.0.mlp.up_proj.weight.exp_avg" in result.output, result.output


def test_trainer_checkpoint_folder_and_a_folder_of_them(written, tmp_path):
    run = tmp_path / "output_dir"
    for step in (500, 1000):
        _trainer_checkpoint(written["state"], run / f"checkpoint-{step}")
    result = _invoke("plan", run / "checkpoint-1000", "--config-from", written["base"], "--json")
    assert result.exit_code == 0, result.output
    assert f"checkpoint folder: {run / 'checkpoint-1000' / 'pytorch_model_fsdp_0'}" in json.loads(
        result.output)["notes"][0]

    out = tmp_path / "out"
    result = _invoke("convert", run, out, "--config-from", written["base"])
    assert result.exit_code == CheckpointError.exit_code, result.output
    assert "none was taken" in result.output
    assert f"{run}/checkpoint-500/pytorch_model_fsdp_0  (checkpoint 500: 21 model tensors)" in result.output
    assert f"{run}/checkpoint-1000/pytorch_model_fsdp_0  (checkpoint 1000: 21 model tensors)" in result.output
    assert f"optimizer state only: {run}/checkpoint-500/optimizer_0, {run}/checkpoint-1000/optimizer_0" in result.output
    assert f"The newest is checkpoint 1000: pass {run}/checkpoint-1000/pytorch_model_fsdp_0" in result.output
    assert not out.exists()


def test_torchtitan_checkpoint_folder_of_steps(written, tmp_path):
    ckpt = tmp_path / "outputs" / "checkpoint"
    shutil.copytree(written["titan_step"], ckpt / "step-10")
    result = _invoke("inspect", ckpt)
    assert result.exit_code == 0, result.output
    assert f"checkpoint folder: {ckpt / 'step-10'} (torchtitan layout)" in result.output
    shutil.copytree(written["titan_step"], ckpt / "step-20")
    for folder in (ckpt, ckpt.parent):
        result = _invoke("plan", folder)
        assert result.exit_code == CheckpointError.exit_code, result.output
        assert "step-10  (step 10: 21 model tensors, 63 optimizer tensors)" in result.output
        assert f"The newest is step 20: pass {ckpt / 'step-20'}" in result.output


def test_discovery_reads_no_data_file_skips_hidden_folders_and_bounds_metadata_reads(written, tmp_path,
                                                                                      monkeypatch):
    state = tmp_path / "state"
    shutil.copytree(written["state"], state)
    for f in state.glob("*/*.distcp"):
        f.unlink()                          # only .metadata is read: the choice is the same without data files
    shutil.copytree(written["state"] / "pytorch_model_fsdp_0", state / ".staging-out")
    folder, note = discover.find_checkpoint(str(state))
    assert folder == str(state / "pytorch_model_fsdp_0") and ".staging" not in note
    monkeypatch.setattr(discover, "MAX_METADATA_READS", 1)
    with pytest.raises(CheckpointError, match="pytorch_model_fsdp_0  \\(not read: more than 1 checkpoint folders"):
        discover.find_checkpoint(str(state))


def test_a_config_only_reference_is_checked_against_the_model_it_builds(written, tmp_path):
    """Issue 19.1: no weights beside config.json no longer means unchecked: the names come from the config's model
    (here streamconv's Llama table; tests/hf/test_expected.py has the rest)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(written["base"] / "config.json", ref / "config.json")
    result = _invoke("plan", written["state"], "--config-from", ref, "--json")
    assert result.exit_code == 0, result.output
    assert any("output names and shapes are those of a LlamaForCausalLM built from" in n
               for n in json.loads(result.output)["notes"])
    result = _invoke("plan", written["state"], "--config-from", ref, "--rename", r"^lm_head=output", "--json")
    assert result.exit_code == ReferenceMismatchError.exit_code, result.output
    assert "output.weight" in result.output and "--rename '^output\\.=lm_head.'" in result.output
    result = _invoke("plan", written["state"], "--config-from", ref, "--rename", r"^lm_head=output", "--json",
                     "--allow-unmatched")
    assert result.exit_code == 0, result.output
    assert any(n.startswith("--allow-unmatched: the output is not the LlamaForCausalLM")
               for n in json.loads(result.output)["notes"])


def test_a_folder_with_no_checkpoint_below_still_explains_dcp(tmp_path):
    (tmp_path / "sub").mkdir()
    result = _invoke("plan", tmp_path)
    assert result.exit_code == CheckpointError.exit_code and "no `.metadata` file" in result.output


# -- the reference check on real checkpoints ----------------------------------------------------------------


def test_renamed_names_fail_before_writing_and_allow_unmatched_writes(written, tmp_path):
    out = tmp_path / "out"
    ckpt = written["state"] / "pytorch_model_fsdp_0"
    args = [ckpt, "--config-from", written["base"], "--rename", r"^model\.norm=model.final_norm"]
    for verb in (["convert", args[0], out] + args[1:], ["plan"] + args):
        result = _invoke(*verb)
        assert result.exit_code == ReferenceMismatchError.exit_code == 4, result.output
        assert "1 output name(s) not in the reference: model.final_norm.weight" in result.output
        assert "1 reference weight(s) not in the output: model.norm.weight" in result.output
        assert str(written["base"]) in result.output
    assert not out.exists() and os.listdir(tmp_path) == []
    result = _invoke("convert", ckpt, out, *args[1:], "--allow-unmatched", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["unmatched_names"] == ["model.final_norm.weight"] and report["missing_names"] == ["model.norm.weight"]
    assert any(n.startswith("--allow-unmatched") and "model.final_norm.weight" in n for n in report["notes"])


def test_excluded_weights_are_named_as_excluded(written, tmp_path):
    result = _invoke("plan", written["state"], "--config-from", written["base"], "--exclude", "*.layers.1.*")
    assert result.exit_code == 4, result.output
    assert "9 reference weight(s) not in the output" in result.output
    assert "9 of those are in the checkpoint but left out by --include/--exclude" in result.output
    assert "partial model on purpose" in result.output


def test_a_reference_of_other_shapes_fails(written, tmp_path):
    """A reference folder whose q_proj has other shapes (hand-made safetensors: this is the reference, not the
    checkpoint)."""
    from safetensors.numpy import load_file, save_file

    ref = tmp_path / "ref"
    shutil.copytree(written["base"], ref)
    weights = load_file(ref / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:32]
    save_file(weights, ref / "model.safetensors")
    result = _invoke("plan", written["state"], "--config-from", ref)
    assert result.exit_code == 4, result.output
    assert "model.layers.0.self_attn.q_proj.weight [64, 64] here, [32, 64] in the reference" in result.output


def test_train_params_reference_is_checked_too_and_no_config_skips_it(written, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(written["state"] / "pytorch_model_fsdp_0", ckpt)
    (ckpt / "train_params.yaml").write_text(f"model_name: {written['base']}\n")
    result = _invoke("plan", ckpt, "--rename", r"^lm_head=output")
    assert result.exit_code == 4 and "output.weight" in result.output, result.output
    out = tmp_path / "out"
    result = _invoke("convert", ckpt, out, "--rename", r"^lm_head=output", "--no-config", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["config_from"] is None and not (out / "config.json").exists()
    assert any(n.startswith("--no-config") for n in report["notes"])


# -- --config-from ------------------------------------------------------------------------------------------


def test_config_from_a_trainer_checkpoint_asks_for_the_base_model(written, tmp_path):
    run = tmp_path / "output_dir"
    ckpt = _trainer_checkpoint(written["state"], run / "checkpoint-1000")
    result = _invoke("plan", ckpt, "--config-from", ckpt)
    assert result.exit_code == OptionsError.exit_code, result.output
    assert f"--config-from {ckpt}: no config.json there" in result.output
    assert "training checkpoint" in result.output and "base model you fine-tuned from" in result.output
    assert "trainer_state.json" in result.output and "config.json exists" not in result.output
    shutil.copy(written["base"] / "config.json", run / "config.json")   # Trainer's final save_model
    result = _invoke("plan", ckpt, "--config-from", ckpt)
    assert f"{run / 'config.json'} exists in a folder above" in result.output
    assert f"pass --config-from {run}" in result.output


def _hub_cache_entry(base: Path, cache: Path) -> Path:
    """`models--org--tiny/` as huggingface_hub lays it out: files in blobs/ named by hash, snapshots/<rev>/ of
    relative symlinks into ../../blobs/, refs/main naming the revision."""
    import hashlib

    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        os.symlink(os.path.join("..", "..", "blobs", digest), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return repo


def test_hub_cache_snapshot_of_symlinks_is_a_reference(written, tmp_path):
    repo = _hub_cache_entry(written["base"], tmp_path / "hub")
    snapshot = repo / "snapshots" / "0123abcd"
    assert os.path.islink(snapshot / "model.safetensors")
    out = tmp_path / "out"
    result = _invoke("convert", written["state"], out, "--config-from", snapshot, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert not any("holds no weights" in n for n in report["notes"])
    assert not any(os.path.islink(out / f) for f in os.listdir(out))           # real files, not links
    assert (out / "tokenizer.json").read_bytes() == (written["base"] / "tokenizer.json").read_bytes()
    assert _logits_equal(out, written)
    # The weights' names were read through the links: a wrong name is caught.
    result = _invoke("plan", written["state"], "--config-from", snapshot, "--rename", r"^lm_head=output")
    assert result.exit_code == 4 and "lm_head.weight" in result.output, result.output
    # The repo folder itself stands for its main snapshot.
    result = _invoke("plan", written["state"], "--config-from", repo, "--json")
    assert result.exit_code == 0, result.output
    assert any(f"its snapshot {snapshot}" in n for n in json.loads(result.output)["notes"])


def test_hub_cache_found_through_train_params_can_be_turned_off(written, tmp_path, monkeypatch):
    _hub_cache_entry(written["base"], tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(written["state"] / "pytorch_model_fsdp_0", ckpt)
    (ckpt / "train_params.yaml").write_text("model_name: org/tiny\n")
    found = api.plan(str(ckpt))
    assert found.tensors
    report = api.convert(str(ckpt), str(tmp_path / "a"))
    assert report.config_from == str(tmp_path / "hub" / "models--org--tiny" / "snapshots" / "0123abcd")
    report = api.convert(str(ckpt), str(tmp_path / "b"), no_config=True)
    assert report.config_from is None and report.copied_files == []
