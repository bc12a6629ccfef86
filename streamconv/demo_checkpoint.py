"""Write a small but real DCP checkpoint the way llama-recipes saves a full fine-tune, for `make demo` and tests.

This is the only streamconv module that touches torch, and it imports torch inside functions, so importing it
is cheap. The conversion path never imports it.

Two parts:

* `run_distributed(target, world_size, kwargs)`: run a module-level function in `world_size` CPU processes
  joined in a gloo process group, return what each rank returned, raise `WorkerError` with the workers'
  tracebacks on failure. Processes are forked from a multiprocessing *forkserver* that imported torch once,
  so a launch costs ~0.1 s instead of ~2 s of `import torch` per rank. The rendezvous store is served by
  the parent on a port the OS picked (127.0.0.1), so there is no free-port race.
* `write_demo_checkpoint(out_dir, world_size=4)`: a tiny transformers `LlamaForCausalLM` sharded with FSDP2
  `fully_shard`, one AdamW step, saved as `{"model": sd, "optim": osd}` with `dcp.save`, plus
  `train_params.yaml` (as llama-recipes' `save_train_params` writes it) and the HF config in `hf_config/`.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .errors import OptionsError

# Imported once by the forkserver so every rank starts with them loaded (a missing module is skipped).
# transformers' Llama costs ~1.5 s once here but saves that much per rank whenever the demo runs.
_PRELOAD = (
    "transformers.models.llama.modeling_llama",
    "torch",
    "torch.distributed",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "streamconv.demo_checkpoint",
)


class WorkerError(RuntimeError):
    """A rank of `run_distributed` failed or timed out. The message holds every rank's traceback."""


# --------------------------------------------------------------------------------------------------------------
# launcher


def run_distributed(target: str, world_size: int, kwargs: Optional[Dict[str, Any]] = None, *,
                    timeout_s: float = 300.0, preload: Sequence[str] = ()) -> List[Any]:
    """Call `module:function` as `function(rank, world_size, **kwargs)` in `world_size` gloo processes.

    Returns the per-rank return values (they must pickle). `preload` adds modules for the forkserver to
    import, which only matters for the first launch of this Python process.
    """
    import multiprocessing as mp
    from datetime import timedelta

    import torch.distributed as dist

    module_name, _, fn_name = target.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"target {target!r} must look like 'package.module:function'")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(_PRELOAD) + list(preload))
    else:  # pragma: no cover - Windows
        ctx = mp.get_context("spawn")

    # The parent serves the store: port 0 lets the OS pick a free port and we hold it for the whole run.
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    with tempfile.TemporaryDirectory(prefix="streamconv-ranks-") as result_dir:
        procs = []
        for rank in range(world_size):
            p = ctx.Process(
                target=_bootstrap, name=f"{fn_name}-rank{rank}", daemon=True,
                args=(module_name, fn_name, rank, world_size, store.port, dict(kwargs or {}), result_dir,
                      list(sys.path), timeout_s))
            p.start()
            procs.append(p)
        hung: List[int] = []
        try:
            _wait(procs, timeout_s)
        finally:
            for rank, p in enumerate(procs):
                if p.exitcode is None:
                    hung.append(rank)
                    p.kill()
                p.join(5)
        if hung or any(p.exitcode != 0 for p in procs):
            raise WorkerError(_failure_report(target, procs, hung, result_dir, timeout_s))
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.ok"), "rb") as f:
                results.append(pickle.load(f))
    del store
    return results


def _wait(procs, timeout_s: float) -> None:
    """Return when all ranks exited, or a few seconds after the first failure (peers then fail too)."""
    from multiprocessing.connection import wait

    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if not alive:
            return
        if any(p.exitcode not in (None, 0) for p in procs):
            # The others are usually blocked in a collective with the dead rank; give them a moment to
            # notice and write their own traceback, then stop them.
            wait([p.sentinel for p in alive], timeout=3.0)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        wait([p.sentinel for p in alive], timeout=min(remaining, 1.0))


def _failure_report(target: str, procs, hung: List[int], result_dir: str, timeout_s: float) -> str:
    lines = [f"{target} failed on {len(procs)} gloo ranks:"]
    errors = []
    for rank, p in enumerate(procs):
        path = os.path.join(result_dir, f"rank{rank}.err")
        if os.path.exists(path):
            with open(path) as f:
                errors.append((os.path.getmtime(path), rank, f.read()))
        if rank in hung:
            lines.append(f"  rank {rank}: still running (timeout {timeout_s:g}s or a peer failed), killed")
        else:
            lines.append(f"  rank {rank}: exit code {p.exitcode}")
    # Earliest traceback first: it is the cause; later ones are usually peers losing their connection.
    for _, rank, text in sorted(errors):
        lines.append(f"\n--- rank {rank} traceback ---\n{text.rstrip()}")
    if not errors:
        lines.append("no rank reached the target (killed, crashed or failed while starting); see the captured "
                     "stderr. A main script that launches ranks needs an `if __name__ == '__main__':` guard, "
                     "because each rank re-imports it, as with any multiprocessing start method but fork.")
    return "\n".join(lines)


def _bootstrap(module_name: str, fn_name: str, rank: int, world_size: int, port: int, kwargs: Dict[str, Any],
               result_dir: str, sys_path: List[str], timeout_s: float) -> None:
    """Runs in each rank: set up the process group, call the target, leave a result or a traceback file."""
    os.environ.update({
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size), "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    })
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # stay on loopback even if the hostname does not resolve
    sys.path[:] = list(sys_path) + [p for p in sys.path if p not in sys_path]
    try:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        fn = getattr(importlib.import_module(module_name), fn_name)
        result = fn(rank, world_size, **kwargs)
        # Only on success: after a failure, destroy_process_group can block on peers stuck in a collective.
        dist.destroy_process_group()
        tmp = os.path.join(result_dir, f"rank{rank}.ok.tmp")
        with open(tmp, "wb") as f:
            pickle.dump(result, f)
        os.replace(tmp, os.path.join(result_dir, f"rank{rank}.ok"))
    except BaseException:
        text = traceback.format_exc()
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(text)
        sys.stderr.write(f"[rank {rank}] {text}")
        sys.stderr.flush()
        os._exit(1)  # skip atexit/finalizers that could block on a broken process group


# --------------------------------------------------------------------------------------------------------------
# demo checkpoint

DEMO_CONFIG = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1003, tie_word_embeddings=False)


@dataclass(frozen=True)
class DemoCheckpoint:
    ckpt_dir: Path          # the DCP folder: .metadata, __R_0.distcp, train_params.yaml
    config_dir: Path        # config.json + generation_config.json, for --config-from
    world_size: int
    num_tensors: int        # tensor items in the checkpoint (model + optimizer)
    seconds: float


def write_demo_checkpoint(out_dir, world_size: int = 4, *, seed: int = 0, lr: float = 1e-4,
                          model_name: Optional[str] = None, timeout_s: float = 300.0) -> DemoCheckpoint:
    """Write a llama-recipes-style FSDP2 checkpoint of a tiny Llama into `out_dir` (created; must be empty).

    `model_name` goes into train_params.yaml; it defaults to the absolute path of `out_dir/hf_config`, which
    resolves offline.
    """
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise OptionsError(f"{out} is not empty; pass a new or empty folder for the demo checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    config_dir = out / "hf_config"
    start = time.monotonic()
    results = run_distributed(
        "streamconv.demo_checkpoint:_demo_worker", world_size,
        dict(out_dir=str(out), config_dir=str(config_dir), seed=seed, lr=lr,
             model_name=model_name or str(config_dir)),
        timeout_s=timeout_s)
    return DemoCheckpoint(ckpt_dir=out, config_dir=config_dir, world_size=world_size,
                          num_tensors=results[0], seconds=time.monotonic() - start)


def _demo_worker(rank: int, world_size: int, *, out_dir: str, config_dir: str, seed: int, lr: float,
                 model_name: str) -> int:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**DEMO_CONFIG)
    torch.manual_seed(seed)  # same init on every rank, as if loaded from one pretrained checkpoint
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optim = torch.optim.AdamW(model.parameters(), lr=lr)

    gen = torch.Generator().manual_seed(seed * 1000 + rank + 1)  # each rank its own micro-batch
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optim.step()
    optim.zero_grad()

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optim)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir))
    if rank == 0:
        _save_train_params(Path(out_dir), model_name=model_name, lr=lr, seed=seed)
        model.config.dtype = "float32"  # what save_pretrained(model) records; the bare config has none
        model.config.save_pretrained(config_dir)
        model.generation_config.save_pretrained(config_dir)
    dist.barrier()
    items = dcp.FileSystemReader(out_dir).read_metadata().state_dict_metadata.values()
    return sum(isinstance(m, dcp.metadata.TensorStorageMetadata) for m in items)


def _save_train_params(ckpt_dir: Path, *, model_name: str, lr: float, seed: int) -> None:
    """Mimic llama-recipes `save_train_params`: train_config + fsdp_config fields, every value str()-ed."""
    import yaml

    train_config = dict(
        model_name=model_name, tokenizer_name=None, enable_fsdp=True, low_cpu_fsdp=False, run_validation=True,
        batch_size_training=2, batching_strategy="packing", context_length=16, gradient_accumulation_steps=1,
        gradient_clipping=False, gradient_clipping_threshold=1.0, num_epochs=1, max_train_step=1,
        max_eval_step=0, num_workers_dataloader=1, lr=lr, weight_decay=0.0, gamma=0.85, seed=seed,
        use_fp16=False, mixed_precision=True, val_batch_size=1, dataset="samsum_dataset", peft_method="lora",
        use_peft=False, from_peft_checkpoint="", output_dir="PATH/to/save/PEFT/model", freeze_layers=False,
        num_freeze_layers=1, quantization=None, one_gpu=False, save_model=True,
        dist_checkpoint_root_folder=str(ckpt_dir.parent), dist_checkpoint_folder=ckpt_dir.name,
        save_optimizer=True, use_fast_kernels=False, use_wandb=False, save_metrics=False,
        flop_counter=False, flop_counter_start=3, use_profiler=False, profiler_dir="PATH/to/save/profiler/results",
    )
    fsdp_config = dict(
        mixed_precision=True, use_fp16=False, sharding_strategy="ShardingStrategy.FULL_SHARD",
        hsdp=False, sharding_group_size=0, replica_group_size=0,
        checkpoint_type="StateDictType.SHARDED_STATE_DICT", fsdp_activation_checkpointing=True,
        fsdp_cpu_offload=False, pure_bf16=False, optimizer="AdamW",
    )
    params = {k: str(v) for k, v in {**train_config, **fsdp_config}.items()}
    (ckpt_dir / "train_params.yaml").write_text(yaml.dump(params, indent=4))
