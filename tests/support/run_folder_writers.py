"""Run folders laid out the way accelerate, transformers' Trainer and torchtitan lay them out, written by torch's
own DCP writer from a tiny HF Llama trained one step under FSDP2 in 2 gloo ranks.

The trainers themselves are not run: on CPU accelerate and Trainer silently fall back to DDP unless their FSDP
plugin and device are forced, and one launch of either costs more than this whole file. Instead each rank makes
exactly the calls accelerate's `save_fsdp_model` / `save_fsdp_optimizer` make for FSDP2 with
`SHARDED_STATE_DICT` (accelerate 1.x, `utils/fsdp_utils.py`):

    dist_cp.save({"model": get_model_state_dict(model)},  FileSystemWriter(out / "pytorch_model_fsdp_0"))
    dist_cp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, FileSystemWriter(out / "optimizer_0"))

and writes the files beside them that `save_state` / `Trainer._save_checkpoint` leave (their content is never read
by streamconv). transformers' Trainer calls the same two accelerate functions inside `checkpoint-N/`.
torchtitan's `step-N/` holds the model's keys at top level beside `optimizer` (its ModelWrapper flattens the
model state dict); it is written here the same way, `{**model_state, "optimizer": optimizer_state}`.

`build(out)` writes, under out/:

* `base/`        — the untrained model's `save_pretrained` folder with a tiny tokenizer (what --config-from takes)
* `state/`       — accelerate `save_state`: pytorch_model_fsdp_0/, optimizer_0/, scheduler.bin, sampler.bin,
                   random_states_0.pkl
* `titan_step/`  — a torchtitan-style step folder (model keys at top level + optimizer)
* `trained.pt`   — the trained weights gathered to full tensors, for reference logits
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from streamconv.demo_checkpoint import run_distributed

WORLD_SIZE = 2
MODEL = "llama_untied"
ACCELERATE_SIDE_FILES = ("scheduler.bin", "sampler.bin", "random_states_0.pkl")
TRAINER_SIDE_FILES = ("trainer_state.json", "training_args.bin", "scheduler.pt", "rng_state_0.pth")


def write(rank: int, world_size: int, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from tests.support import hf_writers

    torch.set_num_threads(1)
    out = Path(out_dir)
    model = hf_writers.make_model(MODEL)
    if rank == 0:
        model.save_pretrained(out / "base")
        hf_writers._add_processors(out / "base", MODEL)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=hf_writers.LR)
    batch = hf_writers.inputs(MODEL, seed=100 + rank)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optim.step()
    optim.zero_grad()

    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optim)
    state = out / "state"
    dcp.save({"model": model_state}, storage_writer=dcp.FileSystemWriter(state / "pytorch_model_fsdp_0",
                                                                         sync_files=False))
    dcp.save({"optimizer": optim_state}, storage_writer=dcp.FileSystemWriter(state / "optimizer_0", sync_files=False))
    dcp.save({**model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(out / "titan_step", sync_files=False))
    full = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out / "trained.pt")
        for name in ACCELERATE_SIDE_FILES:
            (state / name).write_bytes(b"written by accelerate; never read by streamconv\n")
    dist.barrier()


def build(out_dir) -> Dict[str, Path]:
    out = Path(out_dir)
    run_distributed(f"{__name__}:write", WORLD_SIZE, {"out_dir": str(out)}, timeout_s=300,
                    preload=("transformers", "transformers.models.llama.modeling_llama", "hf_writers", __name__))
    return {"base": out / "base", "state": out / "state", "titan_step": out / "titan_step",
            "trained": out / "trained.pt"}
