"""gs:// reads through gcsfs vs obstore against a local GCS server: which client should read a bucket checkpoint.

    python -m benchmarks.gcs_clients [--mib 256] [--repeat 3]

Uploads `--mib` MiB of random bytes (4 objects) to fake-gcs-server on localhost (tests/support/gcs_server.py), then,
interleaved `--repeat` times, reads every object back the way streamconv's RemoteReader does (ranged GETs of
4 MiB, 6 in flight: source/remote.py's REQUEST_BYTES and DEFAULT_MAX_REQUESTS) in a process of its own under
`/usr/bin/time -v`, once through gcsfs (fs/remote.py's filesystem: gcsfs with its loop cut to one try, a JSON-API
media download per range) and once through obstore (`GCSStore`: an XML-API GET per range). Prints and writes to
benchmarks/results/gcs-clients.json the wall and CPU seconds (user + sys) and peak RSS of each, with the load
average, after checking each read's CRC-32 against the uploaded bytes. Wall seconds on a shared machine are
noise; compare CPU seconds. The server's own CPU is the same for both and not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET, OBJECTS = "bench-clients", 4
RANGE_BYTES, IN_FLIGHT = 4 << 20, 6


def _reader(client: str, server_url: str):
    """get(key, start, end) -> bytes through `client`."""
    if client == "obstore":
        import obstore
        from obstore.store import GCSStore
        store = GCSStore(BUCKET, base_url=server_url, skip_signature=True)
        return lambda key, start, end: bytes(obstore.get_range(store, key, start=start, end=end))
    from streamconv.fs import remote
    fs, _ = remote.filesystem(f"gs://{BUCKET}")
    return lambda key, start, end: fs.cat_file(f"{BUCKET}/{key}", start=start, end=end)


def child(client: str, server_url: str, sizes: dict) -> None:
    """Read every object in ranges, IN_FLIGHT at once; print {key: CRC-32}."""
    get = _reader(client, server_url)
    jobs = [(key, start, min(start + RANGE_BYTES, size)) for key, size in sizes.items()
            for start in range(0, size, RANGE_BYTES)]
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        pieces = list(pool.map(lambda job: (job, zlib.crc32(get(*job))), jobs))
    crcs = {}
    for (key, start, end), crc in pieces:
        crcs.setdefault(key, []).append((start, end, crc))
    print(json.dumps({key: [c for _, _, c in sorted(parts)] for key, parts in crcs.items()}))


def _measured(client: str, server, sizes: dict, env: dict) -> dict:
    started = time.time()
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "benchmarks.gcs_clients", "--child",
                             client, server.url, json.dumps(sizes)], env=env, capture_output=True, text=True,
                            timeout=1800, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{client} failed:\n{result.stderr[-3000:]}")

    def field(name: str) -> float:
        return float(re.search(name + r": ([\d.]+)", result.stderr).group(1))
    return {"wall_s": round(time.time() - started, 2),
            "cpu_s": round(field(r"User time \(seconds\)") + field(r"System time \(seconds\)"), 2),
            "peak_rss_mib": round(field(r"Maximum resident set size \(kbytes\)") / 1024, 1),
            "load_1min": round(os.getloadavg()[0], 1), "crcs": json.loads(result.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], json.loads(args.child[2]))
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    sys.path.insert(0, str(REPO))
    from tests.support import gcs_server

    server = gcs_server.start()
    try:
        server.bucket(BUCKET)
        rng, sizes, expected = random.Random(21), {}, {}
        for n in range(OBJECTS):
            data = rng.randbytes(args.mib * (1 << 20) // OBJECTS)
            key = f"ckpt/__{n}_0.distcp"
            server.put(BUCKET, key, data)
            sizes[key] = len(data)
            expected[key] = [zlib.crc32(data[i:i + RANGE_BYTES]) for i in range(0, len(data), RANGE_BYTES)]
            del data
        env = dict(os.environ, **server.env, PYTHONPATH=str(REPO))
        rows = {"gcsfs": [], "obstore": []}
        for attempt in range(args.repeat):
            for client in rows:
                row = _measured(client, server, sizes, env)
                if row.pop("crcs") != expected:
                    raise SystemExit(f"{client}: the bytes read differ from the bytes uploaded")
                rows[client].append(row)
                print(f"{client:8} round {attempt + 1}: {row}", flush=True)
    finally:
        server.stop()
    out = {"mib": args.mib, "range_bytes": RANGE_BYTES, "in_flight": IN_FLIGHT, "runs": rows}
    path = REPO / "benchmarks" / "results" / "gcs-clients.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
