"""source/fast_records.py: torch's per-chunk `.metadata` records read in bulk into columns, and the general machine as
the tested fallback: both decode every checkpoint to the same metadata, whichever way the pickle was written."""
from __future__ import annotations

import pickle

import pytest

from benchmarks import metadata_scale
from streamconv.errors import StreamconvError
from streamconv.source import fast_records, metadata, safe_pickle
from streamconv.source.io import DirectoryReader, MemoryReader


def _both(reader, monkeypatch):
    fast = metadata.load_metadata(reader)
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "1")
    assert not metadata.fast_records_on()
    general = metadata.load_metadata(reader)
    monkeypatch.delenv("STREAMCONV_NO_FAST_PATHS")
    return fast, general


def _columns(raw: bytes):
    return safe_pickle.load_metadata_pickle(raw, source="x", fast=fast_records.handlers).columns


@pytest.fixture(scope="module")
def small_scale(tmp_path_factory):
    """The benchmark's DeepSeek-V3 layout, scaled down: 4 layers (1 dense), 8 experts, EP 2 x FSDP 2."""
    out = tmp_path_factory.mktemp("scale") / "ckpt"
    counts = metadata_scale.write(out, layers=4, dense_layers=1, experts=8, ep=2, fsdp=2, with_optim=True)
    return out, counts


def test_the_generator_writes_what_it_counts(small_scale):
    out, counts = small_scale
    meta = metadata.load_metadata(DirectoryReader(out))
    assert counts["model_tensors"] == 3 + 9 * 4 + 3 + 8 * 3 and counts["tensors"] == 4 * counts["model_tensors"]
    assert sum(len(t.chunks) for t in meta.tensors) == counts["chunks"]
    assert len(meta.files) == counts["ranks"] == 4
    assert sum((out / f).stat().st_size for f in meta.files) == counts["data_bytes"]
    assert sum((out / f).stat().st_blocks for f in meta.files) == 0          # sparse: nothing written


def test_fast_and_general_decode_the_same_metadata(small_scale, monkeypatch):
    out, counts = small_scale
    fast, general = _both(DirectoryReader(out), monkeypatch)
    assert fast == general
    raw = (out / ".metadata").read_bytes()
    columns = _columns(raw)
    # Every record went through the fast path (AdamW's 0-d steps too) but the first of each kind (its key names are
    # new strings) and those a FRAME (every 64 KiB) cuts.
    rows = sum(len(t.chunks) for t in fast.tensors)
    assert any(not t.shape for t in fast.tensors)
    missed = 2 + len(raw) // 65536 + 1
    assert rows - missed <= columns.row_count <= rows
    assert 2 * (rows - missed) <= len(columns.chunk_dims) <= 2 * rows


@pytest.mark.parametrize("name", ["fsdp2_optim", "tp", "exotic_dtypes", "dtensor_2d"])
def test_torch_written_checkpoints_decode_the_same_both_ways(name, tmp_path_factory, monkeypatch):
    from tests.support import dcp_writers
    ckpt = dcp_writers.build(tmp_path_factory.mktemp(name), [name])[name]
    fast, general = _both(DirectoryReader(ckpt), monkeypatch)
    assert fast == general


def test_a_reference_back_into_consumed_records_falls_back_to_the_general_machine(tmp_path, monkeypatch):
    """torch never refers back to a chunk's objects, but a pickle may: here two tensors share their chunk objects,
    so the pickle fetches memo entries the fast path elided. The load runs again on the general machine and decodes
    the same metadata."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    chunks = [ChunkStorageMetadata(offsets=torch.Size([4 * r, 0]), sizes=torch.Size([4, 3])) for r in range(4)]
    storage = {MetadataIndex(fqn, c.offsets, r): _StorageInfo("__0_0.distcp", 100 * r + 400 * (fqn == "v"), 100)
               for fqn in ("w", "v") for r, c in enumerate(chunks)}
    props = TensorProperties(dtype=torch.float32)
    md = Metadata({fqn: TensorStorageMetadata(props, torch.Size([16, 3]), list(chunks)) for fqn in ("w", "v")},
                  planner_data={"w": ("w",), "v": ("v",)}, storage_data=storage)
    raw = pickle.dumps(md, protocol=4)
    files = {".metadata": raw, "__0_0.distcp": bytes(800)}
    assert _columns(raw) is None             # the fast load gave up: decoded by the general machine alone
    fast, general = _both(MemoryReader(files), monkeypatch)
    assert fast == general
    assert [c.offsets for c in fast.tensors[0].chunks] == [(0, 0), (4, 0), (8, 0), (12, 0)]
    assert [c.location.offset for c in fast.tensors[1].chunks] == [400, 500, 600, 700]


def test_a_negative_size_in_a_record_is_refused_as_before(small_scale, monkeypatch):
    """A number the fast path does not take (negative) sends the record to the general machine, which refuses it
    with the same message."""
    out, _ = small_scale
    raw = bytearray((out / ".metadata").read_bytes())
    record = raw.index(b"\x86\x94\x85\x94R\x94", len(raw) // 3)     # the end of some 2-D torch.Size
    # The second dim just before it becomes BININT -1 when it was a BININT2 (M xx): rewrite it as J ffffffff.
    at = record - 3
    assert raw[at] == 0x4D
    raw[at:record] = b"J\xff\xff\xff\xff"
    files = {".metadata": bytes(raw)}
    errors = []
    for env in (None, "1"):
        if env:
            monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", env)
        with pytest.raises(Exception) as caught:
            metadata.load_metadata(MemoryReader(files))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "not a tuple of non-negative ints" in errors[0]


def _md(tensors, storage_rows, planner=None):
    """A torch Metadata pickled as FileSystemWriter pickles it: `tensors` {fqn: (shape, [chunk offsets], chunk
    sizes)}, `storage_rows` [(fqn, offsets, file, blob offset, length)] in storage_data's order."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    props = TensorProperties(dtype=torch.float32)
    sdm = {fqn: TensorStorageMetadata(props, torch.Size(shape), [ChunkStorageMetadata(torch.Size(o), torch.Size(sizes))
                                                                  for o in offsets])
           for fqn, (shape, offsets, sizes) in tensors.items()}
    storage = {MetadataIndex(fqn, torch.Size(o), 0): _StorageInfo(path, at, length)
               for fqn, o, path, at, length in storage_rows}
    return pickle.dumps(Metadata(sdm, planner_data=planner or {f: (f,) for f in tensors}, storage_data=storage),
                        protocol=4)


def test_numbers_of_every_width_decode_the_same_both_ways(monkeypatch):
    """Offsets past 2^31 and 2^32 (LONG1 of 5 and 6 bytes), BININT, BININT2 and BININT1, in both kinds of record."""
    big = [0, 200, 70_000, 3_000_000_000, 2 ** 40 + 5]
    offsets = [(o, 0) for o in big]
    raw = _md({"w": ((2 ** 41, 3), offsets, (7, 3))},
              [("w", o, "__0_0.distcp", big[-1 - k], big[k] + 1000) for k, o in enumerate(offsets)])
    fast, general = _both(MemoryReader({".metadata": raw}), monkeypatch)
    assert fast == general
    chunks = fast.tensors[0].chunks
    assert [c.offsets for c in chunks] == offsets
    assert [(c.location.offset, c.location.length) for c in chunks] == [(big[-1 - k], big[k] + 1000) for k in range(5)]
    columns = _columns(raw)
    assert columns.row_count == 4 and len(columns.chunk_dims) == 2 * 4   # the first of each names new strings


def test_a_record_one_byte_off_its_run_goes_to_the_general_machine(small_scale, monkeypatch):
    """A record in the middle of a run whose offset 0 is written as LONG1 of no bytes (`\\x8a\\x00`, still 0; torch
    writes `K\\x00`): the compiled shape does not take it, the general machine reads it, and the fast path takes up
    the next record again. The metadata decoded is the same as the file's without the change."""
    out, _ = small_scale
    raw = (out / ".metadata").read_bytes()
    changed = bytearray(raw)
    storage_at = raw.index(b"storage_data")
    for section in (len(raw) // 8, storage_at + (len(raw) - storage_at) // 2):   # in chunk records, in storage rows
        at = raw.index(b"h!K\x00", section) + 2     # torch.Size's first int, a 0
        changed[at] = 0x8A
    assert len(changed) == len(raw) and sum(a != b for a, b in zip(raw, changed)) == 2
    before, after = _columns(raw), _columns(bytes(changed))
    assert after.row_count == before.row_count - 1
    assert len(after.chunk_dims) == len(before.chunk_dims) - 2
    original = metadata.load_metadata(DirectoryReader(out))
    fast, general = _both(MemoryReader({".metadata": bytes(changed)}), monkeypatch)
    assert fast == general == original


def test_a_memo_entry_replaced_between_runs_is_read_again(monkeypatch):
    """The fqn and file names rows refer to are remembered only while no memo entry is replaced: here a BINPUT between
    two storage rows makes the reference that named 'w' name 'v', so the rows after it are v's. Remembering 'w'
    would leave v's chunks without storage."""
    offsets = [(4 * r, 0) for r in range(8)]
    rows = [("w", o, "__0_0.distcp", 100 * k, 48) for k, o in enumerate(offsets)]
    raw = _md({"w": ((32, 3), offsets[:4], (4, 3)), "v": ((32, 3), offsets[4:], (4, 3))}, rows,
              planner={"w": ("w",), "v": ("v",)})
    storage_at = raw.index(b"storage_data")
    fqn_ref = raw[raw.index(b"fqn\x94", storage_at) + 4:][:2]            # BINGET of 'w'
    assert fqn_ref[0] == 0x68
    fifth = storage_at
    for _ in range(5):
        fifth = raw.index(fqn_ref, fifth + 1)
    record = raw.rindex(b")\x81\x94}\x94(", storage_at, fifth) - 2     # the fifth row's MetadataIndex reference
    assert raw[record] == 0x68
    crafted = raw[:record] + b"\x8c\x01vq" + fqn_ref[1:] + b"0" + raw[record:]   # 'v', BINPUT over 'w', POP
    fast, general = _both(MemoryReader({".metadata": crafted, "__0_0.distcp": bytes(800)}), monkeypatch)
    assert fast == general
    assert [c.location.offset for c in fast.tensors[1].chunks] == [400, 500, 600, 700]
    assert _columns(crafted).row_count == 7     # all but the first (its key names are new strings)


def test_a_storage_row_naming_something_else_stops_its_run(small_scale, monkeypatch):
    """A row in the middle of a run whose fqn reference names a class instead of a string: the run ends before it,
    and the general machine refuses it with the message it always gave."""
    out, _ = small_scale
    raw = bytearray((out / ".metadata").read_bytes())
    storage_at = raw.index(b"storage_data")
    new = b")\x81\x94}\x94("
    second_row = raw.index(new, raw.index(new, raw.index(new, storage_at) + 1) + 1) + len(new)   # its MetadataIndex
    fqn_key = raw[second_row:second_row + (2 if raw[second_row] == 0x68 else 5)]    # the 'fqn' key's reference
    at = raw.index(new + fqn_key, storage_at + (len(raw) - storage_at) // 2) + len(new + fqn_key)
    # A row's fqn reference (BINGET / LONG_BINGET i) now names memo entry 0x28: the ChunkStorageMetadata class ('h('
    # in every chunk record), not a string.
    assert raw.count(b"h()\x81") > 100 and raw[at] in (0x68, 0x6A)
    raw[at + 1:at + (2 if raw[at] == 0x68 else 5)] = b"(" if raw[at] == 0x68 else b"(\0\0\0"
    errors = []
    for env in (None, "1"):
        if env:
            monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", env)
        with pytest.raises(Exception) as caught:
            metadata.load_metadata(MemoryReader({".metadata": bytes(raw)}))
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "expected a string" in errors[0]


def test_tensors_of_one_layout_share_their_chunk_columns(small_scale):
    """A layer's weights share their boxes and files columns with the other layers' of that shape, an optimizer
    moment with its parameter's: what each table has of its own is its blobs' offsets and lengths (16 bytes a
    chunk)."""
    out, counts = small_scale
    meta = metadata.load_metadata(DirectoryReader(out))
    by_fqn = {t.fqn: t.chunks for t in meta.tensors}
    weight = "layers.1.moe.routed_experts.inner_experts.w1_EFD"
    moment = by_fqn[f"optimizer.state.{weight}.exp_avg"]
    assert moment.boxes is by_fqn[weight].boxes and moment.where is by_fqn[weight].where
    assert moment.blobs is not by_fqn[weight].blobs and moment.blobs != by_fqn[weight].blobs
    assert by_fqn[weight].boxes is by_fqn[weight.replace("layers.1", "layers.2")].boxes
    own = {id(c.blobs): len(c.blobs) * c.blobs.itemsize for c in by_fqn.values()}
    shared = {id(a): len(a) * a.itemsize for c in by_fqn.values() for a in (c.boxes, c.where)}
    assert sum(own.values()) == 16 * counts["chunks"]
    assert sum(shared.values()) < sum(own.values())


def test_chunks_of_0_to_5_dims_decode_the_same_both_ways(monkeypatch):
    """torch.Size pickles as EMPTY_TUPLE (0 dims), TUPLE1-3 or MARK ... TUPLE (4+), each making its own number of memo
    entries: the fast path elides as many as the records made, so every reference after them still resolves."""
    tensors, rows = {}, []
    for n in (1, 2, 3, 4, 5, 0, 0, 0):     # 0-d after the others: their records are not a run's first with new keys
        shape = tuple(4 * (k + 1) for k in range(n))
        offsets = [tuple((r if k == 0 else 0) for k in range(n)) for r in range(4 if n else 1)]
        sizes = tuple((1 if k == 0 else s) for k, s in enumerate(shape)) if n else ()
        name = f"t{len(tensors)}_{n}"      # one string object, memoized once as torch's are
        tensors[name] = (shape, offsets, sizes)
        rows += [(name, o, "__0_0.distcp", 1000 * n + 100 * r, 64) for r, o in enumerate(offsets)]
    raw = _md(tensors, rows)
    fast, general = _both(MemoryReader({".metadata": raw, "__0_0.distcp": bytes(6000)}), monkeypatch)
    assert fast == general
    assert [len(t.chunks) for t in fast.tensors] == [4, 4, 4, 4, 4, 1, 1, 1]
    assert [c.location.offset for c in fast.tensors[4].chunks] == [5000, 5100, 5200, 5300]
    columns = _columns(raw)     # None when the load gave up (a reference into elided memo entries)
    assert columns.row_count == len(rows) - 1 and len(columns.chunk_dims) == 2 * (len(rows) - 1)


def _taken(raw: bytes):
    """(records each fast path took, by class name; the columns) of decoding `raw` with the fast paths."""
    taken = {}

    def counting(spec):
        paths, columns = fast_records.handlers(spec)
        names = {id(cls): cls.__name__ for cls in (safe_pickle.ChunkStorageMetadata, safe_pickle.MetadataIndex,
                                                    safe_pickle.TensorStorageMetadata)}

        def wrap(key, run):
            def counted(*args):
                out = run(*args)
                if out is not None:
                    taken[names[key]] = taken.get(names[key], 0) + 1
                return out
            return counted
        return {key: wrap(key, run) for key, run in paths.items()}, columns

    columns = safe_pickle.load_metadata_pickle(raw, source="x", fast=counting).columns
    return taken, columns


@pytest.mark.parametrize("name", ["fsdp2", "tp", "dtensor_2d"])
def test_a_multi_rank_checkpoint_is_read_by_the_fast_paths(name, dcp_checkpoints, monkeypatch):
    """torch's coordinator pickles each rank's storage rows with that rank's own strings, so every row names its fqn
    inline (and each rank's first row its file); each state_dict_metadata entry after the first refers to classes
    and keys already seen. The fast paths take every entry but the first and every row but each file's first (and
    those a FRAME cuts), and decode the same metadata as the general machine."""
    import pickletools
    ckpt = dcp_checkpoints[name]
    raw = (ckpt / ".metadata").read_bytes()
    fast, general = _both(DirectoryReader(ckpt), monkeypatch)
    assert fast == general
    taken, columns = _taken(raw)
    rows = sum(len(t.chunks) for t in fast.tensors)
    frames = sum(op.name == "FRAME" for op, _, _ in pickletools.genops(raw))
    assert rows - len(fast.files) - frames <= columns.row_count <= rows - len(fast.files)
    assert len(fast.tensors) - 1 - frames <= taken["TensorStorageMetadata"] <= len(fast.tensors) - 1


def _inline_rows(tensors, storage_rows):
    """`_md` as a multi-rank save pickles it: each tensor with TensorProperties of its own, each storage row naming
    its fqn with a string of its own (written inline)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       TensorProperties, TensorStorageMetadata)
    sdm = {fqn: TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(shape),
                                      [ChunkStorageMetadata(torch.Size(o), torch.Size(sizes)) for o in offsets])
           for fqn, (shape, offsets, sizes) in tensors.items()}
    storage = {MetadataIndex("".join(list(fqn)), torch.Size(o), 0): _StorageInfo(path, at, length)
               for fqn, o, path, at, length in storage_rows}
    return pickle.dumps(Metadata(sdm, planner_data={f: (f,) for f in tensors}, storage_data=storage), protocol=4)


def _error(files) -> str:
    with pytest.raises(StreamconvError) as caught:
        metadata.load_metadata(MemoryReader(files))
    return str(caught.value)


def _same_error(files, monkeypatch, expected: str):
    """The message decoding `files` ends with, the same with the fast paths on and off, holding `expected`."""
    fast = _error(files)
    monkeypatch.setenv("STREAMCONV_NO_FAST_PATHS", "1")
    general = _error(files)
    monkeypatch.delenv("STREAMCONV_NO_FAST_PATHS")
    assert fast == general and expected in fast, (fast, general)


def test_an_inline_fqn_holding_a_record_s_tail_is_not_split_inside_it(monkeypatch):
    """A storage row's inline fqn is matched lazily up to what follows it in the record; one that holds bytes
    looking like that tail (here the next row's whole tail, then bytes no UTF-8 string has) must not be cut there:
    its length byte says where it ends, the fast path leaves the row to the general machine, which refuses the
    string as it always did."""
    offsets = [(4 * r, 0) for r in range(4)]
    raw = _inline_rows({"ww": ((16, 3), offsets, (4, 3))},
                       [("ww", o, "__0_0.distcp", 100 * k, 48) for k, o in enumerate(offsets)])
    fqn = b"\x8c\x02ww\x94"
    third = raw.index(fqn, raw.index(fqn, raw.index(fqn, raw.index(b"storage_data")) + 1) + 1)
    tail = raw[third + 4:raw.index(b"ub", raw.index(b"ub", third) + 2) + 2]   # from its \x94 to the row's end
    crafted_name = b"ww" + tail + b"\xff"
    assert len(crafted_name) < 256
    crafted = raw[:third] + b"\x8c" + bytes([len(crafted_name)]) + crafted_name + raw[third + 4:]
    _same_error({".metadata": crafted, "__0_0.distcp": bytes(800)}, monkeypatch, "UnicodeDecodeError")


def test_an_entry_with_a_chunk_of_another_rank_is_refused_as_before(monkeypatch):
    """The entry fast path takes an entry only when every chunk has the tensor's number of dims: here the second
    tensor's third chunk has 3, and the general machine names it, with the fast paths on as with them off."""
    offsets = [(4 * r, 0) for r in range(4)]
    raw = _inline_rows({"vv": ((16, 3), offsets, (4, 3)), "ww": ((16, 3), offsets, (4, 3))},
                       [(f, o, "__0_0.distcp", 100 * k, 48) for f in ("vv", "ww") for k, o in enumerate(offsets)])
    assert raw.count(b"K\x08K\x00\x86\x94") == 4      # offsets (8, 0): vv's and ww's chunks, then their storage rows
    second = raw.index(b"K\x08K\x00\x86\x94", raw.index(b"K\x08K\x00\x86\x94") + 1)
    crafted = raw[:second] + b"K\x08K\x00K\x00\x87\x94" + raw[second + 6:]   # (8, 0, 0)
    assert _taken(raw)[0]["TensorStorageMetadata"] == 1     # ww's entry, in the file before the change
    _same_error({".metadata": crafted, "__0_0.distcp": bytes(800)}, monkeypatch, "do not match the tensor's rank")


def test_a_tuple_closing_fewer_ints_than_it_follows_is_refused_as_before(monkeypatch):
    """torch.Size's dims end with TUPLE1-3 holding as many ints as precede it: two ints closed by TUPLE1 leave one
    on the stack, which the general machine refuses; the fast paths must not read them as a 2-d size."""
    offsets = [(4 * r, 0) for r in range(4)]
    raw = _inline_rows({"vv": ((16, 3), offsets, (4, 3)), "ww": ((16, 3), offsets, (4, 3))},
                       [(f, o, "__0_0.distcp", 100 * k, 48) for f in ("vv", "ww") for k, o in enumerate(offsets)])
    second = raw.index(b"K\x08K\x00\x86\x94", raw.index(b"K\x08K\x00\x86\x94") + 1)
    crafted = raw[:second] + b"K\x08K\x00\x85\x94" + raw[second + 6:]
    _same_error({".metadata": crafted, "__0_0.distcp": bytes(800)}, monkeypatch, "REDUCE calls 8")
