"""Issue 11 items 1 and 4 on checkpoints written by torch's own FileSystemWriter: zstd-compressed blobs
(`_extensions=[ZStandard()]`, with thread_count=2 and on a 2-D mesh) and chunks stored with permuted strides
(transposed, channels_last; single process and DTensor shards), each bit for bit against torch's reconstruction
(`dcp_to_torch_save`); the CRC-32 of decoded records; `verify`; and the messages without `zstandard`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support import dcp_writers
import streamconv
from streamconv import failpoints
from tests.support import zstd_writers
from streamconv.demo_checkpoint import run_distributed
from streamconv.errors import CheckpointError, CorruptChunkError
from streamconv.execution.executor import check_stored
from streamconv.model import StoredTensor
from streamconv.execution.geometry import storage_order
from tests.support.outputs import read_output, same_bits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flavors(tmp_path_factory):
    out = tmp_path_factory.mktemp("flavors")
    run_distributed("tests.support.zstd_writers:write_zstd_ranks3", 3, dict(out_dir=str(out)))
    run_distributed("tests.support.zstd_writers:write_zstd_ranks4", 4, dict(out_dir=str(out)))
    run_distributed("tests.support.zstd_writers:write_strided_ranks2", 2, dict(out_dir=str(out)))
    zstd_writers.strided_single(out / "strided_single")
    zstd_writers.strided_single(out / "strided_single_zstd", zstd=True)
    return out


def convert_and_compare(ckpt: Path, out: Path, **options) -> dict:
    ref = dcp_writers.reference_state_dict(ckpt)     # torch reads zstd back itself (zstandard installed)
    plan = streamconv.plan(str(ckpt), **{k: v for k, v in options.items() if k in ("buffer_size",)})
    report = streamconv.convert(str(ckpt), str(out), **options)
    got = read_output(out)
    assert report.tensors == len(plan.tensors) == len(got) > 0
    for t in plan.tensors:
        assert same_bits(got[t.name], ref[t.source_fqn].contiguous()), f"{ckpt.name}: {t.name} differs"
    return got


def compressed(ckpt: Path) -> bool:
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(ckpt)).read_metadata()
    return all(info.transform_descriptors == ["stream.zstd/1"] for info in md.storage_data.values())


# -- zstd ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zstd_fsdp2", "zstd_threads", "zstd_mesh2d", "strided_dtensor_zstd",
                                  "strided_single_zstd"])
def test_zstd_matches_dcp_to_torch_save(flavors, tmp_path, name):
    ckpt = flavors / name
    assert compressed(ckpt)
    if name == "zstd_threads":
        assert len(list(ckpt.glob("__0_*.distcp"))) == 2
    # A small buffer: big tensors are cut into many bands, so blobs are decoded piece by piece.
    convert_and_compare(ckpt, tmp_path / "out", buffer_size="64KiB", max_shard_size="60KB")


def test_zstd_casts_and_crc_and_verify(flavors, tmp_path):
    ckpt = flavors / "zstd_mesh2d"
    ref = dcp_writers.reference_state_dict(ckpt)
    report = streamconv.convert(str(ckpt), str(tmp_path / "out"), dtype="bfloat16", crc=True, workers=2)
    assert report.crc_checked_bytes > 0
    got = read_output(tmp_path / "out")
    for key, t in got.items():
        assert same_bits(t, ref["model." + key].to(torch.bfloat16)), key
    result = streamconv.verify(str(ckpt), str(tmp_path / "out"), dtype="bfloat16")
    assert result.crc_checked_chunks > 0 and result.crc_unrecorded_chunks == 0
    # convert sums each record as it decodes it (verify decodes it once more first): the same chunks counted
    assert report.crc_checked_bytes == result.crc_checked_bytes


@pytest.mark.parametrize("name", ["zstd_fsdp2", "strided_dtensor_zstd"])
def test_zstd_crc_while_decoding_covers_every_chunk(flavors, tmp_path, name):
    ckpt = flavors / name
    report = streamconv.convert(str(ckpt), str(tmp_path / "out"), crc=True, buffer_size="64KiB")
    tensor_bytes = sum(t.numel() * t.element_size() for t in read_output(tmp_path / "out").values())
    assert report.crc_checked_bytes == tensor_bytes > 0


def test_zstd_inspect_and_plan_name_the_transform(flavors):
    info = streamconv.inspect(str(flavors / "zstd_fsdp2"))
    assert "zstd-compressed (stream.zstd/1" in info["transform"] and "decompressed while streaming" in info["transform"]
    assert streamconv.inspect(str(flavors / "strided_single"))["transform"] is None

    from streamconv.runs.report import Reporter

    class Notes(Reporter):
        def __init__(self):
            super().__init__()
            self.notes = []

        def note(self, text):
            self.notes.append(text)

    notes = Notes()
    streamconv.plan(str(flavors / "zstd_fsdp2"), reporter=notes)
    assert any("zstd-compressed" in n for n in notes.notes), notes.notes


def test_zstd_default_workers_hold_a_decoder_each_and_the_report_says_so(flavors, tmp_path, monkeypatch):
    """Issue 20 item 2: on 16 CPUs a zstd checkpoint gets as many writers as keep the predicted peak within
    --buffer-size + 48 MiB with a decoder each (12 in 32 MiB with the 2026-12-07 terms; the count follows them),
    in the plan and in convert's JSON report."""
    from streamconv.cli import cli
    from click.testing import CliRunner
    from streamconv.runs import conversion, preparing
    from streamconv.fs import fastpaths
    from streamconv.planning.plan import (DECODER_BYTES_PER_WRITER, IO_STEP_BYTES_PER_WRITER,
                                          PLAIN_STEP_BYTES_PER_WRITER, step_bytes_held, writers_peak_bytes)
    monkeypatch.setattr(preparing, "available_cpus", lambda: 16)
    monkeypatch.setattr(conversion, "available_cpus", lambda: 16)
    ckpt = flavors / "zstd_fsdp2"
    planned = streamconv.plan(str(ckpt), no_config=True)
    n = planned.workers         # as many as fit, and no more: the bound holds for n writers, not for n + 1
    assert 2 < n < 16 and f"{n} keep the predicted peak (" in planned.workers_reason, planned.workers_reason
    two = streamconv.plan(str(ckpt), no_config=True, workers=2)
    step = step_bytes_held(planned.tensors, IO_STEP_BYTES_PER_WRITER)
    assert planned.peak_bytes - two.peak_bytes == (n - 2) * (step + DECODER_BYTES_PER_WRITER)   # n - 2 more writers
    assert writers_peak_bytes(planned, n) <= (32 + 48) * 2**20 < writers_peak_bytes(planned, n + 1)
    result = CliRunner().invoke(cli, ["convert", str(ckpt), str(tmp_path / "out"), "--json", "--no-config"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["workers"], report["workers_reason"]) == (n, planned.workers_reason), report
    # Without copy_file_range/preadv (found only when the copy starts; forced off here by
    # STREAMCONV_NO_FAST_PATHS) each writer also holds one plain step, which convert's prediction adds.
    plain_off = {"copy_file_range", "preadv"} & fastpaths.disabled()
    plain_io_bytes = n * step_bytes_held(planned.tensors, PLAIN_STEP_BYTES_PER_WRITER) if plain_off else 0
    assert report["predicted_peak_bytes"] == planned.peak_bytes + plain_io_bytes


def _edit_biggest_blob(src: Path, dst: Path, edit) -> None:
    """Copy the checkpoint and change the decoded bytes of its largest zstd blob with `edit(bytearray)`
    (recompressed, so the stream stays valid and only the zip's CRC-32s can tell)."""
    import pickle
    import shutil

    import zstandard
    shutil.copytree(src, dst)
    md = pickle.loads((dst / ".metadata").read_bytes())
    index, info = max(((i, s) for i, s in md.storage_data.items() if i.offset is not None), key=lambda x: x[1].length)
    path = dst / info.relative_path
    data = bytearray(path.read_bytes())
    blob = bytes(data[info.offset:info.offset + info.length])
    plain = bytearray(zstandard.ZstdDecompressor().stream_reader(blob).read())
    edit(plain)
    blob = zstandard.ZstdCompressor().compress(bytes(plain))
    assert len(blob) <= info.length      # written in place; the old tail stays unreferenced
    data[info.offset:info.offset + len(blob)] = blob
    path.write_bytes(bytes(data))
    info.length = len(blob)
    (dst / ".metadata").write_bytes(pickle.dumps(md))


def _flip_tensor_byte(plain: bytearray) -> None:
    plain[plain.find(b"data/0") + 200] ^= 0x40     # inside the tensor's bytes (after the header and its padding)


def _corrupt_first_big_blob(src: Path, dst: Path) -> None:
    _edit_biggest_blob(src, dst, _flip_tensor_byte)


def test_zstd_corrupt_data_pkl_is_caught_while_locating(flavors, tmp_path):
    def flip_pickle(plain: bytearray) -> None:
        at = plain.find(b"_rebuild_tensor")
        plain[at] ^= 0x20     # `_rebuild_tensor` -> `_REbuild...`: still a plausible pickle, wrong CRC-32
    _edit_biggest_blob(flavors / "zstd_fsdp2", tmp_path / "bad", flip_pickle)
    with pytest.raises(CorruptChunkError, match=r"data\.pkl fails its CRC-32"):
        streamconv.convert(str(tmp_path / "bad"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_zstd_blobs_without_their_descriptor_are_refused(flavors, tmp_path):
    """.metadata from another save (no transform listed) over zstd blobs: refused, saying the two do not match."""
    import pickle
    import shutil
    from streamconv.errors import UnsupportedFeatureError
    shutil.copytree(flavors / "zstd_fsdp2", tmp_path / "ck")
    md = pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())
    for info in md.storage_data.values():
        info.transform_descriptors = None
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(md))
    assert streamconv.inspect(str(tmp_path / "ck"))["transform"] is None
    with pytest.raises(UnsupportedFeatureError, match="zstd-compressed although .metadata lists no transform"):
        streamconv.convert(str(tmp_path / "ck"), str(tmp_path / "out"))


def test_zstd_corrupt_record_fails_crc(flavors, tmp_path):
    bad = tmp_path / "bad"
    _corrupt_first_big_blob(flavors / "zstd_fsdp2", bad)
    with pytest.raises(CorruptChunkError, match="decoded from the zstd blob"):
        streamconv.convert(str(bad), str(tmp_path / "out"), crc=True)
    assert not (tmp_path / "out").exists()


def _cli(*args, hide_zstandard: Path = None):
    env = dict(os.environ)
    path = [str(REPO)]
    if hide_zstandard is not None:
        hide_zstandard.mkdir(exist_ok=True)
        (hide_zstandard / "zstandard.py").write_text("raise ImportError('hidden for the test')\n")
        path.insert(0, str(hide_zstandard))
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-m", "streamconv.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_without_zstandard_says_which_extra(flavors, tmp_path):
    hide = tmp_path / "hide"
    ckpt = str(flavors / "zstd_fsdp2")
    inspected = _cli("inspect", ckpt, hide_zstandard=hide)
    assert inspected.returncode == 0, inspected.stderr
    assert "pip install 'streamconv[zstd]'" in inspected.stdout
    planned = _cli("plan", ckpt, hide_zstandard=hide)
    assert planned.returncode == 0 and "pip install 'streamconv[zstd]'" in planned.stdout + planned.stderr
    converted = _cli("convert", ckpt, str(tmp_path / "out"), "--json", hide_zstandard=hide)
    assert converted.returncode == 2, converted.stderr
    error = json.loads(converted.stdout)["error"]
    assert "pip install 'streamconv[zstd]'" in error and "zstandard" in error and "Traceback" not in converted.stderr
    assert not (tmp_path / "out").exists()
    # With zstandard the same command works.
    assert _cli("convert", ckpt, str(tmp_path / "out2")).returncode == 0


# -- permuted strides ---------------------------------------------------------------------------------------


def test_strided_chunks_are_really_stored_permuted(flavors):
    from streamconv.api import load, locate_chunks
    reader, _ = load(str(flavors / "strided_single"))
    with reader:
        conversion = streamconv.plan(str(flavors / "strided_single"))
        stored = locate_chunks(conversion, reader)
    strides = {t.source_fqn: stored[t.chunks[0].location].stride for t in conversion.tensors}
    assert strides["linear_t.weight"] == (1, 6)
    assert strides["conv.weight"] == (27, 1, 9, 3)
    assert strides["cube.weight"] == (1, 77, 11)


@pytest.mark.parametrize("name", ["strided_single", "strided_dtensor"])
@pytest.mark.parametrize("buffer_size", ["64KiB", "32MiB"])
def test_strided_matches_dcp_to_torch_save(flavors, tmp_path, name, buffer_size):
    got = convert_and_compare(flavors / name, tmp_path / "out", buffer_size=buffer_size)
    if name == "strided_single":
        state = zstd_writers.strided_state()
        assert all(torch.equal(got[k], v) for k, v in state.items())


def test_strided_cast(flavors, tmp_path):
    ckpt = flavors / "strided_single"
    ref = dcp_writers.reference_state_dict(ckpt)
    streamconv.convert(str(ckpt), str(tmp_path / "out"), dtype="float16", buffer_size="64KiB")
    got = read_output(tmp_path / "out")
    for key, t in got.items():
        assert same_bits(t, ref[key].to(torch.float16)), key


def test_storage_order():
    assert storage_order((2, 3), (3, 1)) == (0, 1)
    assert storage_order((6, 96), (1, 6)) == (1, 0)
    assert storage_order((9, 3, 3, 3), (27, 1, 9, 3)) == (0, 2, 3, 1)
    assert storage_order((4, 1, 5), (1, 99, 4)) == (1, 2, 0)     # a size-1 dim's stride means nothing
    assert storage_order((3, 4), (0, 1)) is None                 # expanded (overlapping)
    assert storage_order((3, 4), (8, 2)) is None                 # gapped
    assert storage_order((3, 4), (4, 4)) is None


def test_other_strides_keep_a_clear_error():
    from streamconv.planning.plan import TensorPlan
    from streamconv.model import BlobLocation, Chunk
    chunk = Chunk((0, 0), (3, 4), BlobLocation("__0_0.distcp", 0, 100))
    t = TensorPlan(name="w", source_fqn="w", src_dtype="float32", dst_dtype="float32", shape=(3, 4), begin=0,
                   nbytes=48, chunks=(chunk,))
    gapped = StoredTensor("float32", (3, 4), (8, 2), 0, 48)
    with pytest.raises(CheckpointError, match=r"strides \[8, 2\] .* not a permutation"):
        check_stored(t, chunk, gapped)
    check_stored(t, chunk, StoredTensor("float32", (3, 4), (1, 3), 0, 48))   # transposed: accepted


def test_benchmark_generator_zstd_flavor(tmp_path):
    import math
    sys.path.insert(0, str(REPO))
    from benchmarks import generate as gen
    from benchmarks import presets

    out = tmp_path / "tiny-zstd"
    stamp = gen.generate("tiny", "bfloat16", out, layout="tp", flavor="zstd")
    assert stamp["flavor"] == "zstd" and compressed(out)
    streamconv.convert(str(out), str(tmp_path / "hf"), buffer_size="64KiB")
    got = read_output(tmp_path / "hf")
    for name, shape in presets.tensor_specs(presets.PRESETS["tiny"]):
        expected = gen.expected_values(gen.data_key(name), "bfloat16", 0, math.prod(shape)).view(shape)
        assert torch.equal(got[name], expected), name


def test_zstd_killed_conversion_resumes_keeping_its_shards(flavors, tmp_path):
    """Decoded bytes pass through memory, so each shard's resume record holds the CRC-32 of what was written:
    a run killed between shards keeps them on --resume (their CRC-32 read back matches) and ends identical."""
    import signal

    ckpt = str(flavors / "zstd_fsdp2")
    streamconv.convert(ckpt, str(tmp_path / "ref"), max_shard_size="60KB")
    want = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), **{failpoints.KILL_AT_ENV: "between-shards@2"})
    args = [sys.executable, "-m", "streamconv.cli", "convert", ckpt, str(out), "--max-shard-size", "60KB",
            "--workers", "1"]
    killed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = subprocess.run(args + ["--resume", "--json"], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert resumed.returncode == 0, resumed.stderr
    assert "kept 2 of" in " ".join(json.loads(resumed.stdout)["notes"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == want
