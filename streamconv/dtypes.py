"""dtype facts in one table: torch name <-> safetensors code, item size, whether it is floating.

Names are torch's without the `torch.` prefix. Bytes are copied raw; only `cast.py` does arithmetic (numpy has
no bfloat16/float8, so it works on the raw bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from .errors import CheckpointError, OptionsError


@dataclass(frozen=True)
class DType:
    name: str            # torch name: "bfloat16"
    safetensors: str     # safetensors header code: "BF16"
    itemsize: int        # bytes per element
    is_floating: bool


_TABLE = [
    DType("float64", "F64", 8, True),
    DType("float32", "F32", 4, True),
    DType("float16", "F16", 2, True),
    DType("bfloat16", "BF16", 2, True),
    DType("float8_e4m3fn", "F8_E4M3", 1, True),
    DType("float8_e5m2", "F8_E5M2", 1, True),
    DType("int64", "I64", 8, False),
    DType("int32", "I32", 4, False),
    DType("int16", "I16", 2, False),
    DType("int8", "I8", 1, False),
    DType("uint64", "U64", 8, False),
    DType("uint32", "U32", 4, False),
    DType("uint16", "U16", 2, False),
    DType("uint8", "U8", 1, False),
    DType("bool", "BOOL", 1, False),
    DType("complex64", "C64", 8, False),
]

BY_NAME: Dict[str, DType] = {d.name: d for d in _TABLE}

# Legacy typed-storage class names found in torch.save's data.pkl (`torch.FloatStorage` ...).
STORAGE_CLASS_TO_NAME: Dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
}

# Output dtypes a user may ask for with --dtype (besides "keep" and "auto").
CASTABLE = ("bfloat16", "float16", "float32")


def lookup(name: str, *, where: str = "") -> DType:
    """The DType for a torch dtype name; CheckpointError naming `where` if streamconv cannot carry it."""
    try:
        return BY_NAME[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise CheckpointError(
            f"{prefix}dtype {name!r} is not supported; supported: {', '.join(sorted(BY_NAME))}") from None


def parse_output_dtype(value: str) -> str:
    """Validate a --dtype value: keep, auto, or one of CASTABLE (a `torch.` prefix is accepted)."""
    v = value.strip().lower()
    if v.startswith("torch."):
        v = v[len("torch."):]
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    v = aliases.get(v, v)
    if v in ("keep", "auto") or v in CASTABLE:
        return v
    raise OptionsError(f"--dtype {value!r} is not supported; use one of keep, auto, {', '.join(CASTABLE)}")
