"""Allow-listed decoding of the two kinds of pickle in a DCP checkpoint, without torch.

* `.metadata` (`pickle.dump(Metadata)` by FileSystemWriter.finish): `load_metadata_pickle`, streamed.
* `data.pkl` inside each tensor's `torch.save` zip: `load_tensor_record`.

Both run on `unpickle.py`'s bounded machine (depth, sizes and allocations capped; see there). Each global
a pickle names is looked up in an allow-list mapping it to a small stand-in of ours; anything else raises
UnsafePickleError before it is imported, so nothing outside the list is ever imported or called. The
stand-ins accept only the argument types torch writes and only record the pickled state;
`reader/metadata.py` and `reader/blob.py` validate it.

How torch 2.13 pickles these (checked with pickletools on real checkpoints):
* dataclasses (Metadata, TensorStorageMetadata, ChunkStorageMetadata, MetadataIndex, StorageMeta,
  _StorageInfo): NEWOBJ with no args, then BUILD with the instance `__dict__`. Fields left at a class
  default are absent (MetadataIndex of a bytes item has no `offset`; _StorageInfo drops None fields);
  an empty BytesStorageMetadata gets no BUILD at all.
* TensorProperties: NEWOBJ, then BUILD with the 5-tuple from its `__getstate__`
  `(dtype, layout, requires_grad, _MEM_FORMAT_ENCODING, pin_memory)`.
* `_MEM_FORMAT_ENCODING(0)` (an Enum), `torch.Size((3, 4))`, `torch.serialization._get_layout('torch.strided')`,
  `pathlib.PosixPath('/', 'ckpt')`: REDUCE of the global with its args. Protocol 2 would write Python 2
  module names for some globals (fix_imports); the allow-list sees the raw names, so those are refused too.
* `torch.float32` etc.: a bare global (dtype.__reduce__ returns its name).
* data.pkl (protocol 2): `torch._utils._rebuild_tensor_v2(<persistent ('storage', torch.FloatStorage, '0',
  'cpu', numel)>, storage_offset, size, stride, requires_grad, OrderedDict())`; dtypes without a legacy
  storage class use `_rebuild_tensor_v3(..., dtype)` with `torch.storage.UntypedStorage`, whose numel is in BYTES.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable, Dict, FrozenSet, Optional, Set, Tuple

from ..dtypes import STORAGE_CLASS_TO_NAME
from ..errors import CheckpointError, UnsafePickleError
from . import unpickle
from .unpickle import Record, describe

# Allocation budget of one load: BASE + FACTOR x the pickle's size, in unpickle.py's estimated bytes. A real
# .metadata (100k chunks over 4 ranks, 17.5 MB) is charged 7x its size (its objects take ~5.3x); the budget
# keeps a crafted pickle of any shape within 64 MiB + 10x the file, including the interpreter.
BUDGET_BASE_BYTES = 8 << 20
BUDGET_FACTOR = 9
MAX_DIMS = 64


@dataclass(frozen=True)
class TorchDtype:
    """Stands in for `torch.<name>` (a dtype). Only the name is kept."""

    __slots__ = ("name",)
    name: str


# `torch.<name>` globals accepted as dtypes: every dtype torch 2.13 pickles by name, plus names shaped like
# future ones (float8_*, int4, uint7, bits16...). Matching a name records a string; it never imports torch.
_DTYPE_NAME = re.compile(r"(bool|(b?float|q?u?int|complex|bits)[0-9][0-9a-z_]{0,30})")


def _dtype_global(name: str) -> Optional[TorchDtype]:
    return TorchDtype(name) if _DTYPE_NAME.fullmatch(name) else None


def _clip(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Call:
    """A global that REDUCE may call: a checking function of ours, never the real one."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn


class _Spec(unpickle.Spec):
    """Globals resolve only through `allowed` (or `dynamic_global`); everything else is refused."""

    def __init__(self, allowed: Dict[Tuple[str, str], Any], what: str, source: str):
        self.allowed, self.what, self.source = allowed, what, source
        self.globals_seen: Set[str] = set()

    def dynamic_global(self, module: str, name: str) -> Any:
        return _dtype_global(name) if module == "torch" else None

    def find_class(self, module: str, name: str) -> Any:
        obj = self.allowed.get((module, name))
        if obj is None:
            obj = self.dynamic_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global `{_clip(module)}.{_clip(name)}`: "
                f"it is not on streamconv's allow-list for {self.what}; nothing was imported or called. A "
                "checkpoint written by torch.distributed.checkpoint.save with FileSystemWriter never needs it: "
                "the file is corrupt, crafted, or from a custom planner/storage writer streamconv does not know "
                "(please report it).")
        self.globals_seen.add(f"{module}.{name}")
        return obj

    def call(self, func: Any, args: tuple) -> Any:
        if not isinstance(func, _Call):
            raise ValueError(f"REDUCE calls {describe(func)}, which is not a callable on the allow-list")
        return func.fn(*args)

    def build(self, obj: Record, state: Any) -> None:
        setstate = getattr(obj, "setstate", None)
        if setstate is None:
            raise ValueError(f"BUILD on a {type(obj).__name__}")
        setstate(state)


# ---------------------------------------------------------------------------------------------------------
# `.metadata`


class _StateRecord(Record):
    """Stand-in for one of torch's checkpoint dataclasses: keeps the BUILD state's known FIELDS, in slots.

    Slots instead of the state dict: a 100k-chunk .metadata holds 300k of these, and a dict costs ~230
    bytes each. Unknown fields (a newer torch) are ignored; absent ones read as the default.
    """

    __slots__ = ()
    torch_name = ""
    FIELDS: Tuple[str, ...] = ()

    def setstate(self, state: Any) -> None:
        if type(state) is not dict or not all(type(k) is str for k in state):
            raise ValueError(f"{self.torch_name}: expected a dict of field names, got {describe(state)}")
        for name in self.FIELDS:
            if name in state:
                setattr(self, name, state[name])
        # The pickle memoizes the state dict, so it would stay alive until the load ends; torch never refers to
        # it again. Emptying it returns its memory now.
        state.clear()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def has(self, key: str) -> bool:
        return hasattr(self, key)

    def describe_fields(self) -> str:
        return describe({name: getattr(self, name) for name in self.FIELDS if hasattr(self, name)})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe_fields()})"


class Metadata(_StateRecord):
    FIELDS = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")
    __slots__ = FIELDS
    torch_name = "Metadata"


class TensorStorageMetadata(_StateRecord):
    FIELDS = ("properties", "size", "chunks")
    __slots__ = FIELDS
    torch_name = "TensorStorageMetadata"


class ChunkStorageMetadata(_StateRecord):
    FIELDS = ("offsets", "sizes")
    __slots__ = FIELDS
    torch_name = "ChunkStorageMetadata"


class BytesStorageMetadata(_StateRecord):
    __slots__ = ()
    torch_name = "BytesStorageMetadata"


class MetadataIndex(_StateRecord):
    # Hashed by identity: it is only ever a key of the one dict it was unpickled into.
    FIELDS = ("fqn", "offset", "index")
    __slots__ = FIELDS
    torch_name = "MetadataIndex"


class StorageInfo(_StateRecord):
    FIELDS = ("relative_path", "offset", "length", "transform_descriptors")
    __slots__ = FIELDS
    torch_name = "_StorageInfo"


class StorageMeta(_StateRecord):
    FIELDS = ("checkpoint_id", "save_id", "load_id", "modules")
    __slots__ = FIELDS
    torch_name = "StorageMeta"


class TensorProperties(_StateRecord):
    """`__getstate__` gives (dtype, layout, requires_grad, mem_format, pin_memory); torch 2.0's dict is accepted too."""

    FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")
    __slots__ = FIELDS
    torch_name = "TensorProperties"
    _TYPES = (TorchDtype, str, bool, int, bool)

    def setstate(self, state: Any) -> None:
        if type(state) is tuple:
            if not (len(state) == 5 and all(isinstance(v, t) for v, t in zip(state, self._TYPES))):
                raise ValueError(f"TensorProperties state {describe(state)} is not "
                                 "(dtype, layout, requires_grad, memory_format, pin_memory)")
            state = dict(zip(self.FIELDS, state))
        super().setstate(state)


def _torch_size(*args: Any) -> Tuple[int, ...]:
    # torch.Size((3, 4)) -> (3, 4)
    if len(args) != 1 or type(args[0]) is not tuple or len(args[0]) > MAX_DIMS:
        raise ValueError(f"torch.Size{describe(args)}: expected one tuple of at most {MAX_DIMS} ints")
    for v in args[0]:
        if type(v) is not int:
            raise ValueError(f"torch.Size{describe(args)}: expected one tuple of ints")
    return args[0]


# Megatron-Core (0.16, `state_dict_saver.save_state_dict_async_plan`) stores every rank's save plan beside the
# metadata (`Metadata.all_local_plans`, to reuse the global plan on the next save). Plain data, never used here:
# no fields are kept.
class SavePlan(_StateRecord):
    __slots__ = ()
    torch_name = "SavePlan"


class WriteItem(_StateRecord):
    __slots__ = ()
    torch_name = "WriteItem"


class TensorWriteData(_StateRecord):
    __slots__ = ()
    torch_name = "TensorWriteData"


class BytesIOWriteData(_StateRecord):
    __slots__ = ()
    torch_name = "BytesIOWriteData"


def _write_item_type(*args: Any) -> int:
    # WriteItemType(2) -> 2 (an Enum of Megatron's saved plans; unused)
    if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] < 16:
        raise ValueError(f"WriteItemType{describe(args)}: expected one small int")
    return args[0]


def _mem_format(*args: Any) -> int:
    # _MEM_FORMAT_ENCODING(0) -> 0 (always contiguous from DCP's writer; unused)
    if len(args) != 1 or type(args[0]) is not int or not 0 <= args[0] < 16:
        raise ValueError(f"_MEM_FORMAT_ENCODING{describe(args)}: expected one small int")
    return args[0]


def _get_layout(*args: Any) -> str:
    # _get_layout('torch.strided') -> 'torch.strided' (unused)
    if len(args) != 1 or type(args[0]) is not str or len(args[0]) > 64:
        raise ValueError(f"_get_layout{describe(args)}: expected one layout name")
    return args[0]


def _ordered_dict(*args: Any) -> dict:
    # OrderedDict() -> {} (filled by SETITEMS, if at all)
    if args:
        raise ValueError(f"OrderedDict{describe(args)}: expected no arguments")
    return {}


def _path_from(cls: Callable[..., Any]) -> Callable[..., str]:
    # PurePath only joins strings: no filesystem access. Kept as str (it is only informational).
    def make(*parts: Any) -> str:
        if len(parts) > 256 or not all(type(p) is str for p in parts) or sum(map(len, parts)) > 4096:
            raise ValueError(f"path parts must be strings (4096 characters in all), got {describe(parts)}")
        return str(cls(*parts))
    return make


SIZE_CALL = _Call("torch.Size", _torch_size)

_DCP = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
_DCP_PLANNER = "torch.distributed.checkpoint.planner"   # only in Megatron's `all_local_plans`
# Where TensorProperties lived in torch 2.0-2.2 (the class still exists there in 2.13).
OLD_PROPERTIES_MODULE = "torch.distributed._shard.sharded_tensor.metadata"

_METADATA_GLOBALS: Dict[Tuple[str, str], Any] = {
    (_DCP, "Metadata"): Metadata,
    (_DCP, "TensorStorageMetadata"): TensorStorageMetadata,
    (_DCP, "ChunkStorageMetadata"): ChunkStorageMetadata,
    (_DCP, "BytesStorageMetadata"): BytesStorageMetadata,
    (_DCP, "TensorProperties"): TensorProperties,
    (_DCP, "_MEM_FORMAT_ENCODING"): _Call("_MEM_FORMAT_ENCODING", _mem_format),
    (_DCP, "MetadataIndex"): MetadataIndex,
    (_DCP, "StorageMeta"): StorageMeta,
    (_DCP_FS, "_StorageInfo"): StorageInfo,
    (_DCP_PLANNER, "SavePlan"): SavePlan,
    (_DCP_PLANNER, "WriteItem"): WriteItem,
    (_DCP_PLANNER, "WriteItemType"): _Call("WriteItemType", _write_item_type),
    (_DCP_PLANNER, "BytesIOWriteData"): BytesIOWriteData,
    (_DCP_PLANNER, "TensorWriteData"): TensorWriteData,
    (OLD_PROPERTIES_MODULE, "TensorProperties"): TensorProperties,
    (OLD_PROPERTIES_MODULE, "MEM_FORMAT_ENCODING"): _Call("MEM_FORMAT_ENCODING", _mem_format),
    ("torch", "Size"): SIZE_CALL,
    ("torch.serialization", "_get_layout"): _Call("_get_layout", _get_layout),
    ("collections", "OrderedDict"): _Call("OrderedDict", _ordered_dict),
}
# StorageMeta.checkpoint_id is the writer's pathlib path. Python 3.13+ may name the module pathlib._local.
for _module in ("pathlib", "pathlib._local"):
    for _name, _cls in (("PosixPath", PurePosixPath), ("PurePosixPath", PurePosixPath),
                        ("WindowsPath", PureWindowsPath), ("PureWindowsPath", PureWindowsPath)):
        _METADATA_GLOBALS[(_module, _name)] = _Call(_name, _path_from(_cls))


@dataclass(frozen=True)
class DecodedPickle:
    root: Any
    globals_seen: FrozenSet[str] = field(default_factory=frozenset)  # "module.name" of every global resolved
    # What `fast` (load_metadata_pickle) read into columns, when it ran to the end; None when the general machine
    # alone decoded the pickle.
    columns: Any = None


def budget_bytes(pickle_bytes: int) -> int:
    return BUDGET_BASE_BYTES + BUDGET_FACTOR * pickle_bytes


def load_metadata_pickle(data: Optional[bytes] = None, *, source: str,
                         read: Optional[Callable[[int, int], bytes]] = None, size: int = 0,
                         fast: Optional[Callable[["_Spec"], Tuple[dict, Any]]] = None) -> DecodedPickle:
    """Decode a `.metadata` pickle into stand-ins: from `data`, or streamed as `size` bytes through
    `read(offset, length)` (a corrupt file then fails at its first bad byte, without reading the rest).
    `source` names the file in error messages. `fast(spec)` -> (fast paths, their columns) (see
    `fast_records.handlers`); when the pickle refers back to something a fast path consumed, the load runs again
    without them."""
    n = len(data) if data is not None else size
    if fast is not None:
        spec = _Spec(_METADATA_GLOBALS, "DCP .metadata", source)
        spec.fast_paths, columns = fast(spec)
        try:
            root = unpickle.load(spec, source=source, data=data, read=read, size=size, budget_bytes=budget_bytes(n))
            return DecodedPickle(root, frozenset(spec.globals_seen), columns)
        except unpickle.FastPathMiss:
            pass
    spec = _Spec(_METADATA_GLOBALS, "DCP .metadata", source)
    root = unpickle.load(spec, source=source, data=data, read=read, size=size, budget_bytes=budget_bytes(n))
    return DecodedPickle(root, frozenset(spec.globals_seen))


# ---------------------------------------------------------------------------------------------------------
# `data.pkl` of one torch.save(tensor) archive


@dataclass(frozen=True)
class StorageClass:
    """`torch.FloatStorage` & co (dtype fixed by the class) or `UntypedStorage` (dtype is None)."""

    __slots__ = ("dtype",)
    dtype: Optional[str]


_UNTYPED = StorageClass(None)
# Legacy storage classes for dtypes streamconv cannot carry: recognised so the error says "unsupported dtype".
_MORE_STORAGE_CLASSES = {
    "ComplexDoubleStorage": "complex128", "QInt8Storage": "qint8", "QInt32Storage": "qint32",
    "QUInt8Storage": "quint8", "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}


@dataclass(frozen=True)
class StorageRef:
    __slots__ = ("storage_class", "key", "location", "numel")
    storage_class: StorageClass
    key: str          # the archive record is `<prefix>/data/<key>`
    location: str     # device at save time, e.g. "cpu"; irrelevant for raw bytes
    numel: int        # elements for a typed storage, BYTES for UntypedStorage


@dataclass(frozen=True)
class TensorRecord:
    """What `data.pkl` says about the one tensor in a torch.save archive."""

    __slots__ = ("dtype", "storage", "storage_offset", "shape", "stride", "flags")
    dtype: str
    storage: StorageRef
    storage_offset: int               # in elements
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    flags: Tuple[str, ...]            # set conj/neg bits from the optional metadata dict (bytes != values)


def _int_tuple(value: Any, what: str) -> Tuple[int, ...]:
    if type(value) is not tuple or len(value) > MAX_DIMS or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{what} must be a tuple of at most {MAX_DIMS} non-negative ints, got {describe(value)}")
    return value


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
             dtype: Optional[TorchDtype], metadata: Any) -> TensorRecord:
    if not isinstance(storage, StorageRef):
        raise ValueError(f"tensor storage must be a persistent storage reference, got {describe(storage)}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ValueError(f"invalid storage_offset {describe(storage_offset)}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"size {shape} and stride {strides} have different lengths")
    if type(requires_grad) is not bool or type(hooks) is not dict or hooks:
        raise ValueError(f"requires_grad {describe(requires_grad)} / backward_hooks {describe(hooks)}: expected a "
                         "bool and an empty OrderedDict")
    if not (metadata is None or (type(metadata) is dict and len(metadata) <= 16
                                 and all(type(k) is str and type(v) is bool for k, v in metadata.items()))):
        raise ValueError(f"tensor metadata {describe(metadata)} is not a dict of flags")
    name = dtype.name if dtype is not None else storage.storage_class.dtype
    if name is None:
        raise ValueError("UntypedStorage without an explicit dtype (_rebuild_tensor_v2 needs a typed storage)")
    flags = tuple(sorted(k for k, v in metadata.items() if v)) if metadata else ()
    return TensorRecord(name, storage, storage_offset, shape, strides, flags)


def _rebuild_tensor_v2(*args: Any) -> TensorRecord:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
    if len(args) not in (6, 7):
        raise ValueError(f"_rebuild_tensor_v2 with {len(args)} arguments (torch writes 6 or 7)")
    return _rebuild(*args[:6], None, args[6] if len(args) == 7 else None)


def _rebuild_tensor_v3(*args: Any) -> TensorRecord:
    # (storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    if len(args) not in (7, 8) or not isinstance(args[6], TorchDtype):
        raise ValueError(f"_rebuild_tensor_v3 with arguments {describe(args)} (torch writes 7 or 8, a dtype 7th)")
    return _rebuild(*args[:7], args[7] if len(args) == 8 else None)


_TENSOR_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _Call("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _Call("_rebuild_tensor_v3", _rebuild_tensor_v3),
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("collections", "OrderedDict"): _Call("OrderedDict", _ordered_dict),
}
for _name, _dtype in {**STORAGE_CLASS_TO_NAME, **_MORE_STORAGE_CLASSES}.items():
    _TENSOR_GLOBALS[("torch", _name)] = StorageClass(_dtype)


class _TensorSpec(_Spec):
    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {describe(pid)} (expected a storage "
                                  "reference)")
        _, storage_class, key, location, numel = pid
        if not (isinstance(storage_class, StorageClass) and type(key) is str and len(key) <= 256
                and type(location) is str and len(location) <= 256 and type(numel) is int and numel >= 0):
            raise CheckpointError(f"{self.source}: malformed storage reference {describe(pid)}")
        return StorageRef(storage_class, key, location, numel)

    def build(self, obj: Record, state: Any) -> None:
        raise ValueError("BUILD in a tensor pickle")


# torch.save writes the same `data.pkl` bytes for every tensor of one dtype, shape and stride (the storage key is
# "0" in each archive), and a checkpoint holds hundreds of blobs per shape (one per layer and rank): decoding is
# the largest part of locating them (issue 20: the first byte of an 11B conversion). Bytes decoded once are not
# decoded again: the result is a pure function of the bytes. Bounded (entries of at most
# RECORD_CACHE_MAX_PKL_BYTES, at most RECORD_CACHE_ENTRIES, then emptied) so that hostile input cannot grow it;
# failures are never cached (each raises again with its own file's name).
RECORD_CACHE_ENTRIES = 1024
RECORD_CACHE_MAX_PKL_BYTES = 1024
_records: Dict[bytes, "TensorRecord"] = {}


def load_tensor_record(data: bytes, *, source: str) -> TensorRecord:
    """Decode a torch.save `data.pkl` that holds exactly one plain tensor."""
    cached = _records.get(data)
    if cached is not None:
        return cached
    record = _decode_tensor_record(data, source=source)
    if len(data) <= RECORD_CACHE_MAX_PKL_BYTES:
        if len(_records) >= RECORD_CACHE_ENTRIES:
            _records.clear()
        _records[bytes(data)] = record
    return record


def _decode_tensor_record(data: bytes, *, source: str) -> TensorRecord:
    spec = _TensorSpec(_TENSOR_GLOBALS, "torch.save data.pkl", source)
    obj = unpickle.load(spec, source=source, data=data, budget_bytes=budget_bytes(len(data)))
    if not isinstance(obj, TensorRecord):
        raise CheckpointError(
            f"{source}: data.pkl holds a {type(obj).__name__}, not a tensor (is this a bytes item, "
            "e.g. an optimizer hyper-parameter, listed as a tensor?)")
    return obj
