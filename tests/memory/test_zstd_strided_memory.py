"""Peak memory stays at the buffer for zstd-compressed and transposed chunks too: 128 MiB tensors, converted with a
4 MiB buffer, measured by the OS (VmHWM of a converter process that never imports torch), output exact."""
import json
import subprocess
import sys

import pytest

from tests.support import rss

from streamconv.demo_checkpoint import run_distributed

ROWS, COLS = 4096, 8192          # 128 MiB of float32 per tensor
BUFFER_MIB = 4


def write_big(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    gen = torch.Generator().manual_seed(rank)
    # Rounded to bfloat16 precision so that zstd has something to squeeze (as with real bf16-trained weights).
    cols = torch.empty(ROWS, COLS // world_size).uniform_(generator=gen).to(torch.bfloat16).float()
    rows = torch.empty(ROWS // world_size, COLS).uniform_(generator=gen).to(torch.bfloat16).float()
    zstd = {"model": {
        "down_proj.weight": DTensor.from_local(cols, mesh, [Shard(1)], run_check=False),   # bands
        "embed.weight": DTensor.from_local(rows, mesh, [Shard(0)], run_check=False),       # copy path
    }}
    dcp.save(zstd, storage_writer=dcp.FileSystemWriter(f"{out_dir}/zstd", sync_files=False,
                                                        _extensions=[ZStandard()]))
    # Each rank's block of rows, stored transposed: the global [ROWS, COLS] tensor is all permuted chunks.
    transposed = torch.empty(COLS, ROWS // world_size).uniform_(generator=gen).t()
    strided = {"model": {"up_proj.weight": DTensor.from_local(transposed, mesh, [Shard(0)], run_check=False)}}
    dcp.save(strided, storage_writer=dcp.FileSystemWriter(f"{out_dir}/strided", sync_files=False))
    return 0


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("big")
    run_distributed(f"{__name__}:write_big", 2, dict(out_dir=str(out)))
    return out


def convert_in_subprocess(ckpt, out, *args):
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(ckpt), str(out), "--json",
                           "--buffer-size", f"{BUFFER_MIB}MiB", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name, bound_mib", [("zstd", 56), ("strided", 52)])
def test_peak_rss_is_bounded_by_the_buffer(big, tmp_path, name, bound_mib):
    import torch
    from safetensors import safe_open

    from tests.support import dcp_writers
    report = convert_in_subprocess(big / name, tmp_path / "out", *(["--crc"] if name == "zstd" else []))
    assert report["bytes_written"] >= 128 * 2**20
    peak_mib = report["peak_rss_bytes"] / 2**20
    # The prediction counts zstd's decoders, and the buffer and numpy (its import measured once they are found)
    # of chunks found transposed while locating: it counted numpy at NUMPY_RSS_BYTES there, 24-27% high.
    rss.assert_within_prediction(report)
    # buffer + 48 MiB (the bound every layout is held to), far below one 128 MiB tensor; zstd adds its decoders
    # (a 2 MiB window each, one per worker): 4 MiB more.
    assert peak_mib < bound_mib, f"{name}: peak RSS {peak_mib:.1f} MiB with a {BUFFER_MIB} MiB buffer"
    ref = dcp_writers.reference_state_dict(big / name)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), ref["model." + key]), key


def test_column_blocks_keep_a_decoder_each_within_the_prediction(tmp_path):
    """A 32 MiB float32 weight in 8 zstd column blocks (Shard(1) over 8 ranks), one writer, a 4 MiB buffer: nothing
    is held, so the writer keeps 8 decoders between bands (planning/streams.py), each decoding its block once. The
    peak stays within the prediction that counts them (6% above it), and the output is exact. (Counting one decoder per
    writer, the prediction was 18 MiB short of this peak.)"""
    import torch
    from safetensors import safe_open

    from tests.support import dcp_writers
    run_distributed("tests.support.zstd_writers:write_column_blocks", 1,
                    dict(out_dir=str(tmp_path), columns=(8,), shape=(2048, 4096)))
    ckpt = tmp_path / "column_blocks_8"
    report = convert_in_subprocess(ckpt, tmp_path / "out", "--workers", "1")
    rss.assert_within_prediction(report)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), dcp_writers.reference_state_dict(ckpt)["w"])


@pytest.mark.slow     # ~30 s on the loaded 2-core VM; the fast test of the same bound: tests/execution/test_held.py
def test_a_held_transposed_zstd_chunk_stays_within_the_prediction(tmp_path):
    """A 32 MiB float32 weight saved transposed in one zstd blob, converted by one writer with a 48 MiB buffer: it
    is held (decoded once into the buffer, execution/held.py: 32 MiB decoded, not 64), which fills the whole
    share; the peak (86-88 MiB) stays within the plan's prediction (91 MiB), and the output is exact."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from safetensors import safe_open
    weight = torch.empty(8192, 1024).uniform_(generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": weight.t()}, no_dist=True, storage_writer=dcp.FileSystemWriter(
            str(tmp_path / "ck"), sync_files=False, _extensions=[ZStandard()]))
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "convert", str(tmp_path / "ck"),
                           str(tmp_path / "out"), "--json", "--buffer-size", "48MiB", "--workers", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    # measured 87.2-87.5 MiB against 91.1 predicted (4%; 95.5-98.5 while numpy was counted at NUMPY_RSS_BYTES)
    rss.assert_within_prediction(report)
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("w"), weight.t())
