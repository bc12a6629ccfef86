"""What a newcomer meets first (issue 17, items 4, 10, 11): README and docs/options.md statements about the CLI that must hold, one
exit code per meaning, sizes that need their unit, honest resume counts and rates, `plan` naming each tensor's
file, `verify --json` always carrying `error`/`exit_code`, the error classes importable from `streamconv`, and a
visible line when the GPU-made fixtures are absent."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import streamconv
from streamconv import failpoints
from streamconv import errors
from streamconv.output import staging
from streamconv.cli import cli
from streamconv.runs.report import TqdmReporter

REPO = Path(__file__).resolve().parent.parent
OPTIONS_DOC = (REPO / "docs" / "options.md").read_text(encoding="utf-8")    # the option reference the README links
SHARD = "100KB"     # the tp checkpoint (~0.8 MB of weights) gives several shards


def long_options(command: str) -> set:
    """Every spelling of every option of a CLI command (`--crc` and `--no-crc`, `-q` and `--quiet`)."""
    params = cli.commands[command].params
    return {o for p in params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts} - {"--help", "-h"}


def run(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=300)


# -- docs/options.md: what `plan` takes of convert's options (17.4) ----------------------------------------------------

def test_readme_names_exactly_the_convert_options_plan_does_not_take():
    sentence = re.search(r"`plan` takes all of them except (.*?): ", OPTIONS_DOC, re.S)
    assert sentence, "docs/options.md lost the sentence saying which convert options plan lacks"
    said = set(re.findall(r"`(--?[\w-]+)`", sentence.group(1)))
    convert, plan = long_options("convert"), long_options("plan")
    lacking = {o for o in convert - plan if not o.startswith("--no-")}   # --no-crc goes with --crc
    assert said == lacking, (said, lacking)
    assert {"--workers", "-q", "--quiet"} <= plan     # what changes a dry run's prediction or its output


def test_readme_option_table_is_convert_s_options():
    table = OPTIONS_DOC.split("`convert` options (", 1)[1].split("\n\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")]
    in_table = {o for row in rows for o in re.findall(r"--?[\w-]+", row.split(" ")[0])}
    assert in_table == long_options("convert"), in_table ^ long_options("convert")


def test_plan_shows_the_workers_it_chose_from_the_cpus_and_an_explicit_count_wins(dcp_checkpoints, monkeypatch):
    """Issue 20 item 2: no --workers = one writer per CPU this process may use, as the budget allows; `plan`
    says the count and why, in text and JSON."""
    from streamconv.runs import preparing
    ckpt = str(dcp_checkpoints["tp"])
    monkeypatch.setattr(preparing, "available_cpus", lambda: 6.5)
    chosen = CliRunner().invoke(cli, ["plan", ckpt, "--json", "--no-config"])
    assert chosen.exit_code == 0, chosen.output
    summary = json.loads(chosen.stdout)
    assert summary["workers"] == 6, summary
    assert summary["workers_reason"].startswith("auto: 6.5 CPUs allow 6,"), summary["workers_reason"]
    small = json.loads(CliRunner().invoke(cli, ["plan", ckpt, "--json", "--no-config", "--buffer-size", "4MiB"]).stdout)
    assert small["workers"] == 2, small
    assert small["workers_reason"].split(", ")[1].startswith("--buffer-size 4.0 MiB has 2.0 MiB shares for 2;"), small
    text = CliRunner().invoke(cli, ["plan", ckpt, "-q", "--no-config"])
    assert text.exit_code == 0, text.output
    assert "(6 worker(s): auto: 6.5 CPUs allow 6, --buffer-size 32.0 MiB has 2.0 MiB shares for 16; 6 keep" \
        in text.output, text.output
    given = CliRunner().invoke(cli, ["plan", ckpt, "-q", "--no-config", "--workers", "3"])
    assert "(3 worker(s): --workers 3)" in given.output, given.output
    # the prediction is for the chosen count, as for the same count given
    explicit = json.loads(CliRunner().invoke(cli, ["plan", ckpt, "--json", "--no-config", "--workers", "6"]).stdout)
    assert explicit["predicted_peak_bytes"] == summary["predicted_peak_bytes"]


def test_plan_workers_change_the_predicted_peak_and_q_prints_only_the_summary(dcp_checkpoints):
    ckpt = str(dcp_checkpoints["tp"])
    peaks = {}
    for workers in ("1", "4"):
        result = CliRunner().invoke(cli, ["plan", ckpt, "--json", "--workers", workers, "--no-config"])
        assert result.exit_code == 0, result.output
        peaks[workers] = json.loads(result.stdout)["predicted_peak_bytes"]
    # Per writer: the part of its buffer share its tensors touch (and an IO step where its tensors hold one: none
    # here, copies and blocks read straight into the buffer): writers take distinct tensors, so three more writers
    # touch at most the 2nd to 4th largest needs (the tp layout's blocks are a few KiB, far below a quarter of the
    # buffer).
    from streamconv import api
    from streamconv.planning.plan import buffer_need_bytes, holds_io_step
    tensors = api.plan(ckpt, no_config=True, workers=1).tensors
    needs = sorted((buffer_need_bytes(t) for t in tensors), reverse=True)
    assert 0 < needs[3] and needs[0] < 8 * 2**20 and not any(holds_io_step(t) for t in tensors)
    assert peaks["4"] - peaks["1"] == sum(needs[1:4]), peaks
    quiet = CliRunner().invoke(cli, ["plan", ckpt, "-q", "--no-config"])
    assert quiet.exit_code == 0 and quiet.output.count("\n") == 1 and quiet.output.startswith("total "), quiet.output


def test_plan_text_lists_each_tensor_under_its_file(dcp_checkpoints):
    ckpt = str(dcp_checkpoints["tp"])
    as_json = json.loads(CliRunner().invoke(cli, ["plan", ckpt, "--json", "--max-shard-size", SHARD,
                                                  "--no-config"]).stdout)
    assert len(as_json["shards"]) > 2
    text = CliRunner().invoke(cli, ["plan", ckpt, "--max-shard-size", SHARD, "--no-config"]).output
    file_of, current = {}, None
    for line in text.split("\ntotal ")[0].splitlines():     # the notes after the summary line are indented too
        if line.endswith("tensors:"):
            current = line.split()[0]
        elif line.startswith("  ") and current:
            file_of[line.split()[0]] = current
    assert file_of == {t["name"]: t["file"] for t in as_json["tensors"]}, text


# -- one exit code per meaning, sizes with units, honest counts (17.10) --------------------------------------

@pytest.mark.parametrize("value", ["2", "512", "0.5e3"])
def test_a_size_without_a_unit_below_1mb_is_refused_naming_the_unit(dcp_checkpoints, tmp_path, value):
    result = CliRunner().invoke(cli, ["convert", str(dcp_checkpoints["tp"]), str(tmp_path / "out"),
                                      "--max-shard-size", value])
    assert result.exit_code == 64, result.output
    assert "no unit" in result.output and "GB" in result.output and f"{value}B" in result.output
    assert not (tmp_path / "out").exists()
    # with a unit the same number is taken, bytes included when asked for
    assert CliRunner().invoke(cli, ["plan", str(dcp_checkpoints["tp"]), "--max-shard-size", f"{value}KB",
                                    "--no-config", "-q"]).exit_code == 0


def test_resume_counts_the_shards_it_kept_and_rates_only_what_it_wrote(dcp_checkpoints, tmp_path):
    out = tmp_path / "out"
    args = ("convert", dcp_checkpoints["tp"], out, "--max-shard-size", SHARD, "--no-config")
    killed = run(*args, "--workers", "1", env={failpoints.KILL_AT_ENV: "between-shards@2"})
    assert killed.returncode == -9, killed.stderr
    stage = tmp_path / ".out.streamconv-partial"
    finished = sorted(p.name[:-len(".json")] for p in (stage / staging.RECORDS_DIR).glob("*.safetensors.json"))
    assert len(finished) == 2
    damaged = stage / finished[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF                                    # same size, wrong CRC-32: finished, but not kept
    damaged.write_bytes(bytes(data))

    # in-process, so that the rate is compared unrounded
    report = streamconv.convert(str(dcp_checkpoints["tp"]), str(out), max_shard_size=SHARD, no_config=True,
                                resume=True)
    note = next(n for n in report.notes if n.startswith("resumed:"))
    assert f"kept 1 of {report.shards} shard(s)" in note and "2 had finished" in note, note
    kept_bytes = (out / finished[1]).stat().st_size
    assert report.kept_bytes == kept_bytes and report.to_dict()["kept_bytes"] == kept_bytes
    assert report.mb_per_s == pytest.approx((report.bytes_written - kept_bytes) / 1e6 / report.seconds)


def test_progress_bar_counts_in_the_summary_s_mb():
    stream = io.StringIO()
    bar = TqdmReporter(stream)
    bar.start(3_000_000, "converting")
    bar.advance(1_500_000)
    bar.close()
    assert "1.50M/3.00M" in stream.getvalue(), stream.getvalue()   # MB as in "MB/s": 10**6, not 2**20


# -- small manners (17.11) ----------------------------------------------------------------------------------

def test_the_error_classes_are_importable_from_streamconv():
    for name in ("StreamconvError", "CheckpointError", "OptionsError", "OutputError", "VerificationError",
                 "ReferenceMismatchError", "ResourceError"):
        assert getattr(streamconv, name) is getattr(errors, name), name
        assert name in streamconv.__all__


def test_verify_json_always_has_error_and_exit_code(dcp_checkpoints, tmp_path):
    out = tmp_path / "out"
    streamconv.convert(str(dcp_checkpoints["tp"]), str(out), no_config=True)
    ok = CliRunner().invoke(cli, ["verify", str(dcp_checkpoints["tp"]), str(out), "--json", "--no-config"])
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    assert report["error"] is None and report["exit_code"] == 0 and report["ok"] is True, report


@pytest.fixture(scope="module")
def inner_pytest(dcp_checkpoints):
    """One `pytest -q` of two tests of tests/support/test_dcp_writers.py, as `make test` runs them (output captured),
    with the GPU-made fixtures absent, on this session's checkpoints (not written twice): its CompletedProcess."""
    env = dict(os.environ, STREAMCONV_SHARED_FIXTURES=str(REPO / "no-such-folder"),
               STREAMCONV_TEST_DCP_CHECKPOINTS=str(dcp_checkpoints["fsdp2"].parent),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/support/test_dcp_writers.py", "-k", "shared_fixtures_are_beside or layout_summary"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_absent_gpu_fixtures_are_said_in_the_summary(inner_pytest):
    result = inner_pytest
    assert result.returncode == 0, result.stdout[-2000:]
    assert re.search(r"NOTE: 1 test\(s\) on the GPU-made fixtures were skipped: .*no-such-folder", result.stdout), \
        result.stdout[-2000:]


def test_make_test_prints_no_table_among_the_dots(inner_pytest):
    result = inner_pytest
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 passed, 1 skipped" in result.stdout, result.stdout[-2000:]     # the table's test did run
    assert "chunk layouts" not in result.stdout, result.stdout[-2000:]


def test_from_file_lists_are_decoded_as_the_shell_decodes_arguments(tmp_path):
    from streamconv.runs.batch import expand_sources
    from streamconv.errors import OptionsError
    latin = os.fsencode(tmp_path) + b"/caf\xe9"            # a folder name that is not valid UTF-8
    os.mkdir(latin)
    (tmp_path / "plain").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf# written on Windows\r\n" + latin + b"\r\n" + os.fsencode(tmp_path / "plain")
                        + b"\r\n")
    found = expand_sources([], from_file=str(listing))
    assert [os.fsencode(p) for p in found] == [latin, os.fsencode(tmp_path / "plain")]
    assert all(os.path.isdir(p) for p in found)
    binary = tmp_path / "__0_0.distcp"
    binary.write_bytes(b"PK\x03\x04\x00\x00runs/a\n")
    with pytest.raises(OptionsError, match="not a list of folders"):
        expand_sources([], from_file=str(binary))
    result = CliRunner().invoke(cli, ["batch", "--from-file", str(binary), "-o", str(tmp_path / "hf/{name}")])
    assert result.exit_code == 64 and "not a list of folders" in result.output, result.output
