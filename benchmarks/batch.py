"""Batch mode: N checkpoints of one preset, converted one by one, as one `streamconv batch`, with `cp -r`, and
on a local Ray cluster.

    python -m benchmarks.batch --preset 2gb -n 4 [--jobs 1,2] [--ray] [--work /tmp/b]

The preset is generated once (cached, as `benchmarks.run` does) and copied N times (real copies: N checkpoints
on disk, as a training run leaves them). Each contender starts with the page cache dropped (when root) and
ends with `sync`; the outputs of every batch run are compared byte for byte with the single conversions'.
Prints a table and writes JSON next to the other results.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List

from .run import DEFAULT_CACHE, HERE, cached_checkpoint, drop_caches, sync

STREAMCONV = [sys.executable, "-m", "streamconv.cli"]


def timed(argv: List[str], log) -> dict:
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sync_s = sync()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    log(f"  {wall + sync_s:7.2f} s  {' '.join(argv[2:] if argv[:2] == STREAMCONV[:2] else argv)[:120]}")
    return {"wall_s": round(wall, 3), "sync_s": round(sync_s, 3), "stdout": proc.stdout}


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="2gb")
    p.add_argument("--ckpt", type=Path, help="use this DCP checkpoint instead of generating the preset")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="keep the page cache (tests; a shared machine)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("-n", type=int, default=4, help="checkpoints in the batch (default 4)")
    p.add_argument("--jobs", default="1,2", help="comma-separated --jobs values to run the batch with")
    p.add_argument("--ray", action="store_true", help="also run the batch with --ray (a local cluster)")
    p.add_argument("--work", type=Path, default=Path("/tmp/streamconv-batch-bench"))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)     # noqa: E731

    ckpt = args.ckpt or cached_checkpoint(args.preset, args.dtype, False, args.cache, log)[0]
    global drop_caches
    if not args.drop_caches:
        drop_caches = lambda: False     # noqa: E731
    shutil.rmtree(args.work, ignore_errors=True)
    runs = args.work / "runs"
    for i in range(args.n):
        shutil.copytree(ckpt, runs / f"checkpoint-{(i + 1) * 1000}")
    sources = sorted(runs.iterdir())
    results = {"preset": str(args.ckpt) if args.ckpt else args.preset, "dtype": args.dtype, "n": args.n, "rows": []}

    def row(name, t, extra=None):
        results["rows"].append(dict({"contender": name, "wall_s": round(t, 2)}, **(extra or {})))

    log(f"{args.n} x {args.preset}: cp -r of all")
    t = timed(["cp", "-r", str(runs), str(args.work / "copy")], log)
    row("cp -r (all)", t["wall_s"] + t["sync_s"])
    shutil.rmtree(args.work / "copy")

    log("single conversions, one after another")
    total = 0.0
    for src in sources:
        t = timed(STREAMCONV + ["convert", str(src), str(args.work / "single" / src.name), "--no-config"], log)
        total += t["wall_s"] + t["sync_s"]
    row("streamconv convert, one by one (sum)", total)

    for jobs in [int(j) for j in args.jobs.split(",") if j]:
        out = args.work / f"batch-j{jobs}"
        t = timed(STREAMCONV + ["batch", f"{runs}/checkpoint-*", "-o", f"{out}/{{name}}", "--no-config", "--json",
                                "--jobs", str(jobs)], log)
        report = json.loads(t["stdout"])
        assert all(same_tree(args.work / "single" / s.name, out / s.name) for s in sources), "batch output differs"
        rerun = timed(STREAMCONV + ["batch", f"{runs}/checkpoint-*", "-o", f"{out}/{{name}}", "--no-config",
                                    "--json", "--jobs", str(jobs)], log)
        assert all(c["status"] == "skipped" for c in json.loads(rerun["stdout"])["checkpoints"])
        row(f"streamconv batch --jobs {jobs}", t["wall_s"] + t["sync_s"],
            {"planning_s": report["planning_seconds"],
             "max_job_peak_rss_mib": round(max(c["peak_rss_bytes"] for c in report["checkpoints"]) / 2**20),
             "rerun_all_skipped_s": round(rerun["wall_s"], 2)})
        shutil.rmtree(out)

    if args.ray:
        out = args.work / "batch-ray"
        t = timed(STREAMCONV + ["batch", f"{runs}/checkpoint-*", "-o", f"{out}/{{name}}", "--no-config", "--json",
                                "--ray"], log)
        assert all(same_tree(args.work / "single" / s.name, out / s.name) for s in sources), "ray output differs"
        row("streamconv batch --ray (local cluster, start-up included)", t["wall_s"] + t["sync_s"])
        shutil.rmtree(out)

    floor = results["rows"][0]["wall_s"]
    lines = [f"{'contender':58} {'wall s':>8} {'x cp':>6}"]
    for r in results["rows"]:
        lines.append(f"{r['contender']:58} {r['wall_s']:8.2f} {r['wall_s'] / floor:6.2f}")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.ckpt.name if args.ckpt else args.preset
    (args.out / f"batch-{name}-x{args.n}.json").write_text(json.dumps(results, indent=2) + "\n")
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
