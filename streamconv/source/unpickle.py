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
"""
from __future__ import annotations

import struct
from bisect import bisect_right
from sys import getrefcount
from typing import Any, Callable, List, Optional, Tuple

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


class _Machine:
    def __init__(self, spec: Spec, stream: _Input, budget_bytes: int):
        self.spec, self.stream, self.budget = spec, stream, budget_bytes
        self.buf, self.pos = stream.first, 0

    def offset(self) -> int:
        return self.stream.consumed - len(self.buf) + self.pos

    def run(self) -> Any:  # noqa: C901 - one flat dispatch loop is the fast way to do this in Python
        spec, stream = self.spec, self.stream
        stack: List[Any] = []
        depth = bytearray()                   # nesting depth of each stack item (0 for scalars)
        marks: List[int] = []
        memo: List[Any] = []                  # dense: pickle's own writers number memo entries 0, 1, 2...
        memo_depth = bytearray()
        # Memo entries a fast path elided, as runs of memo indices [hole_starts[k], hole_ends[k]); hole_cum[k]:
        # entries elided up to the end of run k. Memo index i is then memo[i - elided before i].
        hole_starts: List[int] = []
        hole_ends: List[int] = []
        hole_cum: List[int] = []
        elided = 0
        overwrites = 0
        fast = spec.fast_paths

        def memo_at(i: int) -> int:
            """Position in `memo` of memo index i (when some entries were elided); FastPathMiss inside a run."""
            k = bisect_right(hole_starts, i) - 1
            if k < 0:
                return i
            if i < hole_ends[k]:
                raise FastPathMiss(f"memo entry {i} was consumed by a fast path")
            return i - hole_cum[k]

        def get(i: int) -> Any:
            try:
                at = memo_at(i) if elided else i
            except FastPathMiss:
                return None
            return memo[at] if 0 <= at < len(memo) else None
        push, dpush = stack.append, depth.append
        cost, budget = 0, self.budget
        buf, pos = self.buf, 0
        end = len(buf)

        def pop_mark(cost: int, slot_bytes: int) -> Tuple[list, int]:
            """The items above the last MARK and their greatest depth, refused before they are copied when the
            copy (`_COPY_SLOT` each) and the container they go into (`slot_bytes` each) would overrun the budget
            while the stack still holds them: a flood of DUPs closed by one APPENDS holds each reference three
            times at that moment (stack, copy, list)."""
            if not marks:
                raise _Refused("container opcode without a MARK")
            at = marks.pop()
            if cost + _STACK_SLOT * len(stack) + (_COPY_SLOT + slot_bytes) * (len(stack) - at) > budget:
                raise _Refused(_over_budget(budget))
            items = stack[at:]
            d = max(depth[at:], default=0)
            del stack[at:], depth[at:]
            return items, d

        target = item = None
        try:
            while True:
                if cost + _STACK_SLOT * len(stack) > budget:
                    raise _Refused(_over_budget(budget))
                if pos >= end:
                    buf, pos = stream.more(buf, pos, 1), 0
                    end = len(buf)
                op = buf[pos]
                pos += 1
                # Fixed-size arguments: make sure they are in the buffer (at most 9 bytes).
                need = _ARG_BYTES[op]
                if need < 0:
                    pos -= 1                # the error names the offending byte's offset
                    raise _Refused(_refused_opcode(op))
                if pos + need > end:
                    buf, pos = stream.more(buf, pos, need), 0
                    end = len(buf)

                if op == 0x94:                                    # MEMOIZE
                    memo.append(stack[-1])
                    memo_depth.append(depth[-1])
                    cost += _SLOT
                elif op == 0x6A or op == 0x68:                    # LONG_BINGET, BINGET
                    if op == 0x6A:
                        i = _unpack_u32(buf, pos)[0]
                        pos += 4
                    else:
                        i = buf[pos]
                        pos += 1
                    if elided:
                        i = memo_at(i)
                    value = memo[i]
                    push(value)
                    dpush(memo_depth[i])
                    if fast is not None:
                        handler = fast.get(id(value))
                        if handler is not None:
                            taken = handler(buf, pos, end, get, overwrites)
                            if taken is not None:
                                pos, values, slots, charge = taken
                                stack[-1] = values[0]
                                depth[-1] = 1
                                for v in values[1:]:
                                    push(v)
                                    dpush(1)
                                start = len(memo) + elided
                                if hole_ends and hole_ends[-1] == start:
                                    hole_ends[-1] += slots
                                    hole_cum[-1] += slots
                                else:
                                    hole_starts.append(start)
                                    hole_ends.append(start + slots)
                                    hole_cum.append(elided + slots)
                                    cost += 3 * _SLOT
                                elided += slots
                                cost += charge
                elif op == 0x4D:                                  # BININT2
                    push(_unpack_u16(buf, pos)[0])
                    dpush(0)
                    pos += 2
                    cost += _INT
                elif op == 0x4B:                                  # BININT1
                    push(buf[pos])
                    dpush(0)
                    pos += 1
                elif op == 0x28:                                  # MARK
                    if len(marks) >= MAX_DEPTH:
                        raise _Refused(f"more than {MAX_DEPTH} nested MARKs")
                    marks.append(len(stack))
                elif op == 0x29:                                  # EMPTY_TUPLE
                    push(())
                    dpush(1)
                elif op == 0x81:                                  # NEWOBJ
                    args = stack.pop()
                    depth.pop()
                    cls = stack[-1]
                    if not (isinstance(cls, type) and issubclass(cls, Record)) or type(args) is not tuple or args:
                        raise _Refused(f"NEWOBJ of {describe(cls)} with arguments {describe(args)}; only the "
                                       "allow-listed checkpoint classes, without arguments, are created")
                    stack[-1] = cls()
                    depth[-1] = 1
                    cost += _RECORD
                elif op == 0x62:                                  # BUILD
                    state = stack.pop()
                    d = depth.pop()
                    obj = stack[-1]
                    if not isinstance(obj, Record) or obj.built:
                        raise _Refused(f"BUILD on {describe(obj)}; only a new checkpoint record can be built, once")
                    entries = len(state) if type(state) is dict else 0
                    spec.build(obj, state)
                    obj.built = True
                    if entries and not state:     # the record took the values and emptied the dict
                        cost -= _ITEM * entries
                        # Refunded only when nothing else holds it (besides our locals and getrefcount's argument).
                        if _forget(memo, state) and getrefcount(state) == 2 + (target is state):
                            cost -= _OBJECT
                    depth[-1] = _deeper(d + 1)
                elif op == 0x86 or op == 0x85 or op == 0x87:      # TUPLE2, TUPLE1, TUPLE3
                    n = op - 0x84
                    if len(stack) < n:
                        raise _Refused("tuple opcode on a short stack")
                    item = tuple(stack[-n:])
                    d = _deeper(max(depth[-n:]) + 1)
                    del stack[-n:], depth[-n:]
                    push(item)
                    dpush(d)
                    cost += 56 + 8 * n
                elif op == 0x75 or op == 0x73:                    # SETITEMS, SETITEM
                    if op == 0x75:
                        items, d = pop_mark(cost, _ITEM // 2)
                    else:
                        items, d = stack[-2:], max(depth[-2:], default=0)
                        if len(items) != 2:
                            raise _Refused("SETITEM on a short stack")
                        del stack[-2:], depth[-2:]
                    target = stack[-1]
                    if type(target) is not dict or len(items) % 2:
                        raise _Refused(f"SETITEM(S) on {describe(target)} with {len(items)} items")
                    for k in range(0, len(items), 2):
                        target[_dict_key(items[k])] = items[k + 1]
                    depth[-1] = _deeper(max(depth[-1], d + 1))
                    cost += _ITEM * (len(items) // 2)
                elif op == 0x7D:                                  # EMPTY_DICT
                    push({})
                    dpush(1)
                    cost += _OBJECT
                elif op == 0x52:                                  # REDUCE
                    args = stack.pop()
                    d = depth.pop()
                    if type(args) is not tuple:
                        raise _Refused(f"REDUCE with arguments {describe(args)} (not a tuple)")
                    result = spec.call(stack[-1], args)
                    stack[-1] = result
                    depth[-1] = _deeper(d + 1)
                    if not (args and result is args[0]):     # torch.Size & co hand back their argument
                        cost += _RECORD
                    # Forgotten only when just built by TUPLE1-3 (torch.Size & co), never a tuple fetched from the memo.
                    if args and item is args and _forget(memo, args) and getrefcount(args) == 3:
                        cost -= 56 + 8 * len(args)
                elif op == 0x4A:                                  # BININT
                    push(_unpack_i32(buf, pos)[0])
                    dpush(0)
                    pos += 4
                    cost += _INT
                elif op == 0x8C or op == 0x58 or op == 0x8D or op == 0x43 or op == 0x42 or op == 0x8E:
                    # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8, SHORT_BINBYTES, BINBYTES, BINBYTES8
                    if op == 0x8C or op == 0x43:
                        n = buf[pos]
                    elif op == 0x58 or op == 0x42:
                        n = _unpack_u32(buf, pos)[0]
                    else:
                        n = _unpack_u64(buf, pos)[0]
                    pos += need
                    if n > MAX_STRING_BYTES:
                        raise _Refused(f"a {n}-byte string; names and paths in a checkpoint are at most "
                                       f"{MAX_STRING_BYTES} bytes")
                    if pos + n > end:
                        buf, pos = stream.more(buf, pos, n), 0
                        end = len(buf)
                    raw = buf[pos:pos + n]
                    pos += n
                    push(str(raw, "utf-8", "surrogatepass") if op in (0x8C, 0x58, 0x8D) else raw)
                    dpush(0)
                    cost += _OBJECT + (n if raw.isascii() else 16 + 4 * n)
                elif op == 0x89 or op == 0x88 or op == 0x4E:      # NEWFALSE, NEWTRUE, NONE
                    push(None if op == 0x4E else op == 0x88)
                    dpush(0)
                elif op == 0x5D:                                  # EMPTY_LIST
                    push([])
                    dpush(1)
                    cost += _OBJECT
                elif op == 0x65 or op == 0x61:                    # APPENDS, APPEND
                    if op == 0x65:
                        items, d = pop_mark(cost, _SLOT)
                    else:
                        if len(stack) < 2:
                            raise _Refused("APPEND on a short stack")
                        items, d = [stack.pop()], depth.pop()
                    target = stack[-1]
                    if type(target) is not list:
                        raise _Refused(f"APPEND(S) on {describe(target)}")
                    target.extend(items)
                    depth[-1] = _deeper(max(depth[-1], d + 1))
                    cost += _SLOT * len(items)
                elif op == 0x74 or op == 0x6C or op == 0x64:      # TUPLE, LIST, DICT (from MARK)
                    items, d = pop_mark(cost, _ITEM)
                    d = _deeper(d + 1)
                    if op == 0x74:
                        push(tuple(items))
                    elif op == 0x6C:
                        push(items)
                    else:
                        if len(items) % 2:
                            raise _Refused("DICT with an odd number of items")
                        out = {}
                        for k in range(0, len(items), 2):
                            out[_dict_key(items[k])] = items[k + 1]
                        push(out)
                    dpush(d)
                    cost += _OBJECT + _ITEM * len(items)
                elif op == 0x71 or op == 0x72:                    # BINPUT, LONG_BINPUT
                    if op == 0x71:
                        i = buf[pos]
                        pos += 1
                    else:
                        i = _unpack_u32(buf, pos)[0]
                        pos += 4
                    if elided and i < len(memo) + elided:
                        i = memo_at(i)
                        memo[i], memo_depth[i] = stack[-1], depth[-1]
                        overwrites += 1
                    elif i < len(memo):
                        memo[i], memo_depth[i] = stack[-1], depth[-1]
                        overwrites += 1
                    elif i == len(memo) + elided:
                        memo.append(stack[-1])
                        memo_depth.append(depth[-1])
                        cost += _SLOT
                    else:
                        raise _Refused(f"memo index {i} skips entries (pickle numbers them 0, 1, 2, ...)")
                elif op == 0x93:                                  # STACK_GLOBAL
                    name = stack.pop()
                    module = stack.pop()
                    del depth[-2:]
                    if type(module) is not str or type(name) is not str:
                        raise _Refused(f"STACK_GLOBAL of {describe(module)}.{describe(name)}")
                    push(spec.find_class(module, name))
                    dpush(0)
                elif op == 0x63:                                  # GLOBAL: "module\nname\n"
                    module, buf, pos = _line(stream, buf, pos)
                    name, buf, pos = _line(stream, buf, pos)
                    end = len(buf)
                    push(spec.find_class(module, name))
                    dpush(0)
                elif op == 0x8A:                                  # LONG1
                    n = buf[pos]
                    pos += 1
                    if n > MAX_INT_BYTES:
                        raise _Refused(f"a {n}-byte integer; checkpoint numbers fit in {MAX_INT_BYTES} bytes")
                    if pos + n > end:
                        buf, pos = stream.more(buf, pos, n), 0
                        end = len(buf)
                    push(int.from_bytes(buf[pos:pos + n], "little", signed=True))
                    pos += n
                    dpush(0)
                    cost += _INT + n
                elif op == 0x47:                                  # BINFLOAT
                    push(_unpack_f64(buf, pos)[0])
                    pos += 8
                    dpush(0)
                    cost += _INT
                elif op == 0x51:                                  # BINPERSID
                    pid = stack.pop()
                    depth.pop()
                    push(spec.persistent_load(pid))
                    dpush(1)
                    cost += _RECORD
                elif op == 0x30:                                  # POP
                    if marks and marks[-1] == len(stack):
                        marks.pop()
                    else:
                        stack.pop()
                        depth.pop()
                elif op == 0x31:                                  # POP_MARK
                    pop_mark(cost, 0)
                elif op == 0x32:                                  # DUP
                    push(stack[-1])
                    dpush(depth[-1])
                elif op == 0x95:                                  # FRAME: a length hint; the stream is read as a whole
                    pos += 8
                elif op == 0x80:                                  # PROTO
                    if buf[pos] > 5:
                        raise _Refused(f"pickle protocol {buf[pos]} (this reader knows 0-5)")
                    pos += 1
                elif op == 0x2E:                                  # STOP
                    if len(stack) != 1 or marks:
                        raise _Refused(f"STOP with {len(stack)} values and {len(marks)} MARKs left on the stack")
                    self.buf, self.pos = buf, pos
                    spec.charged_bytes = cost
                    return stack[0]
                else:  # pragma: no cover - every opcode with _ARG_BYTES >= 0 has a branch above
                    raise _Refused(_refused_opcode(op))
        except Exception:
            self.buf, self.pos = buf, pos     # for the byte offset in the error message
            raise


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


# Bytes of fixed-size argument after each opcode; -1 for opcodes this reader refuses. Variable-length
# payloads (strings, LONG1, GLOBAL lines) are fetched by their branch after the length is checked.
_ARG_BYTES = [-1] * 256
for _op, _n in {0x94: 0, 0x6A: 4, 0x68: 1, 0x4D: 2, 0x4B: 1, 0x28: 0, 0x29: 0, 0x81: 0, 0x62: 0, 0x85: 0,
                0x86: 0, 0x87: 0, 0x75: 0, 0x73: 0, 0x7D: 0, 0x52: 0, 0x4A: 4, 0x8C: 1, 0x58: 4, 0x8D: 8,
                0x43: 1, 0x42: 4, 0x8E: 8, 0x89: 0, 0x88: 0, 0x4E: 0, 0x5D: 0, 0x65: 0, 0x61: 0, 0x74: 0,
                0x6C: 0, 0x64: 0, 0x71: 1, 0x72: 4, 0x93: 0, 0x63: 0, 0x8A: 1, 0x47: 8, 0x51: 0, 0x30: 0,
                0x31: 0, 0x32: 0, 0x95: 8, 0x80: 1, 0x2E: 0}.items():
    _ARG_BYTES[_op] = _n

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
