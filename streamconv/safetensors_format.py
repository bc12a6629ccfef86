"""The safetensors file format, in one place: how `plan` builds a header and how `verify` reads one back.

A file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section:

    {"__metadata__": {"format": "pt"}, "name": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}, ...}

`data_offsets` count from the data section's start. The reading rules are the ones the safetensors library
enforces when it opens a file (`SafeTensors::read_metadata` / `Metadata::validate` in its Rust crate), so an
output `verify` approves is one transformers can load without the safetensors package being here:

* N is at most MAX_HEADER_BYTES and the header lies inside the file;
* the header is UTF-8, starts with '{', and is one JSON object (trailing spaces are padding);
* no name appears twice (the library would keep one silently; we refuse, as it does for its own writes);
* `__metadata__`, when present, maps strings to strings;
* every entry has a known `dtype`, a `shape` of non-negative ints and two `data_offsets`, whose
  distance is exactly the bytes dtype x shape hold;
* sorted by offset, the entries tile the data section from 0 with no gap or overlap, and end where the file
  ends (the last check is the caller's, which words a truncated file its own way).

Nothing here opens a file: callers read the bytes (`verification.py`) and decide what a problem means.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

# safetensors readers refuse a longer header (MAX_HEADER_SIZE in the safetensors crate).
MAX_HEADER_BYTES = 100_000_000
LENGTH = struct.Struct("<Q")            # the header length before the JSON
METADATA_KEY = "__metadata__"
ALIGN_BYTES = 8                         # the data section starts 8-byte aligned, as safetensors pads
# What streamconv writes in every header; transformers 4.x refuses to load a file whose `format` is not "pt".
WRITTEN_METADATA: Dict[str, str] = {"format": "pt"}

# Every dtype code the safetensors library knows, with its size in bits (F4/F6 pack several per byte).
DTYPE_BITS: Dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
_SHOWN = 120            # characters of an untrusted value shown in a problem


def build_header(tensors: Sequence[Tuple[str, str, Sequence[int], int, int]]) -> bytes:
    """The 8-byte length and JSON header for (name, safetensors dtype code, shape, begin, end), offsets
    relative to the data section, padded with spaces so the data starts 8-byte aligned."""
    body: Dict[str, Any] = {METADATA_KEY: dict(WRITTEN_METADATA)}
    for name, code, shape, begin, end in tensors:
        body[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(body, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(LENGTH.size + len(text)) % ALIGN_BYTES)
    return LENGTH.pack(len(text)) + text


@dataclass(frozen=True)
class Entry:
    """One tensor of a header; begin/end count from the data section's start."""

    name: str
    dtype: str              # safetensors code, e.g. "BF16"
    shape: Tuple[int, ...]
    begin: int
    end: int


@dataclass
class Header:
    """What a header says, and every way it breaks the rules above (empty when the file would load)."""

    length: int                                     # N: JSON bytes after the 8-byte length
    metadata: Optional[Dict[str, Any]] = None       # `__metadata__` as found (None: absent or unreadable)
    entries: List[Entry] = field(default_factory=list)     # well-formed entries, in offset order
    problems: List[str] = field(default_factory=list)
    data_end: int = 0                               # where the entries end, relative to the data section
    is_object: bool = False                         # the JSON parsed as an object (metadata can be judged)

    @property
    def data_start(self) -> int:
        return LENGTH.size + self.length


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def header_length(first: bytes, file_bytes: int) -> Tuple[int, Optional[str]]:
    """(N, problem) from the first 8 bytes of a file (or of a blob: `file_bytes` counts from its start); the
    problem, when there is one, means nothing else can be read: the file is too short, or N is over the limit
    or past the end of the file."""
    if len(first) < LENGTH.size:
        return 0, f"only {len(first)} bytes long: not a safetensors file (it starts with an 8-byte header length)"
    (n,) = LENGTH.unpack(first[:LENGTH.size])
    if n > MAX_HEADER_BYTES:
        return n, f"header length {n:,} is over the safetensors limit of {MAX_HEADER_BYTES:,} bytes readers accept"
    if LENGTH.size + n > file_bytes:
        return n, f"header length {n:,} runs past the end of the file ({file_bytes:,} bytes): truncated"
    return n, None


def decode_body(text: bytes) -> Dict[str, Any]:
    """The header's JSON object (the N bytes after the length): UTF-8, starting with '{', valid JSON, no name
    twice. ValueError naming the first rule broken."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"header is not UTF-8 (byte {exc.start})") from None
    if not decoded.startswith("{"):
        raise ValueError(f"header does not start with '{{' (found {shown(decoded[:8])})")
    try:
        body = json.loads(decoded, object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"header is not valid JSON: {shown(str(exc))}") from None
    if not isinstance(body, dict):    # unreachable after '{' and a full parse, kept as the rule's statement
        raise ValueError(f"header is a JSON {type(body).__name__}, not an object")
    return body


def pop_metadata(body: Dict[str, Any]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """(`__metadata__` as found, problem) taken out of a decoded header; None when absent. The problem, when
    there is one, says it is not a map of strings to strings."""
    if METADATA_KEY not in body:
        return None, None
    metadata = body.pop(METADATA_KEY)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        return metadata, f"{METADATA_KEY} is not a map of strings to strings: {shown(metadata)}"
    return metadata, None


def unique_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """`object_pairs_hook` for json.loads: a repeated key is refused (json.loads would keep the last silently)."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {shown(key)} appears twice")
        out[key] = value
    return out


def _nonnegative_ints(value: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(value, list) and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    return None


def read_entry(name: str, info: Any) -> Tuple[Optional[Entry], Optional[str]]:
    where = f"tensor {shown(name)}"
    if not isinstance(info, dict) or not _ENTRY_KEYS <= set(info):
        keys = sorted(info) if isinstance(info, dict) else type(info).__name__
        return None, f"{where}: header entry needs dtype, shape and data_offsets (found {shown(keys)})"
    code, shape, offsets = info["dtype"], _nonnegative_ints(info["shape"]), _nonnegative_ints(info["data_offsets"])
    if not isinstance(code, str) or code not in DTYPE_BITS:
        return None, f"{where}: dtype {shown(code)} is not a safetensors dtype ({', '.join(DTYPE_BITS)})"
    if shape is None:
        return None, f"{where}: shape {shown(info['shape'])} is not a list of non-negative ints"
    if offsets is None or len(offsets) != 2 or offsets[0] > offsets[1]:
        return None, f"{where}: data_offsets {shown(info['data_offsets'])} are not [begin, end] with begin <= end"
    bits = DTYPE_BITS[code]
    for d in shape:
        bits *= d
    if bits % 8:
        return None, f"{where}: {code} {list(shape)} is not a whole number of bytes"
    begin, end = offsets
    if end - begin != bits // 8:
        return None, (f"{where}: data_offsets [{begin}, {end}) hold {end - begin} bytes; {code} {list(shape)} "
                      f"needs {bits // 8}")
    return Entry(name, code, shape, begin, end), None


def parse_header(text: bytes) -> Header:
    """Check a header's JSON (the N bytes after the length) against the rules in this module's docstring.

    Never raises for bad input: every problem is a sentence in `problems`, and the entries that are well
    formed on their own are kept, so a caller can still compare them and say which tensor is affected."""
    header = Header(length=len(text))
    try:
        body = decode_body(text)
    except ValueError as exc:
        header.problems.append(str(exc))
        return header
    header.is_object = True
    header.metadata, problem = pop_metadata(body)
    if problem:
        header.problems.append(problem)
    for name, info in body.items():
        entry, problem = read_entry(name, info)
        if problem:
            header.problems.append(problem)
        else:
            header.entries.append(entry)
    header.entries.sort(key=lambda e: (e.begin, e.end))
    position = 0
    for entry in header.entries:
        if entry.begin != position:
            what = "a gap" if entry.begin > position else "an overlap"
            header.problems.append(f"tensor {shown(entry.name)}: data_offsets [{entry.begin}, {entry.end}) leave "
                                   f"{what} after byte {position} of the data section")
        position = max(position, entry.end)
    header.data_end = position
    return header
