"""Allow-listed unpicklers for the two kinds of pickle in a DCP checkpoint, decoded without torch.

* `.metadata` (`pickle.dump(Metadata)` by FileSystemWriter.finish): `load_metadata_pickle`.
* `data.pkl` inside each tensor's `torch.save` zip: `load_tensor_record`.

`find_class` maps each allowed `module.name` to a small stand-in of ours; anything else raises
UnsafePickleError before it is imported, so nothing outside the list is ever imported or called. The
stand-ins only record the pickled state; `reader/metadata.py` and `reader/blob.py` validate it.

How torch 2.13 pickles these (checked with pickletools on real checkpoints):
* dataclasses (Metadata, TensorStorageMetadata, ChunkStorageMetadata, MetadataIndex, StorageMeta,
  _StorageInfo): NEWOBJ with no args, then BUILD with the instance `__dict__`. Fields left at a class
  default are absent (MetadataIndex of a bytes item has no `offset`; _StorageInfo drops None fields);
  an empty BytesStorageMetadata gets no BUILD at all.
* TensorProperties: NEWOBJ, then BUILD with the 5-tuple from its `__getstate__`
  `(dtype, layout, requires_grad, _MEM_FORMAT_ENCODING, pin_memory)`.
* `_MEM_FORMAT_ENCODING(0)` (an Enum), `torch.Size((3, 4))`, `torch.serialization._get_layout('torch.strided')`,
  `pathlib.PosixPath('/', 'ckpt')`: REDUCE of the global with its args. Protocol 2 would write Python 2
  module names for some globals (fix_imports); find_class sees the raw names, so those are refused too.
* `torch.float32` etc.: a bare global (dtype.__reduce__ returns its name).
* data.pkl (protocol 2): `torch._utils._rebuild_tensor_v2(<persistent ('storage', torch.FloatStorage, '0',
  'cpu', numel)>, storage_offset, size, stride, requires_grad, OrderedDict())`; dtypes without a legacy
  storage class use `_rebuild_tensor_v3(..., dtype)` with `torch.storage.UntypedStorage`, whose numel is in BYTES.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Optional, Set, Tuple

from ..dtypes import STORAGE_CLASS_TO_NAME
from ..errors import CheckpointError, StreamconvError, UnsafePickleError

# ---------------------------------------------------------------------------------------------------------
# Stand-ins shared by both pickles


# Hardening: BUILD on a global (e.g. `torch.Size` followed by BUILD with a slot-state dict) would call
# setattr on the object find_class returned. The objects handed out are therefore immutable: builtins,
# `_Sealed` classes, `_ReadOnlyCall` wrappers and slotted frozen dataclasses. A crafted checkpoint cannot
# change how the next one is decoded.


class _Sealed(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


class _ReadOnlyCall:
    """A stand-in function that a pickle can call but not modify (functions have a writable __dict__)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]):
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("read-only")

    def __repr__(self) -> str:
        return f"<stand-in {self._fn.__name__}>"


@dataclass(frozen=True)
class TorchDtype:
    """Stands in for `torch.<name>` (a dtype). Only the name is kept."""

    __slots__ = ("name",)
    name: str


# `torch.<name>` globals accepted as dtypes: every dtype torch 2.13 pickles by name, plus names shaped like
# future ones (float8_*, int4, uint7, bits16...). Matching a name records a string; it never imports torch.
_DTYPE_NAME = re.compile(r"(bool|(b?float|q?u?int|complex|bits)[0-9][0-9a-z_]*)")


def _dtype_global(name: str) -> Optional[TorchDtype]:
    return TorchDtype(name) if _DTYPE_NAME.fullmatch(name) else None


class _SafeUnpickler(pickle.Unpickler):
    """Resolves globals only through `ALLOWED` (or `dynamic_global`); refuses everything else."""

    ALLOWED: ClassVar[Dict[Tuple[str, str], Any]] = {}
    WHAT: ClassVar[str] = "pickle"

    def __init__(self, data: bytes, *, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source
        self.globals_seen: Set[str] = set()

    def dynamic_global(self, module: str, name: str) -> Any:
        return None

    def find_class(self, module: str, name: str) -> Any:
        obj = self.ALLOWED.get((module, name))
        if obj is None:
            obj = self.dynamic_global(module, name)
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global `{module}.{name}`: it is not on streamconv's allow-list "
                f"for {self.WHAT}; nothing was imported or called. A checkpoint written by "
                "torch.distributed.checkpoint.save with FileSystemWriter never needs it: the file is corrupt, "
                "crafted, or from a custom planner/storage writer streamconv does not know (please report it).")
        self.globals_seen.add(f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in {self.WHAT}")


def _unpickle(unpickler: _SafeUnpickler) -> Any:
    try:
        return unpickler.load()
    except StreamconvError:
        raise
    except Exception as exc:  # pickle raises many types on bad input (incl. RecursionError); all mean "corrupt"
        raise CheckpointError(
            f"{unpickler.source}: malformed or truncated {unpickler.WHAT} ({type(exc).__name__}: {exc}); "
            "the file is damaged or was not fully written/copied") from exc


# ---------------------------------------------------------------------------------------------------------
# `.metadata`


class Record(metaclass=_Sealed):
    """Stand-in for one of torch's checkpoint dataclasses: keeps the BUILD state dict, nothing else."""

    torch_name: ClassVar[str] = ""
    fields: Dict[str, Any] = {}  # replaced (never mutated) by __setstate__; empty when no BUILD happened

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"{self.torch_name}: expected a dict state, got {type(state).__name__}")
        self.fields = dict(state)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fields!r})"


class Metadata(Record):
    torch_name = "Metadata"


class TensorStorageMetadata(Record):
    torch_name = "TensorStorageMetadata"


class ChunkStorageMetadata(Record):
    torch_name = "ChunkStorageMetadata"


class BytesStorageMetadata(Record):
    torch_name = "BytesStorageMetadata"


class MetadataIndex(Record):
    # Hashed by identity: it is only ever a key of the one dict it was unpickled into.
    torch_name = "MetadataIndex"


class StorageInfo(Record):
    torch_name = "_StorageInfo"


class StorageMeta(Record):
    torch_name = "StorageMeta"


class TensorProperties(Record):
    """`__getstate__` gives (dtype, layout, requires_grad, mem_format, pin_memory); a dict is accepted too."""

    torch_name = "TensorProperties"
    _ORDER = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == len(self._ORDER):
            state = dict(zip(self._ORDER, state))
        super().__setstate__(state)


# Megatron-Core (0.16, `state_dict_saver.save_state_dict_async_plan`) stores every rank's save plan beside the
# metadata (`Metadata.all_local_plans`, to reuse the global plan on the next save). Plain data, never used here.
class SavePlan(Record):
    torch_name = "SavePlan"


class WriteItem(Record):
    torch_name = "WriteItem"


class TensorWriteData(Record):
    torch_name = "TensorWriteData"


# Called once per chunk (several times per tensor), so these map to builtins: no Python frame per call, and
# builtin types cannot be modified by BUILD. Their results are validated where they are used (metadata.py).
_torch_size = tuple       # torch.Size((3, 4)) -> (3, 4)
_mem_format = int         # _MEM_FORMAT_ENCODING(0) -> 0 (always contiguous from DCP's writer; unused)
_write_item_type = int    # WriteItemType(2) -> 2 (an Enum of Megatron's saved plans; unused)
_get_layout = str         # _get_layout('torch.strided') -> 'torch.strided' (unused)


def _path_from(cls: Callable[..., Any]) -> _ReadOnlyCall:
    # PurePath only joins strings: no filesystem access. Kept as str (it is only informational).
    def make(*parts: Any) -> str:
        if not all(isinstance(p, str) for p in parts):
            raise ValueError(f"path parts must be strings, got {parts!r}")
        return str(cls(*parts))
    return _ReadOnlyCall(make)


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
    (_DCP, "_MEM_FORMAT_ENCODING"): _mem_format,
    (_DCP, "MetadataIndex"): MetadataIndex,
    (_DCP, "StorageMeta"): StorageMeta,
    (_DCP_FS, "_StorageInfo"): StorageInfo,
    (_DCP_PLANNER, "SavePlan"): SavePlan,
    (_DCP_PLANNER, "WriteItem"): WriteItem,
    (_DCP_PLANNER, "WriteItemType"): _write_item_type,
    (_DCP_PLANNER, "TensorWriteData"): TensorWriteData,
    (OLD_PROPERTIES_MODULE, "TensorProperties"): TensorProperties,
    (OLD_PROPERTIES_MODULE, "MEM_FORMAT_ENCODING"): _mem_format,
    ("torch", "Size"): _torch_size,
    ("torch.serialization", "_get_layout"): _get_layout,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
# StorageMeta.checkpoint_id is the writer's pathlib path. Python 3.13+ may name the module pathlib._local.
for _module in ("pathlib", "pathlib._local"):
    for _name, _cls in (("PosixPath", PurePosixPath), ("PurePosixPath", PurePosixPath),
                        ("WindowsPath", PureWindowsPath), ("PureWindowsPath", PureWindowsPath)):
        _METADATA_GLOBALS[(_module, _name)] = _path_from(_cls)


class _MetadataUnpickler(_SafeUnpickler):
    ALLOWED = _METADATA_GLOBALS
    WHAT = "DCP .metadata"

    def dynamic_global(self, module: str, name: str) -> Any:
        return _dtype_global(name) if module == "torch" else None


@dataclass(frozen=True)
class DecodedPickle:
    root: Any
    globals_seen: FrozenSet[str] = field(default_factory=frozenset)  # "module.name" of every global resolved


def load_metadata_pickle(data: bytes, *, source: str) -> DecodedPickle:
    """Decode a `.metadata` pickle into stand-ins. `source` names the file in error messages."""
    unpickler = _MetadataUnpickler(data, source=source)
    root = _unpickle(unpickler)
    return DecodedPickle(root, frozenset(unpickler.globals_seen))


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


# Results of persistent_load / the rebuild stand-ins are slotted too: a later BUILD on them cannot alter
# fields after they were validated.
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
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild(storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Optional[TorchDtype],
             metadata: Any) -> TensorRecord:
    if not isinstance(storage, StorageRef):
        raise ValueError(f"tensor storage must be a persistent storage reference, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise ValueError(f"invalid storage_offset {storage_offset!r}")
    shape = _int_tuple(size, "size")
    strides = _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"size {shape} and stride {strides} have different lengths")
    if dtype is not None and not isinstance(dtype, TorchDtype):
        raise ValueError(f"dtype must be a torch dtype, got {dtype!r}")
    name = dtype.name if dtype is not None else storage.storage_class.dtype
    if name is None:
        raise ValueError("UntypedStorage without an explicit dtype (_rebuild_tensor_v2 needs a typed storage)")
    flags = tuple(sorted(k for k, v in metadata.items() if v)) if isinstance(metadata, dict) else ()
    return TensorRecord(name, storage, storage_offset, shape, strides, flags)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> TensorRecord:
    return _rebuild(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> TensorRecord:
    return _rebuild(storage, storage_offset, size, stride, dtype, metadata)


_TENSOR_GLOBALS: Dict[Tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _ReadOnlyCall(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_tensor_v3"): _ReadOnlyCall(_rebuild_tensor_v3),
    ("torch", "UntypedStorage"): _UNTYPED,
    ("torch.storage", "UntypedStorage"): _UNTYPED,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
for _name, _dtype in {**STORAGE_CLASS_TO_NAME, **_MORE_STORAGE_CLASSES}.items():
    _TENSOR_GLOBALS[("torch", _name)] = StorageClass(_dtype)


class _TensorUnpickler(_SafeUnpickler):
    ALLOWED = _TENSOR_GLOBALS
    WHAT = "torch.save data.pkl"

    def dynamic_global(self, module: str, name: str) -> Any:
        return _dtype_global(name) if module == "torch" else None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} (expected a storage reference)")
        _, storage_class, key, location, numel = pid
        if not (isinstance(storage_class, StorageClass) and isinstance(key, str) and isinstance(location, str)
                and type(numel) is int and numel >= 0):
            raise CheckpointError(f"{self.source}: malformed storage reference {pid!r}")
        return StorageRef(storage_class, key, location, numel)


def load_tensor_record(data: bytes, *, source: str) -> TensorRecord:
    """Decode a torch.save `data.pkl` that holds exactly one plain tensor."""
    obj = _unpickle(_TensorUnpickler(data, source=source))
    if not isinstance(obj, TensorRecord):
        raise CheckpointError(
            f"{source}: data.pkl holds a {type(obj).__name__}, not a tensor (is this a bytes item, "
            "e.g. an optimizer hyper-parameter, listed as a tensor?)")
    return obj
