"""The bounded pickle machine: the state of one load and its loop (see `unpickle.py` for what it refuses and why).

`Machine` holds the stack, marks, memo, bytes charged and input position; its `run` loop fetches each opcode with
its fixed-size argument and calls the opcode's function (`pickle_opcodes.OPS`). `Input` hands out the pickle's bytes
block by block; `Holes` keeps the memo entries fast paths elided.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable, List, Optional, Tuple

from .pickle_checks import (BLOCK_BYTES, COPY_SLOT, SLOT, STACK_SLOT, FastPathMiss, Refused, Stop, over_budget,
                            refused_opcode)
from .pickle_opcodes import ARG_BYTES, OPS

class Input:
    """The pickle's bytes, in blocks: all at once (bytes) or read on demand through `read(offset, length)`."""

    def __init__(self, data: Optional[bytes], read: Optional[Callable[[int, int], bytes]], size: int):
        self.read, self.size = read, size
        self.first = data if data is not None else b""
        self.consumed = len(self.first)   # file offset just past what has been handed out

    def more(self, buf: bytes, pos: int, need: int) -> bytes:
        """`buf[pos:]` extended to at least `need` bytes; Refused when the file ends first."""
        rest = buf[pos:]
        missing = need - len(rest)
        if self.read is None or missing > self.size - self.consumed:
            raise Refused("truncated: the data ends in the middle of an item (incomplete copy or interrupted save)")
        length = min(max(missing, BLOCK_BYTES), self.size - self.consumed)
        block = self.read(self.consumed, length)
        self.consumed += length
        return rest + block


class Holes:
    """Memo entries a fast path elided (not stored), as runs of memo indices [starts[k], ends[k]); cum[k]: entries
    elided up to the end of run k. Memo index i is then memo[i - entries elided before i]."""

    __slots__ = ("starts", "ends", "cum", "elided")

    def __init__(self) -> None:
        self.starts: List[int] = []
        self.ends: List[int] = []
        self.cum: List[int] = []
        self.elided = 0

    def at(self, i: int) -> int:
        """Position in the memo list of memo index i; FastPathMiss when a fast path consumed entry i."""
        k = bisect_right(self.starts, i) - 1
        if k < 0:
            return i
        if i < self.ends[k]:
            raise FastPathMiss(f"memo entry {i} was consumed by a fast path")
        return i - self.cum[k]

    def add(self, stored: int, slots: int) -> int:
        """`slots` entries elided after the `stored` ones the memo list holds; the bytes to charge for it (a new run
        of indices costs three list slots, extending the last one nothing)."""
        start = stored + self.elided
        self.elided += slots
        if self.ends and self.ends[-1] == start:
            self.ends[-1] += slots
            self.cum[-1] += slots
            return 0
        self.starts.append(start)
        self.ends.append(start + slots)
        self.cum.append(self.elided)
        return 3 * SLOT


class Machine:
    """The state of one load: the stack (each item's nesting depth beside it, in `depth`), the open MARKs, the memo,
    the bytes charged so far and the input position. Each opcode is a function of it (`OPS`, below); `run` fetches
    an opcode and its fixed-size argument and calls the opcode's function, which may read further (`more`).

    `pos` is published before anything can fail (each function stores it past what it has read), so that an error
    names the byte offset where the machine stopped."""

    __slots__ = ("spec", "stream", "budget", "buf", "pos", "stack", "depth", "marks", "memo", "memo_depth", "holes",
                 "fast", "cost", "overwrites", "fresh", "target")

    def __init__(self, spec: Any, stream: Input, budget_bytes: int):     # spec: an `unpickle.Spec`
        self.spec, self.stream, self.budget = spec, stream, budget_bytes
        self.buf, self.pos = stream.first, 0
        self.stack: List[Any] = []
        self.depth = bytearray()
        self.marks: List[int] = []
        self.memo: List[Any] = []           # dense: pickle's own writers number memo entries 0, 1, 2...
        self.memo_depth = bytearray()
        self.holes = Holes()
        self.fast = spec.fast_paths
        self.cost = 0
        self.overwrites = 0                 # BINPUTs that replaced an entry (see Spec.fast_paths)
        self.fresh: Any = None              # the tuple TUPLE1-3 built last: REDUCE may forget it from the memo
        self.target: Any = None             # the container SETITEM(S)/APPEND(S) filled last

    def offset(self) -> int:
        return self.stream.consumed - len(self.buf) + self.pos

    def run(self) -> Any:
        stack, depth, memo, memo_depth = self.stack, self.depth, self.memo, self.memo_depth
        ops, arg_bytes, budget, slot = OPS, ARG_BYTES, self.budget, STACK_SLOT
        try:
            while True:
                if self.cost + slot * len(stack) > budget:
                    raise Refused(over_budget(budget))
                buf, pos = self.buf, self.pos
                if pos >= len(buf):
                    buf, pos = self.more(buf, pos, 1)
                op = buf[pos]
                if op == 0x94:      # MEMOIZE, a fifth of the opcodes torch writes: run here, without a call
                    self.pos = pos + 1
                    memo.append(stack[-1])
                    memo_depth.append(depth[-1])
                    self.cost += SLOT
                    continue
                need = arg_bytes[op]
                if need < 0:
                    raise Refused(refused_opcode(op))      # at the offending byte's offset
                pos += 1
                self.pos = pos
                if pos + need > len(buf):
                    buf, pos = self.more(buf, pos, need)
                ops[op](self, buf, pos)
        except Stop:
            self.spec.charged_bytes = self.cost
            return stack[0]

    def more(self, buf: bytes, pos: int, need: int) -> Tuple[bytes, int]:
        """`buf[pos:]` extended to at least `need` bytes, as the machine's buffer: (the buffer, 0)."""
        self.buf = buf = self.stream.more(buf, pos, need)
        self.pos = 0
        return buf, 0

    def push(self, value: Any, depth: int) -> None:
        self.stack.append(value)
        self.depth.append(depth)

    def pop_mark(self, slot_bytes: int) -> Tuple[list, int]:
        """The items above the last MARK and their greatest depth, refused before they are copied when the copy
        (`COPY_SLOT` each) and the container they go into (`slot_bytes` each) would overrun the budget while the
        stack still holds them: a flood of DUPs closed by one APPENDS holds each reference three times at that
        moment (stack, copy, list)."""
        stack, depth = self.stack, self.depth
        if not self.marks:
            raise Refused("container opcode without a MARK")
        at = self.marks.pop()
        if self.cost + STACK_SLOT * len(stack) + (COPY_SLOT + slot_bytes) * (len(stack) - at) > self.budget:
            raise Refused(over_budget(self.budget))
        items = stack[at:]
        d = max(depth[at:], default=0)
        del stack[at:], depth[at:]
        return items, d

    def memo_get(self, i: int) -> Any:
        """Memo entry i, or None when absent or elided (what fast paths ask)."""
        try:
            at = self.holes.at(i) if self.holes.elided else i
        except FastPathMiss:
            return None
        return self.memo[at] if 0 <= at < len(self.memo) else None
