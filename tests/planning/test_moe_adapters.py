"""The torchtitan Qwen3 adapter as data, without files: detection beside the Llama adapters, the literal pieces
of unstacked grouped experts, and every adapter offered by `--source-format`; the DeepSeek-V3 adapters' config
check and the megatron-mla names. The real checkpoints are in tests/producers/test_trainers_moe.py (marker
`trainers`), tests/producers/test_megatron_mla.py (marker `megatron`) and tests/memory/test_expert_memory.py."""
import re

import pytest
from click.testing import CliRunner

from streamconv.cli import cli
from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, TensorEntry
from streamconv.planning import trainers
from streamconv.planning.plan import PlanOptions, build_plan

P = "layers.0.moe.routed_experts.inner_experts."


def entry(name, shape, split_dim=None):
    """A tensor stored as two chunks halved along `split_dim` (FSDP2 / EP on dim 0, TP on another), else one."""
    if split_dim is None:
        return TensorEntry(name, "float32", shape, (Chunk((0,) * len(shape), shape, BlobLocation(name, 0, 1)),))
    half = shape[split_dim] // 2
    chunks = tuple(Chunk(tuple(half * r if d == split_dim else 0 for d in range(len(shape))),
                         tuple(half if d == split_dim else s for d, s in enumerate(shape)),
                         BlobLocation(f"{name}#{r}", r, 1)) for r in (0, 1))
    return TensorEntry(name, "float32", shape, chunks)


def test_grouped_experts_unstack_into_literal_pieces():
    meta = CheckpointMetadata(tensors=(entry(P + "w1_EFD", (4, 6, 8), split_dim=0),
                                       entry(P + "w2_EDF", (4, 8, 6), split_dim=1),
                                       entry("layers.0.moe.router.gate.weight", (4, 8))))
    plan = build_plan(meta, PlanOptions(source_format="torchtitan-qwen3", max_shard_bytes=10**9))
    by_name = {t.name: t for t in plan.tensors}
    assert sorted(by_name) == sorted(
        ["model.layers.0.mlp.gate.weight"]
        + [f"model.layers.0.mlp.experts.{e}.{p}.weight" for e in range(4) for p in ("gate_proj", "down_proj")])
    for e in range(4):
        gate = by_name[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]
        (piece,) = gate.pieces       # expert e is one plane of the chunk holding experts 2*(e//2) .. +1
        assert gate.shape == (6, 8) and piece.chunk.location.relative_path == f"{P}w1_EFD#{e // 2}"
        assert (piece.src_start, piece.dst_start, piece.sizes) == ((e % 2, 0, 0), (0, 0), (6, 8))
        down = by_name[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]
        assert down.shape == (8, 6)  # rows 0-3 from rank 0's chunk, rows 4-7 from rank 1's: two pieces
        assert [(p.chunk.location.relative_path, p.src_start, p.dst_start, p.sizes) for p in down.pieces] == [
            (f"{P}w2_EDF#0", (e, 0, 0), (0, 0), (4, 6)), (f"{P}w2_EDF#1", (e, 0, 0), (4, 0), (4, 6))]
    assert by_name["model.layers.0.mlp.gate.weight"].pieces == ()      # a rename keeps the plain copy path


DENSE_QWEN3 = ["tok_embeddings.weight", "layers.0.attention.qkv_linear.wq.weight",
               "layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.weight",
               "layers.0.feed_forward.w1.weight", "norm.weight", "lm_head.weight"]


def test_qwen3_is_told_from_llama_by_its_qk_norm():
    assert trainers.resolve(DENSE_QWEN3, []).name == "torchtitan-qwen3"
    llama = [n for n in DENSE_QWEN3 if "_norm." not in n]
    assert trainers.resolve(llama, []).name == "torchtitan-llama"


def test_deepseek_v3_is_told_from_llama_by_its_latent_attention():
    """DeepSeek-V3 without q LoRA has Llama's `attention.wq` and a dense first layer's `feed_forward.w1`."""
    names = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wkv_a.weight",
             "layers.0.attention.kv_norm.weight", "layers.0.feed_forward.w1.weight", "norm.weight"]
    assert trainers.resolve(names, []).name == "torchtitan-deepseek-v3"


def test_source_format_offers_every_adapter():
    result = CliRunner().invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0, result.output
    shown = re.sub(r"-\n\s+", "-", result.output)     # (click may wrap a name after one of its hyphens)
    for adapter in trainers.ADAPTERS:
        assert adapter.name in shown, adapter.name


def test_fused_expert_layout_joins_gate_and_up_into_literal_pieces():
    """`--expert-layout fused`: w1_EFD then w3_EFD side by side on the ffn dim as `experts.gate_up_proj`
    [E, 2F, D] (each FSDP2 chunk one piece), w2_EDF renamed to `experts.down_proj` and kept on the copy path."""
    meta = CheckpointMetadata(tensors=(entry(P + "w1_EFD", (4, 6, 8), split_dim=0),
                                       entry(P + "w3_EFD", (4, 6, 8), split_dim=0),
                                       entry(P + "w2_EDF", (4, 8, 6), split_dim=0)))
    plan = build_plan(meta, PlanOptions(source_format="torchtitan-qwen3", expert_layout="fused",
                                        max_shard_bytes=10**9))
    by_name = {t.name: t for t in plan.tensors}
    assert sorted(by_name) == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    gate_up = by_name["model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (4, 12, 8)
    assert sorted((p.chunk.location.relative_path, p.src_start, p.dst_start, p.sizes) for p in gate_up.pieces) == [
        (f"{P}w1_EFD#0", (0, 0, 0), (0, 0, 0), (2, 6, 8)), (f"{P}w1_EFD#1", (0, 0, 0), (2, 0, 0), (2, 6, 8)),
        (f"{P}w3_EFD#0", (0, 0, 0), (0, 6, 0), (2, 6, 8)), (f"{P}w3_EFD#1", (0, 0, 0), (2, 6, 0), (2, 6, 8))]
    down = by_name["model.layers.0.mlp.experts.down_proj"]
    assert down.shape == (4, 8, 6) and down.pieces == () and down.source_fqn == P + "w2_EDF"
    resolution = trainers.resolve([P + "w1_EFD", "layers.0.attention.q_norm.weight", "tok_embeddings.weight",
                                   "layers.0.attention.k_norm.weight"], [], expert_layout="fused")
    assert resolution.adapter.expert_layout.startswith("fused mlp.experts.gate_up_proj [E, 2F, D]")
    assert "routed experts: fused" in resolution.note


def test_fused_expert_layout_with_a_missing_half_is_refused_not_zero_filled():
    """Only w1_EFD (w3_EFD absent): gate_up_proj would be half empty; refused, naming the fix."""
    import pytest
    from streamconv.errors import ReferenceMismatchError
    meta = CheckpointMetadata(tensors=(entry(P + "w1_EFD", (4, 6, 8), split_dim=0),))
    with pytest.raises(ReferenceMismatchError, match=r"gate_up_proj.*only .*w1_EFD is in the checkpoint and "
                                                     r"selected \(192 of 384 elements\); convert with --expert-layout "
                                                     r"per-expert"):
        build_plan(meta, PlanOptions(source_format="torchtitan-qwen3", expert_layout="fused", max_shard_bytes=10**9))
    # ... and so is the half the user excluded: never joined against the user's word, never left empty
    meta = CheckpointMetadata(tensors=(entry(P + "w1_EFD", (4, 6, 8), split_dim=0),
                                       entry(P + "w3_EFD", (4, 6, 8), split_dim=0)))
    with pytest.raises(ReferenceMismatchError, match="only .*w1_EFD is in the checkpoint and selected"):
        build_plan(meta, PlanOptions(source_format="torchtitan-qwen3", expert_layout="fused", exclude=("*w3_EFD",),
                                     max_shard_bytes=10**9))


def test_a_grouped_weight_is_proven_once_for_all_its_experts(monkeypatch):
    """Each of E unstacked experts reads the same grouped weight: its chunks are deduplicated, proven to tile it and
    indexed once per plan, not once per expert (E x its chunks; most of a DeepSeek-V3-scale plan's time)."""
    from streamconv.planning import proven as proven_module, transforms
    proofs, indexes = [], []
    real_check, real_index, real_lead = proven_module.check_coverage, transforms.ChunkIndex, transforms.LeadIndex
    monkeypatch.setattr(proven_module, "check_coverage", lambda fqn, *a: (proofs.append(fqn), real_check(fqn, *a)))
    monkeypatch.setattr(transforms, "ChunkIndex", lambda *a: (indexes.append(a), real_index(*a))[1])

    class CountedLeadIndex(real_lead):
        def __init__(self, *a):
            indexes.append(a)
            super().__init__(*a)
    monkeypatch.setattr(transforms, "LeadIndex", CountedLeadIndex)
    meta = CheckpointMetadata(tensors=(entry(P + "w1_EFD", (8, 6, 4), split_dim=0),
                                       entry(P + "w2_EDF", (8, 4, 6), split_dim=1),
                                       entry("layers.0.moe.router.gate.weight", (8, 4))))
    plan = build_plan(meta, PlanOptions(source_format="torchtitan-qwen3", max_shard_bytes=10**9))
    assert len(plan.tensors) == 1 + 2 * 8
    assert sorted(proofs) == sorted([P + "w1_EFD", P + "w2_EDF", "layers.0.moe.router.gate.weight"])
    assert len(indexes) == 2


@pytest.mark.parametrize("adapter", [trainers.TORCHTITAN_DEEPSEEK_V3, trainers.MEGATRON_MLA])
def test_deepseek_v3_adapters_need_the_interleaved_rope_config(adapter):
    """Both trainers' RoPE pairs channels as DeepSeek-V3's `rope_interleave: true` does; with `false` transformers
    would run the same rows as another model, which the names cannot show: refused (exit 4), the fix named."""
    from streamconv.errors import ReferenceMismatchError
    assert adapter.config_check({}).startswith("rope_interleave: true in config.json")      # transformers' default
    assert adapter.config_check({"rope_interleave": True})
    with pytest.raises(ReferenceMismatchError, match='set "rope_interleave": true') as exc:
        adapter.config_check({"rope_interleave": False})
    assert exc.value.exit_code == 4 and "nothing was written" in str(exc.value)


def test_megatron_mla_names_map_to_deepseek_v3_in_both_key_forms():
    """Every megatron-mla attention and router tensor (local-spec and Transformer Engine names, stacked and per
    layer) is one rename: literal targets."""
    names = {
        "decoder.layers.self_attention.linear_q_down_proj.weight": "model.layers.{i}.self_attn.q_a_proj.weight",
        "decoder.layers.self_attention.q_layernorm.weight": "model.layers.{i}.self_attn.q_a_layernorm.weight",
        "decoder.layers.self_attention.linear_q_up_proj.layer_norm_weight":
            "model.layers.{i}.self_attn.q_a_layernorm.weight",
        "decoder.layers.self_attention.linear_kv_up_proj.layer_norm_weight":
            "model.layers.{i}.self_attn.kv_a_layernorm.weight",
        "decoder.layers.self_attention.linear_kv_down_proj.weight":
            "model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
        "decoder.layers.self_attention.linear_q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
        "decoder.layers.mlp.router.expert_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
        "decoder.layers.mlp.shared_experts.linear_fc2.weight": "model.layers.{i}.mlp.shared_experts.down_proj.weight",
    }
    for stacked, target in names.items():
        for name, lead in ((stacked, (2,)), (stacked.replace("decoder.layers.", "decoder.layers.1."), ())):
            e = entry(name, lead + (4, 4))
            made = [out for r in trainers.MEGATRON_MLA.rules for m in [r.match(name)] if m
                    for out, _ in trainers.outputs(r, m, e, None)]
            want = [target.format(i=i) for i in range(2)] if lead else [target.format(i=1)]
            assert made == want, (name, made)
    assert trainers.megatron_adapter(["embedding.word_embeddings.weight", *names]) is trainers.MEGATRON_MLA


def test_unstacked_names_from_one_template_are_the_names_expanded_one_by_one():
    """Every adapter's unstacking targets, and one whose index follows a group reference (`\\1{expert}` reads as
    groups 10-19 expanded whole): the names made from the template parsed once are `m.expand` of each target."""
    import re
    from streamconv.planning.trainers import adapter as adapter_module
    rules = [r for a in trainers.ADAPTERS for r in a.rules + a.fused_rules if r.unstack]
    rules.append(trainers.Rule(r"x\.(\d+)\.w", r"y.\1{expert}.w", unstack=True))
    assert len(rules) >= 8
    m = re.fullmatch("".join(f"(v{i}x)" for i in range(1, 21)), "".join(f"v{i}x" for i in range(1, 21)))
    for rule in rules:
        leads = [(i, j) for i in range(3) for j in range(10)] if rule.unstack == 2 else [(i,) for i in range(10)]
        assert adapter_module._indexed_names(rule.target, m, leads) == [
            m.expand(adapter_module._indexed(rule.target, lead)) for lead in leads], rule.target
