"""Write a real DCP checkpoint of a preset model with torch's own writer, sharded like FSDP2 over
4 ranks (or, with `--layout tp`, Megatron-style tensor parallel: see TP_RULES; with `--layout shortrun`,
every matrix split along its last dim; with `--layout ep`, a MoE preset's experts over torchtitan's expert-parallel
2-D mesh), in bounded memory.

    python -m benchmarks.generate --preset 2gb --dtype bfloat16 --out /tmp/ckpt-2gb [--with-optim] [--layout tp]

How: `world_size` gloo processes on 127.0.0.1 each hold a state dict of DTensors (`Shard(0)`, so
chunk sizes are torch.chunk's, exactly as `fully_shard` lays them out) whose local shards live on the
*meta* device, and call `torch.distributed.checkpoint.save` once, so planning, dedup, `.metadata`
and the `__R_0.distcp` files are all torch's. The planner's `resolve_data` (the hook torch's writer
calls for each item, one at a time, right before `torch.save`-ing it) materialises that chunk's
data only then. torch's writer keeps a reference to every tensor it wrote until the rank's file is
closed (`tensor_dict` in filesystem.py), so the planner frees the previous chunk's storage when it
is asked for the next one: each rank holds one chunk at a time.

Data: element i of a tensor is `pool[(seed(name) + i) % POOL_SIZE]`, with `pool` a fixed N(0, 0.02)
sample cast to the dtype and POOL_SIZE prime. It does not depend on the sharding, it is cheap (a
memcpy), and `expected_values()` recomputes any slice, so an output can be checked without keeping
the checkpoint in RAM. A bfloat16 checkpoint holds exactly the bf16 rounding of the float32 one.

The layout is llama-cookbook's: `{"model": model_state_dict, "optim": optimizer_state_dict}`, so
DCP keys are `model.<hf name>` and `optim.state.<hf name>.exp_avg`; the MoE presets (`moe_presets.py`) are saved
as torchtitan saves a model-only checkpoint, flat keys in torchtitan's names (`layers.0.moe.routed_experts...`). A `.generator.json` stamp is
written into the folder last; the folder appears under its final name only when complete.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
import zlib
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .presets import PRESETS, tensor_specs

STAMP = ".generator.json"
GENERATOR_VERSION = 1
POOL_SIZE = 4_194_319          # prime: no tensor row length is a multiple of it
POOL_SEED = 20240925
DTYPES = ("bfloat16", "float16", "float32")
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
WORLD_SIZE = 4

# How the tensors are sharded over the ranks (a 1-D mesh of WORLD_SIZE).
#   fsdp2: every tensor Shard(0), torch.chunk sizes, as FSDP2's fully_shard lays them out.
#   tp:    Megatron-style tensor parallelism; TP_RULES below decide, by name suffix.
#   shortrun: every >= 2-D tensor Shard(last dim), 1-D tensors Shard(0). A chunk is then a column block
#          whose rows are short runs of the output: in/4 elements (1 KiB for a bf16 [*, 2048] weight, 8 bytes
#          for the 14-wide patch embedding), the geometry of MoE experts [E, out, in] sharded on `in`, of
#          convolutions split on a kernel dim and of 2-D meshes on trailing dims.
#   ep:    (MoE presets) torchtitan's expert parallelism, EP_DEGREE x (WORLD_SIZE / EP_DEGREE): grouped experts on
#          a 2-D mesh (ep, efsdp), Shard(0) over ep and, over efsdp, Shard(0) or, when efsdp x ep > experts,
#          Shard(1) (torchtitan's distributed/fsdp.py rule); every other tensor FSDP2 Shard(0) over all ranks.
LAYOUTS = ("fsdp2", "tp", "shortrun", "ep")
EP_DEGREE = 2
# torchtitan's grouped expert tensors, by name suffix: the tensors the ep layout places on its 2-D mesh
GROUPED_EXPERT_SUFFIXES = ("_EFD", "_EDF")
# How torch's FileSystemWriter serializes items: default torch.save blobs, or each blob zstd-compressed
# (`_extensions=[ZStandard()]`, needs the `zstandard` package).
FLAVORS = ("torch_save", "zstd")
DEFAULT_FLAVOR = "torch_save"
DEFAULT_LAYOUT = "fsdp2"
# (name suffixes, placement) for the tp layout, first match wins. Tensors with fewer than 2 dims
# (norms, biases, gates, class embedding) are always Replicate (torch's dedup writes each on one rank);
# a >= 2-D tensor that no rule matches is Replicate too.
TP_RULES: Tuple[Tuple[Tuple[str, ...], str], ...] = (
    # Rowwise: the input dim (1) is split, so the chunks are column blocks with offsets (0, c)
    ((".o_proj.weight", ".down_proj.weight", ".out_proj.weight", ".fc2.weight"), "Shard(1)"),
    # Colwise: the output dim (0) is split; embeddings and lm_head over the vocabulary/rows
    ((".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight",
      ".fc1.weight", "embed_tokens.weight", "lm_head.weight", "multi_modal_projector.weight",
      "patch_embedding.weight", "embedding.weight", "gated_positional_embedding.embedding"), "Shard(0)"),
)


def placement_for(name: str, shape: Tuple[int, ...], layout: str = DEFAULT_LAYOUT,
                  world_size: int = WORLD_SIZE) -> str:
    """"Shard(n)" or "Replicate()" for tensor `name` (as the preset names it) in `layout`; on a 2-D mesh
    (the ep layout's grouped experts) one placement per mesh dim, comma-separated: "Shard(0),Shard(1)"."""
    if layout == "ep" and name.endswith(GROUPED_EXPERT_SUFFIXES):
        efsdp = world_size // EP_DEGREE
        return f"Shard(0),Shard({1 if efsdp * EP_DEGREE > shape[0] else 0})"
    if layout in ("fsdp2", "ep"):
        return "Shard(0)"
    if layout == "shortrun":
        return f"Shard({max(0, len(shape) - 1)})"
    if layout != "tp":
        raise ValueError(f"unknown layout {layout!r} (one of {LAYOUTS})")
    if len(shape) < 2:
        return "Replicate()"
    for suffixes, placement in TP_RULES:
        if name.endswith(suffixes):
            return placement
    return "Replicate()"


# ---------------------------------------------------------------- data (also used to verify outputs)

def data_key(hf_name: str, kind: str = "model") -> str:
    """Seed key of a tensor: the HF name for weights, the flat DCP key for optimizer state."""
    return hf_name if kind == "model" else f"optim.state.{hf_name}.{kind}"


def _pool(dtype: str):
    """The value pool, twice over, so any window of up to POOL_SIZE elements is one slice."""
    import torch

    g = torch.Generator().manual_seed(POOL_SEED)
    pool = (torch.randn(POOL_SIZE, generator=g, dtype=torch.float32) * 0.02).to(getattr(torch, dtype))
    return torch.cat([pool, pool])


_POOLS: Dict[str, object] = {}


def expected_values(key: str, dtype: str, start: int, count: int, out=None):
    """Elements [start, start+count) of the row-major flattened tensor `key`, as a 1-D torch tensor."""
    import torch

    pool = _POOLS.get(dtype)
    if pool is None:
        pool = _POOLS[dtype] = _pool(dtype)
    if out is None:
        out = torch.empty(count, dtype=getattr(torch, dtype))
    k = (zlib.crc32(key.encode()) + start) % POOL_SIZE
    pos = 0
    while pos < count:
        n = min(POOL_SIZE, count - pos)
        out[pos:pos + n].copy_(pool[k:k + n])
        pos += n
        k = (k + n) % POOL_SIZE
    return out


def fill_chunk(key: str, dtype: str, shape, offsets, sizes, out) -> None:
    """Fill `out` (1-D, prod(sizes) elements) with the box [offsets, offsets + sizes) of tensor `key`,
    row-major. A Shard(0) chunk is one contiguous run of the flattened tensor; a chunk split along a
    later dim (Shard(1): a column block) is a run per index of the dims before the last split one."""
    shape, offsets, sizes = tuple(shape), tuple(offsets), tuple(sizes)
    if out.numel() == 0:
        return
    # k: the last dim that the chunk does not span whole; dims after it are full, so runs are contiguous
    k = max([d for d in range(len(shape)) if sizes[d] != shape[d]] or [0])
    run = math.prod(sizes[k:])
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    if k == 0:
        start = offsets[0] * strides[0] if shape else 0
        expected_values(key, dtype, start, run, out=out)
        return
    pos = 0
    for index in itertools.product(*(range(o, o + n) for o, n in zip(offsets[:k], sizes[:k]))):
        start = sum(i * st for i, st in zip(index, strides)) + offsets[k] * strides[k]
        expected_values(key, dtype, start, run, out=out[pos:pos + run])
        pos += run


# ---------------------------------------------------------------- one rank

def _fixed_mmap_threshold(threshold: int = 1 << 20) -> None:
    """Serve allocations >= 1 MiB with mmap so freed chunk buffers leave RSS (see generate())."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _make_planner(generated: Dict[str, Tuple[str, Tuple[int, ...]]]):
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class GeneratingSavePlanner(DefaultSavePlanner):
        """Hands torch's writer each chunk's data just in time and frees the previous chunk."""

        def __init__(self):
            super().__init__()
            self._previous = None

        def resolve_data(self, write_item):
            if self._previous is not None:  # torch has finished torch.save-ing it; it keeps a reference
                self._previous.untyped_storage().resize_(0)
                self._previous = None
            spec = generated.get(write_item.index.fqn)
            if spec is None:  # bytes items and small real tensors (optimizer step)
                return super().resolve_data(write_item)
            key, shape = spec
            chunk = write_item.tensor_data.chunk
            dtype = write_item.tensor_data.properties.dtype
            flat = torch.empty(math.prod(chunk.sizes), dtype=dtype)
            fill_chunk(key, str(dtype).replace("torch.", ""), shape, chunk.offsets, chunk.sizes, flat)
            self._previous = flat
            return flat.view(tuple(chunk.sizes))

    return GeneratingSavePlanner()


def _rank_main(rank: int, world: int, port: int, preset: str, dtype_name: str, with_optim: bool,
               out: str, results, layout: str = DEFAULT_LAYOUT, flavor: str = DEFAULT_FLAVOR) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _fixed_mmap_threshold()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(hours=3))
    try:
        mesh = init_device_mesh("cpu", (world,))
        # the ep layout's (ep, efsdp) mesh for grouped experts (every rank creates it: it is a collective)
        mesh_2d = init_device_mesh("cpu", (EP_DEGREE, world // EP_DEGREE)) if layout == "ep" else None
        dtype = getattr(torch, dtype_name)
        generated: Dict[str, Tuple[str, Tuple[int, ...]]] = {}

        def sharded(name, shape):
            placement = placement_for(name, shape, layout, world)
            local_shape = list(shape)
            if "," in placement:   # 2-D mesh: torch's own rule for the local box of nested placements
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
                places = [Shard(int(p[len("Shard("):-1])) for p in placement.split(",")]
                local_shape, _ = compute_local_shape_and_global_offset(shape, mesh_2d, places)
                local = torch.empty(tuple(local_shape), dtype=dtype, device="meta")
                return DTensor.from_local(local, mesh_2d, places, run_check=False, shape=torch.Size(shape),
                                          stride=torch.empty(shape, device="meta").stride())
            if placement == "Replicate()":
                place = Replicate()
            else:
                # torch.chunk sizes along the dim; trailing ranks may get an empty chunk (FSDP2 does the same)
                dim = int(placement[len("Shard("):-1])
                place = Shard(dim)
                per = -(-shape[dim] // world)
                local_shape[dim] = max(0, min(shape[dim], (rank + 1) * per) - min(shape[dim], rank * per))
            local = torch.empty(tuple(local_shape), dtype=dtype, device="meta")
            return DTensor.from_local(local, mesh, [place], run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())

        model, state = {}, {}
        specs = tensor_specs(PRESETS[preset])
        prefix = PRESETS[preset].DCP_PREFIX
        for name, shape in specs:
            model[name] = sharded(name, shape)
            generated[f"{prefix}{name}"] = (data_key(name), shape)
            if with_optim:
                state[name] = {"step": torch.tensor(1000.0)}
                for kind in ("exp_avg", "exp_avg_sq"):
                    state[name][kind] = sharded(name, shape)
                    generated[f"optim.state.{name}.{kind}"] = (data_key(name, kind), shape)
        state_dict = {"model": model} if prefix == "model." else model   # flat: torchtitan's model-only save
        if with_optim:
            state_dict["optim"] = {"state": state, "param_groups": [{
                "lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
                "fused": None, "decoupled_weight_decay": True, "params": [n for n, _ in specs]}]}
        t0 = time.perf_counter()
        writer_kwargs = {}
        if flavor == "zstd":
            from torch.distributed.checkpoint._extension import ZStandard
            writer_kwargs["_extensions"] = [ZStandard()]
        dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(out, **writer_kwargs), planner=_make_planner(generated))
        results.put((rank, time.perf_counter() - t0, t0 - t_start))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver

def checkpoint_bytes(preset: str, dtype: str, with_optim: bool) -> int:
    """Tensor bytes the checkpoint holds (the files add ~1.5 KiB per chunk)."""
    n = sum(math.prod(s) for _, s in tensor_specs(PRESETS[preset]))
    return n * ITEMSIZE[dtype] * (3 if with_optim else 1)


def read_stamp(ckpt: Path) -> Optional[dict]:
    try:
        return json.loads((Path(ckpt) / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate(preset: str, dtype: str, out: Path, *, with_optim: bool = False, world_size: int = WORLD_SIZE,
             overwrite: bool = False, layout: str = DEFAULT_LAYOUT, flavor: str = DEFAULT_FLAVOR) -> dict:
    """Write the checkpoint to `out` (via `out.partial`); return the stamp, with timings and peak RSS."""
    import multiprocessing as mp

    from .measure import TreeSampler

    if layout not in LAYOUTS:
        raise SystemExit(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if flavor not in FLAVORS:
        raise SystemExit(f"unknown flavor {flavor!r} (one of {', '.join(FLAVORS)})")
    cfg = PRESETS[preset]
    if cfg.DCP_PREFIX != "model." and with_optim:
        raise SystemExit(f"--with-optim: the {preset} preset is saved as torchtitan saves a model-only checkpoint "
                         "(flat model keys); optimizer state is written only for the llama-cookbook presets "
                         f"({', '.join(n for n, c in PRESETS.items() if c.DCP_PREFIX == 'model.')})")
    if layout == "ep" and not any(n.endswith(GROUPED_EXPERT_SUFFIXES) for n, _ in tensor_specs(cfg)):
        raise SystemExit(f"--layout ep places grouped expert tensors; the {preset} preset has none "
                         f"(use a MoE preset: {', '.join(n for n, c in PRESETS.items() if c.DCP_PREFIX != 'model.')})")
    if layout == "ep" and world_size % EP_DEGREE:
        raise SystemExit(f"--layout ep needs a world size divisible by the expert-parallel degree {EP_DEGREE}")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise SystemExit(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    need = checkpoint_bytes(preset, dtype, with_optim)
    free = shutil.disk_usage(partial.parent).free
    if free < need + 2**30:
        raise SystemExit(f"generating {preset} {dtype}{' with optimizer state' if with_optim else ''} needs "
                         f"{need / 1e9:.1f} GB (+1 GiB spare) free in {partial.parent}; {free / 1e9:.1f} GB are free")

    t0 = time.perf_counter()
    # Import torch once and fork the ranks: four concurrent `import torch` take ~10 s on 2 cores.
    # Nothing in this process has started a thread pool yet, so forking is safe. glibc's
    # dynamic mmap threshold would serve the chunk buffers from the heap, which fragments and
    # stays resident; a fixed threshold hands every large buffer back to the OS when freed.
    importlib.import_module("torch.distributed.checkpoint")
    importlib.import_module("torch.distributed.tensor")

    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, preset, dtype, with_optim, str(partial), results, layout,
                                                     flavor))
             for r in range(world_size)]
    for p in procs:
        p.start()
    # PSS: the forked ranks share torch's pages, which a sum of RSS would count five times.
    sampler = TreeSampler(os.getpid(), include_root=True, period_s=0.1, pss=True)
    sampler.start()
    while any(p.is_alive() for p in procs):
        procs[0].join(timeout=0.2)
        if any(p.exitcode not in (None, 0) for p in procs):
            # the survivors would wait in a collective until the gloo timeout: end them now
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
    sampler.stop()
    wall = time.perf_counter() - t0
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"generator ranks failed (rank, exit code): {bad}")
    timings = [results.get() for _ in procs]
    save_s = max(t[1] for t in timings)
    setup_s = max(t[2] for t in timings)
    files = sorted(partial.iterdir())
    stamp = {
        "generator_version": GENERATOR_VERSION, "preset": preset, "dtype": dtype, "with_optim": with_optim,
        "world_size": world_size, "sharding": layout, "flavor": flavor,
        "layout": f"{cfg.SAVED_BY}, " + {
            "fsdp2": "FSDP2 Shard(0)",
            "tp": "Megatron-style TP: Shard(0) colwise, Shard(1) rowwise (o_proj/down_proj/fc2), 1-D Replicate",
            "shortrun": "short runs: >= 2-D tensors Shard(last dim), 1-D Shard(0)",
            "ep": f"torchtitan EP {EP_DEGREE} x FSDP {world_size // EP_DEGREE}: grouped experts Shard(0) over ep, "
                  "Shard(0) or Shard(1) over efsdp; the rest FSDP2 Shard(0)"}[layout],
        "num_params": sum(math.prod(s) for _, s in tensor_specs(PRESETS[preset])),
        "tensor_bytes": need, "file_bytes": sum(f.stat().st_size for f in files),
        "files": len(files), "pool_size": POOL_SIZE, "pool_seed": POOL_SEED,
        "wall_s": round(wall, 2), "setup_s": round(setup_s, 2), "dcp_save_s": round(save_s, 2),
        "peak_rss_bytes": sampler.peak_rss, "peak_anon_bytes": sampler.peak_anon, "peak_pss_bytes": sampler.peak_pss,
        "torch_version": _torch_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        stamp["self_check"] = check_written(partial, preset, dtype, flavor)
    except GeneratorCheckFailed:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    partial.rename(out)
    return stamp


# At most this many tensors, each at most this many elements, are read back by torch after writing.
SAMPLE_TENSORS = 6
SAMPLE_MAX_NUMEL = 16 << 20


class GeneratorCheckFailed(SystemExit):
    """The checkpoint just written does not hold the generator's data (see check_written)."""


def _sample(specs: List[Tuple[str, Tuple[int, ...]]]) -> List[Tuple[str, Tuple[int, ...]]]:
    """Up to SAMPLE_TENSORS small-enough tensors spread over the save order, the last one included: the
    just-in-time trick of _make_planner fails, when it fails, on items written after the first. A MoE preset
    adds its last grouped expert tensor whatever its size: they hold most of its bytes, and every one is larger
    than SAMPLE_MAX_NUMEL at the benchmark sizes (403 MB in bf16), so otherwise none would be read back."""
    small = [(n, s) for n, s in specs if 0 < math.prod(s) <= SAMPLE_MAX_NUMEL]
    if len(small) > SAMPLE_TENSORS:
        step = (len(small) - 1) / (SAMPLE_TENSORS - 1)
        small = [small[round(i * step)] for i in range(SAMPLE_TENSORS)]
    experts = [(n, s) for n, s in specs if n.endswith(GROUPED_EXPERT_SUFFIXES)]
    return small + [experts[-1]] if experts and experts[-1] not in small else small


def check_written(folder: Path, preset: str, dtype: str, flavor: str = DEFAULT_FLAVOR) -> dict:
    """Read a sample of tensors back with torch's own DCP reader and compare them with the generator's data;
    raise GeneratorCheckFailed when any differs or the files are too small to hold the tensors.

    Why: the planner frees each chunk's storage (`resize_(0)`) once torch has serialized it. A torch that
    still holds a reference when it serializes (seen with 2.11) writes empty storages and reports success:
    a 21 GB model became 1.06 GB of files, and every benchmark on it measured nothing."""
    import torch
    import torch.distributed.checkpoint as dcp

    specs = tensor_specs(PRESETS[preset])
    file_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(".distcp"))
    model_bytes = sum(math.prod(s) for _, s in specs) * ITEMSIZE[dtype]
    if flavor == "torch_save" and file_bytes < model_bytes:
        raise GeneratorCheckFailed(
            f"generator self-check: {folder} holds {file_bytes} bytes of .distcp files, fewer than the "
            f"{model_bytes} bytes of model tensors alone: torch wrote empty or truncated storages (the "
            "just-in-time resize_(0) in _make_planner); do not benchmark on it")
    sample = _sample(specs)
    model = {name: torch.empty(shape, dtype=getattr(torch, dtype)) for name, shape in sample}
    state = {"model": model} if PRESETS[preset].DCP_PREFIX == "model." else model
    try:
        with warnings.catch_warnings():   # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    except Exception as exc:   # whatever torch raises for an unreadable blob: the checkpoint is not usable
        raise GeneratorCheckFailed(f"generator self-check: torch cannot read {folder} back: "
                                   f"{type(exc).__name__}: {str(exc)[:300]}") from None
    for name, shape in sample:
        if not _holds_the_data(model.pop(name).reshape(-1), data_key(name), dtype):
            raise GeneratorCheckFailed(f"generator self-check: tensor {PRESETS[preset].DCP_PREFIX}{name} in {folder} differs from the "
                                       "generator's data; do not benchmark on it")
    return {"checked_tensors": [n for n, _ in sample], "file_bytes": file_bytes}


def _holds_the_data(got, key: str, dtype: str) -> bool:
    """`got` (1-D) is the generator's data for `key`, compared bit for bit in windows of SAMPLE_MAX_NUMEL
    elements, so a large tensor costs no second copy of itself."""
    import torch

    for start in range(0, got.numel(), SAMPLE_MAX_NUMEL):
        part = got[start:start + SAMPLE_MAX_NUMEL]
        expected = expected_values(key, dtype, start, part.numel())
        if not torch.equal(part.view(torch.uint8) if part.is_floating_point() else part,
                           expected.view(torch.uint8) if expected.is_floating_point() else expected):
            return False
    return True


def _torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate",
                                     description="Write a DCP checkpoint of a preset model (see module docstring).")
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to create")
    parser.add_argument("--with-optim", action="store_true", help="add AdamW state (exp_avg, exp_avg_sq, step): 3x the bytes")
    parser.add_argument("--layout", default=DEFAULT_LAYOUT, choices=LAYOUTS,
                        help="fsdp2: every tensor Shard(0) (default); tp: Megatron-style tensor parallel "
                             "(Shard(0) colwise, Shard(1) rowwise, 1-D Replicate; see TP_RULES); shortrun: "
                             ">= 2-D tensors Shard(last dim), chunks of short runs as MoE experts split on `in`; "
                             "ep (MoE presets): torchtitan's expert parallel, grouped experts on a 2 x 2 mesh")
    parser.add_argument("--world-size", type=int, default=WORLD_SIZE, help="simulated ranks (default 4)")
    parser.add_argument("--flavor", default=DEFAULT_FLAVOR, choices=FLAVORS,
                        help="torch_save: FileSystemWriter's default blobs; zstd: each blob compressed with "
                             "torch's ZStandard extension (needs `zstandard`)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    stamp = generate(args.preset, args.dtype, args.out, with_optim=args.with_optim,
                     world_size=args.world_size, overwrite=args.overwrite, layout=args.layout,
                     flavor=args.flavor)
    print(json.dumps(stamp, indent=1))
    print(f"wrote {args.out}: {stamp['file_bytes'] / 1e9:.2f} GB in {stamp['files']} files, "
          f"{stamp['wall_s']:.1f} s, peak of the process tree: RSS {stamp['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"PSS {stamp['peak_pss_bytes'] / 2**20:.0f} MiB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
