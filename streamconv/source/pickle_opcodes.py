"""The opcodes of the bounded pickle machine (`pickle_machine.Machine`), one small function each, and their table.

Each is `op(m, buf, pos)`: `m` the machine, `pos` just past the opcode in `buf`, with its fixed-size argument
(`ARG_BYTES`) already in the buffer; it stores `m.pos` past whatever it reads. Grouped by family: the memo,
scalars, containers, objects (globals, calls and records, each resolved by the `unpickle.Spec`), the stack and the
stream. `OPCODES` lists every opcode the machine runs; every other byte is refused.
"""
from __future__ import annotations

import struct
from sys import getrefcount
from typing import Any, Callable, Dict, List, Optional, Tuple

from .pickle_checks import (INT, ITEM, MAX_DEPTH, MAX_INT_BYTES, MAX_STRING_BYTES, OBJECT, RECORD, SLOT,
                            Record, Refused, Stop, deeper, describe, dict_key, forget)

# `m` below is the `pickle_machine.Machine` running the load (not imported: the machine imports this table), and the
# stream `Input` its `stream`.
Op = Callable[[Any, bytes, int], None]

_unpack_i32 = struct.Struct("<i").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_unpack_u16 = struct.Struct("<H").unpack_from
_unpack_u64 = struct.Struct("<Q").unpack_from
_unpack_f64 = struct.Struct(">d").unpack_from

# -- the memo


def _memoize(m: Any, buf: bytes, pos: int) -> None:
    m.memo.append(m.stack[-1])
    m.memo_depth.append(m.depth[-1])
    m.cost += SLOT


def _binget(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    _get(m, buf, buf[pos])


def _long_binget(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    _get(m, buf, _unpack_u32(buf, pos)[0])


def _get(m: Any, buf: bytes, i: int) -> None:
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


def _binput(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    _put(m, buf[pos])


def _long_binput(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    _put(m, _unpack_u32(buf, pos)[0])


def _put(m: Any, i: int) -> None:
    memo, elided = m.memo, m.holes.elided
    if i < len(memo) + elided:
        at = m.holes.at(i) if elided else i
        memo[at], m.memo_depth[at] = m.stack[-1], m.depth[-1]
        m.overwrites += 1
    elif i == len(memo) + elided:
        memo.append(m.stack[-1])
        m.memo_depth.append(m.depth[-1])
        m.cost += SLOT
    else:
        raise Refused(f"memo index {i} skips entries (pickle numbers them 0, 1, 2, ...)")


# -- scalars


def _binint1(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 1
    m.stack.append(buf[pos])
    m.depth.append(0)


def _binint2(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 2
    m.stack.append(_unpack_u16(buf, pos)[0])
    m.depth.append(0)
    m.cost += INT


def _binint(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 4
    m.stack.append(_unpack_i32(buf, pos)[0])
    m.depth.append(0)
    m.cost += INT


def _long1(m: Any, buf: bytes, pos: int) -> None:
    n = buf[pos]
    m.pos = pos = pos + 1
    if n > MAX_INT_BYTES:
        raise Refused(f"a {n}-byte integer; checkpoint numbers fit in {MAX_INT_BYTES} bytes")
    if pos + n > len(buf):
        buf, pos = m.more(buf, pos, n)
    m.pos = pos + n
    m.push(int.from_bytes(buf[pos:pos + n], "little", signed=True), 0)
    m.cost += INT + n


def _binfloat(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 8
    m.push(_unpack_f64(buf, pos)[0], 0)
    m.cost += INT


def _constant(value: Any) -> Op:
    def op(m: Any, buf: bytes, pos: int) -> None:
        m.push(value, 0)
    return op


def _string(text: bool, width: int, length: Callable[[bytes, int], int]) -> Op:
    """The opcode of a str (`text`) or bytes of `length(buf, pos)` bytes after a `width`-byte length field."""
    def op(m: Any, buf: bytes, pos: int) -> None:
        n = length(buf, pos)
        m.pos = pos = pos + width
        if n > MAX_STRING_BYTES:
            raise Refused(f"a {n}-byte string; names and paths in a checkpoint are at most {MAX_STRING_BYTES} bytes")
        if pos + n > len(buf):
            buf, pos = m.more(buf, pos, n)
        raw = buf[pos:pos + n]
        m.pos = pos + n
        m.push(str(raw, "utf-8", "surrogatepass") if text else raw, 0)
        m.cost += OBJECT + (n if raw.isascii() else 16 + 4 * n)
    return op


def _byte(buf: bytes, pos: int) -> int:
    return buf[pos]


def _u32(buf: bytes, pos: int) -> int:
    return _unpack_u32(buf, pos)[0]


def _u64(buf: bytes, pos: int) -> int:
    return _unpack_u64(buf, pos)[0]


# -- containers


def _mark(m: Any, buf: bytes, pos: int) -> None:
    if len(m.marks) >= MAX_DEPTH:
        raise Refused(f"more than {MAX_DEPTH} nested MARKs")
    m.marks.append(len(m.stack))


def _empty(make: Callable[[], Any], charge: int) -> Op:
    def op(m: Any, buf: bytes, pos: int) -> None:
        m.push(make(), 1)
        m.cost += charge
    return op


def _tuple1(m: Any, buf: bytes, pos: int) -> None:
    stack = m.stack
    if not stack:
        raise Refused("tuple opcode on a short stack")
    m.fresh = stack[-1] = (stack[-1],)
    m.depth[-1] = deeper(m.depth[-1] + 1)
    m.cost += 64


def _tuple_of(n: int) -> Op:
    """TUPLE2, TUPLE3."""
    def op(m: Any, buf: bytes, pos: int) -> None:
        stack, depth = m.stack, m.depth
        if len(stack) < n:
            raise Refused("tuple opcode on a short stack")
        item = tuple(stack[-n:])
        d = deeper(max(depth[-n:]) + 1)
        del stack[-n:], depth[-n:]
        m.push(item, d)
        m.fresh = item
        m.cost += 56 + 8 * n
    return op


def _from_mark(make: Callable[[list], Any]) -> Op:
    """TUPLE, LIST, DICT: a container of the items above the last MARK."""
    def op(m: Any, buf: bytes, pos: int) -> None:
        items, d = m.pop_mark(ITEM)
        d = deeper(d + 1)
        m.push(make(items), d)
        m.cost += OBJECT + ITEM * len(items)
    return op


def _dict_of(items: list) -> dict:
    if len(items) % 2:
        raise Refused("DICT with an odd number of items")
    out = {}
    for k in range(0, len(items), 2):
        out[dict_key(items[k])] = items[k + 1]
    return out


def _setitems(m: Any, buf: bytes, pos: int) -> None:
    items, d = m.pop_mark(ITEM // 2)
    _fill_dict(m, items, d)


def _setitem(m: Any, buf: bytes, pos: int) -> None:
    stack, depth = m.stack, m.depth
    items, d = stack[-2:], max(depth[-2:], default=0)
    if len(items) != 2:
        raise Refused("SETITEM on a short stack")
    del stack[-2:], depth[-2:]
    _fill_dict(m, items, d)


def _fill_dict(m: Any, items: list, d: int) -> None:
    target = m.target = m.stack[-1]
    if type(target) is not dict or len(items) % 2:
        raise Refused(f"SETITEM(S) on {describe(target)} with {len(items)} items")
    for k in range(0, len(items), 2):
        target[dict_key(items[k])] = items[k + 1]
    m.depth[-1] = deeper(max(m.depth[-1], d + 1))
    m.cost += ITEM * (len(items) // 2)


def _appends(m: Any, buf: bytes, pos: int) -> None:
    items, d = m.pop_mark(SLOT)
    _extend(m, items, d)


def _append(m: Any, buf: bytes, pos: int) -> None:
    if len(m.stack) < 2:
        raise Refused("APPEND on a short stack")
    _extend(m, [m.stack.pop()], m.depth.pop())


def _extend(m: Any, items: list, d: int) -> None:
    target = m.target = m.stack[-1]
    if type(target) is not list:
        raise Refused(f"APPEND(S) on {describe(target)}")
    target.extend(items)
    m.depth[-1] = deeper(max(m.depth[-1], d + 1))
    m.cost += SLOT * len(items)


# -- objects: globals, calls and records, each resolved by the Spec


def _stack_global(m: Any, buf: bytes, pos: int) -> None:
    name = m.stack.pop()
    module = m.stack.pop()
    del m.depth[-2:]
    if type(module) is not str or type(name) is not str:
        raise Refused(f"STACK_GLOBAL of {describe(module)}.{describe(name)}")
    m.push(m.spec.find_class(module, name), 0)


def _global(m: Any, buf: bytes, pos: int) -> None:
    """GLOBAL "module\\nname\\n"."""
    module, buf, pos = _line(m.stream, buf, pos)
    name, buf, pos = _line(m.stream, buf, pos)
    m.buf, m.pos = buf, pos
    m.push(m.spec.find_class(module, name), 0)


def _reduce(m: Any, buf: bytes, pos: int) -> None:
    stack = m.stack
    args = stack.pop()
    d = m.depth.pop()
    if type(args) is not tuple:
        raise Refused(f"REDUCE with arguments {describe(args)} (not a tuple)")
    result = m.spec.call(stack[-1], args)
    stack[-1] = result
    m.depth[-1] = deeper(d + 1)
    if not (args and result is args[0]):     # torch.Size & co hand back their argument
        m.cost += RECORD
    # Forgotten only when just built by TUPLE1-3 (torch.Size & co), never a tuple fetched from the memo: nothing
    # else holds it (besides `args`, `m.fresh` and getrefcount's argument).
    if args and m.fresh is args and forget(m.memo, args) and getrefcount(args) == 3:
        m.cost -= 56 + 8 * len(args)


def _newobj(m: Any, buf: bytes, pos: int) -> None:
    stack = m.stack
    args = stack.pop()
    m.depth.pop()
    cls = stack[-1]
    if not (isinstance(cls, type) and issubclass(cls, Record)) or type(args) is not tuple or args:
        raise Refused(f"NEWOBJ of {describe(cls)} with arguments {describe(args)}; only the allow-listed "
                       "checkpoint classes, without arguments, are created")
    stack[-1] = cls()
    m.depth[-1] = 1
    m.cost += RECORD


def _build(m: Any, buf: bytes, pos: int) -> None:
    state = m.stack.pop()
    d = m.depth.pop()
    obj = m.stack[-1]
    if not isinstance(obj, Record) or obj.built:
        raise Refused(f"BUILD on {describe(obj)}; only a new checkpoint record can be built, once")
    entries = len(state) if type(state) is dict else 0
    m.spec.build(obj, state)
    obj.built = True
    if entries and not state:     # the record took the values and emptied the dict
        m.cost -= ITEM * entries
        # Refunded only when nothing else holds it (besides `state`, `m.target` and getrefcount's argument).
        if forget(m.memo, state) and getrefcount(state) == 2 + (m.target is state):
            m.cost -= OBJECT
    m.depth[-1] = deeper(d + 1)


def _binpersid(m: Any, buf: bytes, pos: int) -> None:
    pid = m.stack.pop()
    m.depth.pop()
    m.push(m.spec.persistent_load(pid), 1)
    m.cost += RECORD


# -- the stack and the stream


def _pop(m: Any, buf: bytes, pos: int) -> None:
    if m.marks and m.marks[-1] == len(m.stack):
        m.marks.pop()
    else:
        m.stack.pop()
        m.depth.pop()


def _pop_mark(m: Any, buf: bytes, pos: int) -> None:
    m.pop_mark(0)


def _dup(m: Any, buf: bytes, pos: int) -> None:
    m.push(m.stack[-1], m.depth[-1])


def _frame(m: Any, buf: bytes, pos: int) -> None:
    m.pos = pos + 8         # a length hint; the stream is read as a whole


def _proto(m: Any, buf: bytes, pos: int) -> None:
    if buf[pos] > 5:
        raise Refused(f"pickle protocol {buf[pos]} (this reader knows 0-5)")
    m.pos = pos + 1


def _stop(m: Any, buf: bytes, pos: int) -> None:
    if len(m.stack) != 1 or m.marks:
        raise Refused(f"STOP with {len(m.stack)} values and {len(m.marks)} MARKs left on the stack")
    raise Stop

def _line(stream: Any, buf: bytes, pos: int) -> Tuple[str, bytes, int]:
    """One newline-terminated ASCII argument (GLOBAL's module and name), at most 256 bytes."""
    while True:
        nl = buf.find(b"\n", pos, pos + 257)
        if nl >= 0:
            return buf[pos:nl].decode("ascii"), buf, nl + 1
        if len(buf) - pos > 256:
            raise Refused("a GLOBAL name longer than 256 bytes")
        buf, pos = stream.more(buf, pos, len(buf) - pos + 1), 0


# Every opcode this reader runs: (name, bytes of fixed-size argument, function). Variable-length payloads (strings,
# LONG1, GLOBAL lines) are fetched by their function once the length is checked. Every other byte is refused.
OPCODES: Dict[int, Tuple[str, int, Op]] = {
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
    0x5D: ("EMPTY_LIST", 0, _empty(list, OBJECT)),
    0x7D: ("EMPTY_DICT", 0, _empty(dict, OBJECT)),
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
# What `Machine.run` indexes by opcode: -1 / None for a refused byte.
ARG_BYTES = [-1] * 256
OPS: List[Optional[Op]] = [None] * 256
for _op, (_, _n, _fn) in OPCODES.items():
    ARG_BYTES[_op], OPS[_op] = _n, _fn
