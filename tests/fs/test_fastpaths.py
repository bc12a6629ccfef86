"""Fast IO paths (copy_file_range, preadv, posix_fadvise, renameat2, sync_file_range) are chosen once at start-up, each with a
plain fallback: every real layout converts to the same bytes with all of them forced off, errors from a fast
path mid-copy surface instead of being retried another way, and a capability the OS lacks is simply not used."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import dcp_writers
import streamconv
from streamconv.fs.infiles import OpenFile
from streamconv import failpoints
from streamconv.fs import fastpaths
from streamconv.output import staging
from streamconv.errors import CheckpointError, OptionsError, OutputError
from streamconv.fs.fastpaths import FastPaths
from streamconv.source.io import DirectoryReader
from streamconv.output import sink
from streamconv.output.sink import FileSink

LAYOUTS = sorted(dcp_writers.CHECKPOINTS)
SMALL = dict(max_shard_size="40KB", buffer_size="64KiB")   # several shards, an index, many bands
FAST_CALLS = ("copy_file_range", "preadv", "posix_fadvise")


def tree_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def forbid_fast_paths(monkeypatch) -> None:
    """With every fast path off, none of them may be called at all."""
    for name in FAST_CALLS:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"os.{_name} called with fast paths off")
        monkeypatch.setattr(os, name, refuse)

    def no_renameat2(*args):
        raise AssertionError("renameat2 called with fast paths off")
    monkeypatch.setattr(staging, "_renameat2", no_renameat2)

    def no_writeback(*args):
        raise AssertionError("sync_file_range called with fast paths off")
    monkeypatch.setattr(OpenFile, "start_writeback", no_writeback)


@pytest.fixture(scope="module")
def default_outputs(dcp_checkpoints, tmp_path_factory):
    """Each layout converted with the fast paths the machine offers: {layout: (report, {file: bytes})}."""
    root = tmp_path_factory.mktemp("fast-default")
    out = {}
    switch = os.environ.pop(failpoints.NO_FAST_PATHS_ENV, None)     # the default run, even inside a forced-fallback session
    try:
        for layout in LAYOUTS:
            report = streamconv.convert(str(dcp_checkpoints[layout]), str(root / layout), **SMALL)
            out[layout] = (report, tree_bytes(root / layout))
    finally:
        if switch is not None:
            os.environ[failpoints.NO_FAST_PATHS_ENV] = switch
    return out


# -- detect --------------------------------------------------------------------------------------------------

def test_detect_reads_the_switch():
    everything = fastpaths.detect({})
    assert fastpaths.detect({failpoints.NO_FAST_PATHS_ENV: "1"}) == fastpaths.detect({failpoints.NO_FAST_PATHS_ENV: "all"}) == fastpaths.NONE
    assert fastpaths.detect({failpoints.NO_FAST_PATHS_ENV: "0"}) == everything
    some = fastpaths.detect({failpoints.NO_FAST_PATHS_ENV: "preadv, fadvise"})
    assert not some.preadv and not some.fadvise
    assert (some.copy_file_range, some.renameat2) == (everything.copy_file_range, everything.renameat2)
    with pytest.raises(OptionsError, match="unknown fast path.*preadv2.*copy_file_range, preadv, fadvise, renameat2"):
        fastpaths.detect({failpoints.NO_FAST_PATHS_ENV: "preadv2"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux offers all four")
def test_detect_finds_all_four_on_linux():
    assert fastpaths.detect({}).names == fastpaths.ALL_NAMES      # (and obstore: installed with the test extra)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sync_file_range is Linux's")
def test_start_writeback_reaches_the_kernel(tmp_path):
    with open(tmp_path / "f", "wb") as f:
        f.write(b"x" * 65536)
        f.flush()
        assert OpenFile(f.fileno(), "f").start_writeback()
    r, w = os.pipe()
    try:
        assert not OpenFile(w, "pipe").start_writeback()      # ESPIPE: the kernel answered, and the answer is not fatal
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("writeback", [True, False], ids=["writeback", "fsync-only"])
@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "pwrite"])
def test_a_shard_starts_its_writeback_every_step_it_is_written(writeback, in_kernel, tmp_path, monkeypatch):
    monkeypatch.setattr(sink, "WRITEBACK_STEP_BYTES", 1 << 20)
    data = os.urandom(5 * (1 << 20) + 123)
    (tmp_path / "src").write_bytes(data)
    fast = FastPaths(copy_file_range=in_kernel, writeback=writeback)
    out = FileSink(str(tmp_path / "shard"), len(data), fast=fast)
    fd = os.open(tmp_path / "src", os.O_RDONLY)
    try:
        for offset in range(0, len(data), 1 << 19):
            out.copy_from(OpenFile(fd, "src"), offset, offset, min(1 << 19, len(data) - offset))
    finally:
        os.close(fd)
        out.close()
    assert (tmp_path / "shard").read_bytes() == data
    assert out.writebacks_started == (5 if writeback else 0)


@pytest.mark.parametrize("missing", ["preadv", "copy_file_range", "posix_fadvise"])
def test_a_missing_os_function_is_not_used(missing, dcp_checkpoints, default_outputs, tmp_path, monkeypatch):
    monkeypatch.delattr(os, missing)
    fast = fastpaths.detect({})
    assert {"preadv": fast.preadv, "copy_file_range": fast.copy_file_range, "posix_fadvise": fast.fadvise}[missing] \
        is False
    out = tmp_path / "out"
    report = streamconv.convert(str(dcp_checkpoints["tp"]), str(out), **SMALL)
    assert tree_bytes(out) == default_outputs["tp"][1]
    assert missing.replace("posix_", "") not in report.fast_paths


# -- every layout, everything off ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_gives_the_same_bytes_with_fast_paths_off(layout, dcp_checkpoints, default_outputs, tmp_path,
                                                               monkeypatch):
    from tests.support.outputs import read_output, same_bits
    monkeypatch.setenv(failpoints.NO_FAST_PATHS_ENV, "1")
    forbid_fast_paths(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")     # --overwrite's two-rename swap, too
    report = streamconv.convert(str(dcp_checkpoints[layout]), str(out), overwrite_any=True, verify=True, **SMALL)
    assert report.fast_paths == []
    default_report, default_bytes = default_outputs[layout]
    assert tree_bytes(out) == default_bytes
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []     # no staging or old folder left
    if sys.platform.startswith("linux"):
        # every one, except the obstore client: a local folder is read through files, never through it
        assert default_report.fast_paths == [n for n in fastpaths.ALL_NAMES if n != "obstore"]
    # And both are torch's own reconstruction.
    ref = dcp_writers.reference_state_dict(dcp_checkpoints[layout])
    got = read_output(out)
    plan = streamconv.plan(str(dcp_checkpoints[layout]))
    for t in plan.tensors:
        assert same_bits(got[t.name], ref[t.source_fqn]), f"{layout}: {t.name}"


def test_cli_json_names_the_fast_paths_in_use(dcp_checkpoints, tmp_path):
    def run(env_value):
        env = dict(os.environ, PYTHONPATH=str(Path(streamconv.__file__).parent.parent))
        env.pop(failpoints.NO_FAST_PATHS_ENV, None)
        if env_value is not None:
            env[failpoints.NO_FAST_PATHS_ENV] = env_value
        out = tmp_path / f"out-{env_value}"
        r = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(dcp_checkpoints["tp"]), str(out),
                            "--json", "--max-shard-size", "40KB"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["fast_paths"], tree_bytes(out)

    plain, plain_bytes = run("1")
    some, some_bytes = run("copy_file_range,renameat2")
    default, default_bytes = run(None)
    assert plain == [] and "copy_file_range" not in some and "renameat2" not in some
    assert plain_bytes == some_bytes == default_bytes
    assert set(some) < set(default) or not default


def test_a_misspelt_switch_is_a_usage_error(dcp_checkpoints, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from streamconv.cli import cli
    monkeypatch.setenv(failpoints.NO_FAST_PATHS_ENV, "preadv2")
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(tmp_path / "out")])
    assert result.exit_code == 64 and "unknown fast path(s) preadv2" in result.output, result.output
    assert os.listdir(tmp_path) == []


# -- errors from a fast path surface ---------------------------------------------------------------------------

def _failing_copy_file_range(monkeypatch, err: int, after_calls: int):
    real = os.copy_file_range
    calls = []

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) > after_calls:
            raise OSError(err, os.strerror(err))
        return real(src, dst, count, offset_src, offset_dst)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    return calls


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range here")
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_an_error_mid_copy_surfaces_and_is_not_retried(err, dcp_checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.NO_FAST_PATHS_ENV, raising=False)
    calls = _failing_copy_file_range(monkeypatch, err, after_calls=3)    # the probe and two copies succeed
    out = tmp_path / "out"
    real_pread = os.pread

    def pread(fd, n, offset):
        if len(calls) > 3:      # after the failure nothing may read the source to copy it another way
            raise AssertionError("fell back to pread after a copy_file_range error")
        return real_pread(fd, n, offset)
    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(OutputError) as exc:
        streamconv.convert(str(dcp_checkpoints["fsdp2"]), str(out), workers=1, **SMALL)
    assert os.strerror(err) in str(exc.value) and ".safetensors: copy failed at offset" in str(exc.value)
    if err == errno.ENOSPC:
        assert "bytes free on" in str(exc.value)
    assert len(calls) == 4
    assert not out.exists() and os.listdir(tmp_path) == []      # staging removed


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range here")
def test_a_probe_answering_exdev_turns_copy_file_range_off(dcp_checkpoints, default_outputs, tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.NO_FAST_PATHS_ENV, raising=False)
    calls = _failing_copy_file_range(monkeypatch, errno.EXDEV, after_calls=0)
    out = tmp_path / "out"
    report = streamconv.convert(str(dcp_checkpoints["fsdp2"]), str(out), **SMALL)
    assert calls == [1]             # only the probe: every copy went through pread/pwrite
    assert "copy_file_range" not in report.fast_paths
    assert tree_bytes(out) == default_outputs["fsdp2"][1]


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range here")
def test_a_checkpoint_on_another_filesystem_converts(dcp_checkpoints, default_outputs, tmp_path):
    """Really across filesystems (tmpfs to the test folder's): on kernels that refuse that copy (EXDEV, Linux
    5.19 and later between different filesystem types) the probe turns copy_file_range off before any shard."""
    import shutil
    import tempfile
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to read from")
    source = Path(tempfile.mkdtemp(dir=shm, prefix="streamconv-fastpaths-"))
    try:
        ckpt = source / "ckpt"
        shutil.copytree(dcp_checkpoints["fsdp2"], ckpt)
        src_fd = os.open(next(ckpt.glob("*.distcp")), os.O_RDONLY)
        dst_fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.copy_file_range(src_fd, dst_fd, 1, 0, 0)
            refused = False
        except OSError as exc:
            refused = exc.errno == errno.EXDEV
        finally:
            os.close(src_fd)
            os.close(dst_fd)
            os.unlink(tmp_path / "probe")
        out = tmp_path / "out"
        report = streamconv.convert(str(ckpt), str(out), **SMALL)
        assert tree_bytes(out) == default_outputs["fsdp2"][1]
        assert ("copy_file_range" in report.fast_paths) == (not refused)
    finally:
        shutil.rmtree(source)


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range here")
def test_a_probe_hitting_eio_is_an_error(dcp_checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv(failpoints.NO_FAST_PATHS_ENV, raising=False)
    _failing_copy_file_range(monkeypatch, errno.EIO, after_calls=0)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="streamconv-probe.*Input/output error"):
        streamconv.convert(str(dcp_checkpoints["fsdp2"]), str(out), **SMALL)
    assert os.listdir(tmp_path) == []


# -- the plain paths on their own ----------------------------------------------------------------------------

def test_plain_read_into_fills_buffers_like_preadv(tmp_path):
    data = bytes(range(256)) * 97
    (tmp_path / "f").write_bytes(data)
    sizes = [0, 5, 1000, 0, 3, 20000]
    results = []
    for fast in (fastpaths.NONE, FastPaths(preadv=hasattr(os, "preadv"))):
        buffers = [bytearray(n) for n in sizes]
        with DirectoryReader(tmp_path, fast=fast) as reader:
            reader.read_into("f", 7, [memoryview(b) for b in buffers])
            with pytest.raises(CheckpointError, match="file ends at offset 24832"):
                reader.read_into("f", len(data) - 10, [memoryview(bytearray(11))])
        results.append(b"".join(buffers))
    assert results[0] == results[1] == data[7:7 + sum(sizes)]


@pytest.mark.parametrize("fast", [fastpaths.NONE, FastPaths(copy_file_range=True)], ids=["pread", "in-kernel"])
def test_file_sink_copy_reports_a_source_that_ends_early(fast, tmp_path):
    if fast.copy_file_range and not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range here")
    src = tmp_path / "src"
    src.write_bytes(b"x" * 100)
    sink = FileSink(str(tmp_path / "dst"), 200, fast=fast)
    fd = os.open(src, os.O_RDONLY)
    try:
        sink.copy_from(OpenFile(fd, str(src)), 0, 50, 100)
        with pytest.raises(OutputError, match=r"source ended early .* wanted 100 bytes from source offset 50, got 50"):
            sink.copy_from(OpenFile(fd, str(src)), 50, 0, 100)
    finally:
        os.close(fd)
        sink.close()
    assert (tmp_path / "dst").read_bytes()[50:150] == b"x" * 100


# -- memory with the plain paths ---------------------------------------------------------------------------------

def write_medium(rank, world_size, out_dir):
    """Two 32 MiB float32 tensors: one copied file to file (Shard(0)), one assembled in bands (Shard(1))."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    rows, cols = 2048, 4096
    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    state = {"model": {
        "down_proj.weight": DTensor.from_local(torch.empty(rows, cols // world_size).uniform_(generator=gen), mesh,
                                               [Shard(1)], run_check=False),
        "embed.weight": DTensor.from_local(torch.empty(rows // world_size, cols).uniform_(generator=gen), mesh,
                                           [Shard(0)], run_check=False),
    }}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


def test_plain_paths_keep_memory_within_the_buffer(tmp_path):
    """The fallbacks read through small bytes objects (1 MiB steps), never a whole chunk: measured by the OS in a
    converter process that never imports torch, with the bound tests/memory/test_memory.py holds the fast paths to."""
    from streamconv.demo_checkpoint import run_distributed
    ckpt = tmp_path / "ckpt"
    run_distributed(f"{__name__}:write_medium", 2, dict(out_dir=str(ckpt)))
    buffer_mib = 4
    peaks, trees = {}, {}
    for switch in ("1", "0"):
        env = dict(os.environ, **{failpoints.NO_FAST_PATHS_ENV: switch})
        out = tmp_path / f"out-{switch}"
        r = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(ckpt), str(out), "--json",
                            "--buffer-size", f"{buffer_mib}MiB"], capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["bytes_written"] > 64 * 2**20
        peaks[switch] = report["peak_rss_bytes"] / 2**20
        print(f"{failpoints.NO_FAST_PATHS_ENV}={switch}: {report['seconds']:.2f} s, peak RSS {peaks[switch]:.1f} MiB")
        trees[switch] = tree_bytes(out)
        assert report["peak_rss_bytes"] <= report["predicted_peak_bytes"]
    assert peaks["1"] < 48 + buffer_mib, f"peak RSS {peaks['1']:.1f} MiB with fast paths off"   # as every layout
    assert trees["1"] == trees["0"]
