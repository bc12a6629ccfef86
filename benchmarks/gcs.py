"""gs:// against a local GCS server: CPU seconds and peak RSS of a conversion from and into a bucket.

    python -m benchmarks.gcs [--repeat 2] [--buffer-size 32MiB]

Writes the 256 MiB checkpoint of tests/support/big_checkpoint.py (torch, 2 gloo ranks), uploads it to
fake-gcs-server on localhost (tests/support/gcs_server.py), then runs, interleaved `--repeat` times, a local
conversion, one from gs:// into a local folder and one from the local folder into gs://, each as its own
`python -m streamconv convert` under `/usr/bin/time -v`. Prints wall and CPU seconds (user + sys), peak RSS and
convert's predicted peak per run with the load average, checks every output against the local one (the gs://
output downloaded), and writes JSON to benchmarks/results/gcs.json. Wall seconds on a shared machine are noise;
compare CPU seconds and RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _convert(src, dst, env, buffer_size: str) -> dict:
    started = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "streamconv", "convert", str(src), str(dst),
                             "--no-config", "--buffer-size", buffer_size, "--json"],
                            env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"convert {src} {dst} failed ({result.returncode}):\n{result.stderr[-3000:]}")

    def field(name: str) -> float:
        return float(re.search(name + r": ([\d.]+)", result.stderr).group(1))
    report = json.loads(result.stdout)
    return {"wall_s": round(time.time() - started, 2),
            "cpu_s": round(field(r"User time \(seconds\)") + field(r"System time \(seconds\)"), 2),
            "peak_rss_mib": round(field(r"Maximum resident set size \(kbytes\)") / 1024, 1),
            "predicted_peak_mib": round(report["predicted_peak_bytes"] / 2 ** 20, 1),
            "load_1min": round(os.getloadavg()[0], 1)}


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".json")
            and p.name != "streamconv.json"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--buffer-size", default="32MiB")
    args = parser.parse_args()
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    sys.path.insert(0, str(REPO))
    from tests.support import big_checkpoint, gcs_server

    work = Path(tempfile.mkdtemp(prefix="streamconv-gcs-bench-"))
    ckpt = big_checkpoint.write(work / "ckpt")
    server = gcs_server.start()
    rows = []
    try:
        url = server.upload(ckpt, "bench", "ckpt")
        env = dict(gcs_server.env_for(server), PYTHONPATH=str(REPO))
        for n in range(args.repeat):
            for kind, src, dst in (("local->local", ckpt, work / f"local{n}"), ("gs->local", url, work / f"gs{n}"),
                                   ("local->gs", ckpt, f"gs://bench/out{n}")):
                row = dict(kind=kind, run=n, **_convert(src, dst, env, args.buffer_size))
                rows.append(row)
                print(f"{kind:13s} wall {row['wall_s']:6.1f} s  cpu {row['cpu_s']:6.2f} s  peak RSS "
                      f"{row['peak_rss_mib']:6.1f} MiB  predicted {row['predicted_peak_mib']:6.1f} MiB  "
                      f"load {row['load_1min']}", flush=True)
            local = _files(work / f"local{n}")
            assert _files(work / f"gs{n}") == local, "gs:// -> local differs from the local conversion"
            downloaded = {k: v for k, v in server.download("bench", f"out{n}").items() if k in local}
            assert downloaded == local, "local -> gs:// differs from the local conversion"
    finally:
        server.stop()
    out = REPO / "benchmarks" / "results" / "gcs.json"
    out.write_text(json.dumps({"buffer_size": args.buffer_size, "runs": rows}, indent=2) + "\n")
    print(f"outputs equal to the local conversion; wrote {out}")


if __name__ == "__main__":
    main()
