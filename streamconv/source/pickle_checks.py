"""The bounded pickle machine's limits, budget charges and checks, and `describe` (see `unpickle.py`).

The caps a value must stay within before anything is built, the estimated bytes each opcode keeps alive (charged
against the load's budget), the checks the opcodes share (nesting depth, dict keys, refused opcodes) and a bounded
rendering of untrusted values for messages.
"""
from __future__ import annotations

from typing import Any, List

MAX_DEPTH = 64                  # a torch .metadata nests ~8 deep
MAX_STRING_BYTES = 64 * 1024    # tensor names and paths; PATH_MAX is 4096
MAX_INT_BYTES = 16              # LONG1 payload: offsets and sizes fit in 9 bytes
BLOCK_BYTES = 1 << 20           # read size when streaming from a file
# Estimated bytes (64-bit CPython 3.9-3.13, with GC headers and growth slack) of what each opcode keeps
# alive, charged against the budget: upper bounds, so that a pickle of any shape stays within it. Stack
# slots are transient and counted live (len(stack) x STACK_SLOT) instead of charged per push.
STACK_SLOT = 10    # pointer + depth byte, with the growth slack of the list and the bytearray
SLOT = 10          # a memo or list slot (pointer + depth byte, with the list's growth slack)
COPY_SLOT = 9      # one item of the transient copy a MARK-closing opcode takes of the stack (pointer + depth byte)
INT = 32           # an int that is not one of CPython's cached small ints
OBJECT = 64        # a str/bytes header, an empty list or dict
RECORD = 80        # a stand-in record with up to 5 slots, or an object a stand-in function returns
ITEM = 64          # one dict entry, with the hash table's growth slack


class FastPathMiss(Exception):
    """A fast path elided memo entries (below) that the pickle then refers to: the caller runs the load again with
    the general machine alone. torch's writers never refer back to the objects a fast path consumes."""


class Record:
    """Base of the stand-in classes NEWOBJ may create (without arguments); BUILD may set their state once."""

    __slots__ = ("built",)

    def __init__(self) -> None:
        self.built = False


class Refused(Exception):
    """Internal: turned into CheckpointError with the source and the byte offset."""


def describe(value: Any, limit: int = 120) -> str:
    """A bounded, recursion-free rendering of an untrusted value: at most `limit` characters, 3 levels, 8 items."""
    text = _describe(value, 3)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe(value: Any, depth: int) -> str:
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (tuple, list, dict)):
        if depth == 0:
            return f"<{type(value).__name__} of {len(value)}>"
        if isinstance(value, dict):
            items = [f"{_describe(k, depth - 1)}: {_describe(v, depth - 1)}" for k, v in list(value.items())[:8]]
            open_, close = "{", "}"
        else:
            items = [_describe(v, depth - 1) for v in value[:8]]
            open_, close = ("(", ")") if isinstance(value, tuple) else ("[", "]")
        if len(value) > 8:
            items.append(f"... {len(value) - 8} more")
        return open_ + ", ".join(items) + close
    return f"<{type(value).__name__}>"


class Stop(Exception):
    """Internal: STOP reached with one value on the stack."""


def dict_key(key: Any) -> Any:
    """`key`, if a checkpoint dict may be keyed by it (SETITEM(S) and DICT both build dicts): a name, a number or
    a record. Anything else (a list, a float NaN) would be unhashable or ambiguous as a key."""
    if not (type(key) is str or type(key) is int or isinstance(key, Record)):
        raise Refused(f"dict key {describe(key)}: checkpoint dicts are keyed by names, numbers or records only")
    return key


def over_budget(budget: int) -> str:
    return f"it would allocate more than {budget} bytes, far more than a checkpoint's metadata of this size needs"


def forget(memo: List[Any], obj: Any) -> bool:
    """Drop a just-consumed REDUCE argument tuple or BUILD state dict from the last few memo entries.

    Python's pickler memoizes both although it never refers to them again (they are made fresh for each
    object), so they would stay alive until the load ends: a third of a large .metadata's memory. A
    crafted pickle that does refer to one gets None.
    """
    for i in range(len(memo) - 1, max(len(memo) - 17, -1), -1):
        if memo[i] is obj:
            memo[i] = None
            return True
    return False


def deeper(d: int) -> int:
    if d > MAX_DEPTH:
        raise Refused(f"values nested more than {MAX_DEPTH} deep; a checkpoint's metadata nests about 8 deep")
    return d


REFUSED_NAMES = {
    0x69: "INST", 0x6F: "OBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER", 0x50: "PERSID", 0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING",
    0x54: "BINSTRING", 0x55: "SHORT_BINSTRING", 0x56: "UNICODE", 0x67: "GET", 0x70: "PUT",
}


def refused_opcode(op: int) -> str:
    name = REFUSED_NAMES.get(op)
    if name is None:
        return f"byte 0x{op:02x} is not a pickle opcode"
    return f"opcode {name}, which torch's checkpoint writers never emit, is not supported"
