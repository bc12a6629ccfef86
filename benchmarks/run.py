"""Benchmark harness: every contender on the same DCP checkpoint, in one invocation.

    python -m benchmarks.run --preset 2gb --out benchmarks/results            # make bench
    python -m benchmarks.run --preset llama-3.2-11b-vision --dtype float32 --out benchmarks/results
    python -m benchmarks.run --ckpt /path/to/checkpoint --out /tmp/results     # any DCP checkpoint

Each contender runs as a child process (`measure.run_measured`): wall time, peak RSS of its
process tree, bytes read/written, exit status, OOM. Before each one the previous output is deleted,
`sync` runs and, with --drop-caches, the page cache is dropped (when permitted; recorded), and free disk space is
checked: a contender that would not fit is reported as skipped, not run. After each one, a timed
`sync` flushes what it left dirty (its "to disk" time is wall + sync), then its output is
fingerprinted (`verify.py`) and deleted.

Prints a table, appends the run to OUT/results.json, writes OUT/<checkpoint>.md, redraws
OUT/results.png from all runs, and (when OUT is benchmarks/results) refreshes the results block of
benchmarks/README.md.
See benchmarks/README.md for how to read the numbers.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import psutil

from . import generate as gen
from .measure import run_measured
from .presets import PRESETS, num_params, output_specs

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / ".cache"
GiB = 2**30
SPARE_BYTES = GiB           # never fill the disk to the last GiB
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"


# ---------------------------------------------------------------- the checkpoint

@dataclass
class Checkpoint:
    path: Path
    label: str                 # "2gb-bfloat16", or the folder name
    files: int
    file_bytes: int            # all files, what cp copies
    largest_file_bytes: int
    tensor_bytes: int          # all tensors, what dcp_to_torch_save holds
    model_bytes: int           # model weights only
    model_numel: int
    model_dtypes: List[str]
    stamp: Optional[dict]      # .generator.json, when benchmarks.generate made it
    model: list                # [common.ModelTensor]

    def model_bytes_as(self, dtype: Optional[str]) -> int:
        return self.model_bytes if dtype is None else self.model_numel * gen.ITEMSIZE.get(dtype, 4)


def inspect_checkpoint(path: Path, label: Optional[str] = None) -> Checkpoint:
    """Sizes and model tensors from `.metadata` (read with torch's reader: the harness may use torch)."""
    import math

    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .baselines.common import model_tensors

    md = FileSystemReader(str(path)).read_metadata()
    files = [f for f in path.iterdir() if f.is_file()]
    tensors = [m for m in md.state_dict_metadata.values() if isinstance(m, TensorStorageMetadata)]
    model = model_tensors(md)
    return Checkpoint(
        path=path, label=label or path.name, files=len(files),
        file_bytes=sum(f.stat().st_size for f in files),
        largest_file_bytes=max(f.stat().st_size for f in files),
        tensor_bytes=sum(math.prod(m.size) * m.properties.dtype.itemsize for m in tensors),
        model_bytes=sum(math.prod(t.shape) * getattr(torch, t.dtype).itemsize for t in model),
        model_numel=sum(math.prod(t.shape) for t in model),
        model_dtypes=sorted({t.dtype for t in model}),
        stamp=gen.read_stamp(path), model=model)


def cached_checkpoint(preset: str, dtype: str, with_optim: bool, cache: Path, log,
                      layout: str = gen.DEFAULT_LAYOUT, flavor: str = gen.DEFAULT_FLAVOR) -> Tuple[Path, bool]:
    """The preset's checkpoint under cache/ckpt, generated on first use; (path, generated now).
    The default (fsdp2) layout has no suffix: `2gb-bfloat16`; others add it: `2gb-bfloat16-tp`; so does a
    writer flavor other than the default: `2gb-bfloat16-zstd`."""
    suffix = "" if layout == gen.DEFAULT_LAYOUT else f"-{layout}"
    suffix += "" if flavor == gen.DEFAULT_FLAVOR else f"-{flavor}"
    path = cache / "ckpt" / f"{preset}-{dtype}{'-optim' if with_optim else ''}{suffix}"
    stamp = gen.read_stamp(path)
    if (stamp and stamp.get("generator_version") == gen.GENERATOR_VERSION
            and stamp.get("num_params") == num_params(PRESETS[preset])   # not a preset since redefined
            and stamp.get("sharding", gen.DEFAULT_LAYOUT) == layout
            and stamp.get("flavor", gen.DEFAULT_FLAVOR) == flavor):
        log(f"reusing {path} (generated {stamp['created']} in {stamp['wall_s']} s)")
        return path, False
    log(f"generating {preset} {dtype}{' with optimizer state' if with_optim else ''} ({layout} layout) into {path} ...")
    stamp = gen.generate(preset, dtype, path, with_optim=with_optim, overwrite=True, layout=layout, flavor=flavor)
    log(f"generated {stamp['file_bytes'] / 1e9:.2f} GB in {stamp['wall_s']} s, peak PSS "
        f"{stamp['peak_pss_bytes'] / 2**20:.0f} MiB (RSS summed over the ranks {stamp['peak_rss_bytes'] / 2**20:.0f} MiB)")
    return path, True


# ---------------------------------------------------------------- contenders (data)

@dataclass(frozen=True)
class Contender:
    name: str
    kind: str                                   # "copy" (the I/O floor) or "convert"
    argv: Callable[[Checkpoint, Path], List[str]]
    space: Callable[[Checkpoint], int]          # bytes it needs free
    out_dtype: Optional[str] = None             # None: keeps the checkpoint's dtype
    available: Callable[[Checkpoint], Optional[str]] = lambda ck: None   # reason it can't run, or None
    note: str = ""
    # Bytes it must hold in RAM before it writes anything (None: bounded). When that is more than
    # the machine has, it is run without the disk check: it will run out of memory first, and the
    # table should say OOM, not "skipped".
    loads: Optional[Callable[[Checkpoint], int]] = None
    # The names it writes: "hf" (streamconv maps a trainer's names and unstacks grouped experts) or "stored"
    # (the checkpoint's own names, every tensor whole: the baselines, --source-format hf). Both are the same for
    # a checkpoint whose names already are Hugging Face's (the llama-cookbook presets).
    naming: str = "hf"


def _streamconv_argv() -> Optional[List[str]]:
    script = Path(sys.executable).with_name("streamconv")
    if importlib.util.find_spec("streamconv") is None or importlib.util.find_spec("streamconv.cli") is None:
        return None
    return [str(script)] if script.exists() else [sys.executable, "-m", "streamconv.cli"]


def compile_streamconv_bytecode() -> Optional[str]:
    """Compile streamconv's modules to bytecode before anything is timed, as `pip install` does: without it a
    run under PYTHONDONTWRITEBYTECODE=1 (or from a read-only tree) compiles ~100 modules from source at every
    start, ~0.1 CPU s that an installed streamconv never pays, all of it before the first byte. Returns where,
    None when streamconv is not importable here."""
    import compileall

    spec = importlib.util.find_spec("streamconv")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = list(spec.submodule_search_locations)[0]
    compileall.compile_dir(folder, quiet=1)
    return folder


@functools.lru_cache(maxsize=None)
def _streamconv_missing() -> Optional[str]:
    argv = _streamconv_argv()
    if argv is None:
        return "not available (no streamconv/cli.py)"
    r = subprocess.run(argv + ["convert", "--help"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"not available (`streamconv convert --help` exited {r.returncode})"


def streamconv_unavailable(ck: Checkpoint) -> Optional[str]:
    return _streamconv_missing()


def streamconv(*extra: str) -> Callable[[Checkpoint, Path], List[str]]:
    return lambda ck, out: (_streamconv_argv() or []) + ["convert", str(ck.path), str(out), "--json", *extra]


def baseline(module: str) -> Callable[[Checkpoint, Path], List[str]]:
    return lambda ck, out: [sys.executable, "-m", f"benchmarks.baselines.{module}", str(ck.path), str(out)]


def accelerate_unavailable(ck: Checkpoint) -> Optional[str]:
    return None if importlib.util.find_spec("accelerate") else "not installed (pip install accelerate)"


def only_for_float32(ck: Checkpoint) -> Optional[str]:
    return None if ck.model_dtypes == ["float32"] else "only for float32 checkpoints"


def _copy_pieces(ck: Checkpoint, out: Path) -> List[str]:
    # One file at a time, each fsynced then deleted: the same bytes read and written as cp -r,
    # needing only the largest file's space. fsync per file stands in for the sync after cp -r.
    script = ('set -e; mkdir -p "$2"; for f in "$1"/* "$1"/.[!.]*; do [ -f "$f" ] || continue; '
              'b=$(basename "$f"); cp "$f" "$2/$b"; sync "$2/$b"; rm "$2/$b"; done')
    return ["bash", "-c", script, "copy-pieces", str(ck.path), str(out)]


GROUPED_EXPERT_SUFFIXES = ("_EFD", "_EDF")    # torchtitan's grouped experts ([E, F, D] w1/w3, [E, D, F] w2)


def has_grouped_experts(ck: Checkpoint) -> bool:
    return any(t.name.endswith(GROUPED_EXPERT_SUFFIXES) for t in ck.model)


def dense_path_unavailable(ck: Checkpoint) -> Optional[str]:
    if not has_grouped_experts(ck):
        return "only for checkpoints with grouped experts (the same as streamconv otherwise)"
    return streamconv_unavailable(ck)


def zstd_unavailable(ck: Checkpoint) -> Optional[str]:
    if shutil.which("zstd") is None:
        return "no zstd command (apt-get install zstd)"
    first = next((p for p in sorted(ck.path.glob("*.distcp"))), None)
    if first is None or first.open("rb").read(4) != b"\x28\xb5\x2f\xfd":
        return "only for checkpoints saved with _extensions=[ZStandard()]"
    return None


def _zstd_decompress(ck: Checkpoint, out: Path) -> List[str]:
    # Each .distcp of a zstd checkpoint is a run of zstd frames (one per item): decompress them all, file by
    # file, as `zstd -d` would for anyone unpacking the checkpoint before converting it.
    script = ('set -e; mkdir -p "$2"; for f in "$1"/*.distcp; do zstd -d -q -c "$f" > "$2/$(basename "$f")"; done')
    return ["bash", "-c", script, "zstd-d", str(ck.path), str(out)]


DENSE_PATH = "streamconv --source-format hf"

CONTENDERS: List[Contender] = [
    Contender("cp -r", "copy", lambda ck, out: ["cp", "-r", str(ck.path), str(out)],
              space=lambda ck: ck.file_bytes, note="the I/O floor"),
    # For a zstd checkpoint: the bytes decompressed by the zstd tool (the floor for undoing the transform).
    Contender("zstd -d (every .distcp)", "decompress", _zstd_decompress, space=lambda ck: ck.tensor_bytes * 11 // 10,
              available=zstd_unavailable, note="decompression alone, one file after the other"),
    Contender("streamconv", "convert", streamconv(), space=lambda ck: ck.model_bytes,
              available=streamconv_unavailable),
    # The same bytes on the copy path: names kept, each grouped expert tensor written whole. The unstack above
    # is measured against it (issue 19.5: within 1.2x of the dense path).
    Contender(DENSE_PATH, "convert", streamconv("--source-format", "hf"), space=lambda ck: ck.model_bytes,
              available=dense_path_unavailable, naming="stored",
              note="the dense path: names as stored, grouped experts copied whole"),
    Contender("streamconv --crc", "convert", streamconv("--crc"), space=lambda ck: ck.model_bytes,
              available=streamconv_unavailable),
    # What durability costs: the same run with fsync off (a switch for this measurement only).
    Contender("streamconv (no fsync)", "convert",
              lambda ck, out: ["env", "STREAMCONV_UNSAFE_NO_FSYNC=1"] + streamconv()(ck, out),
              space=lambda ck: ck.model_bytes, available=streamconv_unavailable),
    Contender("streamconv --buffer-size 16MiB", "convert", streamconv("--buffer-size", "16MiB"),
              space=lambda ck: ck.model_bytes, available=streamconv_unavailable),
    Contender("streamconv --dtype bfloat16", "convert", streamconv("--dtype", "bfloat16"),
              space=lambda ck: ck.model_bytes_as("bfloat16"), out_dtype="bfloat16",
              available=lambda ck: only_for_float32(ck) or streamconv_unavailable(ck)),
    Contender("streamconv --dtype bfloat16 --buffer-size 16MiB", "convert",
              streamconv("--dtype", "bfloat16", "--buffer-size", "16MiB"),
              space=lambda ck: ck.model_bytes_as("bfloat16"), out_dtype="bfloat16",
              available=lambda ck: only_for_float32(ck) or streamconv_unavailable(ck)),
    Contender("dcp_to_torch_save + save_file", "convert", baseline("dcp_to_torch_save"),
              space=lambda ck: ck.tensor_bytes + ck.model_bytes, note="torch.save file, then safetensors",
              loads=lambda ck: ck.tensor_bytes, naming="stored"),
    Contender("llama-cookbook (dcp.load no_dist)", "convert", baseline("cookbook"),
              space=lambda ck: ck.model_bytes, loads=lambda ck: ck.model_bytes, naming="stored"),
    Contender("accelerate merge-weights", "convert",
              lambda ck, out: [sys.executable, "-m", "accelerate.commands.accelerate_cli", "merge-weights",
                               str(ck.path), str(out)],
              space=lambda ck: ck.model_bytes, available=accelerate_unavailable, loads=lambda ck: ck.tensor_bytes,
              naming="stored"),
]
COPY_PIECES = Contender("cp per file (+fsync, delete)", "copy", _copy_pieces,
                        space=lambda ck: ck.largest_file_bytes,
                        note="the I/O floor when cp -r does not fit: the same bytes, one file at a time")


# ---------------------------------------------------------------- machine and page cache

def machine_info(work: Path) -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    du = shutil.disk_usage(work)
    device = fstype = "?"
    best = ""
    for line in open("/proc/mounts"):
        dev, mnt, fs = line.split()[:3]
        if str(work.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, device, fstype = mnt, dev, fs
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "safetensors", "numpy", "streamconv", "accelerate"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "disk": {"device": device, "fstype": fstype, "mount": best, "total_bytes": du.total, "free_bytes": du.free},
            "kernel": platform.release(), "python": platform.python_version(), "versions": versions,
            "hostname": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def sync() -> float:
    t0 = time.perf_counter()
    os.sync()
    return time.perf_counter() - t0


def drop_caches() -> bool:
    """Empty the page cache so every contender starts cold. Needs root; False when refused."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rmtree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------- one contender

def run_contender(c: Contender, ck: Checkpoint, work: Path, args, log) -> dict:
    row = {"name": c.name, "kind": c.kind, "out_dtype": c.out_dtype, "note": c.note}
    reason = c.available(ck)
    if reason:
        row.update(status="skipped", note=reason)
        return row
    slot = work / "run"
    rmtree(slot)
    slot.mkdir(parents=True)
    out = slot / "out"
    need, free = c.space(ck) + SPARE_BYTES, shutil.disk_usage(work).free
    ram = psutil.virtual_memory().total
    if c.loads is not None and c.loads(ck) > ram:
        row["expected_oom"] = f"must load {c.loads(ck) / 1e9:.1f} GB > {ram / 2**30:.0f} GiB RAM before writing (no disk check)"
    elif need > free:
        row.update(status="skipped", note=f"needs {need / 1e9:.1f} GB free, {free / 1e9:.1f} GB are")
        return row
    row["caches_dropped"] = drop_caches() if args.drop_caches else False
    argv = c.argv(ck, out)
    log(f"[{c.name}] {' '.join(argv)}")
    m = run_measured(argv, watch_dir=slot, timeout_s=args.timeout, mem_limit_bytes=args.mem_limit,
                     stdout_path=work / "stdout.txt", stderr_path=work / "stderr.txt",
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                         x for x in (str(HERE.parent), os.environ.get("PYTHONPATH")) if x)}, cwd=HERE.parent)
    row["sync_s"] = round(sync(), 3)
    row.update(status=m.status, measurement=m.to_json())
    if m.note or "expected_oom" in row:
        row["note"] = "; ".join(x for x in (c.note, m.note, row.get("expected_oom")) if x)
    stdout = (work / "stdout.txt").read_text(errors="replace")
    stderr = (work / "stderr.txt").read_text(errors="replace")
    if c.name.startswith("streamconv"):
        try:
            row["report"] = json.loads(stdout)
        except ValueError:
            row["stdout_tail"] = stdout[-2000:]
    if m.status != "finished":
        row["stderr_tail"] = stderr[-3000:]
        log(f"[{c.name}] {m.status} (exit {m.exit_code}, signal {m.signal}): {stderr.strip()[-500:]}")
    row["out_bytes"] = _tree_bytes(out)
    return row


def _median_attempt(attempts: List[dict]) -> dict:
    """With --repeat: the attempt with the median wall + sync time; the others go under "repeats"."""
    if len(attempts) == 1:
        return attempts[0]
    done = [a for a in attempts if a["status"] == "finished"]
    if len(done) < len(attempts):
        row = next(a for a in attempts if a["status"] != "finished")
    else:
        row = sorted(done, key=lambda a: a["measurement"]["wall_s"] + a["sync_s"])[len(done) // 2]
    row = dict(row)
    row["repeats"] = [{"status": a["status"], "wall_s": a.get("measurement", {}).get("wall_s"),
                       "sync_s": a.get("sync_s"), "peak_rss_bytes": a.get("measurement", {}).get("peak_rss_bytes")}
                      for a in attempts]
    if row["status"] == "finished":
        times = sorted(a["measurement"]["wall_s"] + a["sync_s"] for a in done)
        row["note"] = "; ".join(x for x in (row.get("note"), f"median of {len(done)} runs ({times[0]:.1f}-{times[-1]:.1f} s)") if x)
    return row


def _ratios_to_dense_path(rows: List[dict]) -> None:
    """On a checkpoint with grouped experts: each streamconv row that unstacks them gets `ratio_to_dense`, its
    wall + sync over the dense path's (the same bytes, names as stored) from the same run."""
    dense = next((r for r in rows if r["name"] == DENSE_PATH and r["status"] == "finished"), None)
    if dense is None:
        return
    dense_s = dense["measurement"]["wall_s"] + dense["sync_s"]
    for r in rows:
        if r["name"].startswith("streamconv") and r is not dense and r["status"] == "finished":
            r["ratio_to_dense"] = round((r["measurement"]["wall_s"] + r["sync_s"]) / dense_s, 3)


def _tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- checking outputs

class Checker:
    """Compares each finished conversion with the generator's data (when the checkpoint has a stamp)
    or with the first finished conversion (the reference), by fingerprints. Outputs are compared with what their
    contender's `naming` says they hold: Hugging Face names (a MoE preset's experts unstacked) or the names as
    stored."""

    def __init__(self, ck: Checkpoint, mode: str, dtypes_wanted: List[Optional[str]]):
        self.ck, self.mode = ck, mode
        self.dtypes_wanted = sorted({d for d in dtypes_wanted if d})
        # (naming, out dtype (None: as stored)) -> fingerprint
        self.reference: Dict[Tuple[str, Optional[str]], object] = {}
        self.reference_name: Dict[str, str] = {}      # naming -> the conversion that became its reference
        stamp = ck.stamp
        if stamp and stamp.get("generator_version") == gen.GENERATOR_VERSION and stamp.get("preset") in PRESETS:
            cfg = PRESETS[stamp["preset"]]
            self.generated = {naming: [(out, gen.data_key(name), shape, first)
                                       for out, name, shape, first in output_specs(cfg, naming)]
                              for naming in ("hf", "stored")}
            self.source = "generator data"
        else:
            self.generated = None
            self.source = None

    def expected(self, out_dtype: Optional[str], naming: str):
        from .verify import expected_fingerprint

        key = (naming, out_dtype)
        if key not in self.reference and self.generated is not None:
            self.reference[key] = expected_fingerprint(self.generated[naming], out_dtype or self.ck.stamp["dtype"],
                                                       self.mode)
        return self.reference.get(key)

    def check(self, name: str, out: Path, out_dtype: Optional[str], naming: str = "hf") -> dict:
        from .verify import compare, fingerprint

        t0 = time.perf_counter()
        try:
            got = fingerprint(out, mode=self.mode)
        except (OSError, ValueError) as e:
            return {"ok": False, "summary": f"unreadable output: {e}"}
        expected = self.expected(out_dtype, naming)
        if expected is None and self.generated is None:
            # no generator data: the first finished conversion is the reference. One of the other naming is
            # the reference too when it wrote the same names (a checkpoint no adapter renames).
            other = next((self.reference.get((n, out_dtype)) for n in self.reference_name if n != naming), None)
            if other is not None and set(other) == set(got):
                expected = other
            elif naming not in self.reference_name and out_dtype is None:
                self.reference_name[naming] = name
                self.source = "reference: " + ", ".join(self.reference_name.values())
                self.reference[(naming, None)] = got
                for d in self.dtypes_wanted:
                    self.reference[(naming, d)] = fingerprint(out, as_dtype=d, mode=self.mode)
                return {"ok": True, "summary": f"reference ({len(got)} tensors)", "reference": True,
                        "check_s": round(time.perf_counter() - t0, 2)}
            else:
                return {"ok": None, "summary": "no reference to compare with"}
        ok, summary = compare(expected, got)
        return {"ok": ok, "summary": summary, "against": self.source, "mode": self.mode,
                "check_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------- report

def _gb(n) -> str:
    return "" if n is None else f"{n / 1e9:.2f}"


def table_rows(run: dict) -> List[List[str]]:
    rows = [["contender", "status", "wall s", "sync s", "x cp", "peak RSS MiB", "anon MiB",
             "1st byte s", "GB read", "GB written", "output", "note"]]
    for r in run["contenders"]:
        m = r.get("measurement") or {}
        io = m.get("io", {})
        check = r.get("check") or {}
        out = "" if not check else ("ok" if check.get("ok") else ("-" if check.get("ok") is None else "MISMATCH"))
        note = r.get("note", "")
        if r.get("ratio_to_dense"):
            note = "; ".join(x for x in (f"{r['ratio_to_dense']:.2f}x the dense path", note) if x)
        rows.append([
            r["name"], r["status"],
            f"{m['wall_s']:.1f}" if m else "", f"{r['sync_s']:.1f}" if "sync_s" in r else "",
            f"{r['ratio_to_cp']:.2f}" if r.get("ratio_to_cp") else "",
            f"{m['peak_rss_bytes'] / 2**20:.0f}" if m else "",
            f"{m['sampled_peak_anon_bytes'] / 2**20:.0f}" if m else "",
            f"{m['first_byte_s']:.2f}" if m.get("first_byte_s") is not None else "",
            _gb(io.get("read_bytes")) if m else "", _gb(io.get("write_bytes")) if m else "",
            out, note if r["status"] != "finished" or not check or check.get("ok") else
            f"{note} {check.get('summary', '')}".strip(),
        ])
    return rows


def format_text(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {2, 3, 4, 5, 6, 7, 8, 9}
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(rows: List[List[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
    return "\n".join(out)


def describe(run: dict) -> str:
    ck, m = run["checkpoint"], run["machine"]
    gen_s = ""
    if ck.get("generator"):
        g = ck["generator"]
        ranks = {"tp": "TP", "shortrun": "last-dim (short-run)", "ep": "EP x FSDP"}.get(g.get("sharding"), "FSDP2")
        gen_s = (f" Generated by `benchmarks.generate` ({g.get('world_size')} {ranks} ranks) in {g.get('wall_s')} s, "
                 f"generator peak PSS {g.get('peak_pss_bytes', 0) / 2**20:.0f} MiB "
                 f"(RSS summed over the forked ranks {g.get('peak_rss_bytes', 0) / 2**20:.0f} MiB).")
    return (f"**{ck['label']}**: {ck['file_bytes'] / 1e9:.2f} GB in {ck['files']} files, model "
            f"{ck['model_bytes'] / 1e9:.2f} GB ({', '.join(ck['model_dtypes'])}).{gen_s} "
            f"Run {m['date']} on {m['cpu']}, {m['cores']} cores, {m['ram_bytes'] / 2**30:.0f} GiB RAM, "
            f"{m['disk']['fstype']} on {m['disk']['device']}, Linux {m['kernel']}, torch {m['versions'].get('torch')}; "
            f"page cache {'dropped before each contender' if run['caches_dropped'] else 'NOT dropped (reads may come from RAM)'}; "
            f"outputs checked against {run.get('checked_against') or 'nothing'} ({run['verify_mode']}).")


def update_readme(readme: Path, runs: List[dict]) -> bool:
    if not readme.exists():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    latest: Dict[str, dict] = {}
    for run in runs:
        latest[run["checkpoint"]["label"]] = run
    order = sorted(latest.values(), key=lambda r: r["checkpoint"]["file_bytes"])
    body = "\n\n".join(describe(r) + "\n\n" + format_markdown(table_rows(r)) for r in order)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{body}\n{README_END}{tail}")
    return True


def plot(runs: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    latest: Dict[str, dict] = {}
    for run in runs:
        latest[run["checkpoint"]["label"]] = run
    series: Dict[str, list] = {}
    for run in latest.values():
        x = run["checkpoint"]["file_bytes"] / 1e9
        for r in run["contenders"]:
            m = r.get("measurement")
            if m:
                series.setdefault(r["name"], []).append((x, m["peak_rss_bytes"] / 2**20,
                                                         m["wall_s"] + r.get("sync_s", 0), r["status"]))
    fig, (ax_rss, ax_t) = plt.subplots(1, 2, figsize=(13, 5.8))
    markers = "osD^vP*Xh<>"
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts.sort()
        ok = [p for p in pts if p[3] == "finished"]
        bad = [p for p in pts if p[3] != "finished"]
        style = dict(marker=markers[i % len(markers)], linestyle="-", alpha=0.85)
        line, = ax_rss.plot([p[0] for p in ok], [p[1] for p in ok], label=name, **style)
        if bad:
            ax_rss.plot([p[0] for p in bad], [p[1] for p in bad], "x", color=line.get_color(), markersize=11, mew=2.5)
        ax_t.plot([p[0] for p in ok], [p[2] for p in ok], color=line.get_color(), **style)
    for y, label in ((64, "64 MiB target (16 MiB buffer)"), (128, "128 MiB target (default)")):
        ax_rss.axhline(y, color="grey", linestyle=":", linewidth=1)
        ax_rss.annotate(label, (0.01, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                        va="bottom")
    ax_rss.set(xscale="log", yscale="log", xlabel="checkpoint size (GB)", ylabel="peak RSS of the process tree (MiB)",
               title="Peak memory (x: out of memory / killed)")
    ax_t.set(xscale="log", yscale="log", xlabel="checkpoint size (GB)", ylabel="wall time + final sync (s)",
             title="Time to data on disk")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_rss, ax_t):
        ax.grid(True, which="both", alpha=0.3)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1, 2, 5)))
            axis.set_major_formatter(plain)
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.legend(loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    tmp = path.with_name(path.name + ".tmp")   # .gitignore has benchmarks/results/*.tmp
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="generate (once, cached) and use this preset")
    src.add_argument("--ckpt", type=Path, help="use an existing DCP checkpoint folder")
    p.add_argument("--dtype", default="bfloat16", choices=gen.DTYPES, help="preset dtype (default bfloat16)")
    p.add_argument("--with-optim", action="store_true", help="preset with AdamW state (3x the bytes)")
    p.add_argument("--layout", default=gen.DEFAULT_LAYOUT, choices=gen.LAYOUTS,
                   help="preset sharding: fsdp2 (every tensor Shard(0), default), tp (Megatron-style: "
                        "Shard(0) colwise, Shard(1) rowwise, 1-D Replicate), shortrun (>= 2-D tensors "
                        "Shard(last dim)) or ep (MoE presets: torchtitan's expert parallel 2 x FSDP 2); "
                        "cached as <preset>-<dtype>-<layout>")
    p.add_argument("--flavor", default=gen.DEFAULT_FLAVOR, choices=gen.FLAVORS,
                   help="how the preset's items are serialized (zstd: torch's ZStandard extension)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help="generated checkpoints (cache/ckpt) and scratch outputs (cache/work); default benchmarks/.cache")
    p.add_argument("--only", help="comma-separated substrings: run only contenders whose name contains one")
    p.add_argument("--skip", help="comma-separated substrings: skip contenders whose name contains one")
    p.add_argument("--verify", choices=("auto", "all", "sample", "none"), default="auto",
                   help="fingerprint every byte (all), 3 windows per tensor (sample); auto: all below 8 GB")
    p.add_argument("--floor", choices=("auto", "per-file"), default="auto",
                   help="the I/O floor: cp -r, or per-file copies when cp -r would not fit (auto); per-file forces that")
    # Opt-in: dropping the page cache empties it for the whole machine (every other process's files too).
    p.add_argument("--drop-caches", dest="drop_caches", action="store_true", default=False,
                   help="drop the whole machine's page cache before each contender (needs root; slows every "
                        "other process on the machine), so each starts cold; default: caches are left warm")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="leave the page cache alone (the default)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run each contender N times and report the run with the median time (default 1)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per contender (default 3 h)")
    p.add_argument("--mem-limit", type=float, default=None,
                   help="GiB of anonymous memory at which a contender is killed and reported OOM (default: RAM - 1 GiB)")
    p.add_argument("--readme", default=None,
                   help="README whose results block to refresh; default: benchmarks/README.md when --out is "
                        "benchmarks/results (the tracked results), else none; '' to skip")
    a = p.parse_args(argv)
    if a.readme is None:    # results written elsewhere must not rewrite the tracked README
        a.readme = str(HERE / "README.md") if a.out.resolve() == (HERE / "results").resolve() else ""
    a.mem_limit = int((a.mem_limit * GiB) if a.mem_limit else psutil.virtual_memory().total - GiB)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    compiled = compile_streamconv_bytecode()
    if compiled:
        log(f"compiled {compiled} to bytecode (as an installed streamconv is) before timing")
    args.cache.mkdir(parents=True, exist_ok=True)
    # Gigabytes of checkpoints must never be committed, even before the top-level .gitignore says so.
    (args.cache / ".gitignore").write_text("# written by benchmarks/run.py: nothing here belongs in git\n*\n")
    work = args.cache / "work"
    rmtree(work)
    work.mkdir(parents=True)
    generated_now = False
    if args.ckpt:
        ck = inspect_checkpoint(args.ckpt.resolve())
    else:
        path, generated_now = cached_checkpoint(args.preset, args.dtype, args.with_optim, args.cache, log,
                                                layout=args.layout, flavor=args.flavor)
        ck = inspect_checkpoint(path, label=path.name)

    contenders = list(CONTENDERS)
    if args.floor == "per-file" or shutil.disk_usage(work).free < ck.file_bytes + SPARE_BYTES:
        contenders.insert(1, COPY_PIECES)   # cp -r is then reported as skipped; this row is the floor
        if args.floor == "per-file":
            c = contenders[0]
            contenders[0] = replace(c, available=lambda ck: "not selected (--floor per-file)")
    def deselected(c: Contender) -> bool:
        only = [k.strip() for k in (args.only or "").split(",") if k.strip()]
        skip = [k.strip() for k in (args.skip or "").split(",") if k.strip()]
        return bool((only and c.kind != "copy" and not any(k in c.name for k in only))
                    or any(k in c.name for k in skip))

    # deselected contenders keep their row ("not selected") so a table never silently loses one
    contenders = [c if not deselected(c) else replace(c, available=lambda ck: "not selected (--only/--skip)")
                  for c in contenders]
    mode = args.verify if args.verify != "auto" else ("all" if ck.model_bytes < 8e9 else "sample")
    checker = Checker(ck, mode, [c.out_dtype for c in contenders]) if mode != "none" else None

    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(work), "verify_mode": mode,
           "argv": sys.argv[1:],
           "checkpoint": {"label": ck.label, "path": str(ck.path), "file_bytes": ck.file_bytes,
                          "files": ck.files, "tensor_bytes": ck.tensor_bytes, "model_bytes": ck.model_bytes,
                          "model_tensors": len(ck.model), "model_dtypes": ck.model_dtypes, "generator": ck.stamp,
                          "generated_by_this_run": generated_now},
           "contenders": []}
    log(f"checkpoint {ck.path}: {ck.file_bytes / 1e9:.2f} GB, model {ck.model_bytes / 1e9:.2f} GB "
        f"{'/'.join(ck.model_dtypes)}, {len(ck.model)} tensors; verify={mode}")
    floor = None
    for c in contenders:
        attempts = []
        for i in range(args.repeat):
            row = run_contender(c, ck, work, args, log)
            out = work / "run" / "out"
            if c.kind == "convert" and row["status"] == "finished" and checker:
                row["check"] = checker.check(c.name, out, c.out_dtype, c.naming)
                log(f"[{c.name}] output: {row['check']['summary']}")
            rmtree(work / "run")
            m = row.get("measurement")
            if m:
                log(f"[{c.name}] {row['status']}: {m['wall_s']:.1f} s + sync {row['sync_s']:.1f} s, "
                    f"peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB")
            else:
                log(f"[{c.name}] {row['status']}: {row.get('note', '')}")
            attempts.append(row)
            if row["status"] != "finished":
                break   # skipped, failed or OOM: repeating will not change that
        row = _median_attempt(attempts)
        m = row.get("measurement")
        if c.kind == "copy" and row["status"] == "finished" and floor is None:
            floor = m["wall_s"] + row["sync_s"]
        if m and floor and row["status"] == "finished":
            row["ratio_to_cp"] = round((m["wall_s"] + row["sync_s"]) / floor, 3)
        run["contenders"].append(row)
    _ratios_to_dense_path(run["contenders"])
    run["caches_dropped"] = any(r.get("caches_dropped") for r in run["contenders"])
    run["checked_against"] = checker.source if checker else None
    rmtree(work)

    rows = table_rows(run)
    print(describe(run) + "\n")
    print(format_text(rows))

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    runs = json.loads(results_path.read_text())["runs"] if results_path.exists() else []
    runs.append(run)
    tmp = results_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    tmp.replace(results_path)
    (args.out / f"{ck.label}.md").write_text(describe(run) + "\n\n" + format_markdown(rows) + "\n")
    plot(runs, args.out / "results.png")
    if args.readme and update_readme(Path(args.readme), runs):
        log(f"updated the results block of {args.readme}")
    log(f"wrote {results_path}, {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
