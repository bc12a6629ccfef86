"""Tests of the benchmark tooling itself (about 15 s): `pytest benchmarks/test_benchmarks.py`.

Not collected by `make test` (testpaths = ["tests"]) unless the project adds it.
"""
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from benchmarks import generate as gen  # noqa: E402
from benchmarks import measure, presets, run, verify  # noqa: E402
from benchmarks.baselines.common import model_tensors, save_sharded  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tiny"
    gen.generate("tiny", "float32", out, with_optim=True)
    return out


def test_presets_match_transformers():
    pytest.importorskip("transformers")
    for name in ("tiny", "llama-3.2-11b-vision"):
        presets.check_against_transformers(name)
    assert presets.num_params(presets.PRESETS["llama-3.2-11b-vision"]) == 10_670_220_835


def test_expected_values_do_not_depend_on_slicing():
    whole = gen.expected_values("w", "float32", 0, gen.POOL_SIZE + 1000)
    part = gen.expected_values("w", "float32", gen.POOL_SIZE - 10, 1010)
    assert torch.equal(whole[gen.POOL_SIZE - 10:], part)
    # the bf16 data is the bf16 rounding of the fp32 data
    assert torch.equal(gen.expected_values("w", "bfloat16", 5, 100), whole[5:105].bfloat16())


def test_generated_checkpoint_is_fsdp2_like_and_holds_the_formula(tiny_ckpt, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    md = FileSystemReader(str(tiny_ckpt)).read_metadata()
    q = md.state_dict_metadata["model.model.language_model.layers.0.self_attn.q_proj.weight"]
    assert [tuple(c.offsets) for c in q.chunks] == [(0, 0), (16, 0), (32, 0), (48, 0)]
    gate = md.state_dict_metadata["model.model.language_model.layers.3.cross_attn_attn_gate"]
    assert sorted(tuple(c.sizes) for c in gate.chunks) == [(0,), (1,)]   # FSDP2's empty chunk
    assert "optim.state.lm_head.weight.exp_avg" in md.state_dict_metadata
    assert "optim.param_groups.0.lr" in md.state_dict_metadata
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == [
        ".generator.json", ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]

    dcp_to_torch_save(str(tiny_ckpt), tmp_path / "all.pt")
    sd = torch.load(tmp_path / "all.pt", weights_only=True)
    specs = presets.tensor_specs(presets.PRESETS["tiny"])
    assert list(sd["model"]) == [n for n, _ in specs]
    for name, shape in specs:
        expected = gen.expected_values(gen.data_key(name), "float32", 0, math.prod(shape)).view(shape)
        assert torch.equal(sd["model"][name], expected), name
    name = "model.vision_model.class_embedding"
    exp_avg = gen.expected_values(gen.data_key(name, "exp_avg"), "float32", 0, 32)
    assert torch.equal(sd["optim"]["state"][name]["exp_avg"], exp_avg)


def test_fingerprints_find_a_changed_byte(tiny_ckpt, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    sd = {}
    for t in model_tensors(FileSystemReader(str(tiny_ckpt)).read_metadata()):
        sd[t.name] = gen.expected_values(gen.data_key(t.name), "float32", 0, math.prod(t.shape)).view(t.shape).clone()
    save_sharded(sd, tmp_path / "out", max_shard_bytes=200_000)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    specs = [(n, gen.data_key(n), s) for n, s in presets.tensor_specs(presets.PRESETS["tiny"])]
    for mode in ("all", "sample"):
        ok, summary = verify.compare(verify.expected_fingerprint(specs, "float32", mode),
                                     verify.fingerprint(tmp_path / "out", mode=mode))
        assert ok, summary
    ok, _ = verify.compare(verify.expected_fingerprint(specs, "bfloat16"),
                           verify.fingerprint(tmp_path / "out", as_dtype="bfloat16"))
    assert ok
    sd["lm_head.weight"][3, 7] += 1
    save_sharded(sd, tmp_path / "bad", max_shard_bytes=200_000)
    ok, summary = verify.compare(verify.expected_fingerprint(specs, "float32"), verify.fingerprint(tmp_path / "bad"))
    assert not ok and "1 bytes differ: lm_head.weight" in summary


def test_measure_sees_memory_io_and_exit_status(tmp_path):
    script = textwrap.dedent("""
        import os, sys, time
        buf = bytearray(300 << 20)          # 300 MiB, touched
        time.sleep(0.3)
        with open(sys.argv[1], "wb") as f:
            f.write(os.urandom(8 << 20))
            f.flush(); os.fsync(f.fileno())
        sys.exit(3)
    """)
    m = measure.run_measured([sys.executable, "-c", script, str(tmp_path / "x.bin")], watch_dir=tmp_path)
    assert m.status == "failed" and m.exit_code == 3
    assert 300 << 20 <= m.peak_rss_bytes < 400 << 20
    assert m.sampled_peak_anon_bytes >= 290 << 20
    assert m.io["write_bytes"] >= 8 << 20
    assert m.first_byte_s is not None and m.first_byte_s < m.wall_s


def test_memory_limit_reports_oom(tmp_path):
    script = "import time\nx = [bytearray(64 << 20) for _ in range(40)]\ntime.sleep(5)"
    m = measure.run_measured([sys.executable, "-c", script], mem_limit_bytes=512 << 20)
    assert m.status == "OOM" and m.signal == 9 and m.wall_s < 5


@pytest.mark.slow   # every contender, plot and README table on `tiny` (~25 s): `make test-slow`; the pieces are tested here
def test_harness_end_to_end_on_tiny(tiny_ckpt, tmp_path):
    run.main(["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "cache"),
              "--readme", "", "--no-drop-caches"])
    runs = json.loads((tmp_path / "results" / "results.json").read_text())["runs"]
    rows = {r["name"]: r for r in runs[-1]["contenders"]}
    assert rows["cp -r"]["status"] == "finished"
    for name in ("dcp_to_torch_save + save_file", "llama-cookbook (dcp.load no_dist)"):
        assert rows[name]["status"] == "finished", rows[name]
        assert rows[name]["check"]["ok"], rows[name]["check"]
    for row in rows.values():   # streamconv's rows too, when its CLI is there
        assert row.get("check", {}).get("ok", True), row
    assert (tmp_path / "results" / "results.png").stat().st_size > 0
    assert not (tmp_path / "cache" / "work").exists()


def test_batch_harness_on_tiny(tiny_ckpt, tmp_path, capsys):
    from benchmarks import batch
    assert batch.main(["--ckpt", str(tiny_ckpt), "-n", "2", "--jobs", "1", "--work", str(tmp_path / "work"),
                       "--out", str(tmp_path / "results"), "--no-drop-caches"]) == 0
    rows = json.loads((tmp_path / "results" / "batch-tiny-x2.json").read_text())["rows"]
    assert [r["contender"] for r in rows] == ["cp -r (all)", "streamconv convert, one by one (sum)",
                                              "streamconv batch --jobs 1"]
    assert rows[2]["rerun_all_skipped_s"] > 0 and "x cp" in capsys.readouterr().out
    assert not (tmp_path / "work").exists()


def test_tp_layout_splits_rowwise_weights_along_dim_1(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "tiny-tp"
    stamp = gen.generate("tiny", "float32", out, with_optim=True, layout="tp")
    assert stamp["sharding"] == "tp"
    md = FileSystemReader(str(out)).read_metadata().state_dict_metadata

    def chunks(key):
        return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md[key].chunks)

    t = "model.model.language_model.layers.0"
    assert chunks(f"{t}.self_attn.o_proj.weight") == [((0, c), (64, 16)) for c in (0, 16, 32, 48)]
    assert chunks(f"{t}.mlp.down_proj.weight") == [((0, c), (64, 32)) for c in (0, 32, 64, 96)]
    assert chunks("optim.state.model.language_model.layers.0.mlp.down_proj.weight.exp_avg") == \
        chunks(f"{t}.mlp.down_proj.weight")
    assert chunks("model.model.vision_model.transformer.layers.0.mlp.fc2.weight") == \
        [((0, c), (32, 16)) for c in (0, 16, 32, 48)]
    assert chunks(f"{t}.self_attn.q_proj.weight") == [((r, 0), (16, 64)) for r in (0, 16, 32, 48)]
    assert chunks("model.lm_head.weight") == [((r, 0), (64, 64)) for r in (0, 64, 128, 192)]
    assert chunks("model.model.language_model.norm.weight") == [((0,), (64,))]   # Replicate, deduped
    assert chunks(f"{t}.mlp.gate_proj.weight")[1][0] == (32, 0)

    # the values do not depend on the sharding
    dcp_to_torch_save(str(out), tmp_path / "all.pt")
    sd = torch.load(tmp_path / "all.pt", weights_only=True)
    for name, shape in presets.tensor_specs(presets.PRESETS["tiny"]):
        expected = gen.expected_values(gen.data_key(name), "float32", 0, math.prod(shape)).view(shape)
        assert torch.equal(sd["model"][name], expected), name
        expected = gen.expected_values(gen.data_key(name, "exp_avg"), "float32", 0, math.prod(shape)).view(shape)
        assert torch.equal(sd["optim"]["state"][name]["exp_avg"], expected), name


def test_fill_chunk_matches_slicing_the_whole_tensor():
    shape = (6, 10, 3)
    whole = gen.expected_values("k", "float32", 0, math.prod(shape)).view(shape)
    for offsets, sizes in (((2, 0, 0), (3, 10, 3)), ((0, 4, 0), (6, 3, 3)), ((1, 2, 1), (2, 5, 2)),
                           ((0, 0, 0), (6, 10, 3)), ((0, 5, 0), (6, 0, 3))):
        out = torch.empty(math.prod(sizes))
        gen.fill_chunk("k", "float32", shape, offsets, sizes, out)
        box = whole[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]
        assert torch.equal(out.view(sizes), box), (offsets, sizes)
    assert gen.placement_for("x.self_attn.o_proj.weight", (4, 4), "tp") == "Shard(1)"
    assert gen.placement_for("x.self_attn.o_proj.weight", (4, 4)) == "Shard(0)"       # fsdp2 default
    assert gen.placement_for("x.post_attention_layernorm.weight", (4,), "tp") == "Replicate()"


def test_shortrun_layout_splits_every_matrix_along_its_last_dim(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "tiny-shortrun"
    stamp = gen.generate("tiny", "float32", out, layout="shortrun")
    assert stamp["sharding"] == "shortrun"
    md = FileSystemReader(str(out)).read_metadata().state_dict_metadata

    def chunks(key):
        return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md[key].chunks)

    t = "model.model.language_model.layers.0"
    assert chunks(f"{t}.self_attn.q_proj.weight") == [((0, c), (64, 16)) for c in (0, 16, 32, 48)]
    # 14 = 4 + 4 + 4 + 2 along the kernel's last dim: 8-byte runs of float32 pairs
    assert chunks("model.model.vision_model.patch_embedding.weight") == \
        [((0, 0, 0, c), (32, 3, 14, n)) for c, n in ((0, 4), (4, 4), (8, 4), (12, 2))]
    assert chunks("model.model.language_model.norm.weight") == [((r,), (16,)) for r in (0, 16, 32, 48)]
    dcp_to_torch_save(str(out), tmp_path / "all.pt")
    sd = torch.load(tmp_path / "all.pt", weights_only=True)
    for name, shape in presets.tensor_specs(presets.PRESETS["tiny"]):
        expected = gen.expected_values(gen.data_key(name), "float32", 0, math.prod(shape)).view(shape)
        assert torch.equal(sd["model"][name], expected), name


def test_generator_self_check_passes_on_a_good_checkpoint(tiny_ckpt):
    stamp = gen.read_stamp(tiny_ckpt)
    assert stamp["self_check"]["checked_tensors"], stamp
    assert gen.check_written(tiny_ckpt, "tiny", "float32")["checked_tensors"] == stamp["self_check"]["checked_tensors"]


def test_generator_refuses_a_checkpoint_with_the_wrong_data(tmp_path, monkeypatch):
    """A torch that serializes a freed storage writes the wrong bytes and reports success: simulated by a
    planner (inherited by the forked ranks) that hands torch zeros; the generator must fail and leave nothing."""
    real = gen._make_planner

    def zeros_planner(generated):
        planner = real(generated)
        resolve = planner.resolve_data

        def resolve_zeros(item):
            data = resolve(item)
            return torch.zeros_like(data) if item.index.fqn in generated else data
        planner.resolve_data = resolve_zeros
        return planner

    monkeypatch.setattr(gen, "_make_planner", zeros_planner)
    out = tmp_path / "bad"
    with pytest.raises(gen.GeneratorCheckFailed, match="differs from the generator's data"):
        gen.generate("tiny", "float32", out)
    assert not out.exists() and not (tmp_path / "bad.partial").exists()


def test_generator_self_check_catches_empty_storages(tiny_ckpt, tmp_path):
    """Files far smaller than the tensors they should hold (empty storages) are refused before any read."""
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(tiny_ckpt, bad)
    for f in bad.glob("*.distcp"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 10)
    with pytest.raises(gen.GeneratorCheckFailed, match="fewer than the"):
        gen.check_written(bad, "tiny", "float32")


def test_results_elsewhere_leave_the_tracked_readme_and_caches_alone(tmp_path):
    """`--out` elsewhere writes only there; dropping the machine's page cache is opt-in (`make bench DROP_CACHES=1`)."""
    args = run.parse_args(["--preset", "tiny", "--out", str(tmp_path / "results")])
    assert args.readme == "" and args.drop_caches is False
    tracked = run.parse_args(["--preset", "tiny"])
    assert Path(tracked.readme) == Path(run.HERE) / "README.md" and tracked.drop_caches is False
    assert run.parse_args(["--preset", "tiny", "--drop-caches"]).drop_caches is True
    make = subprocess.run(["make", "-n", "bench", "DROP_CACHES=1"], cwd=REPO, capture_output=True, text=True)
    assert "--drop-caches" in make.stdout and "--no-drop-caches" not in make.stdout.split("benchmarks.run", 1)[1]
    make = subprocess.run(["make", "-n", "bench"], cwd=REPO, capture_output=True, text=True)
    assert "--no-drop-caches" in make.stdout and "DROP_CACHES=1" in make.stdout


# ---------------------------------------------------------------- the Mixture-of-Experts preset (issue 19.5)

MOE_TINY = presets.PRESETS["qwen3-moe-tiny"]
W1 = "layers.0.moe.routed_experts.inner_experts.w1_EFD"


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "qwen3-moe-tiny"
    gen.generate("qwen3-moe-tiny", "float32", out)
    return out


def _full(name, shape, dtype="float32"):
    return gen.expected_values(gen.data_key(name), dtype, 0, math.prod(shape)).view(shape)


def test_moe_preset_is_saved_as_torchtitan_saves_it_and_holds_the_formula(moe_ckpt, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    md = FileSystemReader(str(moe_ckpt)).read_metadata().state_dict_metadata
    specs = presets.tensor_specs(MOE_TINY)
    assert list(md) == [n for n, _ in specs]      # flat torchtitan keys, model only
    # 3 experts over 4 FSDP2 ranks: torch.chunk gives ranks 0-2 one expert each and rank 3 an empty chunk
    assert sorted((tuple(c.offsets), tuple(c.sizes)) for c in md[W1].chunks) == \
        [((0, 0, 0), (0, 32, 64)), ((0, 0, 0), (1, 32, 64)), ((1, 0, 0), (1, 32, 64)), ((2, 0, 0), (1, 32, 64))] \
        or sorted(tuple(c.offsets)[0] for c in md[W1].chunks if c.sizes[0]) == [0, 1, 2]
    dcp_to_torch_save(str(moe_ckpt), tmp_path / "all.pt")
    sd = torch.load(tmp_path / "all.pt", weights_only=True)
    for name, shape in specs:
        assert torch.equal(sd[name], _full(name, shape)), name
    assert gen.read_stamp(moe_ckpt)["self_check"]["checked_tensors"]
    with pytest.raises(SystemExit, match="torchtitan"):
        gen.generate("qwen3-moe-tiny", "float32", tmp_path / "x", with_optim=True)
    with pytest.raises(SystemExit, match="grouped expert"):
        gen.generate("tiny", "float32", tmp_path / "y", layout="ep")


def test_generator_self_check_reads_back_a_grouped_expert_tensor(moe_ckpt, monkeypatch):
    """At the benchmark sizes every grouped expert tensor is larger than the small-tensor sample's limit, and they
    hold 88% of the bytes: the self-check reads the last one back too (compared window by window)."""
    big = presets.tensor_specs(presets.PRESETS["qwen3-moe-3gb"])
    sample = [n for n, _ in gen._sample(big)]
    assert sample[-1] == "layers.1.moe.routed_experts.inner_experts.w3_EFD" and len(sample) == gen.SAMPLE_TENSORS + 1
    dense = [n for n, _ in gen._sample(presets.tensor_specs(presets.PRESETS["llama-3.2-11b-vision"]))]
    assert len(dense) == gen.SAMPLE_TENSORS     # no grouped experts: the sample is what it was
    monkeypatch.setattr(gen, "SAMPLE_MAX_NUMEL", 1000)     # windows of 1000 elements over the tiny preset's tensors
    assert "layers.1.moe.routed_experts.inner_experts.w3_EFD" in gen.check_written(moe_ckpt, "qwen3-moe-tiny",
                                                                                     "float32")["checked_tensors"]


def test_moe_hf_outputs_are_torchs_unbind_of_the_grouped_experts(tmp_path):
    """The expected fingerprints of the unstacked output (a grouped tensor's plane e starts at element e*F*D) equal
    those of the planes torch's `unbind` cuts, and a swap of two experts is caught."""
    from benchmarks.moe_presets import hf_outputs

    specs = dict(presets.tensor_specs(MOE_TINY))
    outputs = hf_outputs(MOE_TINY)
    assert len(outputs) == len(specs) - 3 * MOE_TINY.layers + 3 * MOE_TINY.layers * MOE_TINY.experts
    state = {}
    for hf, name, shape, _ in outputs:
        whole = _full(name, specs[name])
        expert = re.search(r"\.experts\.(\d+)\.", hf)      # the expert index the Hugging Face name says
        state[hf] = whole.unbind(0)[int(expert.group(1))].clone() if expert else whole.clone()
        assert tuple(state[hf].shape) == shape, hf
    assert "model.layers.1.mlp.experts.2.down_proj.weight" in state and "model.layers.0.mlp.gate.weight" in state
    save_sharded(state, tmp_path / "out")
    expected = verify.expected_fingerprint([(hf, gen.data_key(n), s, f) for hf, n, s, f in outputs], "float32")
    ok, summary = verify.compare(expected, verify.fingerprint(tmp_path / "out"))
    assert ok, summary
    a, b = "model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.1.gate_proj.weight"
    state[a], state[b] = state[b], state[a]
    save_sharded(state, tmp_path / "swapped")
    ok, summary = verify.compare(expected, verify.fingerprint(tmp_path / "swapped"))
    assert not ok and "2 bytes differ" in summary, summary


def test_moe_harness_measures_the_unstack_beside_the_dense_path(moe_ckpt, tmp_path):
    """One run: cp -r, streamconv (torchtitan-qwen3 detected, experts unstacked) and the dense path (the same bytes,
    --source-format hf); each output checked against the generator's data under its own names."""
    from benchmarks.moe_presets import hf_outputs

    run.main(["--ckpt", str(moe_ckpt), "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "cache"),
              "--readme", "", "--no-drop-caches",
              "--skip", "crc,fsync,buffer,dtype,dcp_to_torch_save,cookbook,accelerate"])
    rows = {r["name"]: r for r in json.loads((tmp_path / "results" / "results.json").read_text())["runs"][-1]["contenders"]}
    assert rows["cp -r"]["status"] == "finished"
    unstack, dense = rows["streamconv"], rows[run.DENSE_PATH]
    assert unstack["check"] == {**unstack["check"], "ok": True, "summary": f"{len(hf_outputs(MOE_TINY))} tensors identical"}
    assert dense["check"] == {**dense["check"], "ok": True, "summary": f"{len(presets.tensor_specs(MOE_TINY))} tensors identical"}
    assert unstack["report"]["tensors"] == len(hf_outputs(MOE_TINY)) and dense["report"]["tensors"] == 27
    # the same tensor bytes (+ a safetensors header that grows with the number of names)
    assert 0 < unstack["report"]["bytes_written"] - 4 * presets.num_params(MOE_TINY) < 8192
    assert 0 < dense["report"]["bytes_written"] - 4 * presets.num_params(MOE_TINY) < 8192
    assert unstack["ratio_to_dense"] > 0 and "x the dense path" in (tmp_path / "results" / "qwen3-moe-tiny.md").read_text()
    assert "ratio_to_dense" not in dense and "ratio_to_cp" in unstack


def test_without_generator_data_each_naming_has_its_own_reference(moe_ckpt, tmp_path):
    """A MoE checkpoint from elsewhere (no stamp): streamconv's output (Hugging Face names) is the reference for
    outputs under those names, the dense path's for the checkpoint's own names, which the cookbook baseline is then
    checked against (it is not a reference of its own)."""
    import shutil

    ckpt = tmp_path / "elsewhere"
    shutil.copytree(moe_ckpt, ckpt, ignore=shutil.ignore_patterns(gen.STAMP))
    run.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "results"), "--cache", str(tmp_path / "cache"),
              "--readme", "", "--no-drop-caches", "--skip", "crc,fsync,buffer,dtype,dcp_to_torch_save,accelerate"])
    rows = {r["name"]: r for r in json.loads((tmp_path / "results" / "results.json").read_text())["runs"][-1]["contenders"]}
    assert rows["streamconv"]["check"]["summary"] == "reference (39 tensors)"
    assert rows[run.DENSE_PATH]["check"]["summary"] == "reference (27 tensors)"
    cookbook = rows["llama-cookbook (dcp.load no_dist)"]["check"]
    assert cookbook["ok"] and cookbook["summary"] == "27 tensors identical", cookbook


def test_moe_ep_layout_converts_into_what_qwen3_moe_loads(tmp_path):
    """torchtitan's expert parallel (EP 2 x FSDP 2; 3 experts are too few for Shard(0) twice, so Shard(1) over
    efsdp: every expert's plane is two chunks); converted with only --config-from a Qwen3MoeConfig base folder, the
    output's names and shapes are proven to be what Qwen3MoeForCausalLM loads and its bytes are the generator's."""
    from torch.distributed.checkpoint import FileSystemReader

    from benchmarks.moe_presets import transformers_config

    pytest.importorskip("transformers")
    ckpt = tmp_path / "tiny-ep"
    assert gen.generate("qwen3-moe-tiny", "float32", ckpt, layout="ep")["sharding"] == "ep"
    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert sorted(tuple(c.offsets) for c in md[W1].chunks) == [(0, 0, 0), (0, 16, 0), (2, 0, 0), (2, 16, 0)]
    assert sorted(tuple(c.offsets) for c in md["tok_embeddings.weight"].chunks) == [(r, 0) for r in (0, 64, 128, 192)]
    transformers_config(MOE_TINY).save_pretrained(tmp_path / "base")
    proc = subprocess.run([sys.executable, "-m", "streamconv", "convert", str(ckpt), str(tmp_path / "out"),
                           "--config-from", str(tmp_path / "base"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    checker = run.Checker(run.inspect_checkpoint(ckpt), "all", [])
    check = checker.check("streamconv", tmp_path / "out", None, "hf")
    assert check["ok"], check


@pytest.mark.trainers
def test_moe_preset_is_torchtitans_qwen3_moe():
    """The tiny MoE preset's names, shapes and order are those of torchtitan 0.3's own Qwen3Model state dict with
    the same sizes (built on the meta device, in a child process: the CPU shims patch torchtitan's modules)."""
    pytest.importorskip("torchtitan")
    c = MOE_TINY
    script = textwrap.dedent(f"""
        import json, torch
        from tests.support import trainer_writers as tw
        tw.shim_torchtitan()
        from torchtitan.models import qwen3 as Q
        from torchtitan.models.common import attention
        from torchtitan.models.common.rope import CosSinRoPE
        Q.get_attention_config = lambda backend: attention.ScaledDotProductAttention.Config()
        layers = Q._build_qwen3_moe_layers(
            n_layers={c.layers}, dim={c.hidden}, n_heads={c.heads}, n_kv_heads={c.kv_heads}, head_dim={c.head_dim},
            moe_hidden_dim={c.moe_intermediate}, num_experts={c.experts}, top_k=2, attn_backend="sdpa",
            moe_comm_backend="standard", rope=CosSinRoPE.Config(dim={c.head_dim}, max_seq_len=64, theta=1e6))
        for layer in layers:
            layer.moe.load_balance_coeff = None
        config = Q.Qwen3Model.Config(
            vocab_size={c.vocab}, dim={c.hidden}, norm=Q._qwen3_norm({c.hidden}), enable_weight_tying=False,
            tok_embeddings=Q.Embedding.Config(num_embeddings={c.vocab}, embedding_dim={c.hidden},
                                              param_init=Q._EMBEDDING_INIT),
            lm_head=Q.Linear.Config(in_features={c.hidden}, out_features={c.vocab}, param_init=Q._LINEAR_INIT),
            layers=layers)
        with torch.device("meta"):
            model = config.build()
        print(json.dumps([[k, list(v.shape)] for k, v in model.state_dict().items()]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = [(k, tuple(s)) for k, s in json.loads(proc.stdout.strip().splitlines()[-1])]
    assert theirs == presets.tensor_specs(c)


def test_plan_state_measures_what_per_chunk_bytes_predicts(tmp_path):
    """benchmarks/plan_state.py on the 671B layout scaled down (4 layers, 64 experts over EP 8 x FSDP 8: 4,224 chunks,
    4,608 pieces): what the metadata, the plan and the located chunks hold per chunk and piece (measured 210 bytes)
    is within `PER_CHUNK_BYTES` (measured 261 at full scale), and not far below it: the constant is a measurement."""
    from benchmarks import metadata_scale
    from streamconv.planning.plan import GENERAL_PER_CHUNK_BYTES, PER_CHUNK_BYTES
    from streamconv.planning.proven import pieces_packed

    metadata_scale.write(tmp_path / "ckpt", layers=4, dense_layers=1, experts=64, ep=8, fsdp=8)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.plan_state", str(tmp_path / "ckpt")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout)
    assert (state["metadata_chunks"], state["plan_pieces"], state["located_chunks"]) == (4224, 4608, 4224)
    assert [p["phase"] for p in state["phases"]] == ["metadata", "plan", "located"]
    # make test-no-fast-paths: the general decoder and Piece objects, predicted with their own constant
    per_chunk_bytes = PER_CHUNK_BYTES if pieces_packed() else GENERAL_PER_CHUNK_BYTES
    assert per_chunk_bytes * 0.6 < state["total_bytes_per_counted_chunk"] <= per_chunk_bytes, state


def test_first_byte_measures_a_real_start_up_warm_and_cold(tiny_ckpt, tmp_path, capsys):
    from benchmarks import first_byte

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)        # (its own pages to drop)
    wall, cpu = first_byte.first_byte(REPO, ckpt, cold=True)
    assert cpu > 0 and 0 < wall < 60
    assert first_byte.main([str(ckpt), "--runs", "1"]) == 0
    assert re.search(r"s wall, [0-9.]+ CPU s \(load average", capsys.readouterr().out)
    steps = {}
    first_byte.first_byte(REPO, ckpt, cold=False, steps=steps)
    assert {".metadata read and decoded", "the plan", "imports: the verbs", "stage"} <= set(steps), steps
    assert 0 < steps[".metadata read and decoded"][0] < steps["total (wall from the first line)"][0]


def test_first_byte_runs_the_tree_it_is_given(tiny_ckpt, tmp_path):
    """A tree whose streamconv fails at start-up fails the measurement: the tree's own code ran, not this one's."""
    from benchmarks import first_byte

    broken = tmp_path / "tree" / "streamconv"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('the other tree')\n")
    with pytest.raises(SystemExit, match="the other tree"):
        first_byte.first_byte(tmp_path / "tree", tiny_ckpt, cold=False)
