"""The fuzzer's worker: run in a subprocess (`python -m tests.support.fuzz_child CORPUS N OUT`) without torch, so that a
crash (segfault) fails the parent test instead of killing it, and so that its peak RSS is streamconv's own.

CORPUS holds real inputs written by torch (`*.metadata` pickles, `*.blob` torch.save archives). Each
hypothesis example picks one and mutates it at the pickle-opcode level (lengths, nesting, globals, types) or
at the zip-record level, then decodes it with streamconv. Every example must end with a result or a
StreamconvError, within MAX_CASE_SECONDS. OUT receives a JSON summary; `OUT.case` holds the input being run
(left behind if the process dies, to reproduce the crash).
"""
from __future__ import annotations

import io
import json
import os
import pickletools
import resource
import struct
import sys
import time
import zipfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamconv.errors import StreamconvError
from streamconv.source.io import MemoryReader
from streamconv.model import BlobLocation
from streamconv.source import load_metadata, locate_tensor

MAX_CASE_SECONDS = 1.0

# Globals a mutation may swap in: allowed ones (type confusion between stand-ins) and refused ones.
GLOBALS = [
    ("torch", "Size"), ("torch", "float32"), ("torch", "FloatStorage"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
    ("torch.serialization", "_get_layout"), ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("os", "system"), ("builtins", "eval"),
]
# Small opcode sequences that build odd values: deep nesting, big lengths, wrong types.
SNIPPETS = [
    b"K\x01" + b"\x85" * 5000,                      # 5000-deep tuple
    b"]" * 3000,                                    # many empty lists
    b"(" * 200,                                     # many MARKs
    b"X\xff\xff\xff\x7f",                           # a 2 GiB string length
    b"\x8d" + struct.pack("<Q", 1 << 62),           # BINUNICODE8 of 2**62 bytes
    b"\x8a\xff" + b"\x01" * 255,                    # a 255-byte integer
    b"}K\x01\x85\x85\x85K\x02s",                    # a tuple as a dict key
    b"h\x00" * 500,                                 # memo gets
    b"N\x81", b")\x81", b"Nb", b"}b", b"NR", b")R", b"\x93", b"0", b"1", b"2", b"t", b"e", b"u", b"s", b"a",
    b"j\xff\xff\xff\x7f",                           # memo index out of range
    b"\x95" + struct.pack("<Q", 1 << 60),           # FRAME length past the end
    b"\x80\x09",                                    # unknown protocol
    b"\x8f", b"\x92", b"i", b"o", b"\x82\x01",      # refused opcodes
]


def _ops(data: bytes):
    """(start, end, opcode name) of each opcode of a valid pickle."""
    found = list(pickletools.genops(data))
    starts = [pos for _, _, pos in found] + [len(data)]
    return [(starts[i], starts[i + 1], found[i][0].name) for i in range(len(found))]


@st.composite
def mutated_pickle(draw, data: bytes):
    ops = _ops(data)
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        start, end, name = draw(st.sampled_from(ops))
        start, end = min(start, len(out) - 1), min(end, len(out))   # earlier mutations moved things
        kind = draw(st.sampled_from(["length", "snippet", "global", "delete", "duplicate", "byte", "cut", "type"]))
        if kind == "length" and end - start > 1:
            # overwrite the opcode's argument bytes (a length, an int, a memo index) with a random value
            arg = draw(st.binary(min_size=end - start - 1, max_size=end - start - 1))
            out[start + 1:end] = arg
        elif kind == "snippet":
            out[start:start] = draw(st.sampled_from(SNIPPETS))
        elif kind == "global":
            module, gname = draw(st.sampled_from(GLOBALS))
            out[start:start] = b"c" + module.encode() + b"\n" + gname.encode() + b"\n"
        elif kind == "delete":
            del out[start:end]
        elif kind == "duplicate":
            out[start:start] = out[start:end]
        elif kind == "byte":
            out[start] = draw(st.integers(0, 255))
        elif kind == "cut":
            del out[start:]
        else:  # "type": a value of another type where this opcode was
            out[start:end] = draw(st.sampled_from([b"N", b"K\x07", b"X\x01\x00\x00\x00a", b"]", b"}", b")",
                                                   b"\x88", b"G" + b"\x7f\xf8" + b"\x00" * 6]))
        if len(out) < 2:
            break
    return bytes(out)


@st.composite
def mutated_blob(draw, blob: bytes):
    out = bytearray(blob)
    choice = draw(st.sampled_from(["zip", "zip", "pickle"]))
    if choice == "pickle":
        # mutate data.pkl in place; the archive's recorded sizes and CRC stay those of the original
        start, end = _data_pkl_range(blob)
        return bytes(out[:start]) + draw(mutated_pickle(blob[start:end])) + bytes(out[end:])
    # zip records: overwrite a field of a local/central/end record with a random or extreme value
    sigs = [i for sig in (b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06") for i in _find_all(blob, sig)]
    at = draw(st.sampled_from(sigs)) + draw(st.integers(4, 40))
    width = draw(st.sampled_from([2, 4]))
    value = draw(st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 1 << 31]) | st.integers(0, 0xFFFFFFFF))
    if at + width <= len(out):
        out[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    return bytes(out)


def _data_pkl_range(blob: bytes):
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data.pkl"))
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.file_size


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a child of
    pytest (torch loaded) would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs) and return the current RSS, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _find_all(data: bytes, sig: bytes):
    i = data.find(sig)
    while i >= 0:
        yield i
        i = data.find(sig, i + 1)


def main() -> int:
    corpus, examples, out_path = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    metadata = [p.read_bytes() for p in sorted(corpus.glob("*.metadata"))]
    blobs = [p.read_bytes() for p in sorted(corpus.glob("*.blob"))]
    case_path = out_path.with_suffix(".case")
    stats = {"cases": 0, "ok": 0, "errors": 0, "slowest_s": 0.0, "largest_input": 0, "failures": [],
             "peak_rss_bytes": 0, "peak_case": "", "max_case_growth_bytes": 0}
    base_rss = peak_rss_bytes()

    def run(kind: str, data: bytes) -> None:
        case_path.write_bytes(kind.encode() + b"\n" + data)
        before = _reset_peak_rss()
        stats["cases"] += 1
        stats["largest_input"] = max(stats["largest_input"], len(data))
        start = time.perf_counter()
        try:
            if kind == "metadata":
                load_metadata(MemoryReader({".metadata": data}))
            else:
                reader = MemoryReader({"__0_0.distcp": data})
                locate_tensor(reader, BlobLocation("__0_0.distcp", 0, len(data)), fqn="t")
            stats["ok"] += 1
        except StreamconvError:
            stats["errors"] += 1
        except BaseException as exc:  # anything else is a finding
            stats["failures"].append({"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:500],
                                      "input_hex": data[:4096].hex()})
        seconds = time.perf_counter() - start
        stats["slowest_s"] = max(stats["slowest_s"], seconds)
        rss = peak_rss_bytes()
        if rss > stats["peak_rss_bytes"]:
            stats["peak_rss_bytes"], stats["peak_case"] = rss, f"{kind}: {data[:300].hex()}"
        if before is not None:      # what this one case added on top of the process as it was
            stats["max_case_growth_bytes"] = max(stats["max_case_growth_bytes"], rss - before)
        if seconds > MAX_CASE_SECONDS:
            stats["failures"].append({"kind": kind, "error": f"took {seconds:.2f} s", "input_hex": data[:4096].hex()})

    @settings(max_examples=examples, deadline=None, database=None, derandomize=bool(os.environ.get("FUZZ_DERANDOMIZE")),
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def fuzz(data):
        if data.draw(st.booleans()) or not blobs:
            run("metadata", data.draw(mutated_pickle(data.draw(st.sampled_from(metadata)))))
        else:
            run("blob", data.draw(mutated_blob(data.draw(st.sampled_from(blobs)))))

    fuzz()
    stats["base_rss_bytes"] = base_rss
    out_path.write_text(json.dumps(stats))
    case_path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
