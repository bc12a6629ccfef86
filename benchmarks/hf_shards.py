"""HuggingFaceStorageWriter per-rank shards: streamconv against torch's `consolidate_safetensors_files`.

    .venv/bin/python -m benchmarks.hf_shards [--ranks 4] [--layers 2] [--runs 3] [--cold] [--work DIR]

Writes a Llama-shaped bf16 model with torch's `HuggingFaceStorageWriter(save_distributed=True)` from `--ranks`
gloo processes (FSDP2-style Shard(0) for most matrices, Shard(1) for o_proj/down_proj as tensor parallelism does;
each rank builds only its own pieces), then runs in turn, `--runs` times each: `cp -r` (the I/O floor), streamconv
`convert`, and torch's consolidator (one output file, as streamconv writes at this size). Peak RSS is the OS's for
the whole process tree (`benchmarks/measure.py`). Warm page cache by default (the shards are read once before each
run); `--cold` drops it instead (needs root). After timing, both outputs are loaded and compared bit for bit.
Prints a table; writes `benchmarks/results/hf-shards.json` and `.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.measure import run_measured

HIDDEN, FFN, VOCAB = 2048, 5632, 32000
RESULTS = Path(__file__).resolve().parent / "results"


def shapes(layers: int) -> Dict[str, tuple]:
    """{name: (shape, sharded dim)} of a Llama-shaped model."""
    out = {"model.embed_tokens.weight": ((VOCAB, HIDDEN), 0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": ((HIDDEN,), 0),
            p + "self_attn.q_proj.weight": ((HIDDEN, HIDDEN), 0),
            p + "self_attn.k_proj.weight": ((HIDDEN // 4, HIDDEN), 0),
            p + "self_attn.v_proj.weight": ((HIDDEN // 4, HIDDEN), 0),
            p + "self_attn.o_proj.weight": ((HIDDEN, HIDDEN), 1),
            p + "post_attention_layernorm.weight": ((HIDDEN,), 0),
            p + "mlp.gate_proj.weight": ((FFN, HIDDEN), 0),
            p + "mlp.up_proj.weight": ((FFN, HIDDEN), 0),
            p + "mlp.down_proj.weight": ((HIDDEN, FFN), 1),
        })
    out["model.norm.weight"] = ((HIDDEN,), 0)
    out["lm_head.weight"] = ((VOCAB, HIDDEN), 0)
    return out


def write_shards(rank: int, world_size: int, out_dir: str, layers: int) -> int:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    sd = {}
    for name, (shape, dim) in shapes(layers).items():
        size = shape[dim]
        step = -(-size // world_size)                      # torch.chunk sizes, as DTensor's Shard
        begin, end = min(rank * step, size), min((rank + 1) * step, size)
        local_shape = list(shape)
        local_shape[dim] = end - begin
        local = torch.empty(local_shape, dtype=torch.bfloat16).uniform_(-1, 1, generator=gen)
        sd[name] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                      stride=torch.empty(shape, device="meta").stride())
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(out_dir, save_distributed=True))
    return 0


_TORCH_CONSOLIDATE = """
import json, sys
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files
src, out, names = sys.argv[1], sys.argv[2], json.loads(open(sys.argv[3]).read())
consolidate_safetensors_files(src, out, fqn_to_index_mapping={n: 1 for n in names})
"""


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    for p in sorted(path.iterdir()):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def compare(ours: Path, theirs: Path) -> int:
    """Tensors compared bit for bit; raises on the first difference."""
    import torch
    from safetensors import safe_open

    def load(folder: Path) -> Dict[str, object]:
        out = {}
        for p in sorted(folder.glob("*.safetensors")):
            with safe_open(str(p), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = load(ours), load(theirs)
    if set(a) != set(b):
        raise SystemExit(f"different tensor names: {sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(
                a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)):
            raise SystemExit(f"{k} differs")
    return len(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/streamconv-bench-hf-shards"))
    args = ap.parse_args(argv)

    from streamconv.demo_checkpoint import run_distributed

    work = args.work
    if work.exists():
        shutil.rmtree(work)
    src = work / "shards"
    t0 = time.perf_counter()
    run_distributed("benchmarks.hf_shards:write_shards", args.ranks, dict(out_dir=str(src), layers=args.layers))
    written_s = time.perf_counter() - t0
    source_bytes = tree_bytes(src)
    names = work / "names.json"
    names.write_text(json.dumps(list(shapes(args.layers))))
    print(f"{source_bytes / 1e6:.0f} MB of per-rank shards from {args.ranks} ranks "
          f"({len(list(src.iterdir()))} files) written in {written_s:.1f} s", flush=True)

    contenders = {
        "cp -r (I/O floor)": lambda out: ["cp", "-r", str(src), str(out)],
        "streamconv convert": lambda out: [sys.executable, "-m", "streamconv.cli", "convert", str(src), str(out),
                                           "--no-config", "--quiet"],
        "torch consolidate_safetensors_files": lambda out: [sys.executable, "-c", _TORCH_CONSOLIDATE, str(src),
                                                             str(out), str(names)],
    }
    results: Dict[str, List[dict]] = {k: [] for k in contenders}
    for attempt in range(args.runs):
        for label, argv in contenders.items():
            out = work / "out"
            if out.exists():
                shutil.rmtree(out)
            if label.startswith("torch"):
                out.mkdir()     # torch's consolidator writes into an existing folder
            drop_caches() if args.cold else warm(src)
            m = run_measured(argv(out), watch_dir=out, env=dict(os.environ))
            sync_t0 = time.perf_counter()
            os.sync()
            m_sync = time.perf_counter() - sync_t0
            if m.status != "finished":
                raise SystemExit(f"{label}: {m.status} (exit {m.exit_code})")
            results[label].append({"wall_s": m.wall_s, "sync_s": m_sync, "peak_rss_bytes": m.peak_rss_bytes,
                                   "user_s": m.user_s, "sys_s": m.sys_s})
            if attempt == args.runs - 1 and not label.startswith("cp"):
                keep = work / ("ours" if label.startswith("streamconv") else "theirs")
                out.rename(keep)
            print(f"  run {attempt + 1} {label}: {m.wall_s:.2f} s, {m.peak_rss_bytes / 2**20:.0f} MiB", flush=True)
    checked = compare(work / "ours", work / "theirs")

    floor = statistics.median(r["wall_s"] + r["sync_s"] for r in results["cp -r (I/O floor)"])
    rows = []
    for label, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        total = statistics.median(r["wall_s"] + r["sync_s"] for r in runs)
        rows.append({"contender": label, "wall_s": round(wall, 2), "x_cp": round(total / floor, 2),
                     "peak_rss_mib": round(max(r["peak_rss_bytes"] for r in runs) / 2**20),
                     "cpu_s": round(statistics.median(r["user_s"] + r["sys_s"] for r in runs), 2)})
    table = ["| contender | wall s | x cp | peak RSS MiB | CPU s |", "|---|---|---|---|---|"]
    table += [f"| {r['contender']} | {r['wall_s']} | {r['x_cp']} | {r['peak_rss_mib']} | {r['cpu_s']} |" for r in rows]
    header = (f"HuggingFaceStorageWriter per-rank shards, bf16, {source_bytes / 1e6:.0f} MB, {args.ranks} ranks, "
              f"{len(shapes(args.layers))} tensors; {'cold' if args.cold else 'warm'} page cache, median of "
              f"{args.runs}; outputs equal bit for bit ({checked} tensors)")
    print(header + "\n" + "\n".join(table))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hf-shards.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    (RESULTS / "hf-shards.json").write_text(json.dumps(
        {"source_bytes": source_bytes, "ranks": args.ranks, "tensors": len(shapes(args.layers)), "cold": args.cold,
         "runs": results, "summary": rows, "date": time.strftime("%Y-%m-%d %H:%M")}, indent=2))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
