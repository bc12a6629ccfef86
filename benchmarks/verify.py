"""Check converted outputs in bounded memory: a fingerprint per tensor (dtype, shape, CRC-32 of its
bytes, optionally after a dtype cast), read in 16 MiB pieces straight from the safetensors files.

Fingerprints of different outputs can be compared after the outputs are deleted, so the harness
never keeps two full outputs on disk. For checkpoints made by `benchmarks.generate`, the expected
fingerprints are computed from the generator's formula instead (ground truth, no reference run).
`mode="sample"` fingerprints only three 256 Ki-element windows per tensor (start, middle, end).
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

PIECE_BYTES = 16 << 20
WINDOW_ELEMENTS = 1 << 18

ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}


class StoredTensor(NamedTuple):
    path: Path
    dtype: str
    shape: Tuple[int, ...]
    offset: int     # absolute offset of the first byte in `path`
    nbytes: int


Fingerprint = Dict[str, Tuple[str, Tuple[int, ...], int]]   # name -> (dtype, shape, crc32)


def read_safetensors_dir(out_dir: Path) -> Dict[str, StoredTensor]:
    """Every tensor in every *.safetensors file under out_dir (headers only)."""
    tensors: Dict[str, StoredTensor] = {}
    files = sorted(Path(out_dir).rglob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors files in {out_dir}")
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise ValueError(f"{name} is in both {tensors[name].path.name} and {path.name}")
            start, end = info["data_offsets"]
            tensors[name] = StoredTensor(path, ST_DTYPES.get(info["dtype"], info["dtype"]),
                                         tuple(info["shape"]), 8 + n + start, end - start)
    return tensors


def windows(numel: int, mode: str) -> List[Tuple[int, int]]:
    """Element ranges [start, stop) to fingerprint."""
    if mode == "all" or numel <= 3 * WINDOW_ELEMENTS:
        return [(0, numel)]
    mid = numel // 2 - WINDOW_ELEMENTS // 2
    return [(0, WINDOW_ELEMENTS), (mid, mid + WINDOW_ELEMENTS), (numel - WINDOW_ELEMENTS, numel)]


def _cast_bytes(data, src: str, dst: str):
    import torch

    t = torch.frombuffer(data, dtype=getattr(torch, src)).to(getattr(torch, dst))
    return t.view(torch.uint8).numpy()


def fingerprint(out_dir: Path, *, as_dtype: Optional[str] = None, mode: str = "all") -> Fingerprint:
    """Fingerprint of every tensor of an output; `as_dtype` casts floating tensors first (torch's rounding)."""
    result: Fingerprint = {}
    buf = bytearray(PIECE_BYTES)
    handles = {}
    try:
        for name, st in read_safetensors_dir(out_dir).items():
            item = ITEMSIZE[st.dtype]
            cast = as_dtype if as_dtype and as_dtype != st.dtype and st.dtype.startswith(("float", "bfloat")) else None
            f = handles.get(st.path) or handles.setdefault(st.path, open(st.path, "rb"))
            crc = 0
            for lo, hi in windows(st.nbytes // item, mode):
                pos, end = st.offset + lo * item, st.offset + hi * item
                f.seek(pos)
                while pos < end:
                    n = f.readinto(memoryview(buf)[:min(PIECE_BYTES, end - pos)])
                    if n <= 0:
                        raise ValueError(f"{st.path.name}: {name} is truncated")
                    piece = memoryview(buf)[:n]
                    crc = zlib.crc32(_cast_bytes(piece, st.dtype, cast) if cast else piece, crc)
                    pos += n
            result[name] = (cast or st.dtype, st.shape, crc)
    finally:
        for f in handles.values():
            f.close()
    return result


def expected_fingerprint(tensors: Iterable[tuple], dtype: str, mode: str = "all") -> Fingerprint:
    """Fingerprints of generator data; `tensors` are (output name, generator key, shape[, first element]): the
    first element (default 0) is where the output starts in the generator's tensor, e.g. expert e of a grouped
    [E, F, D] tensor starts at e*F*D."""
    import torch

    from .generate import expected_values

    result: Fingerprint = {}
    piece_elems = PIECE_BYTES // ITEMSIZE[dtype]
    buf = torch.empty(piece_elems, dtype=getattr(torch, dtype))
    for name, key, shape, *first in tensors:
        base = first[0] if first else 0
        crc = 0
        for lo, hi in windows(math.prod(shape), mode):
            pos = lo
            while pos < hi:
                n = min(piece_elems, hi - pos)
                vals = expected_values(key, dtype, base + pos, n, out=buf[:n])
                crc = zlib.crc32(vals.view(torch.uint8).numpy(), crc)
                pos += n
        result[name] = (dtype, tuple(shape), crc)
    return result


def compare(expected: Fingerprint, got: Fingerprint, limit: int = 3) -> Tuple[bool, str]:
    """(ok, one-line summary naming the first differences)."""
    missing = [n for n in expected if n not in got]
    extra = [n for n in got if n not in expected]
    meta = [n for n in expected if n in got and expected[n][:2] != got[n][:2]]
    data = [n for n in expected if n in got and expected[n][:2] == got[n][:2] and expected[n][2] != got[n][2]]
    if not (missing or extra or meta or data):
        return True, f"{len(expected)} tensors identical"
    parts = []
    for label, names in (("missing", missing), ("unexpected", extra), ("dtype/shape differ", meta),
                         ("bytes differ", data)):
        if names:
            detail = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            if label == "dtype/shape differ":
                n = names[0]
                detail += f" (expected {expected[n][:2]}, got {got[n][:2]})"
            parts.append(f"{len(names)} {label}: {detail}")
    return False, "; ".join(parts)
