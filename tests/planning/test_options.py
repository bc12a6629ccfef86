"""One options object: the CLI flags and API keywords are derived from `ConvertOptions`, and options given twice
are refused instead of silently dropped."""
import dataclasses
import json
import pickle

import pytest
from click.testing import CliRunner

import streamconv
from streamconv import api
from streamconv.cli import cli
from streamconv.errors import OptionsError
from streamconv.planning.options import BatchOptions, ConvertOptions, RunOptions, resolve
from streamconv.planning.plan import PlanOptions


def test_every_field_is_a_flag_of_convert_plan_and_verify():
    runner = CliRunner()
    for command in ("convert", "plan", "verify"):
        text = runner.invoke(cli, [command, "--help"], terminal_width=200).output
        for f in dataclasses.fields(ConvertOptions):
            if command == "verify" and f.name == "max_shard_size":
                # verify finds tensors by name: accepted (scripts pass it), not listed where it does not apply
                assert f.metadata["flag"] not in text
                continue
            assert f.metadata["flag"] in text, (command, f.name)
    assert "[default: 5GB]" in runner.invoke(cli, ["plan", "--help"], terminal_width=200).output


def test_defaults_resolve_to_the_planner_defaults():
    assert ConvertOptions().plan_options() == PlanOptions()
    assert api.make_options() == PlanOptions()
    assert api.make_options(max_shard_size="2GB", renames=["a=b"]).max_shard_bytes == 2 * 10**9


def test_each_options_object_takes_its_own_fields_out_of_a_commands_keywords():
    """How commands.py splits one click command's keyword arguments into the three objects."""
    values = {"max_shard_size": "2GB", "workers": 3, "output_template": "hf/{name}", "as_json": True}
    assert BatchOptions.take(values) == BatchOptions(output_template="hf/{name}")
    assert RunOptions.take(values) == RunOptions(workers=3)
    assert ConvertOptions.take(values) == ConvertOptions(max_shard_size="2GB")
    assert values == {"as_json": True}          # what belongs to none is left for the command
    assert RunOptions.field_names()[:2] == ("workers", "verify")
    assert ConvertOptions.field_names() == tuple(f.name for f in dataclasses.fields(ConvertOptions))


def test_picklable_and_frozen():
    options = ConvertOptions(max_shard_size="1MB", include=["*.weight"], renames=("a=b",), config_from="/x")
    assert pickle.loads(pickle.dumps(options)) == options
    assert options.include == ("*.weight",)          # lists become tuples: hashable and equal after a round trip
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = "bfloat16"


def test_bad_values_are_refused_when_built():
    with pytest.raises(OptionsError, match="--max-shard-size"):
        ConvertOptions(max_shard_size="lots")
    with pytest.raises(OptionsError, match="--rename"):
        ConvertOptions(renames=("no-equals-sign",))


def test_options_given_twice_are_an_error():
    with pytest.raises(OptionsError, match="given twice"):
        resolve(PlanOptions(), {"max_shard_size": "2GB"})
    with pytest.raises(OptionsError, match="given twice"):
        resolve(ConvertOptions(config_from="/a"), {}, config_from="/b")
    with pytest.raises(OptionsError, match="unknown option"):
        resolve(None, {"max_shard_bytes": 5})
    plan_options, user = resolve(ConvertOptions(dtype="bf16"), {}, no_config=True)
    assert plan_options.dtype == "bfloat16" and user.no_config


def test_api_plan_refuses_a_dropped_keyword(demo_checkpoint):
    with pytest.raises(OptionsError, match="given twice"):
        streamconv.plan(str(demo_checkpoint.ckpt_dir), PlanOptions(), max_shard_size="1KB")
    by_object = streamconv.plan(str(demo_checkpoint.ckpt_dir), ConvertOptions(max_shard_size="100KB"), no_config=True)
    by_keyword = streamconv.plan(str(demo_checkpoint.ckpt_dir), max_shard_size="100KB", no_config=True)
    assert by_object.to_dict() == by_keyword.to_dict() and len(by_object.shards) > 1


# -- the run's options and the derived ones (issue 18.3) ------------------------------------------------------


def test_run_options_are_one_frozen_object_given_once(demo_checkpoint, tmp_path):
    from streamconv.planning.options import DEFAULT_CRC, RunOptions

    run = RunOptions(workers=1, verify=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.workers = 2
    assert run.check_crc and RunOptions(crc=False, verify=True).check_crc is False
    assert RunOptions().check_crc is DEFAULT_CRC
    assert pickle.loads(pickle.dumps(run)) == run
    with pytest.raises(OptionsError, match="run options given twice.*workers"):
        streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), run=run, workers=3)
    assert not (tmp_path / "out").exists()
    report = streamconv.convert(str(demo_checkpoint.ckpt_dir), str(tmp_path / "out"), run=run, no_config=True)
    assert report.verified_tensors == report.tensors > 0 and not report.resumed


def test_the_derived_options_are_not_public():
    assert not hasattr(streamconv, "PlanOptions") and "PlanOptions" not in streamconv.__all__
    assert {"ConvertOptions", "RunOptions"} <= set(streamconv.__all__)


def test_the_record_holds_the_user_options_with_what_was_derived(demo_checkpoint, tmp_path):
    """The record's options come from the objects (no second resolution): the user's --rename as typed (a literal
    '=' escaped), sizes in bytes, dtype "auto" as resolved from the config."""
    out = tmp_path / "out"
    streamconv.convert(str(demo_checkpoint.ckpt_dir), str(out), ConvertOptions(
        dtype="auto", max_shard_size="1MB", renames=(r"^lm_head\=?=lm_head",), include=("*",)))
    recorded = json.loads((out / "streamconv.json").read_text())["options"]
    assert recorded["renames"] == [r"^lm_head\=?=lm_head"] and recorded["include"] == ["*"]
    assert recorded["max_shard_size"] == "1000000B" and recorded["dtype"] == "float32"    # demo config: float32
    assert recorded["config_from"] is None and recorded["source_format"] == "auto"
