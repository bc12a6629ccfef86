"""Cast raw little-endian element bytes between floating dtypes, bit-identical to torch 2.13's CPU `Tensor.to`.
(For NaN payloads: when the caller recasts the `torch_scalar_ranges` with path="scalar", as the executor does for
one torch thread; torch's own NaN payloads depend on its thread count.)

numpy only: bfloat16 is arithmetic on uint32 bits, float8 goes through a 256-entry table. Work is done in
chunks of `CHUNK_ELEMS` elements through small scratch arrays, so the only full-size allocation is the output
(none when the caller passes `out`, which may even be the input buffer itself).

What torch 2.13 does on x86 (AVX2 and AVX512 builds; checked bit-for-bit by tests/execution/test_cast.py):

* Values: every cast rounds to nearest, ties to even, overflow goes to inf, subnormals are kept.
  float64 -> bfloat16/float16 rounds TWICE, via float32 (1 + 2**-8 + 2**-30 gives bfloat16 1.0, not 1.0078125).
  bfloat16 <-> float16 goes through float32 (exact), so it rounds once.
* NaNs depend on the conversion and on which of torch's two loops handles the element: the vectorized
  loop (contiguous tensors) or the scalar loop (0-dim tensors, and for two pairs the tail of each thread's
  chunk that does not fill a vector -- see `torch_scalar_ranges`). Strided tensors, which streamconv never
  casts, get the scalar bits too, except float16 -> float32 which keeps the vectorized ones there.

    pair                 vectorized loop                                scalar loop
    f32 -> bf16          0xFFFF (sign and payload dropped)              0x7FC0
    f64 -> bf16          0xFFFF                                         0x7FC0
    f16 -> bf16          0x7FC0                                         0x7FC0
    f32 -> f16           sign | 0x7E00 | f32 mantissa >> 13 (as F16C)   same
    f64, bf16 -> f16     as f32 -> f16 after the cast to float32        same
    f16 -> f32           sign | 0x7FC00000 | mantissa << 13             0x7FFFFFFF
    f64 -> f32           sign | 0x7FC00000 | mantissa >> 29             same
    bf16 -> f32          bits << 16 (signalling NaNs stay signalling)   same
    identity             bytes copied                                   same

  numpy's own float32 -> float16 cast keeps signalling NaNs signalling (0x7C01 where torch gives 0x7E00), and
  numpy's float16 -> float32 cast does not set the quiet bit, so both are patched after the numpy cast.
* float8 sources: float8_e4m3fn NaN -> 0x7FF00000 | sign as float32, 0x7FC0 as bfloat16, 0x7F80 | sign as
  float16; float8_e5m2 behaves like its float16 widening (bits << 8). The same in both loops.
* torch without vector kernels (ATEN_CPU_CAPABILITY=default) gives the same values but other NaN bits
  (scalar-loop NaNs everywhere, no payload in float16); that build is not reproduced.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..dtypes import BY_NAME, CASTABLE, lookup
from ..errors import OptionsError

# Elements per chunk: 64Ki float32 is 256 KiB, so the scratch arrays stay in L2. Measured fastest of 8Ki..256Ki.
CHUNK_ELEMS = 1 << 16

# Destination dtypes and the source dtypes we read; float8 sources only widen.
CAST_TARGETS = CASTABLE
CAST_SOURCES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")

PATHS = ("vector", "scalar")

# Unsigned integer of each item size: the raw element bits, little-endian.
_BITS = {1: np.dtype("u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


def _floats(bits: np.ndarray) -> np.ndarray:
    """The same bytes as floats of the same size AND byte order: '<u4' -> '<f4'. Never `view(np.float32)`,
    which is the host's order and reads little-endian data wrongly on a big-endian host."""
    return bits.view(bits.dtype.str.replace("u", "f"))


class _Scratch:
    """Chunk-sized work arrays, allocated once per `cast_into` call and reused for every chunk."""

    def __init__(self, n: int):
        self.bits = np.empty(n, np.uint32)     # fp32 bit arithmetic
        self.f32 = np.empty(n, np.float32)     # float32 intermediate of two-step casts
        self.nan = np.empty(n, np.bool_)       # NaN mask


# --- kernels: (x, o, scratch) with x, o equal-length arrays of the numpy storage types -------------------

def _f32_to_bf16(x: np.ndarray, o: np.ndarray, s: _Scratch, nan_bits: int) -> None:
    """Round-to-nearest-even on the bits: (x + 0x7FFF + lsb) >> 16, then NaNs get torch's fixed pattern."""
    n = x.shape[0]
    t, m = s.bits[:n], s.nan[:n]
    np.right_shift(x, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(t, 0x7FFF, out=t)
    np.add(t, x, out=t)  # NaNs may wrap around here; they are overwritten below
    np.right_shift(t, 16, out=t)
    np.copyto(o, t, casting="unsafe")
    np.isnan(_floats(x), out=m)
    if m.any():
        np.copyto(o, nan_bits, where=m)


def _f32_to_f16(x: np.ndarray, o: np.ndarray, s: _Scratch) -> None:
    """numpy rounds like torch; only NaNs differ (numpy leaves signalling NaNs signalling)."""
    m = s.nan[:x.shape[0]]
    np.copyto(_floats(o), _floats(x), casting="unsafe")
    np.isnan(_floats(x), out=m)
    if m.any():
        bits = x[m]
        o[m] = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x03FF)


def _f16_to_f32(x: np.ndarray, o: np.ndarray, s: _Scratch, scalar: bool) -> None:
    m = s.nan[:x.shape[0]]
    np.copyto(_floats(o), _floats(x))
    np.isnan(_floats(x), out=m)
    if m.any():
        if scalar:
            np.copyto(o, 0x7FFFFFFF, where=m)
        else:  # vcvtph2ps: sign and payload kept, quiet bit set
            bits = x[m].astype(np.uint32)
            o[m] = (bits << 16 & 0x80000000) | 0x7FC00000 | (bits & 0x3FF) << 13


def _bf16_to_f32(x: np.ndarray, o: np.ndarray, s: _Scratch) -> None:
    np.left_shift(x, 16, out=o, dtype=np.uint32)


def _f64_to_f32(x: np.ndarray, o: np.ndarray, s: _Scratch) -> None:
    np.copyto(_floats(o), _floats(x), casting="unsafe")


def _via_f32(first: Callable, second: Callable) -> Callable:
    """A two-step kernel through the float32 scratch array (exact first steps, or torch's own double rounding)."""
    def kernel(x: np.ndarray, o: np.ndarray, s: _Scratch) -> None:
        f = s.f32[:x.shape[0]].view(np.uint32)
        first(x, f, s)
        second(f, o, s)
    return kernel


def _f16_widen(x: np.ndarray, o: np.ndarray, s: _Scratch) -> None:
    np.copyto(_floats(o), _floats(x))  # NaN bits do not matter: the next step replaces them


def _bf16_nan(bits: int) -> Callable:
    return lambda x, o, s: _f32_to_bf16(x, o, s, bits)


def _f16_f32(scalar: bool) -> Callable:
    return lambda x, o, s: _f16_to_f32(x, o, s, scalar)


# (src, dst) -> (vectorized-loop kernel, scalar-loop kernel)
_KERNELS: Dict[Tuple[str, str], Tuple[Callable, Callable]] = {
    ("float32", "bfloat16"): (_bf16_nan(0xFFFF), _bf16_nan(0x7FC0)),
    ("float64", "bfloat16"): (_via_f32(_f64_to_f32, _bf16_nan(0xFFFF)), _via_f32(_f64_to_f32, _bf16_nan(0x7FC0))),
    ("float16", "bfloat16"): (_via_f32(_f16_widen, _bf16_nan(0x7FC0)),) * 2,
    ("float32", "float16"): (_f32_to_f16,) * 2,
    ("float64", "float16"): (_via_f32(_f64_to_f32, _f32_to_f16),) * 2,
    ("bfloat16", "float16"): (_via_f32(_bf16_to_f32, _f32_to_f16),) * 2,
    ("float16", "float32"): (_f16_f32(False), _f16_f32(True)),
    ("float64", "float32"): (_f64_to_f32,) * 2,
    ("bfloat16", "float32"): (_bf16_to_f32,) * 2,
}


# --- float8: every source byte looked up in a 256-entry table ---------------------------------------------

def _float8_to_f32_bits(src_dtype: str) -> np.ndarray:
    """torch's float32 bit pattern for each of the 256 float8 codes."""
    codes = np.arange(256, dtype=np.uint32)
    if src_dtype == "float8_e5m2":  # the top byte of a float16
        out = np.empty(256, np.uint32)
        _f16_to_f32((codes << 8).astype(np.uint16), out, _Scratch(256), scalar=False)
        return out
    sign = (codes >> 7).astype(np.float32)
    exp = ((codes >> 3) & 0xF).astype(np.int32)
    man = (codes & 7).astype(np.float32)
    # e4m3fn: bias 7, subnormals at exp 0, no infinities, S.1111.111 is NaN.
    value = np.where(exp == 0, man / 8, 1 + man / 8) * np.ldexp(np.float32(1), np.maximum(exp, 1) - 7)
    out = np.where(sign == 1, -value, value).astype(np.float32).view(np.uint32)
    nan = (codes & 0x7F) == 0x7F
    out[nan] = (codes[nan] << 24 & 0x80000000) | 0x7FF00000
    return out


def _float8_table(src_dtype: str, dst_dtype: str) -> np.ndarray:
    f32 = _float8_to_f32_bits(src_dtype)
    if dst_dtype == "float32":
        return f32
    table = np.empty(256, np.uint16)
    if dst_dtype == "bfloat16":
        _f32_to_bf16(f32, table, _Scratch(256), 0x7FC0)
    else:
        _f32_to_f16(f32, table, _Scratch(256))
    return table


# --- public API -------------------------------------------------------------------------------------------

def can_cast(src_dtype: str, dst_dtype: str) -> bool:
    """True if `cast_into` converts src_dtype elements to dst_dtype (identity included)."""
    if src_dtype == dst_dtype:
        return src_dtype in BY_NAME
    return src_dtype in CAST_SOURCES and dst_dtype in CAST_TARGETS


def _check_pair(src_dtype: str, dst_dtype: str) -> None:
    if can_cast(src_dtype, dst_dtype):
        return
    if dst_dtype not in CAST_TARGETS:
        raise OptionsError(f"cannot cast {src_dtype} to {dst_dtype}: casts produce one of {', '.join(CAST_TARGETS)}")
    if src_dtype in BY_NAME and not BY_NAME[src_dtype].is_floating:
        raise OptionsError(f"cannot cast {src_dtype} to {dst_dtype}: only floating tensors are cast; "
                           "leave integer and bool tensors in their own dtype")
    raise OptionsError(f"cannot cast {src_dtype} to {dst_dtype}: supported sources are {', '.join(CAST_SOURCES)}")


def output_nbytes(n_src_bytes: int, src_dtype: str, dst_dtype: str) -> int:
    """Bytes `cast_into` writes for `n_src_bytes` bytes of src_dtype elements."""
    _check_pair(src_dtype, dst_dtype)
    src_size, dst_size = BY_NAME[src_dtype].itemsize, BY_NAME[dst_dtype].itemsize
    if n_src_bytes < 0 or n_src_bytes % src_size:
        raise ValueError(f"{n_src_bytes} bytes is not a whole number of {src_dtype} elements ({src_size} bytes each)")
    return n_src_bytes // src_size * dst_size


def _as_bytes(src: Buffer) -> np.ndarray:
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or not src.flags.c_contiguous:
            raise ValueError(f"src must be a C-contiguous uint8 array, got {src.dtype} "
                             f"{'contiguous' if src.flags.c_contiguous else 'strided'}; use .view(np.uint8)")
        return src.reshape(-1)
    return np.frombuffer(memoryview(src).cast("B"), dtype=np.uint8)


def _out_bytes(out: Optional[np.ndarray], nbytes: int) -> np.ndarray:
    if out is None:
        return np.empty(nbytes, np.uint8)
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or not out.flags.c_contiguous \
            or not out.flags.writeable:
        raise ValueError("out must be a writable C-contiguous uint8 numpy array")
    if out.size < nbytes:
        raise ValueError(f"out holds {out.size} bytes but the cast writes {nbytes}; pass a buffer of "
                         "output_nbytes(...) bytes or more")
    return out.reshape(-1)[:nbytes]


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def cast_into(src: Buffer, src_dtype: str, dst_dtype: str, out: Optional[np.ndarray] = None, *,
              path: str = "vector") -> np.ndarray:
    """Cast the little-endian src_dtype elements in `src` to dst_dtype; return a uint8 view of the result.

    Bits match `torch.Tensor.to(dst_dtype)` on CPU in torch 2.13. `path` picks which of torch's loops to
    imitate; it only changes NaN bit patterns (see the module docstring): "vector" is what contiguous tensors
    get, "scalar" is what 0-dim tensors and the ranges from `torch_scalar_ranges` get.

    `out`, if given, is a writable C-contiguous uint8 array of at least `output_nbytes(...)` bytes; the result
    is its first output_nbytes bytes. It may be the src buffer itself (same start address): the cast then runs
    in place, front to back when narrowing and back to front when widening. Otherwise no allocation is larger
    than `CHUNK_ELEMS` elements besides the output.

    Raises OptionsError for a pair that cannot be cast, ValueError for a bad buffer.
    """
    _check_pair(src_dtype, dst_dtype)
    if path not in PATHS:
        raise ValueError(f"path {path!r} is not one of {', '.join(PATHS)}")
    x8 = _as_bytes(src)
    o8 = _out_bytes(out, output_nbytes(x8.size, src_dtype, dst_dtype))
    aliased = x8.size > 0 and np.may_share_memory(x8, o8)
    if aliased and _address(x8) != _address(o8):
        raise ValueError("out overlaps src at a different start address; pass separate buffers or src itself")
    if src_dtype == dst_dtype:
        if not aliased:
            np.copyto(o8, x8)
        return o8

    src_t, dst_t = lookup(src_dtype), lookup(dst_dtype)
    x = x8.view(_BITS[src_t.itemsize])  # kernels work on raw bits and view them as floats where numpy can
    o = o8.view(_BITS[dst_t.itemsize])
    n = x.shape[0]
    if src_dtype.startswith("float8"):
        kernel = _table_kernel(_float8_table(src_dtype, dst_dtype))
    else:
        kernel = _KERNELS[(src_dtype, dst_dtype)][PATHS.index(path)]

    scratch = _Scratch(min(n, CHUNK_ELEMS))
    staged = np.empty(min(n, CHUNK_ELEMS), x.dtype) if aliased else None
    starts = range(0, n, CHUNK_ELEMS)
    if aliased and dst_t.itemsize > src_t.itemsize:
        starts = reversed(starts)  # a widening chunk overwrites the source of later chunks, so do those first
    with np.errstate(all="ignore"):  # overflow to inf and NaN casts are expected, not warnings
        for i in starts:
            j = min(i + CHUNK_ELEMS, n)
            xc = x[i:j]
            if staged is not None:  # in place: read the whole chunk before writing any of its output
                xc = staged[:j - i]
                np.copyto(xc, x[i:j])
            kernel(xc, o[i:j], scratch)
    return o8


def _table_kernel(table: np.ndarray) -> Callable:
    return lambda x, o, s: np.take(table, x, out=o)


# --- where torch takes its scalar loop --------------------------------------------------------------------

# at::internal::GRAIN_SIZE: tensors up to this many elements are converted by one thread.
TORCH_GRAIN_SIZE = 32768
# Pairs whose vectorized loop leaves the remainder of each thread's chunk to the scalar loop, and the
# block sizes that loop handles (float16 -> float32 also converts one half-width vector of 8).
_VECTOR_TAILS: Dict[Tuple[str, str], Tuple[int, ...]] = {
    ("float64", "bfloat16"): (16,),
    ("float16", "float32"): (16, 8),
}
# Pairs whose 0-dim result comes from the scalar loop and differs from the vectorized one.
_SCALAR_WHEN_0DIM = {("float32", "bfloat16"), ("float64", "bfloat16"), ("float16", "float32")}


def torch_scalar_ranges(shape: Sequence[int], src_dtype: str, dst_dtype: str, *,
                        num_threads: int) -> List[Tuple[int, int]]:
    """Element ranges [start, stop) of a contiguous tensor that torch 2.13 converts with its scalar loop.

    Only NaN bits differ between the loops, and only for the pairs in the module docstring's table. Cast
    these ranges with `path="scalar"` and everything else with `path="vector"` to reproduce
    `tensor.to(dst_dtype)` exactly, for a torch that runs with `num_threads` intra-op threads
    (`torch.get_num_threads()`): torch splits tensors larger than TORCH_GRAIN_SIZE elements into
    min(num_threads, ceil(numel / TORCH_GRAIN_SIZE)) equal chunks, and each chunk has its own tail.
    """
    _check_pair(src_dtype, dst_dtype)
    pair = (src_dtype, dst_dtype)
    if len(shape) == 0:
        return [(0, 1)] if pair in _SCALAR_WHEN_0DIM else []
    numel = int(np.prod(shape, dtype=np.int64))
    if pair not in _VECTOR_TAILS or numel == 0:
        return []
    chunks = 1 if num_threads <= 1 or numel <= TORCH_GRAIN_SIZE else min(num_threads, -(-numel // TORCH_GRAIN_SIZE))
    chunk = -(-numel // chunks)
    ranges = []
    for begin in range(0, numel, chunk):
        end = min(begin + chunk, numel)
        vectorized = 0
        for width in _VECTOR_TAILS[pair]:
            vectorized += (end - begin - vectorized) // width * width
        if begin + vectorized < end:
            ranges.append((begin + vectorized, end))
    return ranges
