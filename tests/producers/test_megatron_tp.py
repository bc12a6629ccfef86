"""A tensor-parallel (TP=2) Megatron-Core checkpoint converts to the same model as the TP=1 fixture.

megatron-core does not run here (no GPU), so the TP=2 checkpoint is written by torch's DCP writer in Megatron's own
layout (2 gloo ranks, `ShardedTensor`s with one local shard per layer, as `dist_checkpointing` saves them) from the
fixture's weights: vocab rows split for the embedding and output layer, `linear_qkv` rows split between ranks (one
query group each), `linear_proj` / `linear_fc2` columns split, and `linear_fc1` as two shards per rank and layer (its
gate half and its up half: Megatron's SwiGLU sharded factory). The conversion must equal the TP=1 one byte for byte
and reproduce Megatron's logits.
"""
from __future__ import annotations

import torch

from streamconv import api
from streamconv.demo_checkpoint import run_distributed

LAYERS, HIDDEN, QKV_ROWS, FFN = 3, 64, 128, 128


def write_tp2(rank: int, world_size: int, out_dir: str, reference: str) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full = torch.load(reference, weights_only=False)

    def sharded(name, boxes):
        """boxes: [(offsets, sizes)] this rank holds of tensor `name`."""
        t = full[name]
        shards = [Shard(t[tuple(slice(o, o + s) for o, s in zip(offs, sizes))].clone(),
                        ShardMetadata(list(offs), list(sizes), f"rank:{rank}/cpu")) for offs, sizes in boxes]
        return init_from_local_shards(shards, list(t.shape))

    half_vocab = full["embedding.word_embeddings.weight"].shape[0] // 2
    state = {
        "embedding.word_embeddings.weight": sharded("embedding.word_embeddings.weight",
                                                    [((rank * half_vocab, 0), (half_vocab, HIDDEN))]),
        "output_layer.weight": sharded("output_layer.weight", [((rank * half_vocab, 0), (half_vocab, HIDDEN))]),
        "decoder.final_layernorm.weight": full["decoder.final_layernorm.weight"],
        "decoder.layers.self_attention.linear_qkv.weight": sharded(
            "decoder.layers.self_attention.linear_qkv.weight",
            [((i, rank * QKV_ROWS // 2, 0), (1, QKV_ROWS // 2, HIDDEN)) for i in range(LAYERS)]),
        "decoder.layers.self_attention.linear_proj.weight": sharded(
            "decoder.layers.self_attention.linear_proj.weight",
            [((i, 0, rank * HIDDEN // 2), (1, HIDDEN, HIDDEN // 2)) for i in range(LAYERS)]),
        "decoder.layers.mlp.linear_fc1.weight": sharded(
            "decoder.layers.mlp.linear_fc1.weight",
            [((i, part * FFN + rank * FFN // 2, 0), (1, FFN // 2, HIDDEN)) for i in range(LAYERS) for part in (0, 1)]),
        "decoder.layers.mlp.linear_fc2.weight": sharded(
            "decoder.layers.mlp.linear_fc2.weight",
            [((i, 0, rank * FFN // 2), (1, HIDDEN, FFN // 2)) for i in range(LAYERS)]),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight":
            full["decoder.layers.self_attention.linear_qkv.layer_norm_weight"],
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": full["decoder.layers.mlp.linear_fc1.layer_norm_weight"],
    }
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


def test_tp2_megatron_checkpoint_converts_like_tp1(shared_fixtures_dir, tmp_path):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import LlamaForCausalLM

    case = shared_fixtures_dir / "megatron_gpt_tp1"
    dcp_to_torch_save(case / "ckpt", tmp_path / "tp1.pt")
    run_distributed(f"{__name__}:write_tp2", 2, dict(out_dir=str(tmp_path / "tp2"),
                                                          reference=str(tmp_path / "tp1.pt")))
    info = api.inspect(str(tmp_path / "tp2"))
    layouts = {t["name"]: t["layout"] for t in info["tensors"]}
    assert layouts["decoder.layers.mlp.linear_fc1.weight"] == "12 chunks, dims 0,1"
    assert layouts["decoder.layers.self_attention.linear_proj.weight"] == "6 chunks, dims 0,2"

    api.convert(str(case / "ckpt"), str(tmp_path / "hf1"), config_from=str(case / "base"))
    report = api.convert(str(tmp_path / "tp2"), str(tmp_path / "hf2"), config_from=str(case / "base"),
                         buffer_size="64KiB")
    assert any(n.startswith("source format: megatron-gpt") for n in report.notes)
    assert (tmp_path / "hf1" / "model.safetensors").read_bytes() == (tmp_path / "hf2" / "model.safetensors").read_bytes()
    expected = torch.load(case / "logits.pt")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf2").eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.allclose(logits, expected["logits"].to(logits.dtype), atol=1e-5)
    assert load_file(tmp_path / "hf2" / "model.safetensors")["model.layers.2.mlp.up_proj.weight"].shape == (FFN, HIDDEN)
