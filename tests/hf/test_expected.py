"""Never a silently wrong model, for any architecture (issue 19 item 1): with a base folder that holds only
config.json, the output's names and shapes must be what that config's model loads, or exit 4 with nothing
written and the stage that would fix it.

Pure layers first (the Llama table, the comparison, the hints, the probe's answer checks), then transformers'
own answer on the meta device (`hf/meta_probe.py`, cached for the session by conftest's `meta_model_cache`), then
real DCP checkpoints written by torch under FSDP2 (`family_writers.py`): Qwen2 with biases and Qwen3 with QK-norm
and tied embeddings converting into folders `from_pretrained` loads with nothing missing and equal logits, and
hostile pairs of checkpoint and config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from streamconv.cli import cli
from streamconv.errors import ReferenceMismatchError
from streamconv.hf import expected, meta_probe, tables
from streamconv.hf.sidecars import HFConfig
from streamconv.output import record

LLAMA = {"model_type": "llama", "vocab_size": 11, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 11, "hidden_size": 8,
             "intermediate_size": 12, "moe_intermediate_size": 6, "num_experts": 3, "num_experts_per_tok": 2,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
             "tie_word_embeddings": False}


def _config(data: dict, folder: str = "/base") -> HFConfig:
    return HFConfig(folder=folder, data=data)


def _llama_output(config: dict) -> dict:
    weights, _ = tables.expected_weights(tables.LLAMA, config)
    return dict(weights)


# -- the Llama table, pure ------------------------------------------------------------------------------------


def test_the_llama_table_lists_every_weight_with_its_shape():
    weights, optional = tables.expected_weights(tables.LLAMA, LLAMA)
    assert len(weights) == 3 + 2 * 9 and optional == frozenset()
    assert weights["model.embed_tokens.weight"] == (11, 8) and weights["lm_head.weight"] == (11, 8)
    assert weights["model.layers.1.self_attn.k_proj.weight"] == (4, 8)          # 2 kv heads of 2
    assert weights["model.layers.0.mlp.down_proj.weight"] == (8, 12)
    biased, _ = tables.expected_weights(tables.LLAMA, dict(LLAMA, attention_bias=True, mlp_bias=True))
    assert biased["model.layers.0.self_attn.o_proj.bias"] == (8,) and biased["model.layers.1.mlp.up_proj.bias"] == (12,)
    assert len(biased) == len(weights) + 2 * 7
    _, tied = tables.expected_weights(tables.LLAMA, dict(LLAMA, tie_word_embeddings=True))
    assert tied == {"lm_head.weight"}


@pytest.mark.parametrize("change", [{"vocab_size": "big"}, {"hidden_size": None}, {"num_hidden_layers": 0}, {"architectures": ["LlamaModel"]},
                                    {"model_type": "mistral"}, {"quantization_config": {"quant_method": "fp8"}},
                                    {"attention_bias": "yes"}, {"hidden_size": 9}])
def test_the_table_declines_a_config_it_does_not_describe_completely(change):
    config = dict(LLAMA, **change)
    assert tables.table_for(LLAMA) is tables.LLAMA
    assert tables.table_for(config) is None


def test_sizes_a_config_leaves_out_are_llama_configs_defaults():
    weights, _ = tables.expected_weights(tables.LLAMA, {"model_type": "llama", "num_hidden_layers": 1})
    assert weights["model.embed_tokens.weight"] == (32000, 4096) and weights["model.layers.0.mlp.up_proj.weight"] == (
        11008, 4096) and len(weights) == 3 + 9


# -- the comparison and its hints, pure -----------------------------------------------------------------------


def test_a_matching_output_passes_and_says_what_proved_it():
    notes = expected.check(_llama_output(LLAMA), _config(LLAMA))
    assert notes == ["21 output names and shapes are those of a LlamaForCausalLM built from /base/config.json by "
                     "streamconv's llama table (checked against transformers 5.25.0), as save_pretrained writes it"]


def test_a_tied_head_may_be_present_or_absent_but_nothing_else_may_be():
    config = dict(LLAMA, tie_word_embeddings=True)
    output = _llama_output(config)
    expected.check(output, _config(config))
    del output["lm_head.weight"]
    expected.check(output, _config(config))
    with pytest.raises(ReferenceMismatchError, match="not in the output: lm_head.weight"):
        expected.check(output, _config(LLAMA))         # untied: the head is a weight of its own


def test_a_wrong_shape_or_a_missing_weight_is_exit_4_listing_both():
    output = _llama_output(LLAMA)
    output["model.layers.0.mlp.up_proj.weight"] = (13, 8)
    del output["model.norm.weight"]
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check(output, _config(LLAMA))
    text = str(exc.value)
    assert exc.value.exit_code == 4 and "nothing was written" in text and "/base/config.json" in text
    assert "model.layers.0.mlp.up_proj.weight [13, 8] here, [12, 8] in the reference" in text
    assert "not in the output: model.norm.weight" in text and "--allow-unmatched" in text


def test_allow_unmatched_turns_the_mismatch_into_notes():
    output = _llama_output(LLAMA)
    output["extra.weight"] = (1,)
    notes = expected.check(output, _config(LLAMA), allow_unmatched=True)
    assert notes == ["--allow-unmatched: the output is not the LlamaForCausalLM built from /base/config.json by "
                     "streamconv's llama table (checked against transformers 5.25.0): 1 output name(s) not in the "
                     "reference: extra.weight"]


def test_a_prefix_that_is_off_is_blamed_on_rename_with_the_rule_to_use():
    output = {"_orig_mod." + n: s for n, s in _llama_output(LLAMA).items()}
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check(output, _config(LLAMA))
    assert "21 name(s) differ only by a prefix: --rename '^_orig_mod\\.='" in str(exc.value)
    assert expected.prefix_rule(["layers.0.w", "layers.1.w", "norm.w"],
                                ["model.layers.0.w", "model.layers.1.w", "model.norm.w"]) == ("", "model.", 3)
    assert expected.prefix_rule(["a.x", "b.y"], ["model.q", "model.r"]) is None


def test_a_rename_is_suggested_only_when_it_would_make_the_names_match():
    """A prefix change that a few names share is no fix when renaming it still leaves the output another model:
    a 2-expert MoE layer against a dense Llama config votes for turning `mlp.experts.0.` into `mlp.` (three
    names fixed), but expert 1 would still have no place, so no --rename is offered; the same rule is offered
    when it fixes everything (one expert, named as if an expert)."""
    config = _config(LLAMA)
    dense = _llama_output(LLAMA)
    moe = {n: s for n, s in dense.items() if not n.startswith("model.layers.0.mlp.")}
    for e in (0, 1):
        for part in ("gate_proj", "up_proj", "down_proj"):
            moe[f"model.layers.0.mlp.experts.{e}.{part}.weight"] = dense[f"model.layers.0.mlp.{part}.weight"]
    rule = "--rename '^model\\.layers\\.0\\.mlp\\.experts\\.0\\.=model.layers.0.mlp.'"
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check(moe, config)
    text = str(exc.value)
    assert expected.prefix_rule(*_unmatched_and_missing(text)) is not None     # the vote alone would offer it
    assert "--rename" not in text and "differ only by a prefix" not in text, text
    assert "check that --config-from is the base model" in text
    one_expert = {n: s for n, s in moe.items() if ".experts.1." not in n}
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check(one_expert, config)
    assert f"3 name(s) differ only by a prefix: {rule}" in str(exc.value), str(exc.value)


def _unmatched_and_missing(text: str):
    """The output names and reference weights an error message lists (all of them: fewer than LIST_LIMIT)."""
    lists = {}
    for line in text.splitlines():
        for key, marker in (("unmatched", "output name(s) not in the reference: "),
                            ("missing", "reference weight(s) not in the output: ")):
            if marker in line:
                lists[key] = line.split(marker, 1)[1].split(", ")
    return lists["unmatched"], lists["missing"]


def test_a_trainers_own_names_are_blamed_on_the_missing_adapter():
    output = {"tok_embeddings.weight": (11, 8), "layers.0.attention.wq.weight": (8, 8),
              "layers.0.moe.experts.w1": (3, 6, 8), "output.weight": (11, 8)}
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check(output, _config(LLAMA))
    text = str(exc.value)
    assert "torchtitan (MoE)'s own module names (e.g. layers.0.moe.experts.w1)" in text
    assert "--source-format, one of torchtitan-llama" in text
    with pytest.raises(ReferenceMismatchError, match="the torchtitan-llama adapter's output is not this config"):
        expected.check({"model.norm.weight": (8,)}, _config(LLAMA), source_format="torchtitan-llama")


def test_a_weight_left_out_by_the_users_filters_says_so():
    output = _llama_output(LLAMA)
    del output["lm_head.weight"]
    with pytest.raises(ReferenceMismatchError, match="(?s)left out by --include/--exclude.*write a partial model"):
        expected.check(output, _config(LLAMA), unfiltered=list(_llama_output(LLAMA)))


# -- when transformers cannot say ---------------------------------------------------------------------------


def test_no_transformers_and_no_table_is_exit_4_saying_how_to_fix(monkeypatch):
    monkeypatch.setattr(meta_probe, "installed_version", lambda: None)
    with pytest.raises(ReferenceMismatchError) as exc:
        expected.check({"model.norm.weight": (8,)}, _config(QWEN3_MOE))
    text = str(exc.value)
    assert exc.value.exit_code == 4 and "cannot prove" in text and "model_type 'qwen3_moe'" in text
    assert "pip install transformers torch" in text and "cover only llama" in text
    assert "--allow-unmatched" in text and "with its weights" in text
    notes = expected.check({"model.norm.weight": (8,)}, _config(QWEN3_MOE), allow_unmatched=True)
    assert notes == ["--allow-unmatched: names not checked against /base/config.json's model: transformers is not "
                     "installed in this Python environment (no-transformers)"]
    assert expected.check(_llama_output(LLAMA), _config(LLAMA))      # the table needs no transformers


def test_the_meta_device_child_is_time_bound(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != meta_probe.CACHE_ENV}
    env[meta_probe.TIMEOUT_ENV] = "0.05"
    with pytest.raises(ReferenceMismatchError, match=r"took over 0.05 s \(raise STREAMCONV_META_TIMEOUT_S"):
        expected.check({"model.norm.weight": (8,)}, _config(dict(QWEN3_MOE, vocab_size=12)), env=env)
    with pytest.raises(ReferenceMismatchError, match="not a number of seconds"):
        meta_probe.timeout_s({meta_probe.TIMEOUT_ENV: "soon"})


@pytest.mark.parametrize("answer,kind", [
    ('{"error": "unknown-model-type", "message": "model_type \'x\' is not one transformers knows"}',
     "unknown-model-type"),
    ("[1]", "bad-answer"), ("{", "bad-answer"),
    ('{"transformers": "5", "model_class": "M", "layouts": [], "optional": [], "ignored_extra": [], "notes": []}',
     "bad-answer"),
    ('{"transformers": "5", "model_class": "M", "layouts": [{"label": "l", "weights": {"w": [-1]}}], "optional": [],'
     ' "ignored_extra": [], "notes": []}', "bad-answer"),
    ('{"transformers": "5", "model_class": "M"}', "bad-answer"),
])
def test_the_childs_answer_is_checked_before_use(answer, kind):
    with pytest.raises(meta_probe.ProbeFailed) as exc:
        meta_probe.parse(answer)
    assert exc.value.kind == kind


# -- transformers' own answer (meta device) ---------------------------------------------------------------
# Asked in this process (`meta_model.describe`, the child's own function: one transformers import for the whole
# file) and kept in the session cache, so that `expected.check` below finds it without a child. The child itself
# runs in the real-checkpoint tests further down (their configs are not asked here) and in the timeout test.


def _transformers_answer(config: dict) -> meta_probe.MetaAnswer:
    pytest.importorskip("transformers")
    from streamconv.hf import meta_model

    text = json.dumps(meta_model.describe(json.loads(json.dumps(config))))
    cached = meta_probe.cache_path(os.environ, json.dumps(config, sort_keys=True), meta_probe.installed_version())
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        Path(cached).write_text(text)
    return meta_probe.parse(text)


@pytest.mark.parametrize("change", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                    {"head_dim": 6, "num_key_value_heads": 1}, {"num_key_value_heads": 4},
                                    {"vocab_size": None, "hidden_size": None, "intermediate_size": None,
                                     "num_attention_heads": None, "num_key_value_heads": None}])
def test_the_llama_table_is_what_transformers_builds(change):
    config = {k: v for k, v in dict(LLAMA, **change).items() if v is not None}    # None: left out, defaulted
    answer = _transformers_answer(dict(config, architectures=["LlamaForCausalLM"]))
    weights, optional = tables.expected_weights(tables.LLAMA, config)
    assert answer.model_class == tables.LLAMA.model_class
    assert [dict(w) for _, w in answer.layouts] == [weights]
    assert answer.optional == optional
    assert answer.transformers_version == tables.LLAMA.checked_with


def test_moe_experts_load_per_expert_or_fused_and_nothing_in_between():
    answer = _transformers_answer(QWEN3_MOE)
    (saved_label, saved), (live_label, live) = answer.layouts
    assert saved["model.layers.1.mlp.experts.2.gate_proj.weight"] == (6, 8)
    assert saved["model.layers.1.mlp.experts.2.down_proj.weight"] == (8, 6)
    assert live["model.layers.1.mlp.experts.gate_up_proj"] == (3, 12, 8)
    assert live["model.layers.1.mlp.experts.down_proj"] == (3, 8, 6)
    config = _config(QWEN3_MOE)
    assert saved_label in expected.check(saved, config)[0] and live_label in expected.check(live, config)[0]
    one_short = {n: s for n, s in saved.items() if n != "model.layers.0.mlp.experts.1.up_proj.weight"}
    with pytest.raises(ReferenceMismatchError, match="not in the output: model.layers.0.mlp.experts.1.up_proj"):
        expected.check(one_short, config)
    transposed = dict(live, **{"model.layers.0.mlp.experts.down_proj": (3, 6, 8)})
    with pytest.raises(ReferenceMismatchError, match=r"experts.down_proj \[3, 6, 8\] here, \[3, 8, 6\]"):
        expected.check(transposed, config)


def test_a_model_type_transformers_does_not_know_is_exit_4():
    config = {"model_type": "no_such_family_9", "hidden_size": 8}
    with pytest.raises(meta_probe.ProbeFailed) as failed:
        _transformers_answer(config)
    assert failed.value.kind == "unknown-model-type"
    text = expected.cannot_prove_message(_config(config), "/base/config.json", failed.value)
    assert "cannot prove" in text and "--allow-unmatched" in text
    assert "model_type 'no_such_family_9' is not one transformers knows" in text and "upgrade transformers" in text


# -- real checkpoints, written by torch under FSDP2 -----------------------------------------------------------


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _loads_with_equal_logits(out: Path, name: str, family: Path) -> None:
    from tests.support import family_writers
    import torch

    model, info = family_writers.model_class(name).from_pretrained(out, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set()), info
    trained = family_writers.make_model(name)
    trained.load_state_dict(torch.load(family / "trained.pt", weights_only=True), strict=True)
    batch = family_writers.inputs(seed=7)
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, trained.eval()(**batch).logits)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama"])
def test_a_config_only_base_folder_converts_into_a_model_that_loads_whole(name, model_families, tmp_path):
    family = model_families[name]
    out = tmp_path / "out"
    result = _invoke("convert", family / "ckpt", out, "--config-from", family / "base", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    source = "streamconv's llama table" if name == "llama" else "on the meta device"
    proven = [n for n in report["notes"] if "output names and shapes are those of a" in n]
    assert len(proven) == 1 and source in proven[0], report["notes"]
    _loads_with_equal_logits(out, name, family)


@pytest.mark.parametrize("other", ["qwen3", "llama"])
def test_a_config_of_another_architecture_is_exit_4_and_nothing_written(other, model_families, tmp_path):
    """Qwen2's q/k/v biases are no weights of Qwen3 (which has QK-norm instead) nor of a plain Llama (table)."""
    ckpt, base = model_families["qwen2"] / "ckpt", model_families[other] / "base"
    out = tmp_path / "out"
    result = _invoke("convert", ckpt, out, "--config-from", base)
    assert result.exit_code == 4, result.output
    assert not out.exists() and "nothing was written" in result.output
    assert "model.layers.0.self_attn.q_proj.bias" in result.output
    assert "check that --config-from is the base model" in result.output
    dry = _invoke("plan", ckpt, "--config-from", base)                  # a dry run says it too
    assert dry.exit_code == 4 and "model.layers.0.self_attn.q_proj.bias" in dry.output, dry.output
    good = tmp_path / "good"
    assert _invoke("convert", ckpt, good, "--config-from", model_families["qwen2"] / "base").exit_code == 0
    (good / record.RECORD_FILE).unlink()         # else verify takes --config-from from the record
    checked = _invoke("verify", ckpt, good, "--config-from", base)        # and so does verify
    assert checked.exit_code == 4 and "model.layers.0.self_attn.q_proj.bias" in checked.output, checked.output


def test_torchtitan_moe_names_with_a_qwen3_moe_config_are_exit_4_naming_the_adapter_stage(model_families,
                                                                                          tmp_path):
    family = model_families["titan_names"]
    out = tmp_path / "out"
    result = _invoke("convert", family / "ckpt", out, "--config-from", family / "base")
    assert result.exit_code == 4, result.output
    assert not out.exists() and "nothing was written" in result.output
    assert "Qwen3MoeForCausalLM" in result.output and "layers.0.moe.experts.w1" in result.output
    assert "torchtitan (MoE)'s own module names" in result.output and "--source-format" in result.output
    written = _invoke("convert", family / "ckpt", out, "--config-from", family / "base", "--allow-unmatched", "--json")
    assert written.exit_code == 0, written.output       # --allow-unmatched keeps working, and says what it let through
    assert any(n.startswith("--allow-unmatched: the output is not the Qwen3MoeForCausalLM")
               for n in json.loads(written.output)["notes"])
