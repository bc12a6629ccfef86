"""Peak RSS and time of the readers and planner on hostile and extreme inputs: `python tests/support/hostile_report.py
[--tree PATH] [--timeout S]` prints a table (and `--json FILE` writes it). `--tree` points at another checkout's
root (for before/after numbers); each case runs in a fresh process (`tests/support/hostile_child.py`).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:       # run as a script: `python tests/support/hostile_report.py`
    sys.path.insert(0, str(REPO_ROOT))
from tests.support import hostile_inputs as hi  # noqa: E402
MiB = 1 << 20

PLAN_CODE = """
import sys, time
from streamconv.model import BlobLocation, Chunk, CheckpointMetadata, TensorEntry
from streamconv.planning.plan import PlanOptions, build_plan
n_tensors, per, dim = map(int, sys.argv[1:4])
tensors = []
for t in range(n_tensors):
    chunks = []
    for i in range(per):
        off, size = [0, 0], [4, 4]
        off[dim], size[dim] = i, 1
        chunks.append(Chunk(tuple(off), tuple(size), BlobLocation(f"__{i % 4}_0.distcp", i * 100, 100)))
    shape = (per, 4) if dim == 0 else (4, per)
    tensors.append(TensorEntry(f"model.layers.{t}.w", "float32", shape, tuple(chunks), ("model", f"layers.{t}.w")))
meta = CheckpointMetadata(tensors=tuple(tensors))
start = time.perf_counter()
build_plan(meta, PlanOptions())
print(time.perf_counter() - start)
"""


def run(tree: Path, args, timeout: float) -> dict:
    # Run from a neutral folder with only `tree` on the path, so that its streamconv is the one measured.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout,
                                cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"outcome": f"timeout after {timeout:.0f} s", "seconds": time.perf_counter() - start}
    if result.returncode != 0:
        return {"outcome": f"died (exit {result.returncode}): {result.stderr.strip().splitlines()[-1][:80]}"
                if result.stderr.strip() else f"died (exit {result.returncode})",
                "seconds": time.perf_counter() - start}
    return {"raw": result.stdout}


def reader_case(tree: Path, kind: str, path: Path, size: int, timeout: float) -> dict:
    out = run(tree, [str(REPO_ROOT / "tests" / "hostile_child.py"), kind, str(path)], timeout)
    if "raw" not in out:
        return {**out, "size": size}
    report = json.loads(out["raw"])
    outcome = f"{report['error']}: {report['message'][:70]}" if report["error"] else "loaded"
    return {"outcome": outcome, "seconds": report["seconds"], "peak_rss_mib": report["peak_rss_bytes"] / MiB,
            "size": size, "message_chars": report["message_chars"]}


def build_cases(work: Path):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    small = work / "small"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.randn(6, 4)}}, storage_writer=FileSystemWriter(str(small)), no_dist=True)
    real = (small / ".metadata").read_bytes()
    buf = io.BytesIO()
    torch.save(torch.ones(2), buf)
    folders = {
        "deep tuple key (1M deep) in .metadata": hi.deep_tuple_key_metadata(),
        "shared 40-level nested list in .metadata": hi.shared_nested_list(40),
        "duplicate storage entry": hi.duplicate_storage_metadata(real),
        "20 MB: empty lists": hi.flood(b"]", 20 * MiB),
        "20 MB: empty dicts": hi.flood(b"}", 20 * MiB),
        "20 MB: memo gets": hi.flood(b"h\x00", 20 * MiB, head=b"\x80\x04]\x94"),
        "20 MB: memoized records": hi.record_flood(20 * MiB),
        "20 MB: 64 KiB strings": hi.string_flood(20 * MiB),
        "20 MB: DUPs closed by one APPENDS": hi.dup_appends_flood(20 * MiB),
        "real: 11B model (3,500 chunks, 4 ranks)": hi.realistic_metadata(3_500),
        "real: 20 MB (120k chunks)": hi.realistic_metadata(120_000),
        "real: 100k chunks over 1,000 ranks": hi.realistic_metadata(100_000, ranks=1000),
    }
    for i, (label, data) in enumerate(folders.items()):
        hi.write_folder(work / f"f{i}", {".metadata": data})
        yield label, "folder", work / f"f{i}", len(data)
    blob = work / "blob" / "__0_0.distcp"
    blob.parent.mkdir()
    blob.write_bytes(hi.blob_with_data_pkl(buf.getvalue(), hi.deep_data_pkl()))
    yield "deep tuple key in a 1 MB data.pkl", "blob", blob, blob.stat().st_size
    ranks = work / "ranks"
    ranks.mkdir()
    (ranks / "__10000000.metadata").write_bytes(b"")
    yield "empty __10000000.metadata", "folder", ranks, 0
    fifo = work / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / ".metadata")
    yield "FIFO .metadata", "folder", fifo, 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=REPO_ROOT)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="streamconv-hostile-"))
    try:
        for label, kind, path, size in build_cases(work):
            rows.append({"case": label, **reader_case(args.tree, kind, path, size, args.timeout)})
            print(_format(rows[-1]), flush=True)
        for label, n_tensors, per, dim in [("plan: 10k chunks sharing dim-0 offset", 1, 10_000, 1),
                                           ("plan: 1M chunks (1000 tensors x 1000, dim 0)", 1000, 1000, 0),
                                           ("plan: 1M chunks of one tensor (dim 1)", 1, 1_000_000, 1)]:
            out = run(args.tree, ["-c", PLAN_CODE, str(n_tensors), str(per), str(dim)], args.timeout)
            row = {"case": label, "size": 0, **({"outcome": "planned", "seconds": float(out["raw"])}
                                               if "raw" in out else out)}
            rows.append(row)
            print(_format(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _format(row: dict) -> str:
    rss = f"{row['peak_rss_mib']:7.1f}" if "peak_rss_mib" in row else "      -"
    bound = f"{64 + 10 * row['size'] / MiB:7.1f}" if row.get("size") else "      -"
    return (f"{row['case'][:44]:44s} {row.get('size', 0) / MiB:7.2f} MiB  {row.get('seconds', 0):7.2f} s  "
            f"peak {rss} MiB (bound {bound})  {row['outcome'][:90]}")


if __name__ == "__main__":
    sys.exit(main())
