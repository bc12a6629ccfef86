"""An unstacked expert's plane is part of a stored chunk, so no CRC-32 recorded by torch covers it: its writer
computes one (execution/copy.py, output/crc.py) for the resume ledger and the output's record. Those CRCs must be
the files' own, or a resumed run would rewrite every shard (or, worse, a record would vouch for wrong bytes);
and a resumed shard with one flipped byte in an expert's plane must be rewritten, never kept on its size alone.

A real torchtitan-layout MoE checkpoint (2 gloo ranks, FSDP on the expert dim for w1/w2, on the ffn dim for w3 so
each of its experts is pieces of two chunks), converted into several shards with the CLI in a subprocess, with the
CRC by libdeflate (as detected: where installed) and by zlib (STREAMCONV_NO_FAST_PATHS=1).
"""
import json
import struct
import zlib

import pytest

from streamconv import failpoints
from streamconv.demo_checkpoint import run_distributed
from streamconv.output import staging
from tests.support.safety import hidden, no_traceback, run, tree_bytes

# float32: 80 KiB an expert plane, above the size from which output.crc.crc32 calls libdeflate (w3's pieces: 40 KiB)
EXPERTS, FFN, DIM, LAYERS = 8, 80, 256, 2
SHARD = "500KB"                                 # 9 shards, most of them all expert planes
PLACEMENTS = {"w1_EFD": 0, "w3_EFD": 1, "w2_EDF": 0}      # the dim each grouped tensor is FSDP-sharded on


def _full(layer, name):
    import torch
    shape = (EXPERTS, DIM, FFN) if name == "w2_EDF" else (EXPERTS, FFN, DIM)
    seed = 10 * layer + sorted(PLACEMENTS).index(name)
    return torch.empty(shape).uniform_(generator=torch.Generator().manual_seed(seed))


def write_moe(rank, world_size, out_dir):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    state = {}
    for layer in range(LAYERS):
        prefix = f"layers.{layer}.moe."
        for name, dim in PLACEMENTS.items():
            state[f"{prefix}routed_experts.inner_experts.{name}"] = distribute_tensor(_full(layer, name), mesh,
                                                                                     [Shard(dim)])
        state[f"{prefix}router.gate.weight"] = torch.ones(EXPERTS, DIM)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(out_dir, sync_files=False))
    return 0


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("unstacked-records")
    run_distributed(f"{__name__}:write_moe", 2, dict(out_dir=str(root / "ckpt")))
    ref = root / "reference"
    assert _convert(root / "ckpt", ref).returncode == 0
    expected = tree_bytes(ref)
    assert len([n for n in expected if n.endswith(".safetensors")]) >= 6
    return {"ckpt": root / "ckpt", "expected": expected}


CRC_BY = {"as-detected": {}, "zlib": {failpoints.NO_FAST_PATHS_ENV: "1"}}


def _convert(ckpt, out, *extra, env=None):
    return run("convert", ckpt, out, "--source-format", "torchtitan-qwen3", "--no-config", "--max-shard-size", SHARD,
               *extra, env=env)


def _expert_data_range(path):
    """(first, end) byte offsets in a safetensors file of its first unstacked expert tensor's data."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    name = next(n for n in sorted(header) if ".experts." in n)
    first, end = header[name]["data_offsets"]
    return 8 + header_len + first, 8 + header_len + end


@pytest.mark.parametrize("crc_by", sorted(CRC_BY))
def test_every_unstacked_shards_recorded_crc32_is_the_files(moe, tmp_path, crc_by):
    out = tmp_path / "out"
    killed = _convert(moe["ckpt"], out, env=dict(CRC_BY[crc_by], **{failpoints.KILL_AT_ENV: "index"}))
    assert killed.returncode == -9, killed.stderr
    stage = tmp_path / ".out.streamconv-partial"
    records = sorted((stage / staging.RECORDS_DIR).glob("*.safetensors.json"))
    assert len(records) == len([n for n in moe["expected"] if n.endswith(".safetensors")])
    for record in records:
        shard = stage / record.name[:-len(".json")]
        assert json.loads(record.read_text())["crc32"] == zlib.crc32(shard.read_bytes()), shard.name

    resumed = _convert(moe["ckpt"], out, "--resume", "--json", env=CRC_BY[crc_by])
    assert resumed.returncode == 0, resumed.stderr
    assert f"kept {len(records)} of" in " ".join(json.loads(resumed.stdout)["notes"])
    assert tree_bytes(out) == moe["expected"]
    output_record = json.loads((out / "streamconv.json").read_text())["files"]
    for name, data in moe["expected"].items():
        if name.endswith(".safetensors"):
            assert int(output_record[name]["crc32"], 16) == zlib.crc32(data), name


@pytest.mark.parametrize("crc_by", sorted(CRC_BY))
def test_a_resumed_shard_with_a_flipped_byte_in_an_experts_plane_is_rewritten(moe, tmp_path, crc_by):
    out = tmp_path / "out"
    env = CRC_BY[crc_by]
    killed = _convert(moe["ckpt"], out, "--workers", "1", env=dict(env, **{failpoints.KILL_AT_ENV: "between-shards@4"}))
    assert killed.returncode == -9, killed.stderr
    stage = tmp_path / ".out.streamconv-partial"
    finished = sorted(p for p in stage.glob("*.safetensors")
                      if (stage / staging.RECORDS_DIR / (p.name + ".json")).exists())
    assert len(finished) == 4
    damaged = next(p for p in reversed(finished) if b".experts." in p.read_bytes()[:4096])
    first, end = _expert_data_range(damaged)
    data = bytearray(damaged.read_bytes())
    data[(first + end) // 2] ^= 0x01                    # same size, one bit of one expert's weights
    damaged.write_bytes(bytes(data))
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished if p != damaged}

    resumed = _convert(moe["ckpt"], out, "--resume", "--json", env=env)
    assert resumed.returncode == 0 and no_traceback(resumed), resumed.stderr
    assert "kept 3 of" in " ".join(json.loads(resumed.stdout)["notes"])
    assert tree_bytes(out) == moe["expected"] and hidden(out) == []
    for name, identity in kept.items():     # the intact ones were not rewritten
        assert ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) == identity
