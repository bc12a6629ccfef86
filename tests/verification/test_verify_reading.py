"""verify's reading side: it reads safetensors itself (no safetensors package), checks the folder's entry points,
opens output files as carefully as checkpoint files and one at a time, and never reports its own failure as a
verdict. Real checkpoints written by torch, converted by streamconv; hand-built bytes only for malformed headers."""
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamconv
from streamconv import safetensors_format as sf
from streamconv.cli import cli
from streamconv.demo_checkpoint import run_distributed
from streamconv.errors import OutputError, VerificationError
from streamconv.planning.plan import INDEX_FILE_NAME, SINGLE_FILE_NAME
from streamconv.output.record import RECORD_FILE

EXIT_DIFFERS = VerificationError.exit_code      # 3


def verify_cli(ckpt, out, *args, timeout=120, **popen):
    """`streamconv verify` in its own process (a hang is a failure, not a stuck suite)."""
    return subprocess.run([sys.executable, "-m", "streamconv", "verify", str(ckpt), str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.fixture(scope="module")
def single(dcp_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    streamconv.convert(str(dcp_checkpoints["fsdp2"]), str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted([SINGLE_FILE_NAME, RECORD_FILE])
    return out


@pytest.fixture(scope="module")
def sharded(dcp_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded") / "out"
    streamconv.convert(str(dcp_checkpoints["fsdp2"]), str(out), max_shard_size="200KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture
def copy_of(tmp_path):
    def make(out: Path) -> Path:
        dst = tmp_path / "copy"
        shutil.copytree(out, dst)
        return dst
    return make


# -- 17.1: no safetensors package, and an internal failure is never a verdict --------------------------------

_NO_SAFETENSORS = ("import sys\n"
                   "sys.modules['safetensors'] = None   # `import safetensors` now fails, as on a lean install\n"
                   "from streamconv.cli import main\n"
                   "sys.argv = ['streamconv'] + sys.argv[1:]\n"
                   "main()\n")


def test_verify_and_convert_verify_work_without_the_safetensors_package(dcp_checkpoints, single, tmp_path):
    ckpt = dcp_checkpoints["fsdp2"]
    run = lambda *args: subprocess.run([sys.executable, "-c", _NO_SAFETENSORS, *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, timeout=120)
    r = run("verify", ckpt, single)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("verified: 29 tensors equal to the checkpoint;"), r.stdout
    r = run("convert", ckpt, tmp_path / "out", "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / SINGLE_FILE_NAME).read_bytes() == (single / SINGLE_FILE_NAME).read_bytes()
    damaged = tmp_path / "damaged"
    shutil.copytree(single, damaged)
    flip_tensor_byte(damaged / SINGLE_FILE_NAME, "model.norm.weight")
    r = run("verify", ckpt, damaged)
    assert r.returncode == EXIT_DIFFERS and "differs: model.norm.weight" in r.stdout, r.stdout + r.stderr


def flip_tensor_byte(path: Path, name: str, at: int = 1) -> None:
    start, header = streamconv.verification.compare.read_header(str(path))
    offset = start + header[name]["data_offsets"][0] + at
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_an_internal_failure_is_an_internal_error_not_a_verdict(dcp_checkpoints, single, monkeypatch):
    def broken(text):
        raise RuntimeError("a bug in the header reader")
    monkeypatch.setattr(sf, "parse_header", broken)
    r = CliRunner().invoke(cli, ["verify", str(dcp_checkpoints["fsdp2"]), str(single), "--json"])
    assert r.exit_code == 1, r.output
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == 1 and "internal error" in doc["error"] and "does not match" not in doc["error"]


def test_an_output_that_cannot_be_read_is_an_io_error_not_a_verdict(dcp_checkpoints, single, monkeypatch):
    """EIO while reading a shard back says nothing about its bytes: the output error's code and the file."""
    import errno
    from streamconv.output import sink

    real = sink.read_at

    def eio(file, view, offset, fast):    # the output's disk fails; the checkpoint's does not
        if file.name.endswith(".safetensors"):
            raise OSError(errno.EIO, "Input/output error")
        return real(file, view, offset, fast)
    monkeypatch.setattr(sink, "read_at", eio)
    r = CliRunner().invoke(cli, ["verify", str(dcp_checkpoints["fsdp2"]), str(single), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == OutputError.exit_code == doc["exit_code"], r.output
    assert f"{single / SINGLE_FILE_NAME}: cannot read at offset" in doc["error"] and "Input/output" in doc["error"]
    assert "does not match" not in doc["error"]


# -- the header rules: the safetensors library's own, without it ----------------------------------------------

def _file(header, data: bytes = b"", raw: bytes = None) -> bytes:
    text = raw if raw is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {
    "good": (_file({"__metadata__": {"format": "pt"}, "a": F32_2}, bytes(8)), True),
    "good, no metadata, padded": (_file(None, bytes(8), raw=json.dumps({"a": F32_2}).encode() + b"   "), True),
    "good, empty": (_file({}), True),
    "good, two in offset order": (_file({"b": {"dtype": "F16", "shape": [1], "data_offsets": [8, 10]},
                                         "a": F32_2}, bytes(10)), True),
    "gap": (_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), False),
    "overlap": (_file({"a": F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)), False),
    "size mismatch": (_file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)), False),
    "unknown dtype": (_file({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), False),
    "negative dim": (_file({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}), False),
    "offsets reversed": (_file({"a": {"dtype": "U8", "shape": [0], "data_offsets": [3, 3]}, "b":
                                {"dtype": "U8", "shape": [3], "data_offsets": [3, 0]}}, bytes(3)), False),
    "metadata not str->str": (_file({"__metadata__": {"format": 1}, "a": F32_2}, bytes(8)), False),
    "not an object": (_file([1, 2]), False),
    "not JSON": (_file(None, raw=b"{nope"), False),
    "not UTF-8": (_file(None, raw=b'{"\xff": 1}'), False),
    "missing field": (_file({"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), False),
    "data longer": (_file({"a": F32_2}, bytes(9)), False),
    "data shorter": (_file({"a": F32_2}, bytes(7)), False),
    "header past the end": (b"\xff" + bytes(7) + b"{}", False),
}


def _ours(path: Path) -> bool:
    from streamconv.fs import location
    opened = location.open_file(str(path))
    try:
        size, header, problem = streamconv.verification.compare._read_safetensors_header(opened, str(path))
    finally:
        opened.close()
    return problem is None and not header.problems and header.data_start + header.data_end == size


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_header_rules_agree_with_the_safetensors_library(case, tmp_path):
    """Each hand-built file is accepted by our reader exactly when the safetensors library opens it."""
    safetensors = pytest.importorskip("safetensors")
    data, loads = HEADERS[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            list(f.keys())
        library = True
    except Exception:
        library = False
    assert library == loads, f"{case}: the library {'opens' if library else 'refuses'} it"
    assert _ours(path) == loads, case


def test_duplicate_names_are_refused():
    header = sf.parse_header(b'{"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, '
                             b'"a": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}')
    assert any("name 'a' appears twice" in p for p in header.problems), header.problems


def test_writer_and_reader_share_the_format():
    built = sf.build_header([("w", "BF16", (2, 3), 0, 12), ("b", "F32", (), 12, 16)])
    assert (8 + len(built) - 8) % sf.ALIGN_BYTES == 0
    header = sf.parse_header(built[8:])
    assert not header.problems and header.metadata == sf.WRITTEN_METADATA and header.data_end == 16
    assert [(e.name, e.dtype, e.shape, e.begin, e.end) for e in header.entries] == [
        ("w", "BF16", (2, 3), 0, 12), ("b", "F32", (), 12, 16)]
    import importlib
    for module in ("streamconv.planning.plan", "streamconv.source.safetensors_blob", "streamconv.hf.layouts"):
        assert importlib.import_module(module).MAX_HEADER_BYTES is sf.MAX_HEADER_BYTES, module


# -- 16.7a/c: entry points -----------------------------------------------------------------------------------

def test_a_renamed_single_file_is_refused(dcp_checkpoints, single, copy_of):
    out = copy_of(single)
    (out / SINGLE_FILE_NAME).rename(out / "weights.safetensors")
    r = verify_cli(dcp_checkpoints["fsdp2"], out)
    assert r.returncode == EXIT_DIFFERS, r.stdout + r.stderr
    assert "weights.safetensors: a single-file output must be named model.safetensors" in r.stdout


def test_a_renamed_shard_is_refused_even_with_a_matching_index(dcp_checkpoints, sharded, copy_of):
    out = copy_of(sharded)
    first = sorted(out.glob("model-*.safetensors"))[0].name
    (out / first).rename(out / "part-1.safetensors")
    index = json.loads((out / INDEX_FILE_NAME).read_text())
    index["weight_map"] = {k: ("part-1.safetensors" if v == first else v) for k, v in index["weight_map"].items()}
    (out / INDEX_FILE_NAME).write_text(json.dumps(index))
    r = verify_cli(dcp_checkpoints["fsdp2"], out)
    assert r.returncode == EXIT_DIFFERS, r.stdout + r.stderr
    assert "part-1.safetensors: not a shard name streamconv writes" in r.stdout


@pytest.mark.parametrize("metadata", ['{"format":"tf"}', '{"format":"PT"}', '{"formax":"pt"}'])
def test_changed_header_metadata_is_refused(dcp_checkpoints, single, copy_of, metadata):
    out = copy_of(single)
    path = out / SINGLE_FILE_NAME
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    text = data[8:8 + n].decode()
    assert text.startswith('{"__metadata__":{"format":"pt"}')
    text = text.replace('{"format":"pt"}', metadata, 1)
    text = text.rstrip(" ")
    assert len(text) <= n
    data[8:8 + n] = (text + " " * (n - len(text))).encode()   # same length: every offset stays valid
    path.write_bytes(bytes(data))
    r = verify_cli(dcp_checkpoints["fsdp2"], out)
    assert r.returncode == EXIT_DIFFERS, r.stdout + r.stderr
    assert f"{SINGLE_FILE_NAME}: header __metadata__ is " in r.stdout and "format is not 'pt'" in r.stdout


# -- 16.13: FIFOs and devices on the output side -------------------------------------------------------------

def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("what", ["index FIFO", "shard FIFO", "shard -> /dev/zero", "index -> /dev/zero"])
def test_a_fifo_or_device_in_the_output_is_named_not_read(dcp_checkpoints, sharded, copy_of, what):
    out = copy_of(sharded)
    target = out / (INDEX_FILE_NAME if what.startswith("index") else sorted(out.glob("model-*"))[0].name)
    if "FIFO" in what:
        _replace_with_fifo(target)
        kind = "a FIFO (named pipe)"
    else:
        target.unlink()
        target.symlink_to("/dev/zero")
        kind = "a character device"
    r = verify_cli(dcp_checkpoints["fsdp2"], out, timeout=60)      # before: blocked (or read) forever
    assert r.returncode == EXIT_DIFFERS, r.stdout + r.stderr
    assert f"{target} is {kind}, not a regular file" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr


# -- 16.9: one output file open at a time ---------------------------------------------------------------------

N_TENSORS = 80


def write_many(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    state = {"model": {f"layers.{i}.weight": DTensor.from_local(torch.rand(128, 1024, generator=gen), mesh,
                                                                [Shard(0)], run_check=False)
                       for i in range(N_TENSORS)}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """80 tensors of 1 MiB, one shard each: more output files than `ulimit -n 64` allows open at once, each
    big enough to fill a compare piece (a sink per file kept to the end held ~3 MiB each: 16.9)."""
    root = tmp_path_factory.mktemp("many")
    ckpt = root / "ckpt"
    run_distributed(f"{__name__}:write_many", 2, dict(out_dir=str(ckpt)))
    out = root / "out"
    streamconv.convert(str(ckpt), str(out), max_shard_size="1MB")
    assert len(list(out.glob("*.safetensors"))) == N_TENSORS
    return ckpt, out


def _nofile(limit):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_verify_of_many_shards_under_a_low_descriptor_limit_and_bounded_memory(many_shards):
    ckpt, out = many_shards
    buffer_mib = 4
    r = verify_cli(ckpt, out, "--buffer-size", f"{buffer_mib}MiB", "--json", preexec_fn=_nofile(64))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    result = json.loads(r.stdout)
    assert result["ok"] and result["tensors_equal"] == N_TENSORS and len(result["files"]) == N_TENSORS
    peak_mib = result["peak_rss_bytes"] / 2**20      # VmHWM of the verify process, as the OS counts it
    # The bound from issue 16.9: the buffer + 55 MiB (interpreter, numpy, click, one compare piece).
    assert 0 < peak_mib <= buffer_mib + 55, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"


def test_convert_verify_of_many_shards_under_a_low_descriptor_limit(many_shards, tmp_path):
    ckpt, _ = many_shards
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "streamconv", "convert", str(ckpt), str(out), "--verify",
                        "--max-shard-size", "1MB"], capture_output=True, text=True, timeout=300,
                       preexec_fn=_nofile(64))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"verified: {N_TENSORS} tensors equal to the checkpoint;" in r.stdout
    assert len(list(out.glob("*.safetensors"))) == N_TENSORS



def test_out_of_descriptors_on_the_output_is_a_resource_error(dcp_checkpoints, sharded, monkeypatch):
    """EMFILE opening a shard names the limit to raise (exit 71): never a verdict, never an internal error."""
    import errno
    from streamconv.source import io

    real = os.open

    def emfile(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(io.os, "open", emfile)
    r = CliRunner().invoke(cli, ["verify", str(dcp_checkpoints["fsdp2"]), str(sharded), "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 71 == doc["exit_code"], r.output
    assert "too many open files" in doc["error"] and "ulimit -n" in doc["error"]


# -- 17.8: say the check ran ------------------------------------------------------------------------------

def test_convert_says_what_it_checked(dcp_checkpoints, tmp_path):
    ckpt = str(dcp_checkpoints["fsdp2"])
    chunks = len({c.location for t in streamconv.plan(ckpt).tensors for c in t.chunks})
    runs = {flags: CliRunner().invoke(cli, ["convert", ckpt, str(tmp_path / str(i)), *flags])
            for i, flags in enumerate([(), ("--crc",), ("--verify",), ("--verify", "--no-crc")])}
    assert all(r.exit_code == 0 for r in runs.values()), {k: r.output for k, r in runs.items()}
    assert "verified" not in runs[()].output and "CRC-checked" not in runs[()].output
    assert f"  CRC-checked: {chunks} chunks as they were read" in runs[("--crc",)].output
    assert f"  verified: 29 tensors equal to the checkpoint; {chunks} chunks CRC-checked\n" in \
        runs[("--verify",)].output
    assert "  verified: 29 tensors equal to the checkpoint; CRC-32s not checked\n" in \
        runs[("--verify", "--no-crc")].output
    r = CliRunner().invoke(cli, ["verify", ckpt, str(tmp_path / "0"), "--no-crc"])
    assert r.exit_code == 0 and r.output.startswith("verified: 29 tensors equal to the checkpoint; CRC-32s not "
                                                    "checked\n"), r.output
