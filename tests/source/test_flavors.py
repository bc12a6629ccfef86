"""Issue 18.2: the Flavor seam. Which kind a checkpoint folder is gets decided in one place, `source.flavors.detect`
(each registered flavor's `detect`, in registry order); discovery (`runs/discover`) and opening a checkpoint
(`runs/checkpoint.load`, every verb) follow it. A new flavor is one module-sized class and one registry entry.
Folders are written by torch's own writers (hand-made only where a side file or a rename is the point)."""
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter, HuggingFaceStorageWriter
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint.filesystem import SerializationFormat

import streamconv
from streamconv.errors import CheckpointError
from streamconv.runs import checkpoint, discover
from streamconv.source import flavors, load_metadata
from streamconv.source.flavors.base import ReadsBlobsAsStored

STATE = {"model.embed_tokens.weight": torch.arange(24, dtype=torch.float32).view(6, 4),
         "model.norm.weight": torch.ones(4, dtype=torch.bfloat16)}
MEGATRON_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch"}


def _save(path, **writer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = writer.pop("storage", None) or FileSystemWriter(str(path), **writer)
        dcp.save(STATE, storage_writer=storage, no_dist=True)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (folder, the flavor name expected, None for no checkpoint)}"""
    root = tmp_path_factory.mktemp("flavors")
    out = {
        "dcp": (_save(root / "dcp"), "dcp"),
        "zstd": (_save(root / "zstd", _extensions=[ZStandard()]), "dcp"),
        "safetensors_dcp": (_save(root / "st", serialization_format=SerializationFormat.SAFETENSORS), "dcp"),
        "hf_per_rank": (_save(root / "hf", storage=HuggingFaceStorageWriter(str(root / "hf"),
                                                                             save_distributed=True)), "hf-per-rank"),
    }
    shutil.copytree(root / "dcp", root / "megatron")
    (root / "megatron" / "metadata.json").write_text(json.dumps(MEGATRON_JSON))
    out["megatron"] = (root / "megatron", "megatron-torch_dist")
    shutil.copytree(root / "dcp", root / "rank_metadata")
    os.rename(root / "rank_metadata" / ".metadata", root / "rank_metadata" / "__0.metadata")
    out["rank_metadata"] = (root / "rank_metadata", "dcp")
    (root / "empty").mkdir()
    out["empty"] = (root / "empty", None)
    shutil.copytree(root / "dcp", root / "no_metadata")
    os.unlink(root / "no_metadata" / ".metadata")
    out["no_metadata"] = (root / "no_metadata", None)
    from safetensors.torch import save_file
    (root / "hf_model").mkdir()
    save_file({k: v.contiguous() for k, v in STATE.items()}, str(root / "hf_model" / "model.safetensors"))
    out["hf_model"] = (root / "hf_model", None)
    return out


KINDS = ["dcp", "zstd", "safetensors_dcp", "hf_per_rank", "megatron", "rank_metadata", "empty", "no_metadata",
         "hf_model"]


@pytest.mark.parametrize("kind", KINDS)
def test_discovery_and_loading_agree_with_the_one_detect(folders, kind):
    folder, expected = folders[kind]
    found = flavors.detect(folder)
    assert (found.name if found else None) == expected
    assert discover.is_dcp_folder(str(folder)) == (expected is not None)
    if expected is None:
        with pytest.raises(CheckpointError, match="not a DCP checkpoint folder"):
            checkpoint.load(str(folder))
        return
    reader, meta = checkpoint.load(str(folder))
    with reader:
        assert {t.fqn for t in meta.tensors} == set(STATE)
        assert discover.read_holding(str(folder)).model_tensors == len(STATE)


def test_a_broken_flavor_counts_as_a_checkpoint_and_loading_says_why(folders, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(folders["hf_per_rank"][0], folder)
    shutil.copy(folders["hf_model"][0] / "model.safetensors", folder / "model.safetensors")
    assert discover.is_dcp_folder(str(folder))
    with pytest.raises(CheckpointError, match="per-rank shards .* and other safetensors files"):
        checkpoint.load(str(folder))


@pytest.mark.parametrize("kind", ["dcp", "megatron", "rank_metadata"])
def test_the_registry_is_the_only_judge(folders, kind, monkeypatch):
    """Take plain DCP out of the registry: neither discovery nor loading recognises a DCP folder any more."""
    folder, _ = folders[kind]
    monkeypatch.setattr(flavors, "FLAVORS", tuple(f for f in flavors.FLAVORS if f.name != "hf-per-rank"))
    assert discover.is_dcp_folder(str(folder))
    monkeypatch.setattr(flavors, "FLAVORS", (flavors.hf_per_rank.FLAVOR,))
    assert flavors.detect(folder) is None and not discover.is_dcp_folder(str(folder))
    with pytest.raises(CheckpointError):
        checkpoint.load(str(folder))


class NamedMetadata(ReadsBlobsAsStored):
    """A test flavor: a DCP folder whose metadata file is called `checkpoint.metadata`. Its whole definition."""

    name = "named-metadata"

    def detect(self, folder):
        return os.path.isfile(os.path.join(folder, "checkpoint.metadata"))

    def load_metadata(self, reader, folder, left_out):
        return load_metadata(reader, "checkpoint.metadata", left_out)


def test_a_new_flavor_is_one_class_and_one_registry_line(folders, tmp_path, monkeypatch):
    odd = tmp_path / "run" / "odd"
    shutil.copytree(folders["dcp"][0], odd)
    os.rename(odd / ".metadata", odd / "checkpoint.metadata")
    with pytest.raises(CheckpointError, match="not a DCP checkpoint folder"):
        streamconv.convert(str(odd), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()

    monkeypatch.setattr(flavors, "FLAVORS", flavors.FLAVORS + (NamedMetadata(),))     # the registry line
    assert flavors.detect(odd).name == "named-metadata"
    assert discover.find_checkpoint(str(tmp_path / "run"))[0] == str(odd)    # found below a run folder
    streamconv.convert(str(tmp_path / "run"), str(tmp_path / "out"))
    streamconv.convert(str(folders["dcp"][0]), str(tmp_path / "plain"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()


def test_only_the_flavors_decide_what_a_folder_is():
    """No module outside source/ decides from file names whether a folder is a checkpoint (and which kind)."""
    package = os.path.dirname(streamconv.__file__)
    spellings = ("shard_files(", "find_metadata_file(", '"__0.metadata"', '{".metadata"', "recognise(", "SHARD_FILE")
    found = []
    for dirpath, _, names in os.walk(package):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, package)
            if not name.endswith(".py") or rel.startswith("source" + os.sep):
                continue
            text = open(path).read()
            found += [f"{rel}: {s}" for s in spellings if s in text]
    assert sorted(found) == [
        "hf/prepare.py: recognise(",                # the trainer adapter choice (megatron-gpt by default)
        'hf/sidecars.py: "__0.metadata"',           # a hint in the no-config.json message, never a decision
        "runs/inspecting.py: recognise(",           # inspect's note: the Megatron flavor's recognition
    ], found
