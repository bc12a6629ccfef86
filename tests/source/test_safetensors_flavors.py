"""The safetensors flavors of torch's DCP writers (issue 11 items 2, 3, 5), on checkpoints torch itself wrote.

* `FileSystemWriter(serialization_format=SAFETENSORS)`: torch cannot read these back, so every tensor is compared
  with the source state dict the writer recorded, bit for bit.
* `HuggingFaceStorageWriter(save_distributed=True)` per-rank shards: compared with the source state dict and with
  torch's own `consolidate_safetensors_files`, bit for bit.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.support import st_writers
import streamconv
from streamconv import failpoints
from streamconv.output import staging
from streamconv.errors import CheckpointError, UnsupportedFeatureError
from streamconv.source.io import DirectoryReader
from streamconv.source import load_metadata, locate_all
from tests.support.outputs import read_output, same_bits

CONVERTED = [n for n in st_writers.CHECKPOINTS if n not in ("hf_clobbered", "hf_consolidated")] + [
    "hf_consolidated/sharded"]
TORCH_CONSOLIDATES = ["hf_fsdp2", "hf_tp", "hf_map", "hf_mesh2d"]   # float only: torch's uses torch.finfo


@pytest.fixture(scope="session")
def st_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    st_writers.build(root)
    return root


def expected_for(st_checkpoints, name):
    return st_writers.load_expected(st_checkpoints / name.split("/")[0])


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamconv.cli", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})))


# -- every flavor converts to the source tensors ----------------------------------------------------------


@pytest.mark.parametrize("name", CONVERTED)
def test_converts_to_the_source_state_dict_bit_for_bit(st_checkpoints, name, tmp_path):
    expected = expected_for(st_checkpoints, name)
    out = tmp_path / "out"
    # Small shards and buffer: several output files, and N-D chunks assembled band by band.
    report = streamconv.convert(str(st_checkpoints / name), str(out), max_shard_size="40KB", buffer_size="64KiB",
                                no_config=True, verify=True)
    got = read_output(out)
    prefix = "model." if name.startswith("st_") else ""
    want = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix) and not k.startswith("optim.")}
    assert set(got) == set(want) and report.tensors == len(want)
    for key, tensor in want.items():
        assert same_bits(got[key], tensor), f"{name}: {key} differs from the source"
    assert report.verified_bytes > 0


@pytest.mark.parametrize("name", TORCH_CONSOLIDATES)
def test_hf_shards_match_torch_consolidate_safetensors_files(st_checkpoints, name, tmp_path):
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    ckpt = st_checkpoints / name
    names = [t.fqn for t in streamconv.api.load(str(ckpt))[1].tensors]
    theirs = tmp_path / "torch"
    theirs.mkdir()     # torch's consolidator needs the folder to exist and a name -> file mapping
    consolidate_safetensors_files(str(ckpt), str(theirs), fqn_to_index_mapping={k: 1 for k in names})
    streamconv.convert(str(ckpt), str(tmp_path / "ours"), no_config=True, buffer_size="64KiB")
    ours = read_output(tmp_path / "ours")
    with safe_open(str(theirs / "model-00001-of-00001.safetensors"), framework="pt") as f:
        torch_tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert set(ours) == set(torch_tensors) == set(names)
    for key in names:
        assert same_bits(ours[key], torch_tensors[key]), f"{name}: {key} differs from torch's consolidation"


def test_torch_consolidated_folder_equals_ours_from_its_shards(st_checkpoints, tmp_path):
    """enable_consolidation=True: torch's own consolidated model beside the shards it was made from."""
    root = st_checkpoints / "hf_consolidated"
    streamconv.convert(str(root / "sharded"), str(tmp_path / "ours"), no_config=True)
    ours = read_output(tmp_path / "ours")
    with safe_open(str(root / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(ours)
        for key in f.keys():
            assert same_bits(ours[key], f.get_tensor(key)), key


def test_torch_cannot_read_safetensors_serialized_dcp(st_checkpoints, tmp_path):
    """Why these are compared with the source state dict: torch's own reader unpickles safetensors bytes."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    import pickle

    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as err:
        dcp_to_torch_save(st_checkpoints / "st_tp", tmp_path / "full.pt")
    causes = [failure[0] if isinstance(failure, tuple) else failure for failure in err.value.failures.values()]
    assert causes and all(isinstance(c, pickle.UnpicklingError) for c in causes)


def test_chunks_are_located_inside_one_safetensors_blob_per_file(st_checkpoints):
    """Every chunk of a file names the file's one blob (offset after the bytes items) and its key; located,
    each lies inside the blob's data section, without overlap."""
    with DirectoryReader(str(st_checkpoints / "st_fsdp2_optim")) as reader:
        meta = load_metadata(reader)
        assert meta.flavor.startswith("safetensors-serialized DCP")
        assert meta.byte_entries and all(not b.location.tensor_key for b in meta.byte_entries if b.location)
        blob_starts = {}
        for t in meta.tensors:
            for c in t.chunks:
                assert c.location.tensor_key == t.fqn
                blob_starts.setdefault(c.location.relative_path, set()).add(c.location.offset)
        assert all(len(starts) == 1 for starts in blob_starts.values()) and len(blob_starts) == 2
        assert any(start > 0 for starts in blob_starts.values() for start in starts)   # after the bytes items
        stored = locate_all(reader, meta.tensors)
        by_file = {}
        for location, s in stored.items():
            assert s.crc32 is None and s.storage_crc32 is None and s.is_contiguous
            by_file.setdefault(location.relative_path, []).append((s.data_offset, s.data_offset + s.data_nbytes))
        for ranges in by_file.values():
            ranges.sort()
            assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


# -- inspect, CRC, resume ------------------------------------------------------------------------------------


def test_inspect_names_the_flavor(st_checkpoints):
    st = run_cli("inspect", st_checkpoints / "st_tp")
    assert st.returncode == 0 and "safetensors-serialized DCP" in st.stdout
    hf = run_cli("inspect", st_checkpoints / "hf_mesh2d", "--json")
    info = json.loads(hf.stdout)
    assert hf.returncode == 0 and info["format"].startswith("Hugging Face per-rank shards")
    assert "4 rank(s)" in info["format"]
    q = next(t for t in info["tensors"] if t["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert q["shape"] == [64, 64] and q["chunks"] == 4


def test_crc_check_reports_safetensors_chunks_as_unchecked(st_checkpoints, tmp_path):
    ckpt = st_checkpoints / "st_fsdp2_optim"
    converted = run_cli("convert", ckpt, tmp_path / "out", "--no-config", "--crc", "--json")
    assert converted.returncode == 0, converted.stderr
    report = json.loads(converted.stdout)
    assert report["crc_checked_bytes"] == 0
    assert any("unchecked" in n and "safetensors" in n for n in report["notes"])
    verified = run_cli("verify", ckpt, tmp_path / "out", "--no-config")
    assert verified.returncode == 0, verified.stderr
    assert "0 chunk CRC-32s ok" in verified.stdout and "chunk(s) unchecked" in verified.stdout
    as_json = json.loads(run_cli("verify", ckpt, tmp_path / "out", "--no-config", "--json").stdout)
    chunks = sum(len(t.chunks) for t in streamconv.plan(str(ckpt), no_config=True).tensors)
    assert as_json["ok"] and as_json["crc_unrecorded_chunks"] == chunks and as_json["crc_checked_chunks"] == 0


def test_resume_records_hold_the_real_crc_of_each_shard(st_checkpoints, tmp_path):
    """Chunks inside safetensors blobs have no recorded CRC-32: copied bytes are read back for the record. A
    killed run's records must match the files, so that --resume keeps them."""
    ckpt, out = st_checkpoints / "hf_tp", tmp_path / "out"
    args = ("convert", ckpt, out, "--no-config", "--max-shard-size", "60KB", "--workers", "1")
    killed = run_cli(*args, env={failpoints.KILL_AT_ENV: "between-shards@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    stage = tmp_path / ".out.streamconv-partial"
    records = sorted((stage / staging.RECORDS_DIR).glob("*.safetensors.json"))
    assert len(records) == 2
    for record in records:
        shard = stage / record.name[:-len(".json")]
        assert json.loads(record.read_text())["crc32"] == zlib.crc32(shard.read_bytes())
    resumed = run_cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 2 of" in " ".join(json.loads(resumed.stdout)["notes"])
    streamconv.convert(str(ckpt), str(tmp_path / "plain"), no_config=True, max_shard_size="60KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in (tmp_path / "plain").iterdir()}


# -- folders that are not converted ------------------------------------------------------------------------


def test_consolidated_hf_folder_keeps_a_clear_message(st_checkpoints):
    result = run_cli("convert", st_checkpoints / "hf_consolidated", "/nonexistent/out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "safetensors model already" in result.stderr and "sharded" in result.stderr


@pytest.mark.parametrize("survivor", [None, 1, 2])
def test_clobbered_distributed_save_is_explained(st_checkpoints, tmp_path, survivor):
    """save_distributed=False of a sharded state dict: all ranks write model-00001-of-00001.safetensors and the
    last one wins. Which one is a race, so each outcome is built from torch's files: rank 1's pieces (all at
    offset 0: the index's total_size gives it away) or rank 2's (pieces at other offsets)."""
    ckpt = tmp_path / "ck"
    shutil.copytree(st_checkpoints / "hf_clobbered", ckpt)
    if survivor is not None:
        shutil.copy(st_checkpoints / "hf_fsdp2" / f"shard-0000{survivor}-model-00001-of-00001.safetensors",
                    ckpt / "model-00001-of-00001.safetensors")
    result = run_cli("inspect", ckpt)
    assert result.returncode == 2 and "save_distributed=True" in result.stderr, result.stderr
    expected = {None: ("pieces of tensors", "index.json says 876808"), 1: ("index.json says 876808",),
                2: ("pieces of tensors",)}[survivor]
    assert any(text in result.stderr for text in expected), result.stderr
    assert "safetensors model already" not in result.stderr


def test_run_folder_holding_hf_shards_is_found(st_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(st_checkpoints / "hf_fsdp2", run / "checkpoint" / "step-10")
    plan = streamconv.plan(str(run), no_config=True)
    assert len(plan.tensors) == 29


# -- damaged and hostile shards ----------------------------------------------------------------------------


def shard_copy(st_checkpoints, tmp_path, name="hf_mesh2d"):
    dst = tmp_path / name
    shutil.copytree(st_checkpoints / name, dst)
    return dst


def test_missing_rank_file_is_named(st_checkpoints, tmp_path):
    ckpt = shard_copy(st_checkpoints, tmp_path)
    (ckpt / "shard-00002-model-00001-of-00001.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[2\] are missing"):
        streamconv.inspect(str(ckpt))


def test_missing_piece_fails_the_coverage_proof(st_checkpoints, tmp_path):
    """A shard file that lost one tensor: that tensor's box has a hole, found before anything is written."""
    ckpt = shard_copy(st_checkpoints, tmp_path, "hf_tp")
    path = ckpt / "shard-00001-model-00001-of-00001.safetensors"
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    info = json.loads(metadata["DCP_SHARDING_INFO"])
    del tensors["model.layers.0.mlp.down_proj.weight"], info["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(path), metadata=dict(metadata, DCP_SHARDING_INFO=json.dumps(info)))
    with pytest.raises(CheckpointError, match="down_proj"):
        streamconv.convert(str(ckpt), str(tmp_path / "out"), no_config=True)
    assert not (tmp_path / "out").exists()


def rewrite_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = edit(data[8:8 + n])
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[:-30], "not valid JSON"),
    (lambda h: b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":1}', "appears twice"),
    (lambda h: h.replace(b'"data_offsets":[0,', b'"data_offsets":[9000000,', 1), "data_offsets"),
    (lambda h: h.replace(b'"F32"', b'"Q99"', 1), "dtype 'Q99' is not supported"),
    (lambda h: h.replace(b"DCP_SHARDING_INFO", b"SOMETHING_ELSE_KEY"), "no DCP_SHARDING_INFO"),
    (lambda h: b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", "not valid JSON"),   # nesting: RecursionError
    (lambda h: b"[]", "does not start with"),
])
def test_hostile_headers_are_refused_by_name(st_checkpoints, tmp_path, edit, message):
    ckpt = shard_copy(st_checkpoints, tmp_path, "hf_tp")
    path = ckpt / "shard-00002-model-00001-of-00001.safetensors"
    rewrite_header(path, edit)
    with pytest.raises(CheckpointError, match=message) as err:
        streamconv.inspect(str(ckpt))
    assert "shard-00002" in str(err.value)


def test_header_length_over_the_cap_is_refused_without_reading_it(st_checkpoints, tmp_path):
    ckpt = shard_copy(st_checkpoints, tmp_path, "hf_tp")
    path = ckpt / "shard-00001-model-00001-of-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header length .* over the safetensors limit"):
        streamconv.inspect(str(ckpt))


def test_a_fifo_among_the_shards_is_refused(st_checkpoints, tmp_path):
    ckpt = shard_copy(st_checkpoints, tmp_path, "hf_tp")
    path = ckpt / "shard-00002-model-00001-of-00001.safetensors"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(CheckpointError, match="FIFO"):
        streamconv.inspect(str(ckpt))


def test_st_metadata_and_blob_from_different_saves_are_refused(st_checkpoints, tmp_path):
    """A .metadata whose chunk is at other offsets than the blob's header records (another save's files)."""
    ckpt = tmp_path / "mixed"
    shutil.copytree(st_checkpoints / "st_tp", ckpt)
    for name in ("__0_0.distcp", "__1_0.distcp"):     # swap the ranks' files: same keys, other offsets
        os.rename(ckpt / name, ckpt / (name + ".tmp"))
    os.rename(ckpt / "__0_0.distcp.tmp", ckpt / "__1_0.distcp")
    os.rename(ckpt / "__1_0.distcp.tmp", ckpt / "__0_0.distcp")
    with pytest.raises(CheckpointError, match="saved_offsets|offsets|different saves"):
        streamconv.convert(str(ckpt), str(tmp_path / "out"), no_config=True)
    assert not (tmp_path / "out").exists()


def test_safetensors_format_with_a_stream_transform_is_refused(tmp_path):
    from streamconv.model import BlobLocation, Chunk, TensorEntry

    location = BlobLocation("__0_0.distcp", 0, 12, ("stream.zstd/1",), tensor_key="w")
    entry = TensorEntry("w", "float32", (3,), (Chunk((0,), (3,), location),))
    with pytest.raises(UnsupportedFeatureError, match="safetensors format through the stream transform"):
        locate_all(object(), [entry])


# -- bounded memory ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    from streamconv.demo_checkpoint import run_distributed

    out = tmp_path_factory.mktemp("st_big")
    run_distributed("tests.support.st_writers:write_big", 2, dict(out_dir=str(out)))
    return out


@pytest.mark.parametrize("flavor", ["hf", "st"])
def test_peak_rss_is_bounded_by_the_buffer(big_checkpoints, flavor, tmp_path):
    """Peak RSS (the OS's VmHWM, in a process that never imports torch) stays at the buffer, far below one
    32 MiB tensor; the Shard(1) tensor is assembled band by band from the two safetensors blobs."""
    buffer_mib = 4
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(big_checkpoints / flavor),
                           str(tmp_path / "out"), "--no-config", "--json", "--buffer-size", f"{buffer_mib}MiB"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bytes_written"] > 64 * 2**20
    peak_mib = report["peak_rss_bytes"] / 2**20
    assert peak_mib < 48 + buffer_mib, f"{flavor}: peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"
    assert streamconv.verify(str(big_checkpoints / flavor), str(tmp_path / "out"), no_config=True).ok


# -- fuzzed headers ----------------------------------------------------------------------------------------


def test_fuzzed_shard_headers_end_in_streamconv_errors(st_checkpoints):
    """Random byte edits of real torch-written shard files (headers mostly): reading, planning and locating
    either work or raise one of streamconv's errors; nothing else escapes."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    from streamconv.source.io import MemoryReader
    from streamconv.planning.plan import PlanOptions, build_plan
    from streamconv.source import hf_shards

    folder = st_checkpoints / "hf_tp"
    names = sorted(p.name for p in folder.iterdir())
    originals = {n: (folder / n).read_bytes() for n in names}
    header_end = {n: 8 + int.from_bytes(data[:8], "little") for n, data in originals.items()}

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(names), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                                            max_size=6))
    def check(name, edits):
        data = bytearray(originals[name])
        for at, value in edits:   # mostly in the header; one position in 4 anywhere (data bytes change nothing)
            data[at % (len(data) if at % 4 == 0 else header_end[name])] = value
        files = dict(originals, **{name: bytes(data)})
        try:
            meta = hf_shards.load_metadata(MemoryReader(files), names)
            conversion = build_plan(meta, PlanOptions(source_format="hf"))
            entries = [TensorEntry(t.source_fqn, t.src_dtype, t.shape, t.chunks) for t in conversion.tensors]
            locate_all(MemoryReader(files), entries)
            outcomes["ok"] += 1
        except StreamconvError:
            outcomes["refused"] += 1

    from streamconv.errors import StreamconvError
    from streamconv.model import TensorEntry
    outcomes = {"ok": 0, "refused": 0}
    check()
    assert outcomes["refused"] > 100 and outcomes["ok"] > 10   # the edits reach the checks


def test_lost_last_rank_is_caught_by_the_reference_check(st_checkpoints, tmp_path):
    """Shapes are the box the pieces span, so a folder without its last rank's file looks like a smaller model;
    --config-from compares every shape with the base model's weights and refuses (exit 4)."""
    ref = tmp_path / "ref"
    streamconv.convert(str(st_checkpoints / "hf_fsdp2"), str(ref), no_config=True)
    (ref / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    ckpt = shard_copy(st_checkpoints, tmp_path, "hf_fsdp2")
    (ckpt / "shard-00002-model-00001-of-00001.safetensors").unlink()
    result = run_cli("convert", ckpt, tmp_path / "out", "--config-from", ref)
    assert result.returncode == 4 and "lm_head.weight [502, 64] here, [1003, 64] in the reference" in result.stderr
    assert not (tmp_path / "out").exists()


def test_torch_written_safetensors_format_with_zstd_is_refused_by_name(tmp_path):
    """torch writes an empty zstd frame per tensor before the blob, so offsets no longer point at it."""
    pytest.importorskip("zstandard")
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.arange(6.0).view(2, 3), "lr": 0.1}, no_dist=True, storage_writer=dcp.FileSystemWriter(
            tmp_path / "ck", serialization_format=SerializationFormat.SAFETENSORS, _extensions=[ZStandard()]))
    result = run_cli("convert", tmp_path / "ck", tmp_path / "out", "--no-config")
    assert result.returncode == 2 and "'a'" in result.stderr and "stream.zstd/1" in result.stderr
    assert "not both" in result.stderr and "Traceback" not in result.stderr


def test_hf_shards_with_non_tensor_items_are_explained(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.arange(6.0).view(2, 3), "step": 3}, no_dist=True,
                 storage_writer=HuggingFaceStorageWriter(str(tmp_path / "ck"), save_distributed=True))
    result = run_cli("inspect", tmp_path / "ck")
    assert result.returncode == 2 and "starts with a torch.save archive" in result.stderr
    assert "shard-00001-model-00001-of-00001.safetensors" in result.stderr
