"""The safe reading layer (`streamconv.source`) against real checkpoints written by torch, and hostile input.

Checkpoints are made in this process with `dcp.save` (single process: no process group needed), once per
module. Metadata is compared with what torch itself unpickles; located bytes with the tensors that were saved.
Malformed inputs (evil pickles, truncated files, odd zips) are built by hand: that is the point of them.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from streamconv.errors import CheckpointError, UnsafePickleError, UnsupportedFeatureError
from streamconv.source.io import DirectoryReader, MemoryReader
from streamconv.model import BlobLocation
from streamconv.source import find_metadata_file, load_metadata, locate_all, locate_tensor
from streamconv.source import safe_pickle

REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


# ---------------------------------------------------------------------------------------------------------
# helpers


def make_state_dict():
    torch.manual_seed(0)
    model = {
        "w32": torch.randn(3, 4),
        "w_bf16": torch.randn(5, 2).bfloat16(),
        "w_f16": torch.randn(7).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "f8b": torch.randn(3).to(torch.float8_e5m2),
        "u16": torch.tensor([1, 2, 65535]).to(torch.uint16),   # v3 rebuild: UntypedStorage counts bytes
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 5),
        "transposed": torch.randn(6, 3).t(),                     # stored with stride (1, 3)
        "conv": torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last),
    }
    optim = {
        "state": {"w32": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
        "param_groups": [{"lr": 0.01, "betas": (0.9, 0.99), "params": ["w32"]}],
    }
    return {"model": model, "optim": optim}


def save(path, state_dict, *, no_dist=False, **writer_kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state_dict, storage_writer=FileSystemWriter(str(path), **writer_kwargs), no_dist=no_dist)
    return Path(path)


def torch_metadata(root: Path, name: str = ".metadata"):
    with open(root / name, "rb") as f:
        return pickle.load(f)


def tensors_by_fqn(state_dict) -> dict:
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", state_dict)
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stored_view(reader, location, stored) -> torch.Tensor:
    """The stored chunk rebuilt from raw file bytes with the reported strides (covers non-contiguous ones)."""
    itemsize = torch.empty((), dtype=getattr(torch, stored.dtype)).element_size()
    span = (1 + sum((d - 1) * s for d, s in zip(stored.shape, stored.stride))) * itemsize
    raw = bytearray(reader.read(location.relative_path, stored.data_offset, span))
    flat = torch.frombuffer(raw, dtype=getattr(torch, stored.dtype))
    return flat.as_strided(stored.shape, stored.stride)


def assert_matches_torch(md, tmd):
    """Every field we decode equals what torch's own unpickling says."""
    torch_tensors = {k: v for k, v in tmd.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    assert [e.fqn for e in md.tensors] == list(torch_tensors)
    assert [b.fqn for b in md.byte_entries] == [k for k in tmd.state_dict_metadata if k not in torch_tensors]
    for entry in md.tensors:
        tsm = torch_tensors[entry.fqn]
        assert entry.dtype == str(tsm.properties.dtype).replace("torch.", "")
        assert entry.shape == tuple(tsm.size)
        assert entry.path == tuple(tmd.planner_data[entry.fqn])
        assert [(c.offsets, c.sizes) for c in entry.chunks] == [(tuple(c.offsets), tuple(c.sizes)) for c in tsm.chunks]
        for chunk, tchunk in zip(entry.chunks, tsm.chunks):
            info = tmd.storage_data[MetadataIndex(entry.fqn, tchunk.offsets)]
            assert (chunk.location.relative_path, chunk.location.offset, chunk.location.length) == (
                info.relative_path, info.offset, info.length)
    for entry in md.byte_entries:
        info = tmd.storage_data[MetadataIndex(entry.fqn)]
        assert (entry.location.relative_path, entry.location.offset, entry.location.length) == (
            info.relative_path, info.offset, info.length)
        assert entry.path == tuple(tmd.planner_data[entry.fqn])
    assert md.version == getattr(tmd, "version", None)
    assert md.files == tuple(sorted({i.relative_path for i in tmd.storage_data.values()}))


def assert_bytes_match(reader, md, stored, expected: dict):
    for entry in md.tensors:
        want = expected[entry.fqn]
        (chunk,) = entry.chunks
        got = stored[chunk.location]
        assert (got.dtype, got.shape, got.stride) == (entry.dtype, tuple(want.shape), want.stride()), entry.fqn
        assert got.data_nbytes == want.numel() * want.element_size()
        if want.numel() == 0:
            continue
        if want.is_contiguous():
            assert reader.read(chunk.location.relative_path, got.data_offset, got.data_nbytes) == as_bytes(want)
        assert as_bytes(stored_view(reader, chunk.location, got)) == as_bytes(want), entry.fqn


def folder_files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}


def torch_save_bytes(t) -> bytes:
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def zip_entries(blob: bytes) -> list:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def build_zip(entries, *, zip64=False) -> bytes:
    """A torch.save-like archive: stored entries, data 64-byte aligned by an 'FB' local extra field.

    With zip64=True every central entry and the end record use zip64 placeholders + extra fields (what
    torch.save writes for >= 4 GiB chunks), so the central extra length differs from the local one.
    """
    out, central = bytearray(), bytearray()
    for name, data in entries:
        raw_name = name.encode()
        header_offset = len(out)
        pad = (-(header_offset + 30 + len(raw_name) + 4)) % 64
        local_extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        crc = zlib.crc32(data)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc, len(data), len(data),
                           len(raw_name), len(local_extra)) + raw_name + local_extra + data
        if zip64:
            extra = struct.pack("<HHQQQ", 0x0001, 24, len(data), len(data), header_offset)
            sizes = (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
        else:
            extra, sizes = b"", (len(data), len(data), header_offset)
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc, sizes[0], sizes[1],
                               len(raw_name), len(extra), 0, 0, 0, 0, sizes[2]) + raw_name + extra
    cd_offset = len(out)
    out += central
    if zip64:
        eocd64_at = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries),
                           len(central), cd_offset)
        out += struct.pack("<IIQI", 0x07064B50, 0, eocd64_at, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(central), cd_offset, 0)
    return bytes(out)


def locate_blob(blob: bytes, *, fqn="t", prefix=b""):
    """locate_tensor on `blob` placed after `prefix` in a one-file MemoryReader."""
    reader = MemoryReader({"__0_0.distcp": prefix + blob})
    return reader, locate_tensor(reader, BlobLocation("__0_0.distcp", len(prefix), len(blob)), fqn=fqn)


class Evil:
    """Pickles as a call of `fn(*args)`, like a malicious checkpoint would."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ---------------------------------------------------------------------------------------------------------
# checkpoints written by torch, once per module


@pytest.fixture(scope="module")
def state_dict():
    return make_state_dict()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, state_dict):
    base = tmp_path_factory.mktemp("reader")
    return {
        "default": save(base / "default", state_dict),
        "no_dist": save(base / "no_dist", state_dict, no_dist=True),
        "multifile": save(base / "multifile", state_dict, single_file_per_rank=False),
        "threads": save(base / "threads", state_dict, thread_count=2),
    }


@pytest.mark.parametrize("variant", ["default", "no_dist", "multifile", "threads"])
def test_metadata_and_bytes_match_torch(ckpts, state_dict, variant):
    root = ckpts[variant]
    with DirectoryReader(root) as reader:
        md = load_metadata(reader, find_metadata_file(root))
        assert_matches_torch(md, torch_metadata(root))
        assert md.version == "1.0.0" and md.torch_version_hint == ">=2.9"
        assert md.tensors[0].path == ("model", "w32")
        assert {b.path for b in md.byte_entries} == {
            ("optim", "param_groups", 0, "lr"), ("optim", "param_groups", 0, "betas"),
            ("optim", "param_groups", 0, "params")}
        stored = locate_all(reader, md.tensors)
        assert_bytes_match(reader, md, stored, tensors_by_fqn(state_dict))
    if variant == "multifile":
        assert len(md.files) == len(md.tensors) + len(md.byte_entries)
    if variant == "threads":
        assert md.files == ("__0_0.distcp", "__0_1.distcp")


def test_strides_and_special_shapes(ckpts):
    with DirectoryReader(ckpts["default"]) as reader:
        md = load_metadata(reader)
        stored = locate_all(reader, md.tensors)
        by_fqn = {e.fqn: stored[e.chunks[0].location] for e in md.tensors}
    assert by_fqn["model.transposed"].stride == (1, 3) and not by_fqn["model.transposed"].is_contiguous
    assert by_fqn["model.conv"].stride == (27, 1, 9, 3)
    assert by_fqn["model.scalar"].shape == () and by_fqn["model.scalar"].data_nbytes == 4
    assert by_fqn["model.empty"].shape == (0, 5) and by_fqn["model.empty"].data_nbytes == 0
    assert by_fqn["model.u16"].data_nbytes == 6


def test_locate_tensor_reads_only_small_ranges(ckpts, state_dict):
    class CountingReader(DirectoryReader):
        calls: list = []

        def read(self, relative_path, offset, length):
            self.calls.append(length)
            return super().read(relative_path, offset, length)

    big = {"big": torch.randn(256, 1024)}   # 1 MiB blob
    root = save(ckpts["default"].parent / "big", big, no_dist=True)
    with CountingReader(root) as reader:
        md = load_metadata(reader)
        reader.calls.clear()
        stored = locate_tensor(reader, md.tensors[0].chunks[0].location, fqn="big")
        assert len(reader.calls) == 2 and sum(reader.calls) <= 8192
        assert reader.read(md.tensors[0].chunks[0].location.relative_path, stored.data_offset,
                           stored.data_nbytes) == as_bytes(big["big"])


def test_gpu_fixtures_match_torch():
    if not GPU_FIXTURES.is_dir():
        pytest.skip(f"{GPU_FIXTURES} not present")
    for name, hint_dtypes in [("fsdp1_mllama_optim", {"bfloat16", "float32"}), ("fsdp2_llama_tied", {"float32"})]:
        root = GPU_FIXTURES / name / "ckpt"
        with DirectoryReader(root) as reader:
            md = load_metadata(reader, find_metadata_file(root))
            assert_matches_torch(md, torch_metadata(root))
            assert {e.dtype for e in md.tensors} == hint_dtypes
            stored = locate_all(reader, md.tensors)
            assert len(stored) == sum(len(e.chunks) for e in md.tensors)
            for entry in md.tensors:
                for chunk in entry.chunks:
                    loc = chunk.location
                    blob = reader.read(loc.relative_path, loc.offset, loc.length)
                    want = torch.load(io.BytesIO(blob), weights_only=True)
                    got = stored[loc]
                    assert got.shape == tuple(want.shape) == chunk.sizes and got.stride == want.stride()
                    raw = reader.read(loc.relative_path, got.data_offset, got.data_nbytes)
                    assert raw == as_bytes(want), (name, entry.fqn, chunk.offsets)


def test_no_torch_on_the_reading_path(ckpts):
    code = textwrap.dedent("""
        import json, sys
        sys.modules["torch"] = None  # any `import torch...` now raises ImportError
        from streamconv.source.io import DirectoryReader
        from streamconv.source import find_metadata_file, load_metadata, locate_all
        root = sys.argv[1]
        with DirectoryReader(root) as reader:
            md = load_metadata(reader, find_metadata_file(root))
            stored = locate_all(reader, md.tensors)
        print(json.dumps({"tensors": len(md.tensors), "located": len(stored),
                          "torch_modules": [m for m in sys.modules if m.split(".")[0] == "torch"
                                            and sys.modules[m] is not None]}))
    """)
    result = subprocess.run([sys.executable, "-c", code, str(ckpts["default"])], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out == {"tensors": 14, "located": 14, "torch_modules": []}


def test_per_rank_metadata_is_merged(tmp_path):
    """use_collectives=False: each rank writes `__{rank}.metadata` with only its own chunks (fake process group)."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    full = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    for rank in range(2):
        dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=2)
        try:
            mesh = init_device_mesh("cpu", (2,))
            state = {"w": DTensor.from_local(full.chunk(2)[rank].clone(), mesh, [Shard(0)], run_check=False),
                     "b": DTensor.from_local(torch.full((4,), float(rank)), mesh, [Replicate()], run_check=False),
                     "step": 7}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp_path)), use_collectives=False)
        finally:
            dist.destroy_process_group()

    assert find_metadata_file(tmp_path) == "__0.metadata"
    with DirectoryReader(tmp_path) as reader:
        md = load_metadata(reader, "__0.metadata")
        w, b = md.tensors
        assert [(c.offsets, c.sizes, c.location.relative_path) for c in w.chunks] == [
            ((0, 0), (3, 4), "__0_0.distcp"), ((3, 0), (3, 4), "__1_0.distcp")]
        assert [c.location.relative_path for c in b.chunks] == ["__0_0.distcp"]  # replicated: lowest rank wins
        assert [e.fqn for e in md.byte_entries] == ["step"]
        assert md.files == ("__0_0.distcp", "__1_0.distcp")
        stored = locate_all(reader, md.tensors)
        got = b"".join(reader.read(c.location.relative_path, stored[c.location].data_offset,
                                   stored[c.location].data_nbytes) for c in w.chunks)
        assert got == as_bytes(full)
    (tmp_path / "__1.metadata").unlink()
    (tmp_path / "__2.metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"missing for rank\(s\) \[1\]"):
        find_metadata_file(tmp_path)


def test_version_hints_for_older_pickles(ckpts):
    """Emulate older writers by editing torch's own Metadata object, then pickling it with torch present."""
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties as OldProperties

    root = ckpts["default"]
    reference = load_metadata(DirectoryReader(root))

    def variant(old_properties: bool, drop: tuple) -> bytes:
        tmd = torch_metadata(root)
        for field in drop:
            del tmd.__dict__[field]    # absent from the pickle, like a writer that predates the field
        if old_properties:
            for item in tmd.state_dict_metadata.values():
                if isinstance(item, TensorStorageMetadata):
                    p = item.properties
                    item.properties = OldProperties(p.dtype, p.layout, p.requires_grad, p.memory_format, p.pin_memory)
        data = pickle.dumps(tmd)
        pickle.loads(data)             # torch itself still reads it
        return data

    cases = [(variant(True, ("storage_meta", "version")), "2.0-2.2"),
             (variant(False, ("storage_meta", "version")), "2.3"),
             (variant(False, ("version",)), "2.4-2.8")]
    files = folder_files(root)
    for data, hint in cases:
        if hint == "2.0-2.2":
            assert b"torch.distributed._shard.sharded_tensor.metadata" in data
        md = load_metadata(MemoryReader({**files, ".metadata": data}))
        assert md.torch_version_hint == hint and md.version is None
        assert md.tensors == reference.tensors and md.byte_entries == reference.byte_entries


def test_missing_chunk_location_names_the_tensor(ckpts):
    root = ckpts["default"]
    tmd = torch_metadata(root)
    del tmd.storage_data[MetadataIndex("model.w_bf16", (0, 0))]
    with pytest.raises(CheckpointError, match=r"tensor 'model.w_bf16' chunk at offsets \[0, 0\].*storage_data"):
        load_metadata(MemoryReader({".metadata": pickle.dumps(tmd)}))


# ---------------------------------------------------------------------------------------------------------
# features we refuse clearly


def _identity_extension(descriptor: str):
    """A real torch stream-transform extension that changes nothing but records `descriptor` in the metadata."""
    from torch.distributed.checkpoint._extension import StreamTransformExtension
    name = descriptor.partition("/")[0]

    class Identity(StreamTransformExtension):
        @staticmethod
        def registry_name():
            return name

        @staticmethod
        def from_descriptor(version):
            return Identity()

        def get_descriptor(self):
            return descriptor

        def transform_to(self, output):
            return output

        def transform_from(self, input):
            return input

    return Identity()


def test_unknown_transform_extension_is_unsupported(tmp_path):
    """Blobs saved through a transform other than torch's ZStandard are refused, naming it and the tensor."""
    root = save(tmp_path / "ck", {"w": torch.ones(2, 2), "lr": 0.1}, no_dist=True,
                _extensions=[_identity_extension("stream.rot13/1")])
    with DirectoryReader(root) as reader:
        md = load_metadata(reader)
        assert md.tensors[0].chunks[0].location.transform_descriptors == ("stream.rot13/1",)
        with pytest.raises(UnsupportedFeatureError, match=r"stream\.rot13/1.*'w'|'w'.*stream\.rot13/1") as err:
            locate_all(reader, md.tensors)
    assert "stream.zstd/1" in str(err.value)     # says what it does undo


def test_zstd_descriptor_on_plain_blobs_is_refused(tmp_path):
    """`stream.zstd/1` in .metadata over blobs that are not zstd (an identity transform under that name): the
    files and the metadata disagree, and the message says so rather than decoding garbage."""
    root = save(tmp_path / "ck", {"w": torch.ones(2, 2)}, no_dist=True,
                _extensions=[_identity_extension("stream.zstd/1")])
    with DirectoryReader(root) as reader:
        md = load_metadata(reader)
        with pytest.raises(CheckpointError, match=r"zstd magic 28b52ffd.*does not belong"):
            locate_all(reader, md.tensors)


def test_safetensors_serialization_format_is_located_in_the_blob(tmp_path):
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    state = {"a": torch.arange(3, dtype=torch.float32), "b": torch.arange(4, dtype=torch.int64).view(2, 2), "lr": 0.1}
    root = save(tmp_path / "ck", state, no_dist=True, serialization_format=SerializationFormat.SAFETENSORS)
    with DirectoryReader(root) as reader:
        md = load_metadata(reader)
        assert md.flavor.startswith("safetensors-serialized DCP")
        for t in md.tensors:
            location = t.chunks[0].location
            assert location.tensor_key == t.fqn
            stored = locate_tensor(reader, location, fqn=t.fqn)
            assert reader.read(location.relative_path, stored.data_offset, stored.data_nbytes) == as_bytes(state[t.fqn])


def test_unsupported_dtype_and_neg_bit():
    with pytest.raises(CheckpointError, match=r"'t'.*dtype 'complex128' is not supported"):
        locate_blob(torch_save_bytes(torch.zeros(2, dtype=torch.complex128)))
    with pytest.raises(UnsupportedFeatureError, match="neg"):
        locate_blob(torch_save_bytes(torch._neg_view(torch.ones(3))))


def test_storage_offset_view_is_addressed():
    """DCP clones such views before saving, but a torch.save blob may keep one: data_offset skips storage_offset."""
    base = torch.arange(10, dtype=torch.float32)
    reader, stored = locate_blob(torch_save_bytes(base[3:7]), prefix=b"x" * 100)
    assert stored.shape == (4,) and stored.data_nbytes == 16
    assert reader.read("__0_0.distcp", stored.data_offset, 16) == as_bytes(base[3:7])


def test_zip64_blob_with_different_local_and_central_extra():
    t = torch.randn(5, 3)
    reader, stored = locate_blob(build_zip(zip_entries(torch_save_bytes(t)), zip64=True), prefix=b"\0" * 7)
    assert (stored.shape, stored.stride) == ((5, 3), (3, 1))
    assert reader.read("__0_0.distcp", stored.data_offset, stored.data_nbytes) == as_bytes(t)


# ---------------------------------------------------------------------------------------------------------
# hostile and broken input


EVIL_METADATA = {
    "os.system (protocol 0 GLOBAL)": (b"cos\nsystem\n(S'echo pwned'\ntR.", "os.system"),
    "builtins.eval (protocol 4 STACK_GLOBAL)": (pickle.dumps(Evil(eval, "1+1"), protocol=4), "builtins.eval"),
    "subprocess.Popen (protocol 2)": (pickle.dumps(Evil(subprocess.Popen, ["true"]), protocol=2,
                                                 fix_imports=False), "subprocess.Popen"),
    "torch.load is not a dtype": (b"\x80\x02ctorch\nload\nq\x00.", "torch.load"),
    "never-imported module": (b"\x80\x02cstreamconv_canary_module\nboom\nq\x00.", "streamconv_canary_module.boom"),
}


@pytest.mark.parametrize("case", list(EVIL_METADATA))
def test_evil_metadata_pickle_is_refused_before_import(case, monkeypatch):
    data, refused = EVIL_METADATA[case]
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a))
    with pytest.raises(UnsafePickleError) as err:
        load_metadata(MemoryReader({".metadata": data}))
    assert ".metadata" in str(err.value) and f"`{refused}`" in str(err.value)
    assert calls == [] and "streamconv_canary_module" not in sys.modules


def test_evil_global_nested_inside_real_metadata(ckpts, monkeypatch):
    tmd = torch_metadata(ckpts["default"])
    tmd.planner_data["model.w32"] = Evil(os.system, "echo pwned")
    data = pickle.dumps(tmd)
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    with pytest.raises(UnsafePickleError, match="system"):
        load_metadata(MemoryReader({".metadata": data}))
    assert calls == []


def test_evil_data_pkl_is_refused(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    evil = build_zip([("archive/data.pkl", b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R."),
                      ("archive/data/0", b"\0" * 16)])
    with pytest.raises(UnsafePickleError, match=r"__0_0.distcp.*'t'.*`os.system`"):
        locate_blob(evil)
    # a tensor-pickle global is not enough to pass the metadata allow-list, and vice versa
    with pytest.raises(UnsafePickleError, match="_rebuild_tensor_v2"):
        load_metadata(MemoryReader({".metadata": b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00."}))
    assert calls == []


def test_build_cannot_modify_stand_ins():
    """BUILD with a slot-state on an allowed global would setattr on our shared objects: refused."""
    for module, name in [(b"torch", b"Size"), (b"torch.distributed.checkpoint.metadata", b"Metadata")]:
        data = b"\x80\x02c" + module + b"\n" + name + b"\nN}X\x03\x00\x00\x00abcK\x01s\x86b."
        with pytest.raises(CheckpointError, match="malformed"):
            load_metadata(MemoryReader({".metadata": data}))
    assert not hasattr(safe_pickle.Metadata, "abc")
    # nor can BUILD rewrite a validated tensor record (data.pkl's result) afterwards
    entries = zip_entries(torch_save_bytes(torch.ones(2)))
    pkl = dict(entries)["archive/data.pkl"]
    forged = pkl[:-1] + b"N}X\x05\x00\x00\x00shapeX\x03\x00\x00\x00abcs\x86b."
    with pytest.raises(CheckpointError, match="malformed"):
        locate_blob(build_zip([(n, forged if n.endswith("data.pkl") else d) for n, d in entries]))


def test_truncated_or_empty_metadata(ckpts):
    data = (ckpts["default"] / ".metadata").read_bytes()
    for broken in (data[: len(data) // 2], data[:-1], b"garbage that is not a pickle"):
        with pytest.raises(CheckpointError, match=r"\.metadata: malformed or truncated"):
            load_metadata(MemoryReader({".metadata": broken}))
    with pytest.raises(CheckpointError, match="empty"):
        load_metadata(MemoryReader({".metadata": b""}))
    with pytest.raises(CheckpointError, match="not a DCP Metadata"):
        load_metadata(MemoryReader({".metadata": pickle.dumps({"a": 1})}))


def test_truncated_distcp_names_file_offset_and_tensor(ckpts):
    root = ckpts["default"]
    files = folder_files(root)
    md = load_metadata(MemoryReader(files))
    last = max((c.location for e in md.tensors for c in e.chunks), key=lambda loc: loc.offset)
    fqn = next(e.fqn for e in md.tensors if e.chunks[0].location == last)
    files["__0_0.distcp"] = files["__0_0.distcp"][: last.offset + last.length // 2]
    with pytest.raises(CheckpointError) as err:
        locate_all(MemoryReader(files), md.tensors)
    message = str(err.value)
    assert "__0_0.distcp" in message and f"offset {last.offset}" in message and repr(fqn) in message
    assert "truncated" in message


def test_malformed_blobs():
    t = torch.arange(4, dtype=torch.float32)
    entries = zip_entries(torch_save_bytes(t))

    def replaced(name, data):
        return [(n, data if n.endswith(name) else d) for n, d in entries]

    cases = {
        "compressed": (_deflated(entries), "compressed"),
        "size mismatch": (build_zip(replaced("data/0", b"\0" * 12)), "12 bytes, but data.pkl says 4 elements"),
        "no storage record": (build_zip([(n, d) for n, d in entries if not n.endswith("data/0")]), "no data/0"),
        "not a zip": (b"\x01" * 200, "does not start with a zip local header"),
        "zstd stream": (b"\x28\xb5\x2f\xfd" + b"\0" * 100, "zstd"),
        "no end record": (build_zip(entries)[:-30], "end-of-central-directory"),
        "a bytes item": (torch_save_bytes({"lr": 0.1}), "not a tensor"),
    }
    # A view that needs more storage than exists: rebuild data.pkl of a (4,)-view over a 2-element storage.
    small = zip_entries(torch_save_bytes(torch.zeros(2)))
    big_pkl = dict(zip_entries(torch_save_bytes(torch.zeros(4))))["archive/data.pkl"]
    patched = big_pkl.replace(b"FloatStorage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x04",
                              b"FloatStorage\nq\x02X\x01\x00\x00\x000q\x03X\x03\x00\x00\x00cpuq\x04K\x02")
    assert patched != big_pkl
    cases["view outside storage"] = (
        build_zip([(n, patched if n.endswith("data.pkl") else d) for n, d in small]), "needs 16 bytes")
    for case, (blob, pattern) in cases.items():
        with pytest.raises(CheckpointError, match=pattern) as err:
            locate_blob(blob, fqn="some.tensor")
        assert "'some.tensor'" in str(err.value) and "__0_0.distcp" in str(err.value), case


def _deflated(entries) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def test_blob_range_outside_file():
    blob = torch_save_bytes(torch.ones(2))
    reader = MemoryReader({"f.distcp": blob})
    with pytest.raises(CheckpointError, match=r"f.distcp: blob at offset 10 .*'x'.*end of the file"):
        locate_tensor(reader, BlobLocation("f.distcp", 10, len(blob)), fqn="x")


def test_locate_all_checks_blob_against_metadata(ckpts):
    files = folder_files(ckpts["default"])
    md = load_metadata(MemoryReader(files))
    a, b = md.tensors[0], md.tensors[1]
    swapped = type(a)(a.fqn, a.dtype, a.shape, (type(a.chunks[0])(a.chunks[0].offsets, a.chunks[0].sizes,
                                                                   b.chunks[0].location),))
    with pytest.raises(CheckpointError, match="different saves"):
        locate_all(MemoryReader(files), [swapped])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_input_only_raises_checkpoint_errors(ckpts, data):
    """Fuzz: any byte flips or cut in .metadata / a blob give CheckpointError or a valid result, never a crash."""
    files = folder_files(ckpts["default"])
    md = load_metadata(MemoryReader(files))
    target = data.draw(st.sampled_from([".metadata", "__0_0.distcp"]))
    raw = bytearray(files[target])
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    files[target] = bytes(raw)
    reader = MemoryReader(files)
    try:
        md = load_metadata(reader) if target == ".metadata" else md
        locate_all(reader, md.tensors)
    except CheckpointError:
        pass


# ---------------------------------------------------------------------------------------------------------
# find_metadata_file


def test_find_metadata_file_explains_what_a_checkpoint_is(tmp_path, ckpts):
    assert find_metadata_file(ckpts["default"]) == ".metadata"
    with pytest.raises(CheckpointError, match="does not exist"):
        find_metadata_file(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="folder is empty"):
        find_metadata_file(tmp_path)

    (tmp_path / "__0_0.distcp").write_bytes(b"")
    (tmp_path / ".metadata.tmp").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        find_metadata_file(tmp_path)
    message = str(err.value)
    assert "__<rank>_<n>.distcp" in message and "save did not finish" in message and "interrupted" in message
    assert "Found: .metadata.tmp, __0_0.distcp." in message

    outer = tmp_path / "run"
    shutil.copytree(ckpts["default"], outer / "epoch_1")
    (outer / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"(?s)safetensors model already.*Did you mean: .*epoch_1\?"):
        find_metadata_file(outer)


# ---------------------------------------------------------------------------------------------------------
# speed


def many_chunk_checkpoint(root: Path, n_chunks: int) -> Path:
    """What dcp.save writes for `n_chunks` small tensors, assembled directly (dcp.save itself needs seconds):
    the same torch.save blob repeated in one .distcp, and torch's own Metadata dataclasses pickled."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorProperties

    blob = torch_save_bytes(torch.ones(8))
    sdm, storage, planner = {}, {}, {}
    for i in range(n_chunks):
        fqn = f"layer{i}.w"
        sdm[fqn] = TensorStorageMetadata(TensorProperties(torch.float32), torch.Size([8]),
                                         [ChunkStorageMetadata(torch.Size([0]), torch.Size([8]))])
        storage[MetadataIndex(fqn, (0,), 0)] = _StorageInfo("__0_0.distcp", i * len(blob), len(blob))
        planner[fqn] = (fqn,)
    root.mkdir()
    (root / "__0_0.distcp").write_bytes(blob * n_chunks)
    (root / ".metadata").write_bytes(pickle.dumps(Metadata(sdm, planner, storage, version="1.0.0")))
    return root


def test_four_thousand_chunks_are_all_located(tmp_path):
    # Speed is measured by the benchmarks (startup to first byte), not asserted here: timed unit tests flake.
    root = many_chunk_checkpoint(tmp_path / "many", 4000)
    with DirectoryReader(root) as reader:
        md = load_metadata(reader)
        stored = locate_all(reader, md.tensors)
    assert len(stored) == 4000 and len({s.data_offset for s in stored.values()}) == 4000
