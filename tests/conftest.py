"""Session fixtures shared by the whole suite.

* `dcp_checkpoints`: every checkpoint of `dcp_writers.CHECKPOINTS`, written once per session by real torch
  writers in gloo process groups (three launches, a few seconds in all). {name: Path of the checkpoint folder}.
  With $STREAMCONV_TEST_DCP_CHECKPOINTS set, the ones already written in that folder (for a pytest a test starts).
* `demo_checkpoint`: the `make demo` checkpoint (`streamconv.demo_checkpoint.DemoCheckpoint`), built on request.
* `s3_server`: a moto S3 server on localhost (`tests/support/s3_server.py`), started on request.
* `gcs_server`: fake-gcs-server on localhost (`tests/support/gcs_server.py`), started on request, once per session.
* `model_families`: tiny Llama, Qwen2, Qwen3 and a torchtitan-named MoE module saved by DCP under FSDP2, each with a
  config-only base folder (`family_writers.py`), built on request.
* `meta_model_cache` (autouse): transformers' answer for a config.json (`streamconv/hf/meta_probe.py`, 5-20 s of
  importing transformers in a child) is kept for the session in $STREAMCONV_META_CACHE_DIR (a tmp folder unless set).
* `source`: for the data-safety suites, a private copy of the session's tensor-parallel checkpoint, made once per
  session (`support/safety.py`), checked after every test that uses it: its files' bytes and mtimes are unchanged
  (so a test that touched it fails itself, not a later one).
* `big_checkpoint`: 256 MiB of float32 tensors (Shard(1) column blocks and Shard(0) rows), once per session, for
  the memory bounds (`support/big_checkpoint.py`).
* `shared_fixtures_dir`: the GPU-made checkpoints in `<repo>/../shared/fixtures` (or $STREAMCONV_SHARED_FIXTURES);
  skips if that copy is absent, and the terminal summary then says so in one line (a skip among hundreds of
  dots is easy to miss, and those tests are the only ones on GPU-made checkpoints).

torch is imported lazily inside the fixtures, so torch-free tests collect and run without it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# gcsfs >= 2025 asks a gRPC control plane for every bucket's layout unless this is false; the local GCS server
# (tests/support/gcs_server.py) has none, and each call would wait 60 s. Read when gcsfs is imported: set first.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
SHARED_FIXTURES_DIR = Path(os.environ.get("STREAMCONV_SHARED_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures")
# The folder of an already written `dcp_checkpoints` (its `build` output), for a pytest run started by a test.
REUSE_DCP_CHECKPOINTS = "STREAMCONV_TEST_DCP_CHECKPOINTS"



@pytest.fixture(scope="session")
def dcp_checkpoints(tmp_path_factory):
    from tests.support import dcp_writers

    written = os.environ.get(REUSE_DCP_CHECKPOINTS)
    if written:     # a pytest run that a test started (tests/test_cli_manners.py) reads its parent's checkpoints
        found = {name: Path(written) / name for name in dcp_writers.CHECKPOINTS}
        missing = [name for name, path in found.items() if not (path / ".metadata").is_file()]
        assert not missing, f"${REUSE_DCP_CHECKPOINTS}={written} lacks {missing}"
        return found
    return dcp_writers.build(tmp_path_factory.mktemp("dcp"))


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    from streamconv.demo_checkpoint import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt", world_size=4)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto, HTTP on localhost) for the session; tests/support/s3_server.py."""
    from tests.support import s3_server as s3

    server = s3.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS-protocol server (fake-gcs-server, HTTP on localhost) for the session; tests/support/gcs_server.py."""
    from tests.support import gcs_server as gcs

    server = gcs.start()
    yield server
    server.stop()


@pytest.fixture()
def gcs_env(gcs_server, monkeypatch):
    """The session's GCS server with its variables set in this process and anonymous access passed the way a user
    passes it (`--storage-options '{"token": "anon"}'`: fsspec read $FSSPEC_GS_TOKEN when it was imported), so
    in-process code talks to it as a user's run would; gcsfs's cached clients dropped before and after."""
    import gcsfs
    from streamconv.fs.remote import StorageOptions

    for key, value in gcs_server.env.items():
        monkeypatch.setenv(key, value)
    gcsfs.GCSFileSystem.clear_instance_cache()
    StorageOptions.set({"token": "anon"})
    yield gcs_server
    StorageOptions.set(None)
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def model_families(tmp_path_factory):
    from tests.support import family_writers

    return family_writers.build(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def safety_checkpoint(tmp_path_factory, dcp_checkpoints):
    from tests.support import safety

    return safety.write_source(tmp_path_factory.mktemp("safety"), dcp_checkpoints["tp"])


@pytest.fixture
def source(safety_checkpoint):
    """`safety_checkpoint`, checked after the test: the source is never touched, whatever the test did."""
    from tests.support import safety

    yield safety_checkpoint
    safety.check_untouched(safety_checkpoint)


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory):
    from tests.support import big_checkpoint

    return big_checkpoint.write(tmp_path_factory.mktemp("big") / "ckpt")


@pytest.fixture(scope="session", autouse=True)
def meta_model_cache(tmp_path_factory):
    if not os.environ.get("STREAMCONV_META_CACHE_DIR"):     # inherited by the CLI subprocesses the tests start
        os.environ["STREAMCONV_META_CACHE_DIR"] = str(tmp_path_factory.mktemp("meta-cache"))
    return Path(os.environ["STREAMCONV_META_CACHE_DIR"])


@pytest.fixture(scope="session")
def shared_fixtures_dir() -> Path:
    if not SHARED_FIXTURES_DIR.is_dir():
        pytest.skip(f"GPU-made fixtures not found at {SHARED_FIXTURES_DIR}: CI expects a copy of shared/ "
                    f"beside the repository ({REPO_ROOT.name}/../shared/fixtures)")
    return SHARED_FIXTURES_DIR


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "GPU-made fixtures not found" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"NOTE: {len(skipped)} test(s) on the GPU-made fixtures were skipped: {SHARED_FIXTURES_DIR} is missing "
            "(copy ../shared/fixtures beside the clone, or set STREAMCONV_SHARED_FIXTURES)", yellow=True, bold=True)
