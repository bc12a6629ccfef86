"""HF-ready output: sidecar files, --dtype auto, reference layouts, tied embeddings, and the report.

Layers: pure helpers first (train_params.yaml, HF cache lookup, config dtype patching, layout rules, tied
pairs, the comparing sink against memory); then real models — a tied tiny Llama, an untied one and a tiny
Mllama trained one step under FSDP2 in gloo ranks (`hf_writers`) — converted and loaded back with
transformers, logits compared exactly; then the GPU-made fixtures against their `ref/` folders.
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from streamconv.source.blob_reader import BlobReader
from streamconv.fs.infiles import OpenFile
from streamconv import api
from streamconv.cli import cli
from streamconv.errors import OptionsError, VerificationError
from streamconv.execution.executor import Executor
from streamconv.hf import layouts, sidecars, tied
from streamconv.source.io import MemoryReader
from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, StoredTensor, TensorEntry
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.output.sink import FileSink

MLLAMA_LIVE = ["model.language_model.embed_tokens.weight", "model.language_model.layers.0.mlp.up_proj.weight",
               "model.vision_model.class_embedding", "model.multi_modal_projector.weight", "lm_head.weight"]
MLLAMA_HUB = ["language_model.model.embed_tokens.weight", "language_model.model.layers.0.mlp.up_proj.weight",
              "vision_model.class_embedding", "multi_modal_projector.weight", "language_model.lm_head.weight"]


def _safetensors(folder):
    """(name, dtype, shape, raw bytes) for every tensor of every safetensors file in `folder`."""
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            blob = Path(folder, f).read_bytes()
            (n,) = struct.unpack("<Q", blob[:8])
            header = json.loads(blob[8:8 + n])
            for k, v in header.items():
                if k != "__metadata__":
                    lo, hi = v["data_offsets"]
                    yield k, v["dtype"], v["shape"], blob[8 + n + lo:8 + n + hi]


def safetensors_names(folder) -> dict:
    """{name: (dtype, shape)}."""
    return {k: (d, s) for k, d, s, _ in _safetensors(folder)}


def safetensors_bytes(folder) -> dict:
    """{name: raw little-endian bytes}."""
    return {k: b for k, _, _, b in _safetensors(folder)}


# -- sidecars -----------------------------------------------------------------------------------------------


def test_train_params_reader_handles_what_llama_recipes_and_yaml_dump_write(tmp_path):
    path = tmp_path / "train_params.yaml"
    path.write_text("# written by save_train_params\n"
                    "model_name: /models/Llama 3.2/base   # trailing comment\n"
                    "quoted: 'it''s True'\n"
                    "dquoted: \"a\\tb\"\n"
                    "long_value: part one\n"
                    "    part two\n"
                    "nested:\n"
                    "  - ignored\n"
                    "use_peft: 'False'\n")
    params = sidecars.read_train_params(str(path))
    assert params["model_name"] == "/models/Llama 3.2/base"
    assert params["quoted"] == "it's True"
    assert params["dquoted"] == "a\tb"
    assert params["long_value"] == "part one part two"
    assert params["nested"] == ""
    assert params["use_peft"] == "False"


def _config_folder(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    return path


def test_find_config_dir_prefers_flag_then_train_params_then_hf_cache(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {"HF_HUB_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}

    src = sidecars.find_config_dir(str(ckpt), None, env)
    assert src.folder is None and "--config-from" in src.note

    base = _config_folder(tmp_path / "base")
    assert sidecars.find_config_dir(str(ckpt), str(base), env).folder == str(base)

    (ckpt / "train_params.yaml").write_text(f"model_name: {base}\nlr: '0.0001'\n")
    src = sidecars.find_config_dir(str(ckpt), None, env)
    assert src.folder == str(base) and "train_params.yaml" in src.note

    (ckpt / "train_params.yaml").write_text("model_name: org/tiny-model\n")
    src = sidecars.find_config_dir(str(ckpt), None, env)
    assert src.folder is None and "org/tiny-model" in src.note and "--config-from" in src.note

    repo = tmp_path / "cache" / "models--org--tiny-model"
    old = _config_folder(repo / "snapshots" / "aaaa")
    main = _config_folder(repo / "snapshots" / "bbbb")
    os.utime(old / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb\n")
    src = sidecars.find_config_dir(str(ckpt), None, env)
    assert src.folder == str(main) and "cache" in src.note


def test_patched_config_sets_the_dtype_keys_the_config_uses():
    assert sidecars.patched_config({"dtype": "float32"}, "bfloat16") == {"dtype": "bfloat16"}
    assert sidecars.patched_config({"torch_dtype": "float32"}, "bfloat16") == {"torch_dtype": "bfloat16"}
    both = sidecars.patched_config({"dtype": "float32", "torch_dtype": "float32"}, "float16")
    assert both == {"dtype": "float16", "torch_dtype": "float16"}
    assert sidecars.patched_config({"transformers_version": "5.24.0"}, "bfloat16")["dtype"] == "bfloat16"
    assert sidecars.patched_config({"transformers_version": "4.45.2"}, "bfloat16")["torch_dtype"] == "bfloat16"
    nested = sidecars.patched_config({"dtype": "float32", "text_config": {"model_type": "x", "dtype": "float32"},
                                      "rope_scaling": {"dtype": "keep me"}}, "bfloat16")
    assert nested["text_config"]["dtype"] == "bfloat16" and nested["rope_scaling"]["dtype"] == "keep me"


def test_load_config_errors_name_the_fix(tmp_path):
    with pytest.raises(OptionsError, match="no config.json"):
        sidecars.load_config(str(tmp_path))
    cfg = sidecars.load_config(str(_config_folder(tmp_path / "m", torch_dtype="torch.bfloat16",
                                                  text_config={"tie_word_embeddings": True})))
    assert cfg.dtype == "bfloat16" and cfg.tie_word_embeddings is True


# -- layouts ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=lambda lay: lay.name)
@pytest.mark.parametrize("direction", layouts.DIRECTIONS)
def test_layout_rules_in_sequence_equal_one_prefix_pass(layout, direction):
    mapping = layouts.LayoutMapping(layout, direction)
    assert layouts.sequential_safe(layouts.rule_order(mapping.pairs))
    samples = [old + "x.weight" for old, _ in mapping.pairs] + [new + "y.bias" for _, new in mapping.pairs]
    samples += ["unrelated.weight", "model.norm.weight"]
    from streamconv.planning.names import apply_renames
    for name in samples:
        assert apply_renames(name, mapping.rules()) == mapping.apply(name), name


def test_rule_order_puts_consumers_first_and_refuses_cycles():
    hub_to_live = [("visual.", "model.visual."), ("model.", "model.language_model.")]
    assert layouts.rule_order(hub_to_live) == hub_to_live[::-1]      # else visual. -> model.language_model.visual.
    assert not layouts.sequential_safe(hub_to_live)
    with pytest.raises(ValueError, match="cycle"):
        layouts.rule_order([("a.", "b."), ("b.", "a.")])


def test_choose_mapping_follows_the_reference_names():
    ref_hub = {n: None for n in MLLAMA_HUB}
    mapping, hits = layouts.choose_mapping(MLLAMA_LIVE, ref_hub, "mllama")
    assert (mapping.label, hits) == ("mllama live->hub", len(MLLAMA_LIVE))
    mapping, _ = layouts.choose_mapping(MLLAMA_HUB, {n: None for n in MLLAMA_LIVE}, "mllama")
    assert mapping.label == "mllama hub->live"
    mapping, _ = layouts.choose_mapping(MLLAMA_HUB, ref_hub, "mllama")
    assert mapping.layout is None                       # already matching: identity wins the tie
    cmp = layouts.compare_names({"a": (2,), "b": (3,)}, {"a": (2,), "c": (1,), "b": (4,)})
    assert (cmp.unmatched, cmp.missing, cmp.shape_mismatches) == ((), ("c",), (("b", (3,), (4,)),))


# -- tied embeddings ----------------------------------------------------------------------------------------


def test_find_tied_pairs():
    llama = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    pair = tied.TiedPair("lm_head.weight", "model.embed_tokens.weight")
    assert tied.find_tied_pairs(llama, True)[0] == (pair,)
    assert tied.find_tied_pairs(llama, False)[0] == ()
    assert tied.find_tied_pairs(llama, None)[0] == ()                        # nothing says tied
    assert tied.find_tied_pairs(llama, None, reference=llama[:2])[0] == (pair,)  # HF saved without the head
    assert tied.find_tied_pairs(llama, True, reference=llama)[0] == ()      # the reference keeps its head
    hub = tied.find_tied_pairs(MLLAMA_HUB, True)[0]
    assert hub == (tied.TiedPair("language_model.lm_head.weight", "language_model.model.embed_tokens.weight"),)
    pairs, notes = tied.find_tied_pairs(["shared.weight", "encoder.embed_tokens.weight", "lm_head.weight"], True)
    assert pairs == () and "ambiguous" in notes[0]


def _two_tensor_checkpoint(head_values, emb_values):
    """A checkpoint in memory with an embedding and a head (float32 [4, 3]), each in two dim-0 chunks."""
    blob = bytearray()
    entries, stored = [], {}
    for fqn, values in (("model.embed_tokens.weight", emb_values), ("lm_head.weight", head_values)):
        arr = np.asarray(values, dtype=np.float32).reshape(4, 3)
        chunks = []
        for lo in (0, 2):
            piece = arr[lo:lo + 2]
            loc = BlobLocation("__0_0.distcp", len(blob), piece.nbytes)
            stored[loc] = StoredTensor("float32", (2, 3), (3, 1), len(blob), piece.nbytes)
            blob.extend(piece.tobytes())
            chunks.append(Chunk((lo, 0), (2, 3), loc))
        entries.append(TensorEntry(fqn, "float32", (4, 3), tuple(chunks), (fqn,)))
    return CheckpointMetadata(tensors=tuple(entries)), MemoryReader({"__0_0.distcp": bytes(blob)}), stored


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_verify_tied_streams_and_names_the_first_difference(tmp_path, dtype):
    emb = np.arange(12, dtype=np.float32) / 7
    meta, reader, stored = _two_tensor_checkpoint(emb.copy(), emb)
    options = PlanOptions(dtype=dtype, buffer_bytes=64 * 1024)
    full = {t.name: t for t in build_plan(meta, options).tensors}
    conversion = build_plan(meta, PlanOptions(dtype=dtype, drop=("lm_head.weight",)))
    assert [t.name for t in conversion.tensors] == ["model.embed_tokens.weight"]
    assert [(s.fqn, s.reason) for s in conversion.skipped] == [("lm_head.weight", "tied duplicate")]
    shard = conversion.shards[0]
    path = str(tmp_path / shard.filename)
    executor = Executor(BlobReader(reader, stored), stored, options.buffer_bytes)
    executor.write_shard(shard, FileSink(path, shard.nbytes))
    embedding = shard.tensors[0]
    assert tied.verify_tied(executor, full["lm_head.weight"], embedding, path) == embedding.nbytes

    changed = emb.copy()
    changed[7] += 1                                     # element [2, 1]
    meta, reader, stored = _two_tensor_checkpoint(changed, emb)
    head = {t.name: t for t in build_plan(meta, options).tensors}["lm_head.weight"]
    with pytest.raises(VerificationError, match=r"first at element \[2, 1\].*tie_word_embeddings is false"):
        tied.verify_tied(Executor(BlobReader(reader, stored), stored, options.buffer_bytes), head, embedding, path)


def test_comparing_sink_compares_in_pieces(tmp_path):
    path = tmp_path / "f"
    data = np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8)
    path.write_bytes(b"\0" * 10 + data.tobytes())
    sink = tied.ComparingSink(str(path), piece_bytes=333)
    sink.write_at(10, data)
    fd = os.open(path, os.O_RDONLY)
    try:
        sink.copy_from(OpenFile(fd, str(path)), 10, 10, 5000)
        with pytest.raises(tied.Mismatch) as exc:
            sink.copy_from(OpenFile(fd, str(path)), 11, 10, 100)
    finally:
        os.close(fd)
        sink.close()
    assert sink.compared == 10000 and exc.value.offset >= 10


# -- real models, trained under FSDP2 -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Checkpoints of hf_writers.MODELS. transformers is imported here while the ranks start: on this kind of
    machine each import takes seconds, and doing both at once halves the wait."""
    from tests.support import hf_writers

    result = {}

    def build():
        try:
            result["models"] = hf_writers.build(tmp_path_factory.mktemp("hf"))
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    worker = threading.Thread(target=build, name="hf_writers.build")
    worker.start()
    importlib.import_module("transformers.models.llama.modeling_llama")
    importlib.import_module("transformers.models.mllama.modeling_mllama")
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["models"]


def logits_of(model, name: str):
    from tests.support import hf_writers
    import torch

    with torch.no_grad():
        return model.eval()(**hf_writers.inputs(name, seed=7)).logits


def trained_logits(folder: Path, name: str, dtype):
    """The trained weights (gathered from the live FSDP2 model) in a model built from base/, cast to
    `dtype` with torch as `model.to(dtype)` would: the reference the converted folder must reproduce."""
    from tests.support import hf_writers
    import torch

    model = hf_writers.model_class(name).from_pretrained(folder / "base", dtype=dtype)
    trained = torch.load(folder / "trained.pt", weights_only=True)
    model.load_state_dict({k: v.to(dtype) for k, v in trained.items()}, strict=True)
    return logits_of(model, name)


def base_logits(folder: Path, name: str):
    from tests.support import hf_writers

    return logits_of(hf_writers.model_class(name).from_pretrained(folder / "base"), name)


def converted_logits(out: Path, name: str, expected_dtype):
    from tests.support import hf_writers

    model, info = hf_writers.model_class(name).from_pretrained(out, output_loading_info=True)
    assert model.dtype == expected_dtype, "config.json's dtype must follow the output"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return logits_of(model, name)


def test_tied_llama_keep_via_cli_round_trips_to_identical_logits(hf_models, tmp_path):
    import torch

    folder = hf_models["llama_tied"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(folder / "ckpt"), str(out), "--config-from",
                                      str(folder / "base"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dropped_tied"] == ["lm_head.weight"]
    assert report["skipped"] == {"tied duplicate": 1}
    assert report["copied_files"] == ["config.json", "generation_config.json", "tokenizer.json",
                                      "tokenizer_config.json", "chat_template.jinja"]
    assert report["unmatched_names"] == [] and report["missing_names"] == []
    assert report["cast"] == {}
    assert safetensors_names(out) == safetensors_names(folder / "base")     # no lm_head, as HF saves it
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    for name in ("tokenizer.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (folder / "base" / name).read_bytes()
    expected = trained_logits(folder, "llama_tied", torch.float32)
    assert not torch.equal(expected, base_logits(folder, "llama_tied")), "the training step must move the weights"
    assert torch.equal(converted_logits(out, "llama_tied", torch.float32), expected)


def test_tied_llama_bfloat16_sharded_equals_the_bf16_cast_model(hf_models, tmp_path):
    import torch

    folder = hf_models["llama_tied"]
    out = tmp_path / "out"
    report = api.convert(str(folder / "ckpt"), str(out), config_from=str(folder / "base"), dtype="bfloat16",
                         max_shard_size="40KB")
    assert report.shards > 1 and "model.safetensors.index.json" in report.files
    assert report.cast == {"float32->bfloat16": report.tensors}
    assert report.dropped_tied == ["lm_head.weight"]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert {d for d, _ in safetensors_names(out).values()} == {"BF16"}
    assert torch.equal(converted_logits(out, "llama_tied", torch.bfloat16),
                       trained_logits(folder, "llama_tied", torch.bfloat16))


def test_config_found_through_train_params_and_dtype_auto(hf_models, tmp_path):
    folder = hf_models["llama_tied"]
    report = api.convert(str(folder / "ckpt"), str(tmp_path / "out"), dtype="auto")
    assert report.config_from == str(folder / "base")
    assert any("train_params.yaml" in n for n in report.notes)
    assert any(n.startswith("--dtype auto: float32") for n in report.notes)
    assert "config.json" in report.copied_files and report.dropped_tied == ["lm_head.weight"]


def test_untied_llama_keeps_both_and_round_trips(hf_models, tmp_path):
    import torch

    folder = hf_models["llama_untied"]
    out = tmp_path / "out"
    report = api.convert(str(folder / "ckpt"), str(out), config_from=str(folder / "base"))
    assert report.dropped_tied == [] and "lm_head.weight" in safetensors_names(out)
    assert torch.equal(converted_logits(out, "llama_untied", torch.float32),
                       trained_logits(folder, "llama_untied", torch.float32))


def test_tied_config_over_untied_weights_fails_and_leaves_nothing(hf_models, tmp_path):
    folder = hf_models["llama_untied"]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(folder / "ckpt"), str(out), "--config-from",
                                      str(hf_models["llama_tied"] / "base")])
    assert result.exit_code == VerificationError.exit_code, result.output
    assert "differ" in result.output and "tie_word_embeddings is false" in result.output
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_mllama_follows_the_hub_layout_and_round_trips(hf_models, tmp_path, dtype):
    import torch

    folder = hf_models["mllama"]
    out = tmp_path / "out"
    report = api.convert(str(folder / "ckpt"), str(out), config_from=str(folder / "base"), dtype=dtype)
    assert report.layout == "mllama live->hub"
    base = safetensors_names(folder / "base")
    assert sorted(safetensors_names(out)) == sorted(base)
    assert report.unmatched_names == [] and report.missing_names == [] and report.dropped_tied == []
    assert "preprocessor_config.json" in report.copied_files
    torch_dtype = torch.float32 if dtype == "keep" else torch.bfloat16
    expected = trained_logits(folder, "mllama", torch_dtype)
    if dtype == "keep":
        assert not torch.equal(expected, base_logits(folder, "mllama")), "the training step must move the weights"
    assert torch.equal(converted_logits(out, "mllama", torch_dtype), expected)


@pytest.mark.parametrize("model", ["llama_tied", "mllama"])
def test_names_are_decided_once_per_conversion(hf_models, tmp_path, model):
    """convert, plan and verify each walk the checkpoint's names once (`naming.source_names`), a tied head (its
    plan is built again to prove it equals the embedding) and a reference layout included. Before naming had
    one home, `plan.select` ran 4 times per conversion, 5 with a tied head."""
    from streamconv.planning import naming

    folder = hf_models[model]
    ckpt, out, base = str(folder / "ckpt"), str(tmp_path / "out"), str(folder / "base")
    for verb, call in (("convert", lambda: api.convert(ckpt, out, config_from=base)),
                       ("plan", lambda: api.plan(ckpt, config_from=base)),
                       ("verify", lambda: api.verify(ckpt, out))):
        before = naming.calls["source_names"]
        call()
        assert naming.calls["source_names"] - before == 1, verb
    # the reference layout is a stage of its own, not a --rename rule: the record holds the user's rules only
    assert json.loads((tmp_path / "out" / "streamconv.json").read_text())["options"]["renames"] == []


def test_plan_shows_the_hf_decisions(hf_models):
    folder = hf_models["mllama"]
    result = CliRunner().invoke(cli, ["plan", str(folder / "ckpt"), "--config-from", str(folder / "base"),
                                      "--dtype", "auto", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    names = [t["name"] for t in summary["tensors"]]
    assert "language_model.lm_head.weight" in names and "vision_model.class_embedding" in names
    assert any("mllama live->hub" in n for n in summary["notes"])
    assert any("--dtype auto: float32" in n for n in summary["notes"])


# -- the GPU-made fixtures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture, dropped", [("fsdp1_mllama_optim", []), ("fsdp2_llama_tied", ["lm_head.weight"])])
def test_fixture_matches_its_reference_name_for_name(shared_fixtures_dir, tmp_path, fixture, dropped):
    ckpt, ref = shared_fixtures_dir / fixture / "ckpt", shared_fixtures_dir / fixture / "ref"
    out = tmp_path / "out"
    report = api.convert(str(ckpt), str(out), config_from=str(ref), dtype="auto", buffer_size="64KiB")
    assert report.dropped_tied == dropped and report.cast == {}
    assert report.unmatched_names == [] and report.missing_names == []
    assert safetensors_names(out) == safetensors_names(ref)
    assert safetensors_bytes(out) == safetensors_bytes(ref)
    assert json.loads((out / "config.json").read_text()) == json.loads((ref / "config.json").read_text())


def test_cli_config_from_a_missing_folder_names_the_fix(shared_fixtures_dir, tmp_path):
    result = CliRunner().invoke(cli, ["plan", str(shared_fixtures_dir / "fsdp2_llama_tied" / "ckpt"),
                                      "--config-from", str(tmp_path / "nope")])
    assert result.exit_code == OptionsError.exit_code, result.output
    assert "not a folder" in result.output and "config.json" in result.output


def test_fixture_without_config_says_how_to_add_one(shared_fixtures_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    report = api.convert(str(shared_fixtures_dir / "fsdp1_mllama_optim" / "ckpt"), str(tmp_path / "out"))
    assert report.copied_files == [] and report.config_from is None
    assert any("meta-llama/Llama-3.2-11B-Vision-Instruct" in n and "--config-from" in n for n in report.notes)
    assert report.skipped["optimizer state"] > 0


def test_a_side_file_that_shrinks_while_copied_fails_naming_it(tmp_path):
    from streamconv.errors import OptionsError
    from streamconv.hf import sidecars
    data = b"x" * (sidecars.COPY_STEP_BYTES + 10)

    def shrinking(offset, n):   # the file was cut to one step after its size was taken
        return data[offset:offset + n] if offset < sidecars.COPY_STEP_BYTES else b""

    with pytest.raises(OptionsError, match=r"tok\.json: file shrank from \d+ to \d+ bytes"):
        sidecars._copy_blocks(shrinking, len(data), str(tmp_path / "out.json"), "tok.json: file")
    dst = tmp_path / "whole.json"
    sidecars._copy_blocks(lambda offset, n: data[offset:offset + n], len(data), str(dst), "tok.json: file")
    assert dst.read_bytes() == data
