"""Converting from object storage vs downloading the same objects, against one local S3 server in one run.

    python -m benchmarks.remote --preset 2gb [--dtype bfloat16] [--buffer-size 32MiB] [--repeat 2]

The preset checkpoint (generated once and cached, as `benchmarks.run` does) is uploaded with boto3 to a moto S3
server started for the run (HTTP on localhost, in a process of its own). Then, alternately, `--repeat` times each:

* streamconv: `streamconv convert s3://bench/ckpt OUT --no-config` (AWS_ENDPOINT_URL names the server);
* boto3 download: every object with ranged GETs of 8 MiB on 8 threads (streamconv allows itself 6 requests in
  flight), written to local files: what "download first" costs before any conversion starts.

Each is measured by `measure.run_measured` (wall, peak RSS of the process tree). Printed: MB/s of each (checkpoint
bytes / wall), the ratio, streamconv's peak RSS beside --buffer-size, and the client stack's import cost (the RSS of
`import s3fs` alone). After timing, the output is compared byte for byte with a local conversion of the same
checkpoint. JSON goes to benchmarks/results/remote-<preset>-<dtype>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .measure import run_measured
from .run import DEFAULT_CACHE, cached_checkpoint

HERE = Path(__file__).resolve().parent
BUCKET = "bench"
_SERVER = ("import sys, time\nfrom moto.server import ThreadedMotoServer\n"
           "s = ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False)\n"
           "s.start()\nprint('ready', flush=True)\nwhile True:\n    time.sleep(3600)\n")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "ready"
    log(f"moto S3 server on 127.0.0.1:{port} (pid {proc.pid})")
    return proc, f"http://127.0.0.1:{port}"


def upload(ckpt: Path, env: dict, log) -> int:
    import boto3
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    total = 0
    t0 = time.perf_counter()
    for path in sorted(ckpt.rglob("*")):
        if path.is_file() and not path.name.startswith(".streamconv"):
            client.upload_file(str(path), BUCKET, f"ckpt/{path.relative_to(ckpt).as_posix()}")
            total += path.stat().st_size
    log(f"uploaded {total / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return total


def import_cost_bytes() -> int:
    """RSS of an interpreter after `import s3fs, fsspec` minus one after `import streamconv.cli` (what the client
    stack adds to a converter's resident memory before it reads a byte)."""
    def rss(code: str) -> int:
        r = subprocess.run([sys.executable, "-c", code + "\nprint(open('/proc/self/statm').read().split()[1])"],
                           capture_output=True, text=True, check=True)
        return int(r.stdout.split()[-1]) * os.sysconf("SC_PAGE_SIZE")
    base = rss("import streamconv.cli")
    return rss("import streamconv.cli, fsspec, s3fs; fsspec.filesystem('s3')") - base


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2gb")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--buffer-size", default="32MiB")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(f"[remote-bench] {msg}", file=sys.stderr, flush=True)

    ckpt, _ = cached_checkpoint(args.preset, args.dtype, False, args.cache, log)
    work = args.cache / "work" / "remote"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    server, url = start_server(log)
    env = dict(os.environ, AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1")
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        total = upload(ckpt, env, log)
        rows = {"streamconv": [], "boto3 download": []}
        for attempt in range(args.repeat):
            for name in rows:
                out = work / f"{name.split()[0]}-{attempt}"
                if name == "streamconv":
                    argv = [sys.executable, "-m", "streamconv", "convert", f"s3://{BUCKET}/ckpt", str(out),
                            "--no-config", "--buffer-size", args.buffer_size, "--json"]
                else:
                    out.mkdir()
                    argv = [sys.executable, "-c", _DOWNLOAD, BUCKET, "ckpt", str(out)]
                m = run_measured(argv, env=env, stderr_path=work / f"{name.split()[0]}-{attempt}.err",
                                 stdout_path=work / f"{name.split()[0]}-{attempt}.out")
                if m.status != "finished":
                    raise SystemExit(f"{name} {m.status} (exit {m.exit_code}); see {work}")
                rows[name].append({"wall_s": m.wall_s, "peak_rss_bytes": m.peak_rss_bytes,
                                   "mb_per_s": total / 1e6 / m.wall_s})
                log(f"{name}: {m.wall_s:.1f} s, {total / 1e6 / m.wall_s:.0f} MB/s, peak RSS "
                    f"{m.peak_rss_bytes / 2**20:.0f} MiB")
                if attempt + 1 < args.repeat or name != "streamconv":
                    shutil.rmtree(out)
        # after timing: the remote conversion is the local one, byte for byte
        local = work / "local"
        subprocess.run([sys.executable, "-m", "streamconv", "convert", str(ckpt), str(local), "--no-config", "-q"],
                       env=env, check=True)
        remote_out = work / f"streamconv-{args.repeat - 1}"
        for f in sorted(local.iterdir()):
            if f.name != "streamconv.json":
                assert (remote_out / f.name).read_bytes() == f.read_bytes(), f.name
        log("checked: the remote conversion equals the local one byte for byte")
    finally:
        server.terminate()
        server.wait()
    best = {name: max(r["mb_per_s"] for r in rs) for name, rs in rows.items()}
    peak = min(r["peak_rss_bytes"] for r in rows["streamconv"])
    imports = import_cost_bytes()
    from streamconv.sizes import parse_size
    buffer_bytes = parse_size(args.buffer_size)
    result = {"preset": args.preset, "dtype": args.dtype, "checkpoint_bytes": total, "buffer_size": args.buffer_size,
              "rows": rows, "best_mb_per_s": best, "ratio": best["streamconv"] / best["boto3 download"],
              "streamconv_peak_rss_bytes": peak, "client_import_rss_bytes": imports,
              "peak_minus_buffer_minus_imports_bytes": peak - buffer_bytes - imports}
    print(f"{'':16} {'MB/s':>8} {'peak RSS MiB':>13}")
    for name, rs in rows.items():
        print(f"{name:16} {best[name]:8.0f} {min(r['peak_rss_bytes'] for r in rs) / 2**20:13.0f}")
    print(f"ratio streamconv / boto3 download: {result['ratio']:.2f}; streamconv peak RSS {peak / 2**20:.0f} MiB = "
          f"buffer {buffer_bytes / 2**20:.0f} + client import {imports / 2**20:.0f} + "
          f"{result['peak_minus_buffer_minus_imports_bytes'] / 2**20:.0f} MiB")
    out = HERE / "results" / f"remote-{args.preset}-{args.dtype}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
