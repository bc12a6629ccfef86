"""`streamconv verify` and `convert --verify`/`--crc`: real checkpoints written by torch's writers, converted by
streamconv, then damaged one way at a time; each damage must be caught, named, and exit with its code."""
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import streamconv
from streamconv import api
from streamconv.runs import shardjob
from streamconv.cli import cli
from streamconv.errors import CheckpointError, VerificationError
from streamconv.planning.plan import INDEX_FILE_NAME
from streamconv.verification.compare import read_header

EXIT_DIFFERS = VerificationError.exit_code      # 3
EXIT_CORRUPT = CheckpointError.exit_code        # 2


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


def verify_json(ckpt, out, *options):
    result = run("verify", ckpt, out, "--json", *options)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def sharded_tp(dcp_checkpoints, tmp_path_factory):
    """A clean tensor-parallel output in several files (with an index)."""
    out = tmp_path_factory.mktemp("clean") / "tp"
    streamconv.convert(str(dcp_checkpoints["tp"]), str(out), max_shard_size="20KB")
    assert len(list(out.glob("*.safetensors"))) > 3
    return out


@pytest.fixture
def damaged(sharded_tp, tmp_path):
    """A fresh copy of the clean output to damage."""
    out = tmp_path / "out"
    shutil.copytree(sharded_tp, out)
    return out


def tensors_of(out: Path):
    """{name: (file, absolute begin, end, dtype, shape)} from the output's headers."""
    found = {}
    for path in sorted(out.glob("*.safetensors")):
        start, header = read_header(str(path))
        for name, e in header.items():
            found[name] = (path.name, start + e["data_offsets"][0], start + e["data_offsets"][1], e["dtype"],
                           e["shape"])
    return found


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


# -- clean outputs pass -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,convert_options,verify_options", [
    ("fsdp2", {}, []),
    ("tp", {"max_shard_size": "20KB"}, []),                                       # Shard(1): band assembly
    ("mesh2d", {"dtype": "bfloat16", "max_shard_size": "30KB"}, ["--dtype", "bfloat16"]),   # 2-D mesh, cast
    ("mixed_dtypes", {"dtype": "bfloat16"}, ["--dtype", "bfloat16"]),
    ("exotic_dtypes", {"max_shard_size": "1KB"}, []),                           # 0-d, empty, float8, ints
    ("fsdp2_optim", {"dtype": "float16", "buffer_size": "64KiB"}, ["--dtype", "float16", "--buffer-size", "64KiB"]),
])
def test_verify_passes_on_clean_outputs(layout, convert_options, verify_options, dcp_checkpoints, tmp_path):
    ckpt, out = dcp_checkpoints[layout], tmp_path / "out"
    streamconv.convert(str(ckpt), str(out), **convert_options)
    code, result = verify_json(ckpt, out, *verify_options)
    assert code == 0 and result["ok"], result
    planned = streamconv.plan(str(ckpt), **{k: v for k, v in convert_options.items() if k == "dtype"})
    assert result["tensors_equal"] == result["tensors_expected"] == len(planned.tensors)
    file_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert result["bytes_compared"] == file_bytes
    chunks = {c.location for t in planned.tensors for c in t.chunks if c.numel}
    assert result["crc_checked_chunks"] == len(chunks) and result["crc_unrecorded_chunks"] == 0


def test_verify_finds_tensors_by_name_whatever_the_sharding(dcp_checkpoints, tmp_path):
    ckpt = dcp_checkpoints["dtensor_2d"]
    streamconv.convert(str(ckpt), str(tmp_path / "one"))
    streamconv.convert(str(ckpt), str(tmp_path / "many"), max_shard_size="2KB")
    for out in ("one", "many"):
        result = run("verify", ckpt, tmp_path / out, "--max-shard-size", "1KB")
        assert result.exit_code == 0, result.output
        assert result.output.startswith("verified: ")


def test_verify_of_gpu_fixture(shared_fixtures_dir, tmp_path):
    ckpt = shared_fixtures_dir / "fsdp1_mllama_optim" / "ckpt"
    streamconv.convert(str(ckpt), str(tmp_path / "out"), max_shard_size="1MB")
    code, result = verify_json(ckpt, tmp_path / "out")
    assert code == 0 and result["ok"] and result["crc_checked_chunks"] > 100, result


# -- damaged outputs: each caught and named, exit 3 ---------------------------------------------------------

def test_flipped_byte_names_tensor_and_element(sharded_tp, damaged, dcp_checkpoints):
    name = "model.layers.1.mlp.down_proj.weight"          # Shard(1) in the checkpoint: assembled in bands
    file, begin, end, dtype, shape = tensors_of(damaged)[name]
    element = 3 * shape[1] + 7                              # row 3, column 7
    flip(damaged / file, begin + element * 4 + 2)
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS and not result["ok"]
    assert [(d["name"], d["file"], d["element"], d["flat_element"]) for d in result["differing"]] == \
        [(name, file, [3, 7], element)]
    assert not result["missing"] and not result["extra"] and not result["file_problems"]
    assert result["tensors_equal"] == result["tensors_expected"] - 1
    assert name in result["error"] and result["exit_code"] == EXIT_DIFFERS
    human = run("verify", dcp_checkpoints["tp"], damaged)
    assert human.exit_code == EXIT_DIFFERS and f"differs: {name} in {file}" in human.output
    assert "element [3, 7]" in human.output
    with pytest.raises(VerificationError) as raised:          # the Python API raises, carrying the result
        streamconv.verify(str(dcp_checkpoints["tp"]), str(damaged))
    assert [d["name"] for d in raised.value.result.differing] == [name]
    assert streamconv.verify(str(dcp_checkpoints["tp"]), str(sharded_tp)).ok


def test_truncated_shard_is_named(damaged, dcp_checkpoints):
    tensors = tensors_of(damaged)
    file, begin, end, _, _ = tensors["model.embed_tokens.weight"]
    size = (damaged / file).stat().st_size
    os.truncate(damaged / file, size - 100)
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    problems = [p["problem"] for p in result["file_problems"] if p["file"] == file]
    assert any(p == f"truncated: {size - 100} bytes, its header describes {size}" for p in problems), problems
    assert len(problems) == 1, problems     # said once, by our own reader (no safetensors package involved)
    last = max((t for t in tensors.items() if t[1][0] == file), key=lambda t: t[1][2])[0]
    assert last in {d["name"] for d in result["differing"]}


def rename_in_header(path: Path, old: str, new: str) -> None:
    """Rewrite a tensor's name in the JSON header, keeping its length (so every offset stays valid)."""
    assert len(old) == len(new)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n]
    assert header.count(f'"{old}"'.encode()) == 1
    data[8:8 + n] = header.replace(f'"{old}"'.encode(), f'"{new}"'.encode())
    path.write_bytes(bytes(data))


def test_tensor_renamed_in_header_is_missing_and_extra(damaged, dcp_checkpoints):
    old, new = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weighs"
    file = tensors_of(damaged)[old][0]
    rename_in_header(damaged / file, old, new)
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert result["missing"] == [old]
    assert result["extra"] == [{"name": new, "file": file}]
    assert any(new in p and "not in the index" in p for p in result["index_problems"])
    assert any(old in p and "does not hold it" in p for p in result["index_problems"])
    assert not result["differing"]


def test_deleted_shard_is_named_with_its_tensors(damaged, dcp_checkpoints):
    tensors = tensors_of(damaged)
    file = tensors["model.norm.weight"][0]
    lost = sorted(n for n, t in tensors.items() if t[0] == file)
    (damaged / file).unlink()
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert {"file": file, "problem": "named in the index but missing"} in result["file_problems"]
    assert sorted(result["missing"]) == lost


def test_extra_tensor_in_a_shard_not_in_the_index(damaged, dcp_checkpoints):
    import torch
    from safetensors.torch import load_file, save_file
    file = tensors_of(damaged)["model.norm.weight"][0]
    tensors = load_file(str(damaged / file))
    tensors["sneaked.in"] = torch.ones(3)
    save_file(tensors, str(damaged / file), metadata={"format": "pt"})
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert result["extra"] == [{"name": "sneaked.in", "file": file}]
    assert any("sneaked.in" in p and "not in the index" in p for p in result["index_problems"])
    assert any("total_size" in p for p in result["index_problems"])   # 12 more bytes than the index says
    assert not result["differing"] and not result["missing"]


def test_wrong_total_size_and_duplicate_index_entry(damaged, dcp_checkpoints):
    index_path = damaged / INDEX_FILE_NAME
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert [p for p in result["index_problems"] if "total_size" in p] == [
        f"metadata.total_size is {index['metadata']['total_size']}; the tensors hold "
        f"{index['metadata']['total_size'] - 2} bytes"]
    # A weight listed twice (JSON allows repeated keys; json.loads would silently keep the last).
    text = index_path.read_text().replace('"weight_map": {', '"weight_map": {"lm_head.weight": "x.safetensors", ', 1)
    index_path.write_text(text)
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert any("'lm_head.weight' appears twice" in p for p in result["index_problems"]), result["index_problems"]


def test_unindexed_file_and_missing_index(damaged, dcp_checkpoints):
    shutil.copy(next(damaged.glob("model-00001-*.safetensors")), damaged / "stale.safetensors")
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert {"file": "stale.safetensors", "problem": "not listed in the index"} in result["file_problems"]
    (damaged / "stale.safetensors").unlink()
    (damaged / INDEX_FILE_NAME).unlink()
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS and any("no model.safetensors.index.json" in p for p in result["index_problems"])


def test_unreadable_index_is_one_problem(damaged, dcp_checkpoints):
    (damaged / INDEX_FILE_NAME).write_text('{"metadata": {"total_size": 1}, "weight_map": ')
    code, result = verify_json(dcp_checkpoints["tp"], damaged)
    assert code == EXIT_DIFFERS
    assert len(result["index_problems"]) == 1 and "unreadable" in result["index_problems"][0]
    assert result["tensors_equal"] == result["tensors_expected"]        # the tensors themselves are fine


def test_wrong_options_are_hinted(sharded_tp, dcp_checkpoints, tmp_path):
    # With its record (streamconv.json) the output's options are known: a contradicting one is a usage error.
    result = run("verify", dcp_checkpoints["tp"], sharded_tp, "--dtype", "bfloat16")
    assert result.exit_code == 64 and "'bfloat16'" in result.output and "'keep'" in result.output
    # An output made before records: the options given are used, and a wrong one is hinted at.
    older = tmp_path / "older"
    shutil.copytree(sharded_tp, older)
    (older / "streamconv.json").unlink()
    result = run("verify", dcp_checkpoints["tp"], older, "--dtype", "bfloat16")
    assert result.exit_code == EXIT_DIFFERS and "dtype F32, expected BF16" in result.output
    assert "--dtype" in result.output


def test_missing_output_folder(dcp_checkpoints, tmp_path):
    code, result = verify_json(dcp_checkpoints["tp"], tmp_path / "nothing")
    assert code == EXIT_DIFFERS and result["file_problems"][0]["problem"] == "output folder does not exist"


def test_convert_verify_runs_the_same_checks(dcp_checkpoints, tmp_path, monkeypatch):
    from streamconv.verification import compare as verifying
    calls = []
    original = verifying.verify_output

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result)
        return result

    monkeypatch.setattr(verifying, "verify_output", spy)
    report = streamconv.convert(str(dcp_checkpoints["mesh2d"]), str(tmp_path / "out"), verify=True,
                                max_shard_size="30KB")
    assert len(calls) == 1 and calls[0].ok and calls[0].tensors_equal == report.tensors
    assert report.verified_bytes == report.bytes_written


def test_convert_verify_catches_a_renamed_tensor_and_commits_nothing(dcp_checkpoints, tmp_path, monkeypatch):
    original = shardjob.write_shards

    def write_then_rename(shards, reader, stored, path_for, **kwargs):
        original(shards, reader, stored, path_for, **kwargs)
        rename_in_header(Path(path_for(shards[0].filename)), "lm_head.weight", "lm_head.weighs")

    monkeypatch.setattr(shardjob, "write_shards", write_then_rename)
    result = run("convert", dcp_checkpoints["tp"], tmp_path / "out", "--verify", "--max-shard-size", "20KB")
    assert result.exit_code == EXIT_DIFFERS
    assert "missing: lm_head.weight" in result.output and "Nothing was committed" in result.output
    assert list(tmp_path.iterdir()) == []


# -- source integrity: CRC-32 of the checkpoint's chunks -----------------------------------------------------

def corrupt_chunk(ckpt: Path, tensor_name: str):
    """Flip one byte in the middle of the storage record of `tensor_name`'s first non-empty chunk.
    Returns (file, byte offset flipped, record range)."""
    plan = streamconv.plan(str(ckpt))
    reader, _ = api.load(str(ckpt))
    with reader:
        stored = api.locate_chunks(plan, reader)
    t = next(t for t in plan.tensors if t.name == tensor_name)
    chunk = next(c for c in t.chunks if c.numel)
    s = stored[chunk.location]
    offset = s.record_offset + s.record_nbytes // 2
    flip(ckpt / chunk.location.relative_path, offset)
    return chunk.location.relative_path, offset, (s.record_offset, s.record_offset + s.record_nbytes)


@pytest.fixture
def corrupt_tp(dcp_checkpoints, tmp_path):
    """The clean tp checkpoint converted, then a copy of the checkpoint with one flipped byte in a chunk."""
    clean = dcp_checkpoints["tp"]
    out = tmp_path / "clean-out"
    streamconv.convert(str(clean), str(out))
    ckpt = tmp_path / "ckpt"
    shutil.copytree(clean, ckpt)
    file, offset, record = corrupt_chunk(ckpt, "model.layers.0.self_attn.o_proj.weight")
    return ckpt, out, file, offset, record


def test_verify_names_a_corrupt_chunk(corrupt_tp):
    ckpt, out, file, offset, (begin, end) = corrupt_tp
    code, result = verify_json(ckpt, out)
    assert code == EXIT_CORRUPT
    assert len(result["corrupt_chunks"]) == 1
    c = result["corrupt_chunks"][0]
    assert (c["file"], c["tensor"], c["begin"], c["end"]) == (file, "model.model.layers.0.self_attn.o_proj.weight",
                                                              begin, end)
    assert begin <= offset < end and c["recorded"] != c["computed"]
    human = run("verify", ckpt, out)
    assert human.exit_code == EXIT_CORRUPT
    assert f"{file}: tensor 'model.model.layers.0.self_attn.o_proj.weight': bytes [{begin}, {end})" in human.output
    # Without the CRC pass the flipped byte shows as a difference between output and checkpoint instead.
    code, result = verify_json(ckpt, out, "--no-crc")
    assert code == EXIT_DIFFERS and [d["name"] for d in result["differing"]] == ["model.layers.0.self_attn.o_proj.weight"]


@pytest.mark.parametrize("flags", [["--verify"], ["--crc"]])
def test_convert_refuses_a_corrupt_chunk(corrupt_tp, tmp_path, flags):
    ckpt, _, file, _, (begin, end) = corrupt_tp
    result = run("convert", ckpt, tmp_path / "new", *flags)
    assert result.exit_code == EXIT_CORRUPT, result.output
    assert file in result.output and "o_proj.weight" in result.output and f"[{begin}, {end})" in result.output
    assert not (tmp_path / "new").exists()


def test_convert_no_crc_converts_the_flipped_byte_silently(corrupt_tp, tmp_path):
    # Why the check exists: nothing else notices (torch.load does not either).
    ckpt = corrupt_tp[0]
    result = run("convert", ckpt, tmp_path / "new", "--no-crc")
    assert result.exit_code == 0, result.output


def test_small_records_are_checked_while_locating(dcp_checkpoints, tmp_path):
    """A flipped byte in a blob's `.data/serialization_id` record fails even with --no-crc (it costs nothing)."""
    import zipfile
    import io
    ckpt = tmp_path / "ckpt"
    shutil.copytree(dcp_checkpoints["fsdp2"], ckpt)
    plan = streamconv.plan(str(ckpt))
    location = next(c.location for t in plan.tensors for c in t.chunks if c.numel)
    path = ckpt / location.relative_path
    with open(path, "rb") as f:
        f.seek(location.offset)
        blob = f.read(location.length)
    info = next(i for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.filename.endswith("serialization_id"))
    data_at = blob.index(zipfile.ZipFile(io.BytesIO(blob)).read(info), info.header_offset)
    flip(path, location.offset + data_at + 3)
    result = run("convert", ckpt, tmp_path / "out", "--no-crc")
    assert result.exit_code == EXIT_CORRUPT and "serialization_id" in result.output and "CRC-32" in result.output


def test_crc_recorded_as_zero_is_not_checked(tmp_path):
    """torch.save(compute_crc32=False) stores 0: such chunks are counted as unrecorded, not as corrupt."""
    import io
    import torch
    from streamconv.source.io import MemoryReader
    from streamconv.model import BlobLocation, Chunk
    from streamconv.source import locate_tensor
    from streamconv.source.blob_reader import BlobReader
    from streamconv.source.integrity import ChunkIntegrity
    torch.serialization.set_crc32_options(False)
    try:
        buf = io.BytesIO()
        torch.save(torch.arange(10.0), buf)
    finally:
        torch.serialization.set_crc32_options(True)
    blob = buf.getvalue()
    location = BlobLocation("f", 0, len(blob))
    reader = MemoryReader({"f": blob})
    stored = locate_tensor(reader, location, fqn="t")
    assert stored.crc32 is None and stored.record_nbytes == 40
    integrity = ChunkIntegrity(BlobReader(reader, {location: stored}), {location: stored})
    integrity.check("t", Chunk((0,), (10,), location))
    assert integrity.unrecorded == [location] and integrity.checked_chunks == 0


def test_crc_streams_in_pieces(dcp_checkpoints):
    """The CRC pass reads each record in pieces of the given size and matches zlib over the whole record."""
    import zlib
    from streamconv.runs.checkpoint import blob_reader
    from streamconv.source.integrity import ChunkIntegrity
    ckpt = dcp_checkpoints["fsdp2"]
    plan = streamconv.plan(str(ckpt))
    reader, _ = api.load(str(ckpt))
    with reader:
        stored = api.locate_chunks(plan, reader)
        sizes = []
        original = reader.read_into

        def spy(path, offset, buffers):
            sizes.append(sum(len(b) for b in buffers))
            return original(path, offset, buffers)

        reader.read_into = spy
        integrity = ChunkIntegrity(blob_reader(plan, reader, stored), stored, piece_bytes=1000)
        t = max(plan.tensors, key=lambda t: t.nbytes)
        for chunk in t.chunks:
            integrity.check(t.source_fqn, chunk)
            s = stored[chunk.location]
            whole = (ckpt / chunk.location.relative_path).read_bytes()[s.record_offset:s.record_offset + s.record_nbytes]
            assert zlib.crc32(whole) == s.crc32
    assert max(sizes) == 1000 and sum(sizes) == sum(stored[c.location].record_nbytes for c in t.chunks)


def test_verify_has_help():
    result = run("verify", "--help")
    assert result.exit_code == 0 and "total_size" in result.output and "--no-crc" in result.output


def test_tied_head_is_rechecked_against_the_written_embedding(dcp_checkpoints, tmp_path):
    """With a config that ties embeddings, verify expects no lm_head.weight and proves the checkpoint's head
    equals the written embedding, as convert does before dropping it. TinyLlama's two differ: caught."""
    ckpt = dcp_checkpoints["fsdp2"]
    config = tmp_path / "base"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": True}))
    out = tmp_path / "out"
    streamconv.convert(str(ckpt), str(out))                 # no config: lm_head.weight kept
    (out / "streamconv.json").unlink()     # (its record would say: made without a config; see test_provenance)
    # --allow-unmatched: TinyLlama (attn_gate, q/k/v biases) is no model of that config; the names are not the point
    code, result = verify_json(ckpt, out, "--config-from", config, "--allow-unmatched")
    assert code == EXIT_DIFFERS
    assert result["extra"] == [{"name": "lm_head.weight", "file": "model.safetensors"}]
    assert [d["name"] for d in result["differing"]] == ["lm_head.weight"]
    assert "tie_word_embeddings is true" in result["differing"][0]["problem"]


def test_convert_crc_reports_what_it_checked(dcp_checkpoints, tmp_path):
    ckpt = dcp_checkpoints["dtensor_1d"]                    # copies, bands, a replicated tensor, an empty chunk
    plain = streamconv.convert(str(ckpt), str(tmp_path / "plain"))
    checked = streamconv.convert(str(ckpt), str(tmp_path / "checked"), crc=True, workers=2)
    assert plain.crc_checked_bytes == 0
    # Every source byte read, each chunk once (DCP saves each chunk as its own storage, so records = chunks).
    assert checked.crc_checked_bytes == sum(t.nbytes for t in streamconv.plan(str(ckpt)).tensors)


# -- in a real process: bounded memory, exit codes, no traceback ----------------------------------------------

# `big_checkpoint` (tests/conftest.py): 256 MiB, Shard(1) column blocks + Shard(0) rows.


def verify_in_subprocess(ckpt, out, *args):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "streamconv.cli", "verify", str(ckpt), str(out), "--json", *args],
                          capture_output=True, text=True)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_verify_memory_is_bounded_by_the_buffer_and_exit_codes_hold(big_checkpoint, tmp_path):
    out = tmp_path / "out"
    streamconv.convert(str(big_checkpoint), str(out), buffer_size="4MiB", max_shard_size="200MB")
    buffer_mib = 4
    code, result = verify_in_subprocess(big_checkpoint, out, "--buffer-size", f"{buffer_mib}MiB")
    assert code == 0 and result["ok"] and result["bytes_compared"] > 256 * 2**20
    peak_mib = result["peak_rss_bytes"] / 2**20
    # Interpreter + numpy + safetensors is ~50 MiB; the buffer comes on top. Far below one 128 MiB tensor.
    assert peak_mib < 56 + buffer_mib, f"peak RSS {peak_mib:.1f} MiB with a {buffer_mib} MiB buffer"

    file, begin, _, _, shape = tensors_of(out)["down_proj.weight"]
    flip(out / file, begin + (shape[1] * 4000 + 5000) * 4)
    code, result = verify_in_subprocess(big_checkpoint, out, "--buffer-size", f"{buffer_mib}MiB")
    assert code == EXIT_DIFFERS and result["exit_code"] == EXIT_DIFFERS
    assert [(d["name"], d["element"]) for d in result["differing"]] == [("down_proj.weight", [4000, 5000])]

    file, _, _, _, _ = tensors_of(out)["embed.weight"]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(big_checkpoint, ckpt)
    corrupt_chunk(ckpt, "embed.weight")
    code, result = verify_in_subprocess(ckpt, out)
    assert code == EXIT_CORRUPT and result["corrupt_chunks"][0]["tensor"] == "model.embed.weight"
