"""Real transformers models trained one step under FSDP2 in CPU gloo ranks, saved the way llama-recipes saves.

One launch (`build`) writes, for each model below, into `out_dir/<name>/`:

* `base/`    — the untrained model's `save_pretrained` folder (config, generation config, weights), plus a
               tiny tokenizer (and for Mllama an image processor): what `--config-from` points at.
* `ckpt/`    — `dcp.save({"model": model.state_dict()})` after one AdamW step (DTensor shards; a tied model
               holds both `lm_head.weight` and `model.embed_tokens.weight`), and a llama-recipes
               `train_params.yaml` whose model_name is `base/`.
* `trained.pt` — the same trained weights gathered to full tensors (live names), for reference logits.

| name          | model |
|---------------|-------|
| llama_tied    | LlamaForCausalLM, tie_word_embeddings=True, vocab 1003 (uneven shards) |
| llama_untied  | the same sizes with tie_word_embeddings=False (its head differs from its embedding) |
| mllama        | MllamaForConditionalGeneration: vision tower, text decoder with a cross-attention layer |
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from streamconv.demo_checkpoint import run_distributed

WORLD_SIZE = 3
LR = 1e-2
MODELS = ("llama_tied", "llama_untied", "mllama")

LLAMA = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=1003, bos_token_id=1, eos_token_id=2, max_position_embeddings=128)
MLLAMA_VISION = dict(hidden_size=32, attention_heads=2, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                     intermediate_layers_indices=[0], vision_output_dim=64, image_size=28, patch_size=14,
                     max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
MLLAMA_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1003, cross_attention_layers=[1], bos_token_id=1,
                   eos_token_id=2, pad_token_id=1000, max_position_embeddings=128)
IMAGE_TOKEN = 1001


def make_config(name: str):
    from transformers import LlamaConfig, MllamaConfig

    if name == "llama_tied":
        return LlamaConfig(**LLAMA, tie_word_embeddings=True)
    if name == "llama_untied":
        return LlamaConfig(**LLAMA, tie_word_embeddings=False)
    if name == "mllama":
        return MllamaConfig(vision_config=MLLAMA_VISION, text_config=MLLAMA_TEXT, image_token_index=IMAGE_TOKEN)
    raise ValueError(f"unknown model {name!r}; known: {MODELS}")


def model_class(name: str):
    from transformers import LlamaForCausalLM, MllamaForConditionalGeneration

    return MllamaForConditionalGeneration if name == "mllama" else LlamaForCausalLM


def make_model(name: str, seed: int = 0):
    """The same weights in every process. Mllama's gates start at 0.5, not 0, so the vision tower and the
    cross-attention change the logits (and get gradients)."""
    torch.manual_seed(seed)
    model = model_class(name)(make_config(name))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "gate" in pname and p.numel() == 1:
                p.fill_(0.5)
    return model


def inputs(name: str, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    batch, length = 2, 12
    ids = torch.randint(3, 1000, (batch, length), generator=gen)
    if name != "mllama":
        return {"input_ids": ids}
    ids[:, 1] = IMAGE_TOKEN
    v = MLLAMA_VISION
    cross = torch.zeros(batch, length, 1, v["max_num_tiles"], dtype=torch.long)
    cross[0, 1:, 0, :] = 1        # sample 0: a 2-tile image (aspect ratio 1x2)
    cross[1, 1:, 0, 0] = 1        # sample 1: one tile
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(batch, 1, v["max_num_tiles"], 3, v["image_size"], v["image_size"], generator=gen),
        "aspect_ratio_ids": torch.tensor([[2], [1]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1]], [[1, 0]]]),
        "cross_attention_mask": cross,
    }


def _shard(name: str, model) -> None:
    from torch.distributed.fsdp import fully_shard

    if name == "mllama":
        groups = [model.model.language_model.layers, model.model.vision_model.transformer.layers,
                  model.model.vision_model.global_transformer.layers]
    else:
        groups = [model.model.layers]
    for layers in groups:
        for layer in layers:
            fully_shard(layer)
    fully_shard(model)


def _write_one(rank: int, name: str, out: Path) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    model = make_model(name)
    if rank == 0:
        model.save_pretrained(out / "base")
        _add_processors(out / "base", name)
    _shard(name, model)
    optim = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = inputs(name, seed=100 + rank)          # each rank its own micro-batch
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optim.step()
    optim.zero_grad()

    state = model.state_dict()
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(out / "ckpt", sync_files=False))
    full = {k: v.full_tensor().detach().clone() for k, v in state.items()}   # collective: every rank, same order
    if rank == 0:
        torch.save(full, out / "trained.pt")
        (out / "ckpt" / "train_params.yaml").write_text(
            f"model_name: {out / 'base'}\nenable_fsdp: 'True'\npure_bf16: 'False'\n"
            f"lr: '{LR}'\ndist_checkpoint_folder: fine-tuned\n")
    dist.barrier()


def write_all(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    for name in MODELS:
        _write_one(rank, name, Path(out_dir) / name)


def _add_processors(base: Path, name: str) -> None:
    """A tiny word-level tokenizer with a chat template (and Mllama's image processor) beside the config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 1000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(base)
    if name == "mllama":
        try:   # the PIL backend by name: the default one wants torchvision and says so on every call
            from transformers import MllamaImageProcessorPil as ImageProcessor
        except ImportError:
            from transformers import MllamaImageProcessor as ImageProcessor
        size = MLLAMA_VISION["image_size"]
        ImageProcessor(size={"height": size, "width": size},
                       max_image_tiles=MLLAMA_VISION["max_num_tiles"]).save_pretrained(base)


def build(out_dir) -> Dict[str, Path]:
    """One launch of WORLD_SIZE ranks writes every model. {name: out_dir/name}."""
    out = Path(out_dir)
    run_distributed(f"{__name__}:write_all", WORLD_SIZE, {"out_dir": str(out)}, timeout_s=300,
                    preload=("transformers", "transformers.models.llama.modeling_llama",
                             "transformers.models.mllama.modeling_mllama", __name__))
    return {name: out / name for name in MODELS}
