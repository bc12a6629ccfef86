"""The public API's planner entry (api.py `build_plan`): it takes the public `ConvertOptions`, as every other
verb does, and plans exactly what the dry run `plan` plans for a checkpoint without a config."""
from __future__ import annotations

import pytest

import streamconv
from streamconv import api
from streamconv.errors import OptionsError
from streamconv.planning import plan as planner
from streamconv.planning.plan import PlanOptions


@pytest.fixture(scope="module")
def fsdp2_optim(dcp_checkpoints):
    ckpt = str(dcp_checkpoints["fsdp2_optim"])
    reader, meta = api.load(ckpt)
    reader.close()
    return ckpt, meta


def _layout(conversion):
    return [(s.filename, s.header, s.tensors) for s in conversion.shards]


def test_build_plan_takes_convert_options_and_plans_what_plan_plans(fsdp2_optim):
    ckpt, meta = fsdp2_optim
    options = streamconv.ConvertOptions(max_shard_size="20KB", dtype="bfloat16", exclude=("*norm*",))
    built = streamconv.build_plan(meta, options)
    assert len(built.shards) > 1 and all(t.dst_dtype == "bfloat16" for t in built.tensors)
    assert not [t.name for t in built.tensors if "norm" in t.name]
    assert _layout(built) == _layout(streamconv.plan(ckpt, options, no_config=True))
    # Its fields as keywords are the same request; the options it was made from travel with the plan.
    assert _layout(streamconv.build_plan(meta, max_shard_size="20KB", dtype="bfloat16", exclude="*norm*")) == \
        _layout(built)
    assert built.options.user == options
    # The defaults: one file, the checkpoint's dtypes.
    assert [s.filename for s in streamconv.build_plan(meta).shards] == ["model.safetensors"]


def test_build_plan_still_takes_the_planners_options(fsdp2_optim):
    """The name was public over `PlanOptions` before; a caller passing one gets the planner's own plan."""
    _, meta = fsdp2_optim
    resolved = PlanOptions(max_shard_bytes=20_000)
    assert _layout(streamconv.build_plan(meta, resolved)) == _layout(planner.build_plan(meta, resolved))
    assert streamconv.build_plan is api.build_plan and "build_plan" in streamconv.__all__


def test_build_plan_refuses_what_it_cannot_honour(fsdp2_optim):
    _, meta = fsdp2_optim
    with pytest.raises(OptionsError, match=r"config_from=.*reads no folder.*streamconv\.plan\(checkpoint_dir"):
        streamconv.build_plan(meta, config_from="base_model/")
    with pytest.raises(OptionsError, match="options given twice"):
        streamconv.build_plan(meta, streamconv.ConvertOptions(), dtype="bfloat16")
    with pytest.raises(OptionsError, match="unknown option"):
        streamconv.build_plan(meta, max_shard_bytes=10)
