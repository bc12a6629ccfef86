"""Converting from object storage vs downloading the same objects, against one local S3 server in one run.

    python -m benchmarks.remote --preset 2gb [--dtype bfloat16] [--buffer-size 32MiB] [--repeat 2] [--fallback]
                                [--baseline ../main-worktree]

The preset checkpoint (generated once and cached, as `benchmarks.run` does) is served by a local S3-protocol server
started for the run (`tests/support/local_s3.py`, HTTP on localhost, in a process of its own; its objects are
symlinks to the cached files, so nothing is uploaded). moto is not used here: it reads a whole object for every
ranged GET, which would measure moto. Then, alternately, `--repeat` times each:

* streamconv: `streamconv convert s3://bench/ckpt OUT --no-config` (AWS_ENDPOINT_URL names the server), its GETs
  through obstore (the default when it is installed);
* streamconv (baseline): the same, run from another source tree (with `--baseline TREE`: a worktree of main, to
  time a change before and after in one run, interleaved);
* streamconv (fsspec): the same with `STREAMCONV_NO_FAST_PATHS=obstore`, the s3fs fallback (with `--fallback`);
* boto3 download: every object with ranged GETs of 8 MiB on 8 threads (streamconv allows itself 6 requests in
  flight), written to local files: what "download first" costs before any conversion starts.

Each is measured by `measure.run_measured` (wall, peak RSS of the process tree, CPU seconds), and the server's own
CPU seconds during it are read from /proc. Printed: MB/s of each (checkpoint bytes / wall), the ratio, streamconv's
peak RSS beside --buffer-size and the client stack's import cost (the RSS an interpreter gains importing what a
remote conversion imports: obstore alone, which lists, stats and reads; fsspec and s3fs for the fallback). The issue's bar (ratio >= 0.9, peak
RSS <= buffer + 64 MiB + import cost) is checked and printed. After timing, the output is compared byte for byte
with a local conversion of the same checkpoint. JSON goes to benchmarks/results/remote-<preset>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .measure import run_measured
from .run import DEFAULT_CACHE, cached_checkpoint

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
MIN_RATIO = 0.9                 # issue 21: at least 0.9x the throughput of a parallel boto3 download
RSS_ALLOWANCE_BYTES = 64 << 20  # issue 21: peak RSS <= buffer + 64 MiB + the client library's import cost
_DOWNLOAD = r"""
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
bucket, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
part = 8 << 20
client = boto3.client("s3")
objects = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
           for o in page.get("Contents", [])]
fds = {}
for o in objects:
    path = os.path.join(out, o["Key"][len(prefix) + 1:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fds[o["Key"]] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
def get(job):
    key, start, end = job
    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"].read()
    assert len(body) == end - start, (key, start, len(body))
    os.pwrite(fds[key], body, start)
jobs = [(o["Key"], s, min(s + part, o["Size"])) for o in objects for s in range(0, o["Size"], part)]
with ThreadPoolExecutor(8) as pool:
    list(pool.map(get, jobs))
for fd in fds.values():
    os.close(fd)
"""


def start_server(bucket_dir: Path, log):
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.local_s3", "--bucket", f"{BUCKET}={bucket_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE.parent)
    word, url = proc.stdout.readline().split()
    assert word == "ready", word
    log(f"local S3 server on {url} (pid {proc.pid})")
    return proc, url


def link_objects(ckpt: Path, bucket_dir: Path) -> int:
    """The checkpoint's files as objects bench/ckpt/<name> (symlinks); returns their bytes."""
    folder = bucket_dir / "ckpt"
    folder.mkdir(parents=True)
    total = 0
    for path in sorted(ckpt.iterdir()):
        if path.is_file() and not path.name.startswith((".streamconv", ".generator")):
            (folder / path.name).symlink_to(path)
            total += path.stat().st_size
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far."""
    fields = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def import_cost_bytes(modules: str) -> int:
    """RSS of an interpreter after importing `modules` (a line of Python) minus one after `import
    streamconv.commands` (the verbs and all they import): what the client stack adds to a converter's resident
    memory before it reads a byte."""
    def rss(code: str) -> int:
        r = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/statm').read().split()[1])"],
                           capture_output=True, text=True, check=True, cwd=HERE.parent)
        return int(r.stdout.split()[-1]) * os.sysconf("SC_PAGE_SIZE")
    base = min(rss("import streamconv.commands") for _ in range(3))
    return min(rss("import streamconv.commands\n" + modules) for _ in range(3)) - base


IMPORTS = {       # a run through obstore lists, stats and reads through it alone (fs/s3_obstore.py)
    "obstore run": "import obstore\nfrom obstore.store import S3Store",
    "fsspec run": "import fsspec, s3fs\nfsspec.filesystem('s3')",
}


def contenders(args, work: Path):
    """(name, tag, argv, extra environment, working folder) of each contender, in the order they run."""
    names = ["streamconv"] + (["streamconv (baseline)"] if args.baseline else []) + \
        (["streamconv (fsspec)"] if args.fallback else []) + ["boto3 download"]
    for name in names:
        tag = name.split()[0] + ("-fsspec" if "fsspec" in name else "-baseline" if "baseline" in name else "")
        if name.startswith("streamconv"):
            tree = Path(args.baseline).resolve() if "baseline" in name else HERE.parent
            # `python -m` puts the working folder first on sys.path: the baseline runs from its own tree
            yield name, tag, ["-m", "streamconv", "convert", f"s3://{BUCKET}/ckpt", "OUT", "--no-config",
                              "--buffer-size", args.buffer_size, "--json"], \
                dict({"STREAMCONV_NO_FAST_PATHS": "obstore"} if "fsspec" in name else {},
                     PYTHONPATH=str(tree)), tree
        else:
            yield name, tag, ["-c", _DOWNLOAD, BUCKET, "ckpt", "OUT"], {}, HERE.parent


def run_all(args, env: dict, server_pid: int, total: int, work: Path, log) -> dict:
    rows: dict = {}
    for attempt in range(args.repeat):
        for name, tag, argv, extra, cwd in contenders(args, work):
            out = work / f"{tag}-{attempt}"
            if name == "boto3 download":
                out.mkdir()
            argv = [sys.executable] + [str(out) if a == "OUT" else a for a in argv]
            server_cpu = cpu_seconds(server_pid)
            m = run_measured(argv, env=dict(env, **extra), stderr_path=work / f"{tag}-{attempt}.err",
                             stdout_path=work / f"{tag}-{attempt}.out", cwd=cwd)
            server_cpu = cpu_seconds(server_pid) - server_cpu
            if m.status != "finished":
                raise SystemExit(f"{name} {m.status} (exit {m.exit_code}); see {work}")
            row = {"wall_s": round(m.wall_s, 2), "peak_rss_bytes": m.peak_rss_bytes,
                   "mb_per_s": round(total / 1e6 / m.wall_s, 1), "cpu_s": round(m.user_s + m.sys_s, 2),
                   "server_cpu_s": round(server_cpu, 2)}
            if name.startswith("streamconv"):
                report = json.loads((work / f"{tag}-{attempt}.out").read_text())
                row["fast_paths"] = report.get("fast_paths")
            rows.setdefault(name, []).append(row)
            log(f"{name}: {m.wall_s:.1f} s, {row['mb_per_s']:.0f} MB/s, CPU {row['cpu_s']:.1f} s (server "
                f"{server_cpu:.1f} s), peak RSS {m.peak_rss_bytes / 2**20:.0f} MiB")
            if attempt + 1 < args.repeat or name != "streamconv":
                shutil.rmtree(out)
    return rows


def check_output(ckpt: Path, work: Path, attempt: int, env: dict, log) -> None:
    """After timing: the remote conversion is the local one, byte for byte."""
    local = work / "local"
    subprocess.run([sys.executable, "-m", "streamconv", "convert", str(ckpt), str(local), "--no-config", "-q"],
                   env=env, check=True, cwd=HERE.parent)
    remote_out = work / f"streamconv-{attempt}"
    for f in sorted(local.iterdir()):
        if f.name != "streamconv.json":
            assert (remote_out / f.name).read_bytes() == f.read_bytes(), f.name
    log("checked: the remote conversion equals the local one byte for byte")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2gb")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--buffer-size", default="32MiB")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--fallback", action="store_true", help="also time streamconv through fsspec/s3fs")
    p.add_argument("--baseline", default=None, metavar="TREE",
                   help="also time the streamconv of another source tree (a worktree of main), interleaved")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--load", default=None, help="the machine's load to record (default: os.getloadavg())")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[remote-bench] {msg}", file=sys.stderr, flush=True)

    ckpt, _ = cached_checkpoint(args.preset, args.dtype, False, args.cache, log)
    work = args.cache / "work" / "remote"
    shutil.rmtree(work, ignore_errors=True)
    total = link_objects(ckpt, work / "bucket")
    load_before = os.getloadavg()
    server, url = start_server(work / "bucket", log)
    env = dict(os.environ, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        rows = run_all(args, env, server.pid, total, work, log)
        check_output(ckpt, work, args.repeat - 1, env, log)
    finally:
        server.terminate()
        server.wait()
    load_after = os.getloadavg()
    shutil.rmtree(work / "local", ignore_errors=True)
    result = summarize(args, rows, total, load_before, load_after)
    out = HERE / "results" / f"remote-{args.preset}-{args.dtype}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    if not result["passed"]:
        raise SystemExit(1)


def summarize(args, rows: dict, total: int, load_before, load_after) -> dict:
    from streamconv.sizes import parse_size
    best = {name: max(r["mb_per_s"] for r in rs) for name, rs in rows.items()}
    peak = max(r["peak_rss_bytes"] for r in rows["streamconv"])
    imports = {name: import_cost_bytes(code) for name, code in IMPORTS.items()}
    buffer_bytes = parse_size(args.buffer_size)
    bound = buffer_bytes + RSS_ALLOWANCE_BYTES + imports["obstore run"]
    ratio = best["streamconv"] / best["boto3 download"]
    result = {"preset": args.preset, "dtype": args.dtype, "checkpoint_bytes": total, "buffer_size": args.buffer_size,
              "machine": {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                          "load_after": [round(x, 2) for x in load_after]},
              "rows": rows, "best_mb_per_s": best, "ratio": round(ratio, 3),
              "streamconv_peak_rss_bytes": peak, "client_import_rss_bytes": imports,
              "rss_bound_bytes": bound, "passed": ratio >= MIN_RATIO and peak <= bound}
    print(f"{'':22} {'MB/s':>8} {'CPU s':>7} {'server CPU s':>13} {'peak RSS MiB':>13}")
    for name, rs in rows.items():
        fastest = max(rs, key=lambda r: r["mb_per_s"])
        print(f"{name:22} {best[name]:8.0f} {fastest['cpu_s']:7.1f} {fastest['server_cpu_s']:13.1f} "
              f"{max(r['peak_rss_bytes'] for r in rs) / 2**20:13.0f}")
    print(f"ratio streamconv / boto3 download: {ratio:.2f} (bar {MIN_RATIO}); streamconv peak RSS "
          f"{peak / 2**20:.0f} MiB <= buffer {buffer_bytes / 2**20:.0f} + {RSS_ALLOWANCE_BYTES >> 20} + client "
          f"import {imports['obstore run'] / 2**20:.0f} = {bound / 2**20:.0f} MiB: "
          f"{'yes' if peak <= bound else 'NO'}; load {load_before[0]:.1f} -> {load_after[0]:.1f} on "
          f"{os.cpu_count()} CPUs")
    if "streamconv (baseline)" in best:
        print(f"streamconv / baseline: {best['streamconv'] / best['streamconv (baseline)']:.2f}x")
    print("import cost: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in imports.items()))
    print("PASSED" if result["passed"] else "FAILED")
    return result


if __name__ == "__main__":
    main()
