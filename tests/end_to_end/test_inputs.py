"""Odd and hostile inputs that real users and attackers produce (issue 8, items 3, 4, 6 and the bad options):
tensor names no safetensors reader loads, checkpoints of thousands of files under a small `ulimit -n`, data and
sidecar files that are FIFOs, devices or directories, paths with NUL bytes, and option values that used to end
in a traceback. Every case is checked through the CLI for its exit code and message where a user would meet it.
"""
import dataclasses
import json
import os
import pickle
import random
import resource
import shutil
import stat
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open

from tests.support import dcp_writers
import streamconv
from streamconv.planning import names
from streamconv.cli import cli
from streamconv.errors import CheckpointError, OptionsError, ResourceError
from streamconv.hf.sidecars import copy_regular, sidecar_names
from streamconv.source.io import DirectoryReader
from streamconv.model import BlobLocation, CheckpointMetadata, Chunk, TensorEntry
from streamconv.planning.plan import PlanOptions, build_plan

LAYOUTS = sorted(dcp_writers.CHECKPOINTS)
CLI = [sys.executable, "-m", "streamconv.cli"]


def run_cli(*args, timeout=120, nofile=None):
    """The real command in a child process (real stdout encoding, real rlimits); a hang fails the test."""
    def limit():
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))


def save_plain(path, tensors):
    """A real single-process DCP checkpoint written by torch's FileSystemWriter: {"model": tensors}."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # "no process group: saving without one"
        import torch.distributed.checkpoint as dcp
        dcp.save({"model": tensors}, storage_writer=dcp.FileSystemWriter(str(path)))
    return path


def write_header_file(shard, path):
    """A shard file with the planned header and zeroed (sparse) data: enough for a reader to parse it."""
    with open(path, "wb") as f:
        f.write(shard.header)
        f.truncate(shard.nbytes)


def assert_headers_load(plan, tmp_path):
    """Every header the planner made is accepted by the safetensors library, with the planned names,
    shapes and dtypes."""
    for shard in plan.shards:
        path = tmp_path / shard.filename
        write_header_file(shard, path)
        with safe_open(str(path), framework="pt") as f:
            assert set(f.keys()) == {t.name for t in shard.tensors}
            for t in shard.tensors:
                piece = f.get_slice(t.name)
                assert tuple(piece.get_shape()) == t.shape
                assert piece.get_dtype() == streamconv.dtypes.BY_NAME[t.dst_dtype].safetensors
        path.unlink()


# ---------------------------------------------------------------------------------------------------------
# item 3: names are checked before writing


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_planned_header_loads_in_safetensors(layout, dcp_checkpoints, tmp_path):
    plan = streamconv.plan(str(dcp_checkpoints[layout]), max_shard_size="40KB")
    assert plan.tensors
    assert_headers_load(plan, tmp_path)


def _one_tensor_meta(fqns):
    tensors = tuple(TensorEntry(fqn=f, dtype="float32", shape=(2,),
                                chunks=(Chunk((0,), (2,), BlobLocation("__0_0.distcp", 8 * i, 8)),), path=(f,))
                    for i, f in enumerate(fqns))
    return CheckpointMetadata(tensors=tensors)


_ANY_TEXT = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fqns=st.lists(st.one_of(_ANY_TEXT, st.sampled_from(["", "__metadata__", "a\udc80", "x\x00y", "module.w", "w"])),
                     min_size=1, max_size=6, unique=True), budget=st.integers(16, 64))
def test_any_names_either_refused_or_loadable(fqns, budget, tmp_path_factory):
    """Whatever the checkpoint's keys, the planner refuses with one of our errors or every header loads."""
    try:
        plan = build_plan(_one_tensor_meta(fqns), PlanOptions(max_shard_bytes=budget))
    except (CheckpointError, OptionsError):
        return
    assert_headers_load(plan, tmp_path_factory.mktemp("h"))
    assert len({t.name for t in plan.tensors}) == len(fqns)


def test_messages_show_huge_names_cut():
    with pytest.raises(CheckpointError) as refused:
        build_plan(_one_tensor_meta(["x" * 100_000 + "\x01"]))
    assert len(str(refused.value)) < 1000 and "100,001 characters" in str(refused.value)


def test_a_header_too_long_for_safetensors_readers_is_refused(monkeypatch):
    import importlib
    plan_module = importlib.import_module("streamconv.planning.plan")    # `streamconv.planning.plan` is the API function
    meta = _one_tensor_meta([f"layer.{i}.w" for i in range(50)])
    assert build_plan(meta).shards
    monkeypatch.setattr(plan_module, "MAX_HEADER_BYTES", 2000)
    with pytest.raises(OptionsError, match="--max-shard-size"):
        build_plan(meta)
    assert len(build_plan(meta, PlanOptions(max_shard_bytes=64)).shards) > 1    # smaller shards fit


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """One real checkpoint per hostile name, each also holding an ordinary tensor."""
    root = tmp_path_factory.mktemp("odd-names")
    cases = {"empty": "", "reserved": "__metadata__", "surrogate": "emb\udc80.weight", "control": "norm\x1b[2J.weight",
             "newline": "norm\n.weight"}
    out = {}
    for case, name in cases.items():
        out[case] = save_plain(root / case, {name: torch.arange(4.0), "ok.weight": torch.ones(3)})
    out["collision"] = save_plain(root / "collision", {"layers.0.w": torch.zeros(2),
                                                       "_orig_mod.layers.0.w": torch.ones(2)})
    out["long_digits"] = save_plain(root / "long_digits", {f"layers.{'9' * 5000}.w": torch.arange(3.0),
                                                           "layers.2.w": torch.arange(2.0), "layers.10.w": torch.ones(1)})
    return out


@pytest.mark.parametrize("case, what", [("empty", "empty"), ("reserved", "reserves"),
                                        ("surrogate", "not valid UTF-8"), ("control", "control character"),
                                        ("newline", "control character")])
def test_unloadable_checkpoint_names_are_refused_before_writing(odd_names, case, what, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(odd_names[case]), str(out)])
    assert result.exit_code == CheckpointError.exit_code == 2, result.output
    assert what in result.output and "--exclude" in result.output
    assert not out.exists()


def test_a_bad_checkpoint_name_can_be_excluded_or_renamed(odd_names, tmp_path):
    ok = CliRunner().invoke(cli, ["convert", str(odd_names["control"]), str(tmp_path / "a"), "--exclude", "*norm*"])
    assert ok.exit_code == 0, ok.output
    renamed = CliRunner().invoke(cli, ["convert", str(odd_names["control"]), str(tmp_path / "b"),
                                       "--rename", r"\x1b\[2J="])
    assert renamed.exit_code == 0, renamed.output
    with safe_open(str(tmp_path / "b" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["norm.weight", "ok.weight"]
        assert f.get_tensor("norm.weight").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_a_rename_that_makes_a_bad_name_is_a_usage_error(odd_names, tmp_path):
    for rule, what in ((r"^layers\.2\.w$=__metadata__", "reserves"), (r"^layers\.2\.w$=", "empty"),
                       ("^layers=l\x07", "control character"), ("^layers\\.2=\udc80", "not valid UTF-8")):
        result = CliRunner().invoke(cli, ["convert", str(odd_names["long_digits"]), str(tmp_path / "out"),
                                          "--rename", rule])
        assert result.exit_code == OptionsError.exit_code == 64, (rule, result.output)
        assert what in result.output and "--rename" in result.output
    assert not (tmp_path / "out").exists()


def test_two_tensors_on_one_name_are_refused_naming_both(odd_names, tmp_path):
    wrapped = CliRunner().invoke(cli, ["plan", str(odd_names["collision"])])
    assert wrapped.exit_code == 2, wrapped.output
    assert "'model.layers.0.w'" in wrapped.output and "'model._orig_mod.layers.0.w'" in wrapped.output
    by_rename = CliRunner().invoke(cli, ["plan", str(odd_names["long_digits"]), "--rename", r"\d+=N"])
    assert by_rename.exit_code == 64, by_rename.output
    assert "both become 'layers.N.w'" in by_rename.output


def test_a_5000_digit_number_in_a_name_converts_in_natural_order(odd_names, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(odd_names["long_digits"]), str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor(f"layers.{'9' * 5000}.w").tolist() == [0.0, 1.0, 2.0]
    plan = streamconv.plan(str(odd_names["long_digits"]))
    assert [t.name[:10] for t in sorted(plan.tensors, key=lambda t: names.natural_key(t.name))] == \
        ["layers.2.w", "layers.10.", "layers.999"]


@given(a=st.integers(0, 10**30), b=st.integers(0, 10**30), zeros=st.integers(0, 3), prefix=st.sampled_from(["", "l."]))
def test_natural_key_orders_numbers_by_value_without_int(a, b, zeros, prefix):
    key_a, key_b = names.natural_key(f"{prefix}{'0' * zeros}{a}.w"), names.natural_key(f"{prefix}{b}.w")
    assert a == b or (key_a < key_b) == (a < b)


def test_inspect_prints_a_lone_surrogate_escaped(odd_names):
    result = run_cli("inspect", odd_names["surrogate"])
    assert result.returncode == 0, result.stderr
    assert "model.emb\\udc80.weight" in result.stdout and "Traceback" not in result.stderr
    control = run_cli("inspect", odd_names["control"])
    assert control.returncode == 0 and "norm\\x1b[2J.weight" in control.stdout and "\x1b" not in control.stdout


# ---------------------------------------------------------------------------------------------------------
# bad options: a clear message and exit 64, never a traceback


@pytest.mark.parametrize("args, message", [
    (["--max-shard-size", "1e400"], "too large"),
    (["--buffer-size", "1e99999999999999999999"], "too large"),
    (["--rename", r"a(b)=\2"], "bad replacement"),
    (["--rename", r"(?P<x>a)=\g<y>"], "bad replacement"),
    (["--rename", "a=b\\"], "bad replacement"),
    (["--rename", "a{99999999999}=b"], "bad regular expression"),
    (["--rename", "(" * 5000 + ")" * 5000 + "=b"], "bad regular expression"),
])
def test_bad_option_values_are_usage_errors(dcp_checkpoints, args, message):
    result = CliRunner().invoke(cli, ["plan", str(dcp_checkpoints["fsdp2"])] + args)
    assert result.exit_code == 64, result.output
    assert message in result.output and not isinstance(result.exception, (OverflowError, IndexError))


def test_staging_name_fits_name_max_for_any_legal_output_name():
    for base in ("out", "a" * 200, "a" * 240, "a" * 255, "é" * 127, "模" * 85):
        staged = names.staging_name(base)
        assert len(os.fsencode(staged)) + len(".old") <= names.NAME_MAX_BYTES, base
        assert staged.startswith(".") and staged == names.staging_name(base)     # deterministic
    assert names.staging_name("out") == ".out.streamconv.partial"
    # Two long names sharing their first 230 characters still get two staging folders.
    assert names.staging_name("a" * 240 + "x") != names.staging_name("a" * 240 + "y")


@pytest.mark.parametrize("length", [240, 255])
def test_a_long_output_name_converts_and_is_replaced(dcp_checkpoints, tmp_path, length):
    out = tmp_path / ("m" * length)
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["fsdp2"]), str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    again = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["fsdp2"]), str(out), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]     # no staging or old folder left


# ---------------------------------------------------------------------------------------------------------
# item 4: any number of files


def test_descriptor_cache_is_bounded_and_never_closes_a_descriptor_in_use(tmp_path):
    n_files, max_open, n_threads = 40, 4, 6
    for i in range(n_files):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 4096)
    before = len(os.listdir("/proc/self/fd"))
    reader = DirectoryReader(tmp_path, max_open=max_open)
    failures = []

    def work(seed):
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                i, j, k = (rng.randrange(n_files) for _ in range(3))
                assert reader.read(f"f{i}", rng.randrange(4000), 16) == bytes([i]) * 16
                with reader.borrow(f"f{j}") as fd:
                    # Other threads evict meanwhile; this descriptor must still be file j.
                    for _ in range(3):
                        reader.size(f"f{rng.randrange(n_files)}")
                    assert os.pread(fd, 8, 100) == bytes([j]) * 8
                fd = reader.fd(f"f{k}")      # stays open until this thread's next fd() call
                reader.read(f"f{rng.randrange(n_files)}", 0, 1)
                assert os.pread(fd, 8, 0) == bytes([k]) * 8
        except BaseException as exc:       # pragma: no cover - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    # At most the cache plus one pinned descriptor per thread is open, whatever was read.
    assert len(os.listdir("/proc/self/fd")) - before <= max_open + n_threads
    reader.close()
    assert len(os.listdir("/proc/self/fd")) == before


_EMFILE_SCRIPT = r"""
import os, resource, sys
from streamconv.source.io import DirectoryReader
from streamconv.errors import ResourceError
folder = sys.argv[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
# A cache larger than the limit: running out closes idle descriptors and goes on.
reader = DirectoryReader(folder, max_open=1000)
for i in range(200):
    assert reader.read(f"f{i}", 0, 1) == bytes([i])
reader.close()
# Every descriptor taken elsewhere: a resource error with the hint, not "bad checkpoint".
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
try:
    DirectoryReader(folder).read("f0", 0, 1)
except ResourceError as exc:
    print("ResourceError", exc.exit_code, exc)
"""


def test_running_out_of_descriptors_is_a_resource_error_with_the_hint(tmp_path):
    for i in range(200):
        (tmp_path / f"f{i}").write_bytes(bytes([i]))
    result = subprocess.run([sys.executable, "-c", _EMFILE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ResourceError 71 ") and "ulimit -n" in result.stdout
    assert ResourceError.exit_code == 71


MANY_TENSORS = 1000    # x 2 ranks, one file each: 2,000 .distcp files


def write_many_files(rank: int, world_size: int, out_dir: str, n_tensors: int) -> int:
    """Run in gloo ranks: `n_tensors` small DTensors Shard(0), saved one file per item per rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world_size,))
    state = {}
    for i in range(n_tensors):
        local = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1000 * i + 10 * rank
        state[f"layers.{i}.w"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
    dcp.save({"model": state}, storage_writer=dcp.FileSystemWriter(out_dir, single_file_per_rank=False,
                                                                   sync_files=False))
    return rank


@pytest.fixture(scope="module")
def many_files_checkpoint(tmp_path_factory):
    from streamconv.demo_checkpoint import run_distributed
    path = tmp_path_factory.mktemp("many") / "ckpt"
    run_distributed(f"{__name__}:write_many_files", 2, dict(out_dir=str(path), n_tensors=MANY_TENSORS))
    return path


def test_thousands_of_files_convert_under_ulimit_256(many_files_checkpoint, tmp_path):
    ckpt = many_files_checkpoint
    assert len(list(ckpt.glob("*.distcp"))) >= 2000
    out = tmp_path / "out"
    result = run_cli("convert", ckpt, out, "--max-shard-size", "8KB", "--verify", "--json", nofile=256, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == MANY_TENSORS
    ref = dcp_writers.reference_state_dict(ckpt)
    from tests.support.outputs import read_output, same_bits
    got = read_output(out)
    assert len(got) == MANY_TENSORS
    for i in (0, 1, 517, MANY_TENSORS - 1):
        assert got[f"layers.{i}.w"][2, 0].item() == 1000 * i + 10      # rank 1's half is in place
    for name, tensor in got.items():
        assert same_bits(tensor, ref["model." + name]), name


# ---------------------------------------------------------------------------------------------------------
# item 6: only regular files are read or copied; raw exceptions on odd paths


@pytest.fixture
def ckpt_copy(dcp_checkpoints, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(dcp_checkpoints["fsdp2"], dst)
    return dst


@pytest.mark.parametrize("kind, what", [("fifo", "FIFO"), ("devzero", "character device"),
                                        ("directory", "directory"), ("dirlink", "directory")])
def test_a_data_file_that_is_not_regular_is_refused_by_name(ckpt_copy, tmp_path, kind, what):
    victim = ckpt_copy / "__1_0.distcp"
    victim.unlink()
    if kind == "fifo":
        os.mkfifo(victim)
    elif kind == "devzero":
        victim.symlink_to("/dev/zero")
    elif kind == "directory":
        victim.mkdir()
    else:
        victim.symlink_to(tmp_path)
    out = tmp_path / "out"
    result = run_cli("convert", ckpt_copy, out, timeout=60)      # a FIFO used to block here forever
    assert result.returncode == 2, result.stderr
    assert "__1_0.distcp" in result.stderr and what in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def _rewrite_relative_paths(ckpt, new_path):
    """The checkpoint's own .metadata (read by torch) with every data file renamed to `new_path`."""
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(ckpt)).read_metadata()
    md.storage_data = {k: dataclasses.replace(v, relative_path=new_path) for k, v in md.storage_data.items()}
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize("relative_path, message", [
    (".", "is a directory"), ("..", "outside the checkpoint"), ("__0_0\x00.distcp", "invalid data file"),
    ("__0_0\ud800.distcp", "cannot name"), ("", "invalid"),
])
def test_odd_relative_paths_are_checkpoint_errors(ckpt_copy, tmp_path, relative_path, message):
    _rewrite_relative_paths(ckpt_copy, relative_path)
    result = CliRunner().invoke(cli, ["convert", str(ckpt_copy), str(tmp_path / "out")])
    assert result.exit_code == 2, (result.output, result.exception)
    assert message in result.output


def _config_dir(tmp_path, tokenizer_kind):
    cfg = tmp_path / "base"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    (cfg / "tokenizer_config.json").write_text("{}")
    tok = cfg / "tokenizer.json"
    if tokenizer_kind == "fifo":
        os.mkfifo(tok)
    elif tokenizer_kind == "devzero":
        tok.symlink_to("/dev/zero")
    elif tokenizer_kind == "directory":
        tok.mkdir()
    else:
        tok.write_text('{"version": "1.0"}')
    return cfg


@pytest.mark.parametrize("kind, what", [("fifo", "FIFO"), ("devzero", "character device"), ("directory", "directory")])
def test_a_sidecar_that_is_not_regular_is_refused_before_converting(dcp_checkpoints, tmp_path, kind, what):
    cfg = _config_dir(tmp_path, kind)
    out = tmp_path / "out"
    result = run_cli("convert", dcp_checkpoints["fsdp2"], out, "--config-from", cfg, timeout=60)
    assert result.returncode == 64, result.stderr
    assert "tokenizer.json" in result.stderr and what in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_a_config_json_that_is_a_fifo_does_not_hang(dcp_checkpoints, tmp_path):
    cfg = tmp_path / "base"
    cfg.mkdir()
    os.mkfifo(cfg / "config.json")
    result = run_cli("plan", dcp_checkpoints["fsdp2"], "--config-from", cfg, timeout=60)
    assert result.returncode == 64 and "config.json" in result.stderr and "FIFO" in result.stderr, result.stderr


def test_regular_sidecars_are_copied_byte_for_byte(dcp_checkpoints, tmp_path):
    cfg = _config_dir(tmp_path, "regular")
    out = tmp_path / "out"
    # --allow-unmatched: the stand-in config.json is no model of TinyLlama's (tests/hf/test_expected.py checks that)
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["fsdp2"]), str(out), "--config-from", str(cfg),
                                      "--allow-unmatched"])
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == (cfg / "tokenizer.json").read_bytes()
    assert sidecar_names(str(cfg)) == ["config.json", "tokenizer.json", "tokenizer_config.json"]


def test_sidecar_copies_stop_at_the_size_fstat_reported(tmp_path):
    # /proc files are regular files whose fstat size (0) is less than what reading them yields: the copy is
    # capped at the size seen when opened, as it is for a file that keeps growing while it is copied.
    src = "/proc/self/status"
    assert stat.S_ISREG(os.stat(src).st_mode) and os.stat(src).st_size == 0 and open(src).read()
    assert copy_regular(src, str(tmp_path / "copy")) == 0
    assert (tmp_path / "copy").read_bytes() == b""
    payload = os.urandom(3 * 2**20 + 17)
    (tmp_path / "src").write_bytes(payload)
    assert copy_regular(str(tmp_path / "src"), str(tmp_path / "dst")) == len(payload)
    assert (tmp_path / "dst").read_bytes() == payload
    with pytest.raises(OptionsError, match="character device"):
        copy_regular("/dev/zero", str(tmp_path / "never"))
