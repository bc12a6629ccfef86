"""A small, bounded pickle machine for the two pickles in a DCP checkpoint (used by `safe_pickle.py`).

Why not `pickle.Unpickler` with `find_class`: the allow-list holds, but the C unpickler trusts the stream's
shape. A million-deep tuple used as a dict key crashes CPython (tuple hashing recurses in C), a file of
`]]]]...` allocates ~80 bytes per input byte, a 4-byte length field asks for gigabytes, and the whole file
has to be in memory first. This machine reads the stream block by block and, before building anything,
checks every value against fixed caps and every allocation against a budget proportional to the file's size:

* nesting depth <= MAX_DEPTH; dict keys are strings, ints or stand-in records (never tuples: nothing is
  ever hashed recursively); no sets;
* strings/bytes <= MAX_STRING_BYTES, ints <= MAX_INT_BYTES, open MARKs <= MAX_DEPTH;
* estimated bytes allocated (objects, stack and memo slots) <= `budget_bytes`, so peak memory is bounded
  by the input size whatever its shape;
* only opcodes that describe data, plus GLOBAL/STACK_GLOBAL (resolved by the caller's allow-list), REDUCE
  and NEWOBJ (calling only what the allow-list returned) and BUILD (only on records made by this load).

Everything it refuses raises CheckpointError naming the source and the byte offset. `describe(value)`
formats untrusted values for messages with bounded length and depth.

How it is built, one module a reader can hold at a time: `pickle_machine.py` (`Machine`: the state of one load,
stack, marks, memo, bytes charged, position, and its `run` loop, which fetches each opcode with its fixed-size
argument), `pickle_opcodes.py` (every opcode a small function of the machine, listed with its name and argument size
in `OPCODES`, grouped by family: the memo, scalars, containers, objects, the stack and stream; a byte not in the
table is refused) and `pickle_checks.py` (the caps, the budget's charges, the shared checks and `describe`). This
module is what callers use: `Spec`, `load` and the names they need. Fast paths (`Spec.fast_paths`) enter through the
memo fetch (`pickle_opcodes._get`).
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Optional

from ..errors import CheckpointError, StreamconvError
from .pickle_checks import (BLOCK_BYTES, MAX_DEPTH, MAX_INT_BYTES, MAX_STRING_BYTES, FastPathMiss, Record, Refused,
                            describe)
from .pickle_machine import Input, Machine

__all__ = ["BLOCK_BYTES", "MAX_DEPTH", "MAX_INT_BYTES", "MAX_STRING_BYTES", "FastPathMiss", "Record", "Spec",
           "describe", "load"]


class Spec:
    """What one kind of pickle may contain. Subclasses say how globals, calls and BUILD resolve."""

    what = "pickle"
    charged_bytes = 0       # the estimate of what the finished load allocated (for tests and tuning)
    # Fast paths for the records a known writer repeats by the hundred thousand: {id(object): handler}. When BINGET
    # fetches such an object (a stand-in class), `handler(buf, pos, end, get, overwrites)` may consume whole records
    # that follow it in `buf[pos:end]` without building them, and returns None (nothing matched: the general machine
    # goes on) or (new pos, values to put in place of the fetched object, memo entries the records made, bytes
    # to charge). `get(i)` is memo entry i, or None when absent or elided. The memo entries of consumed records
    # are elided (not stored); a later reference to one raises FastPathMiss. `overwrites` counts the BINPUTs that
    # replaced an entry: while it stays the same, a string `get(i)` returned is still entry i (the machine only
    # ever appends entries, or forgets a tuple or dict it consumed).
    fast_paths: Optional[dict] = None

    def find_class(self, module: str, name: str) -> Any:
        raise NotImplementedError

    def call(self, func: Any, args: tuple) -> Any:
        """REDUCE: `func` came from find_class; raise ValueError/TypeError for arguments torch never writes."""
        raise NotImplementedError

    def build(self, obj: Record, state: Any) -> None:
        raise NotImplementedError

    def persistent_load(self, pid: Any) -> Any:
        raise ValueError(f"unexpected persistent id {describe(pid)}")


def load(spec: Spec, *, source: str, data: Optional[bytes] = None,
         read: Optional[Callable[[int, int], bytes]] = None, size: int = 0, budget_bytes: int) -> Any:
    """Run the pickle in `data` (or `size` bytes streamed through `read`) and return its result."""
    stream = Input(data, read, size if data is None else len(data))
    machine = Machine(spec, stream, budget_bytes)
    try:
        return machine.run()
    except (StreamconvError, FastPathMiss):
        raise
    except Refused as exc:
        raise CheckpointError(f"{source}: malformed or truncated {spec.what} at byte {machine.offset()}: {exc}") from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error,
            UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointError(
            f"{source}: malformed or truncated {spec.what} at byte {machine.offset()} ({type(exc).__name__}: "
            f"{describe(str(exc), 200)}); the file is damaged, was not fully written/copied, or was crafted") from None

