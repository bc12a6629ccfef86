"""Naming decided once, in ordered stages, each name remembering the stage that made it: one case per stage where
an error blames that stage (its error class and its fix), plus the stages' order. Metadata is built by hand, as in
the planner's own tests: naming reads no bytes."""
import json

import pytest

from streamconv import hf
from streamconv.errors import CheckpointError, OptionsError, ReferenceMismatchError
from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, TensorEntry
from streamconv.planning import naming
from streamconv.planning.names import RenameRule
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.planning.transforms import Heads
from streamconv.safetensors_format import build_header

MLLAMA_LIVE_TO_HUB = naming.PrefixMap((("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")),
                                      "the reference layout 'mllama live->hub' (chosen by the weights in /ref)")


def meta_of(*fqns, shape=(4, 4)):
    tensors = tuple(TensorEntry(fqn=f, dtype="float32", shape=shape, chunks=(Chunk((0, 0), shape, BlobLocation("__0_0.distcp", 0, 64)),),
                                path=(f,)) for f in fqns)
    return CheckpointMetadata(tensors=tensors, byte_entries=())


def rules(*texts):
    return tuple(RenameRule.parse(t) for t in texts)


# -- one error per stage, blamed on it ------------------------------------------------------------------------


def test_checkpoint_stage_an_unwritable_key_blames_the_checkpoint():
    with pytest.raises(CheckpointError, match=r"made by the checkpoint's own key.*control character.*--rename"):
        build_plan(meta_of("layers.0.w\x01"))


def test_wrapper_stage_a_collision_blames_the_wrapper_removal():
    with pytest.raises(CheckpointError, match=r"both become 'layers.0.w' \(made by removing wrapper segments "
                                              r"\(_orig_mod.*--exclude one of them"):
        build_plan(meta_of("layers.0.w", "_orig_mod.layers.0.w"))


def test_adapter_stage_a_collision_blames_the_adapter():
    # torchtitan names its head `output` (and some releases `lm_head`): both map to lm_head.weight.
    meta = meta_of("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight",
                   "output.weight", "lm_head.weight")
    with pytest.raises(CheckpointError, match=r"'output.weight' and 'lm_head.weight' both become 'lm_head.weight' "
                                              r"\(made by the torchtitan-llama adapter \(detected.*--source-format hf"):
        build_plan(meta, PlanOptions(heads=Heads(1, 1, 4)))       # (for wq's RoPE rows)


def test_layout_stage_a_collision_blames_the_reference_layout():
    meta = meta_of("model.language_model.norm.weight", "language_model.model.norm.weight")
    with pytest.raises(ReferenceMismatchError, match=r"both become 'language_model.model.norm.weight' \(made by the "
                                                     r"reference layout 'mllama live->hub'.*--config-from"):
        naming.name_tensors(meta, PlanOptions(), layout=MLLAMA_LIVE_TO_HUB)


def test_rename_stage_blames_the_rule_that_made_the_name():
    meta = meta_of("model.layers.0.w", "model.layers.1.w")
    with pytest.raises(OptionsError, match=r"both become 'model.layers.X.w' \(made by --rename 'layers\\.1=layers.X'\)"):
        build_plan(meta, PlanOptions(renames=rules(r"layers\.0=layers.X", r"layers\.1=layers.X")))
    with pytest.raises(OptionsError, match=r"made by --rename 'w\$=w\\x00'.*change that --rename rule"):
        build_plan(meta, PlanOptions(renames=rules("w$=w\x00")))


def test_a_name_bad_from_the_start_is_blamed_on_the_checkpoint_even_when_renamed():
    with pytest.raises(CheckpointError, match="made by the checkpoint's own key"):
        build_plan(meta_of("a\x01"), PlanOptions(renames=rules("^a=b")))


# -- the order of the stages, and provenance ---------------------------------------------------------------


def test_stages_apply_in_order_and_each_name_remembers_its_maker():
    meta = meta_of("_orig_mod.model.language_model.layers.0.w", "lm_head.weight", "model.language_model.norm.weight")
    named = (naming.source_names(meta, PlanOptions()).with_layout(MLLAMA_LIVE_TO_HUB)
             .with_renames(rules(r"^language_model\.model\.norm=language_model.model.final_norm"))
             .filtered((), ("*layers*",)).dropping(("language_model.lm_head.weight",)).checked())
    steps = {t.fqn: [(s.number, s.name) for s in t.steps] for t in named.tensors}
    assert steps["_orig_mod.model.language_model.layers.0.w"] == [
        (naming.CHECKPOINT, "_orig_mod.model.language_model.layers.0.w"),
        (naming.WRAPPERS, "model.language_model.layers.0.w"), (naming.LAYOUT, "language_model.model.layers.0.w")]
    # the user's rule sees the layout's name: renames come after the reference layout, and have the last word
    assert named.made_by() == {"language_model.model.final_norm.weight":
                               r"--rename '^language_model\.model\.norm=language_model.model.final_norm'"}
    assert {s.fqn: s.reason for s in named.all_skipped} == {
        "_orig_mod.model.language_model.layers.0.w": naming.EXCLUDED, "lm_head.weight": naming.TIED}
    assert [n for _, n in named.dropping(()).selected] == [      # undoing the drop
        "language_model.lm_head.weight", "language_model.model.final_norm.weight"]


def test_rename_rule_text_round_trips():
    for text in ("a=b", r"a\=b=c", r"^x\.(\d+)=y.\1"):
        rule = RenameRule.parse(text)
        assert RenameRule.parse(rule.text) == rule


# -- a name the reference does not have -------------------------------------------------------------------------


def reference_folder(tmp_path, names):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text(json.dumps({"model_type": "mllama", "tie_word_embeddings": False}))
    entries, pos = [], 0
    for n in names:
        entries.append((n, "F32", [4, 4], pos, pos + 64))
        pos += 64
    (ref / "model.safetensors").write_bytes(build_header(entries) + bytes(pos))
    return ref


def test_names_the_reference_lacks_are_blamed_on_their_stage(tmp_path):
    ref = reference_folder(tmp_path, ["language_model.model.norm.weight", "language_model.lm_head.weight"])
    meta = meta_of("model.language_model.norm.weight", "lm_head.weight", "model.language_model.extra.weight",
                   "vision.patch")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    with pytest.raises(ReferenceMismatchError) as exc:
        hf.prepare(meta, PlanOptions(renames=rules("^vision=tower")), str(ckpt), config_from=str(ref), no_config=False)
    text = str(exc.value)
    assert "2 output name(s) not in the reference: language_model.model.extra.weight, tower.patch" in text
    assert "1 of those made by the reference layout 'mllama live->hub'" in text
    assert "1 of those made by --rename '^vision=tower'" in text


def test_prepare_hands_its_naming_to_the_planner(tmp_path):
    ref = reference_folder(tmp_path, ["language_model.model.norm.weight", "language_model.lm_head.weight"])
    meta = meta_of("model.language_model.norm.weight", "lm_head.weight")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    before = naming.calls["source_names"]
    setup = hf.prepare(meta, PlanOptions(), str(ckpt), config_from=str(ref))
    plan = build_plan(meta, setup.options)
    assert naming.calls["source_names"] == before + 1
    assert [t.name for t in plan.tensors] == ["language_model.lm_head.weight", "language_model.model.norm.weight"]
    assert plan.options.naming is None and plan.options.renames == ()     # the layout is not a --rename rule
