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

How it reads: `_Machine` holds the state of one load (stack, marks, memo, bytes charged, position) and its `run`
loop fetches each opcode with its fixed-size argument; every opcode is a small function of the machine, listed
with its name and argument size in `_OPCODES` (grouped below by family: the memo, scalars, containers, objects,
the stack and stream). A byte not in the table is refused. Fast paths (`Spec.fast_paths`) enter through the
memo fetch (`_get`).
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from sys import getrefcount
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import CheckpointError, StreamconvError

MAX_DEPTH = 64                  # a torch .metadata nests ~8 deep
MAX_STRING_BYTES = 64 * 1024    # tensor names and paths; PATH_MAX is 4096
MAX_INT_BYTES = 16              # LONG1 payload: offsets and sizes fit in 9 bytes
BLOCK_BYTES = 1 << 20           # read size when streaming from a file

_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from
_unpack_f64 = struct.Struct(">d").unpack_from

# Estimated bytes (64-bit CPython 3.9-3.13, with GC headers and growth slack) of what each opcode keeps
# alive, charged against the budget: upper bounds, so that a pickle of any shape stays within it. Stack
# slots are transient and counted live (len(stack) x _STACK_SLOT) instead of charged per push.
_STACK_SLOT = 10    # pointer + depth byte, with the growth slack of the list and the bytearray
_SLOT = 10          # a memo or list slot (pointer + depth byte, with the list's growth slack)
_COPY_SLOT = 9      # one item of the transient copy a MARK-closing opcode takes of the stack (pointer + depth byte)
_INT = 32           # an int that is not one of CPython's cached small ints
_OBJECT = 64        # a str/bytes header, an empty list or dict
_RECORD = 80        # a stand-in record with up to 5 slots, or an object a stand-in function returns
_ITEM = 64          # one dict entry, with the hash table's growth slack


class FastPathMiss(Exception):
    """A fast path elided memo entries (below) that the pickle then refers to: the caller runs the load again with
    the general machine alone. torch's writers never refer back to the objects a fast path consumes."""


class Record:
    """Base of the stand-in classes NEWOBJ may create (without arguments); BUILD may set their state once."""

    __slots__ = ("built",)

    def __init__(self) -> None:
        self.built = False


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


class _Refused(Exception):
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


class _Input:
    """The pickle's bytes, in blocks: all at once (bytes) or read on demand through `read(offset, length)`."""

    def __init__(self, data: Optional[bytes], read: Optional[Callable[[int, int], bytes]], size: int):
        self.read, self.size = read, size
        self.first = data if data is not None else b""
        self.consumed = len(self.first)   # file offset just past what has been handed out

    def more(self, buf: bytes, pos: int, need: int) -> bytes:
        """`buf[pos:]` extended to at least `need` bytes; _Refused when the file ends first."""
        rest = buf[pos:]
        missing = need - len(rest)
        if self.read is None or missing > self.size - self.consumed:
            raise _Refused("truncated: the data ends in the middle of an item (incomplete copy or interrupted save)")
        length = min(max(missing, BLOCK_BYTES), self.size - self.consumed)
        block = self.read(self.consumed, length)
        self.consumed += length
        return rest + block


def load(spec: Spec, *, source: str, data: Optional[bytes] = None,
         read: Optional[Callable[[int, int], bytes]] = None, size: int = 0, budget_bytes: int) -> Any:
    """Run the pickle in `data` (or `size` bytes streamed through `read`) and return its result."""
    stream = _Input(data, read, size if data is None else len(data))
    machine = _Machine(spec, stream, budget_bytes)
    try:
        return machine.run()
    except (StreamconvError, FastPathMiss):
        raise
    except _Refused as exc:
        raise CheckpointError(f"{source}: malformed or truncated {spec.what} at byte {machine.offset()}: {exc}") from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, struct.error,
            UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointError(
            f"{source}: malformed or truncated {spec.what} at byte {machine.offset()} ({type(exc).__name__}: "
            f"{describe(str(exc), 200)}); the file is damaged, was not fully written/copied, or was crafted") from None


class _Holes:
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
        return 3 * _SLOT


class _Stop(Exception):
    """Internal: STOP reached with one value on the stack."""


class _Machine:
    """The state of one load: the stack (each item's nesting depth beside it, in `depth`), the open MARKs, the memo,
    the bytes charged so far and the input position. Each opcode is a function of it (`_OPS`, below); `run` fetches
    an opcode and its fixed-size argument and calls the opcode's function, which may read further (`more`).

    `pos` is published before anything can fail (each function stores it past what it has read), so that an error
    names the byte offset where the machine stopped."""

    __slots__ = ("spec", "stream", "budget", "buf", "pos", "stack", "depth", "marks", "memo", "memo_depth", "holes",
                 "fast", "cost", "overwrites", "fresh", "target")

    def __init__(self, spec: Spec, stream: _Input, budget_bytes: int):
        self.spec, self.stream, self.budget = spec, stream, budget_bytes
        self.buf, self.pos = stream.first, 0
        self.stack: List[Any] = []
        self.depth = bytearray()
        self.marks: List[int] = []
        self.memo: List[Any] = []           # dense: pickle's own writers number memo entries 0, 1, 2...
        self.memo_depth = bytearray()
        self.holes = _Holes()
        self.fast = spec.fast_paths
        self.cost = 0
        self.overwrites = 0                 # BINPUTs that replaced an entry (see Spec.fast_paths)
        self.fresh: Any = None              # the tuple TUPLE1-3 built last: REDUCE may forget it from the memo
        self.target: Any = None             # the container SETITEM(S)/APPEND(S) filled last

    def offset(self) -> int:
        return self.stream.consumed - len(self.buf) + self.pos

    def run(self) -> Any:
        stack, depth, memo, memo_depth = self.stack, self.depth, self.memo, self.memo_depth
        ops, arg_bytes, budget, slot = _OPS, _ARG_BYTES, self.budget, _STACK_SLOT
        try:
            while True:
                if self.cost + slot * len(stack) > budget:
                    raise _Refused(_over_budget(budget))
                buf, pos = self.buf, self.pos
                if pos >= len(buf):
                    buf, pos = self.more(buf, pos, 1)
                op = buf[pos]
                if op == 0x94:      # MEMOIZE, a fifth of the opcodes torch writes: run here, without a call
                    self.pos = pos + 1
                    memo.append(stack[-1])
                    memo_depth.append(depth[-1])
                    self.cost += _SLOT
                    continue
                need = arg_bytes[op]
                if need < 0:
                    raise _Refused(_refused_opcode(op))      # at the offending byte's offset
                pos += 1
                self.pos = pos
                if pos + need > len(buf):
                    buf, pos = self.more(buf, pos, need)
                ops[op](self, buf, pos)
        except _Stop:
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
        (`_COPY_SLOT` each) and the container they go into (`slot_bytes` each) would overrun the budget while the
        stack still holds them: a flood of DUPs closed by one APPENDS holds each reference three times at that
        moment (stack, copy, list)."""
        stack, depth = self.stack, self.depth
        if not self.marks:
            raise _Refused("container opcode without a MARK")
        at = self.marks.pop()
        if self.cost + _STACK_SLOT * len(stack) + (_COPY_SLOT + slot_bytes) * (len(stack) - at) > self.budget:
            raise _Refused(_over_budget(self.budget))
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


# ---------------------------------------------------------------------------------------------------------
# The opcodes. Each is `op(m, buf, pos)`: `pos` is just past the opcode in `buf`, with its fixed-size argument
# (`_ARG_BYTES`) already in the buffer; it stores `m.pos` past whatever it reads.

# -- the memo


def _memoize(m: _Machine, buf: bytes, pos: int) -> None:
    m.memo.append(m.stack[-1])
    m.memo_depth.append(m.depth[-1])
    m.cost += _SLOT


def _binget(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    _get(m, buf, buf[pos])


def _long_binget(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    _get(m, buf, _unpack_u32(buf, pos)[0])


def _get(m: _Machine, buf: bytes, i: int) -> None:
    """Push memo entry i. When it is a class a fast path reads records of (`Spec.fast_paths`), the fast path may
    take the run of records that follows: its values replace the class on the stack, their memo entries are
    elided."""
    at = m.holes.at(i) if m.holes.elided else i
    value = m.memo[at]
    m.stack.append(value)
    m.depth.append(m.memo_depth[at])
    if m.fast is None:
        return
    handler = m.fast.get(id(value))
    if handler is None:
        return
    taken = handler(buf, m.pos, len(buf), m.memo_get, m.overwrites)
    if taken is None:
        return
    m.pos, values, slots, charge = taken
    stack, depth = m.stack, m.depth
    stack[-1] = values[0]
    depth[-1] = 1
    for v in values[1:]:
        stack.append(v)
        depth.append(1)
    m.cost += charge + m.holes.add(len(m.memo), slots)


def _binput(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    _put(m, buf[pos])


def _long_binput(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    _put(m, _unpack_u32(buf, pos)[0])


def _put(m: _Machine, i: int) -> None:
    memo, elided = m.memo, m.holes.elided
    if i < len(memo) + elided:
        at = m.holes.at(i) if elided else i
        memo[at], m.memo_depth[at] = m.stack[-1], m.depth[-1]
        m.overwrites += 1
    elif i == len(memo) + elided:
        memo.append(m.stack[-1])
        m.memo_depth.append(m.depth[-1])
        m.cost += _SLOT
    else:
        raise _Refused(f"memo index {i} skips entries (pickle numbers them 0, 1, 2, ...)")


# -- scalars


def _binint1(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    m.stack.append(buf[pos])
    m.depth.append(0)


def _binint2(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 2
    m.stack.append(_unpack_u16(buf, pos)[0])
    m.depth.append(0)
    m.cost += _INT


def _binint(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    m.stack.append(_unpack_i32(buf, pos)[0])
    m.depth.append(0)
    m.cost += _INT


def _long1(m: _Machine, buf: bytes, pos: int) -> None:
    n = buf[pos]
    m.pos = pos = pos + 1
    if n > MAX_INT_BYTES:
        raise _Refused(f"a {n}-byte integer; checkpoint numbers fit in {MAX_INT_BYTES} bytes")
    if pos + n > len(buf):
        buf, pos = m.more(buf, pos, n)
    m.pos = pos + n
    m.push(int.from_bytes(buf[pos:pos + n], "little", signed=True), 0)
    m.cost += _INT + n


def _binfloat(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 8
    m.push(_unpack_f64(buf, pos)[0], 0)
    m.cost += _INT


def _constant(value: Any) -> Callable[[_Machine, bytes, int], None]:
    def op(m: _Machine, buf: bytes, pos: int) -> None:
        m.push(value, 0)
    return op


def _string(text: bool, width: int, length: Callable[[bytes, int], int]) -> Callable[[_Machine, bytes, int], None]:
    """The opcode of a str (`text`) or bytes of `length(buf, pos)` bytes after a `width`-byte length field."""
    def op(m: _Machine, buf: bytes, pos: int) -> None:
        n = length(buf, pos)
        m.pos = pos = pos + width
        if n > MAX_STRING_BYTES:
            raise _Refused(f"a {n}-byte string; names and paths in a checkpoint are at most {MAX_STRING_BYTES} bytes")
        if pos + n > len(buf):
            buf, pos = m.more(buf, pos, n)
        raw = buf[pos:pos + n]
        m.pos = pos + n
        m.push(str(raw, "utf-8", "surrogatepass") if text else raw, 0)
        m.cost += _OBJECT + (n if raw.isascii() else 16 + 4 * n)
    return op


def _byte(buf: bytes, pos: int) -> int:
    return buf[pos]


def _u32(buf: bytes, pos: int) -> int:
    return _unpack_u32(buf, pos)[0]


def _u64(buf: bytes, pos: int) -> int:
    return _unpack_u64(buf, pos)[0]


# -- containers


def _mark(m: _Machine, buf: bytes, pos: int) -> None:
    if len(m.marks) >= MAX_DEPTH:
        raise _Refused(f"more than {MAX_DEPTH} nested MARKs")
    m.marks.append(len(m.stack))


def _empty(make: Callable[[], Any], charge: int) -> Callable[[_Machine, bytes, int], None]:
    def op(m: _Machine, buf: bytes, pos: int) -> None:
        m.push(make(), 1)
        m.cost += charge
    return op


def _tuple1(m: _Machine, buf: bytes, pos: int) -> None:
    stack = m.stack
    if not stack:
        raise _Refused("tuple opcode on a short stack")
    m.fresh = stack[-1] = (stack[-1],)
    m.depth[-1] = _deeper(m.depth[-1] + 1)
    m.cost += 64


def _tuple_of(n: int) -> Callable[[_Machine, bytes, int], None]:
    """TUPLE2, TUPLE3."""
    def op(m: _Machine, buf: bytes, pos: int) -> None:
        stack, depth = m.stack, m.depth
        if len(stack) < n:
            raise _Refused("tuple opcode on a short stack")
        item = tuple(stack[-n:])
        d = _deeper(max(depth[-n:]) + 1)
        del stack[-n:], depth[-n:]
        m.push(item, d)
        m.fresh = item
        m.cost += 56 + 8 * n
    return op


def _from_mark(make: Callable[[list], Any]) -> Callable[[_Machine, bytes, int], None]:
    """TUPLE, LIST, DICT: a container of the items above the last MARK."""
    def op(m: _Machine, buf: bytes, pos: int) -> None:
        items, d = m.pop_mark(_ITEM)
        d = _deeper(d + 1)
        m.push(make(items), d)
        m.cost += _OBJECT + _ITEM * len(items)
    return op


def _dict_of(items: list) -> dict:
    if len(items) % 2:
        raise _Refused("DICT with an odd number of items")
    out = {}
    for k in range(0, len(items), 2):
        out[_dict_key(items[k])] = items[k + 1]
    return out


def _setitems(m: _Machine, buf: bytes, pos: int) -> None:
    items, d = m.pop_mark(_ITEM // 2)
    _fill_dict(m, items, d)


def _setitem(m: _Machine, buf: bytes, pos: int) -> None:
    stack, depth = m.stack, m.depth
    items, d = stack[-2:], max(depth[-2:], default=0)
    if len(items) != 2:
        raise _Refused("SETITEM on a short stack")
    del stack[-2:], depth[-2:]
    _fill_dict(m, items, d)


def _fill_dict(m: _Machine, items: list, d: int) -> None:
    target = m.target = m.stack[-1]
    if type(target) is not dict or len(items) % 2:
        raise _Refused(f"SETITEM(S) on {describe(target)} with {len(items)} items")
    for k in range(0, len(items), 2):
        target[_dict_key(items[k])] = items[k + 1]
    m.depth[-1] = _deeper(max(m.depth[-1], d + 1))
    m.cost += _ITEM * (len(items) // 2)


def _appends(m: _Machine, buf: bytes, pos: int) -> None:
    items, d = m.pop_mark(_SLOT)
    _extend(m, items, d)


def _append(m: _Machine, buf: bytes, pos: int) -> None:
    if len(m.stack) < 2:
        raise _Refused("APPEND on a short stack")
    _extend(m, [m.stack.pop()], m.depth.pop())


def _extend(m: _Machine, items: list, d: int) -> None:
    target = m.target = m.stack[-1]
    if type(target) is not list:
        raise _Refused(f"APPEND(S) on {describe(target)}")
    target.extend(items)
    m.depth[-1] = _deeper(max(m.depth[-1], d + 1))
    m.cost += _SLOT * len(items)


# -- objects: globals, calls and records, each resolved by the Spec


def _stack_global(m: _Machine, buf: bytes, pos: int) -> None:
    name = m.stack.pop()
    module = m.stack.pop()
    del m.depth[-2:]
    if type(module) is not str or type(name) is not str:
        raise _Refused(f"STACK_GLOBAL of {describe(module)}.{describe(name)}")
    m.push(m.spec.find_class(module, name), 0)


def _global(m: _Machine, buf: bytes, pos: int) -> None:
    """GLOBAL "module\\nname\\n"."""
    module, buf, pos = _line(m.stream, buf, pos)
    name, buf, pos = _line(m.stream, buf, pos)
    m.buf, m.pos = buf, pos
    m.push(m.spec.find_class(module, name), 0)


def _reduce(m: _Machine, buf: bytes, pos: int) -> None:
    stack = m.stack
    args = stack.pop()
    d = m.depth.pop()
    if type(args) is not tuple:
        raise _Refused(f"REDUCE with arguments {describe(args)} (not a tuple)")
    result = m.spec.call(stack[-1], args)
    stack[-1] = result
    m.depth[-1] = _deeper(d + 1)
    if not (args and result is args[0]):     # torch.Size & co hand back their argument
        m.cost += _RECORD
    # Forgotten only when just built by TUPLE1-3 (torch.Size & co), never a tuple fetched from the memo: nothing
    # else holds it (besides `args`, `m.fresh` and getrefcount's argument).
    if args and m.fresh is args and _forget(m.memo, args) and getrefcount(args) == 3:
        m.cost -= 56 + 8 * len(args)


def _newobj(m: _Machine, buf: bytes, pos: int) -> None:
    stack = m.stack
    args = stack.pop()
    m.depth.pop()
    cls = stack[-1]
    if not (isinstance(cls, type) and issubclass(cls, Record)) or type(args) is not tuple or args:
        raise _Refused(f"NEWOBJ of {describe(cls)} with arguments {describe(args)}; only the allow-listed "
                       "checkpoint classes, without arguments, are created")
    stack[-1] = cls()
    m.depth[-1] = 1
    m.cost += _RECORD


def _build(m: _Machine, buf: bytes, pos: int) -> None:
    state = m.stack.pop()
    d = m.depth.pop()
    obj = m.stack[-1]
    if not isinstance(obj, Record) or obj.built:
        raise _Refused(f"BUILD on {describe(obj)}; only a new checkpoint record can be built, once")
    entries = len(state) if type(state) is dict else 0
    m.spec.build(obj, state)
    obj.built = True
    if entries and not state:     # the record took the values and emptied the dict
        m.cost -= _ITEM * entries
        # Refunded only when nothing else holds it (besides `state`, `m.target` and getrefcount's argument).
        if _forget(m.memo, state) and getrefcount(state) == 2 + (m.target is state):
            m.cost -= _OBJECT
    m.depth[-1] = _deeper(d + 1)


def _binpersid(m: _Machine, buf: bytes, pos: int) -> None:
    pid = m.stack.pop()
    m.depth.pop()
    m.push(m.spec.persistent_load(pid), 1)
    m.cost += _RECORD


# -- the stack and the stream


def _pop(m: _Machine, buf: bytes, pos: int) -> None:
    if m.marks and m.marks[-1] == len(m.stack):
        m.marks.pop()
    else:
        m.stack.pop()
        m.depth.pop()


def _pop_mark(m: _Machine, buf: bytes, pos: int) -> None:
    m.pop_mark(0)


def _dup(m: _Machine, buf: bytes, pos: int) -> None:
    m.push(m.stack[-1], m.depth[-1])


def _frame(m: _Machine, buf: bytes, pos: int) -> None:
    m.pos = pos + 8         # a length hint; the stream is read as a whole


def _proto(m: _Machine, buf: bytes, pos: int) -> None:
    if buf[pos] > 5:
        raise _Refused(f"pickle protocol {buf[pos]} (this reader knows 0-5)")
    m.pos = pos + 1


def _stop(m: _Machine, buf: bytes, pos: int) -> None:
    if len(m.stack) != 1 or m.marks:
        raise _Refused(f"STOP with {len(m.stack)} values and {len(m.marks)} MARKs left on the stack")
    raise _Stop


def _dict_key(key: Any) -> Any:
    """`key`, if a checkpoint dict may be keyed by it (SETITEM(S) and DICT both build dicts): a name, a number or
    a record. Anything else (a list, a float NaN) would be unhashable or ambiguous as a key."""
    if not (type(key) is str or type(key) is int or isinstance(key, Record)):
        raise _Refused(f"dict key {describe(key)}: checkpoint dicts are keyed by names, numbers or records only")
    return key


def _over_budget(budget: int) -> str:
    return f"it would allocate more than {budget} bytes, far more than a checkpoint's metadata of this size needs"


def _forget(memo: List[Any], obj: Any) -> bool:
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


def _deeper(d: int) -> int:
    if d > MAX_DEPTH:
        raise _Refused(f"values nested more than {MAX_DEPTH} deep; a checkpoint's metadata nests about 8 deep")
    return d


def _line(stream: _Input, buf: bytes, pos: int) -> Tuple[str, bytes, int]:
    """One newline-terminated ASCII argument (GLOBAL's module and name), at most 256 bytes."""
    while True:
        nl = buf.find(b"\n", pos, pos + 257)
        if nl >= 0:
            return buf[pos:nl].decode("ascii"), buf, nl + 1
        if len(buf) - pos > 256:
            raise _Refused("a GLOBAL name longer than 256 bytes")
        buf, pos = stream.more(buf, pos, len(buf) - pos + 1), 0


# Every opcode this reader runs: (name, bytes of fixed-size argument, function). Variable-length payloads (strings,
# LONG1, GLOBAL lines) are fetched by their function once the length is checked. Every other byte is refused.
_OPCODES: Dict[int, Tuple[str, int, Callable[[_Machine, bytes, int], None]]] = {
    0x94: ("MEMOIZE", 0, _memoize),
    0x68: ("BINGET", 1, _binget),
    0x6A: ("LONG_BINGET", 4, _long_binget),
    0x71: ("BINPUT", 1, _binput),
    0x72: ("LONG_BINPUT", 4, _long_binput),
    0x4B: ("BININT1", 1, _binint1),
    0x4D: ("BININT2", 2, _binint2),
    0x4A: ("BININT", 4, _binint),
    0x8A: ("LONG1", 1, _long1),
    0x47: ("BINFLOAT", 8, _binfloat),
    0x4E: ("NONE", 0, _constant(None)),
    0x88: ("NEWTRUE", 0, _constant(True)),
    0x89: ("NEWFALSE", 0, _constant(False)),
    0x8C: ("SHORT_BINUNICODE", 1, _string(True, 1, _byte)),
    0x58: ("BINUNICODE", 4, _string(True, 4, _u32)),
    0x8D: ("BINUNICODE8", 8, _string(True, 8, _u64)),
    0x43: ("SHORT_BINBYTES", 1, _string(False, 1, _byte)),
    0x42: ("BINBYTES", 4, _string(False, 4, _u32)),
    0x8E: ("BINBYTES8", 8, _string(False, 8, _u64)),
    0x28: ("MARK", 0, _mark),
    0x29: ("EMPTY_TUPLE", 0, _empty(tuple, 0)),
    0x5D: ("EMPTY_LIST", 0, _empty(list, _OBJECT)),
    0x7D: ("EMPTY_DICT", 0, _empty(dict, _OBJECT)),
    0x85: ("TUPLE1", 0, _tuple1),
    0x86: ("TUPLE2", 0, _tuple_of(2)),
    0x87: ("TUPLE3", 0, _tuple_of(3)),
    0x74: ("TUPLE", 0, _from_mark(tuple)),
    0x6C: ("LIST", 0, _from_mark(list)),
    0x64: ("DICT", 0, _from_mark(_dict_of)),
    0x73: ("SETITEM", 0, _setitem),
    0x75: ("SETITEMS", 0, _setitems),
    0x61: ("APPEND", 0, _append),
    0x65: ("APPENDS", 0, _appends),
    0x93: ("STACK_GLOBAL", 0, _stack_global),
    0x63: ("GLOBAL", 0, _global),
    0x52: ("REDUCE", 0, _reduce),
    0x81: ("NEWOBJ", 0, _newobj),
    0x62: ("BUILD", 0, _build),
    0x51: ("BINPERSID", 0, _binpersid),
    0x30: ("POP", 0, _pop),
    0x31: ("POP_MARK", 0, _pop_mark),
    0x32: ("DUP", 0, _dup),
    0x95: ("FRAME", 8, _frame),
    0x80: ("PROTO", 1, _proto),
    0x2E: ("STOP", 0, _stop),
}
# What `_Machine.run` indexes by opcode: -1 / None for a refused byte.
_ARG_BYTES = [-1] * 256
_OPS: List[Optional[Callable[[_Machine, bytes, int], None]]] = [None] * 256
for _op, (_, _n, _fn) in _OPCODES.items():
    _ARG_BYTES[_op], _OPS[_op] = _n, _fn

_REFUSED_NAMES = {
    0x69: "INST", 0x6F: "OBJ", 0x92: "NEWOBJ_EX", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4",
    0x8F: "EMPTY_SET", 0x90: "ADDITEMS", 0x91: "FROZENSET", 0x96: "BYTEARRAY8", 0x97: "NEXT_BUFFER",
    0x98: "READONLY_BUFFER", 0x50: "PERSID", 0x49: "INT", 0x4C: "LONG", 0x46: "FLOAT", 0x53: "STRING",
    0x54: "BINSTRING", 0x55: "SHORT_BINSTRING", 0x56: "UNICODE", 0x67: "GET", 0x70: "PUT",
}


def _refused_opcode(op: int) -> str:
    name = _REFUSED_NAMES.get(op)
    if name is None:
        return f"byte 0x{op:02x} is not a pickle opcode"
    return f"opcode {name}, which torch's checkpoint writers never emit, is not supported"
