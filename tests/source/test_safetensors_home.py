"""Issue 18.7: the safetensors header format has one home, `streamconv/safetensors_format.py`. Every reader of
headers (safetensors-serialized DCP blobs and HF per-rank shards in `source/`, the reference model's weights in
`hf/layouts`, the output in `verify/`) goes through its length rule and JSON rules, so changing a rule there
changes it everywhere. Checked on files written by torch's own FileSystemWriter and the safetensors library."""
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import SerializationFormat

import streamconv
from streamconv import safetensors_format as sf
from streamconv.errors import CheckpointError
from streamconv.fs import location
from streamconv.hf import layouts
from streamconv.source import load_metadata, locate_all
from streamconv.source.io import DirectoryReader

PACKAGE = Path(streamconv.__file__).parent


@pytest.fixture(scope="module")
def st_dcp(tmp_path_factory):
    root = tmp_path_factory.mktemp("st_dcp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
                 storage_writer=FileSystemWriter(str(root), serialization_format=SerializationFormat.SAFETENSORS),
                 no_dist=True)
    return root


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("ref") / "model.safetensors"
    save_file({"model.w": torch.zeros(2, 3)}, str(path), metadata={"format": "pt"})
    return path


def _locate(root):
    with DirectoryReader(str(root)) as reader:
        meta = load_metadata(reader)
        return meta, locate_all(reader, meta.tensors)


def test_the_header_limit_is_the_formats_for_dcp_blobs_and_references(st_dcp, reference_file, monkeypatch):
    meta, stored = _locate(st_dcp)
    assert {t.fqn for t in meta.tensors} == {"w", "b"} and len(stored) == 2
    assert layouts._safetensors_header(location.at(str(reference_file.parent)), reference_file.name) == {"model.w": (2, 3)}
    monkeypatch.setattr(sf, "MAX_HEADER_BYTES", 16)     # one rule changed in its one home...
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: safetensors blob at offset \d+: header length .* "
                                              "over the safetensors limit of 16 bytes"):
        _locate(st_dcp)                                  # ...applies to DCP blobs
    with pytest.raises(CheckpointError, match="model.safetensors: header length .* over the safetensors limit"):
        layouts._safetensors_header(location.at(str(reference_file.parent)), reference_file.name)     # ...and to the reference's weights


def test_a_repeated_name_is_refused_by_the_one_json_rule(st_dcp, reference_file, tmp_path, monkeypatch):
    calls = []
    real = sf.decode_body
    monkeypatch.setattr(sf, "decode_body", lambda text: calls.append(len(text)) or real(text))
    import streamconv.source.safetensors_blob as blob
    monkeypatch.setattr(blob, "decode_body", sf.decode_body)
    monkeypatch.setattr(layouts, "decode_body", sf.decode_body)
    _locate(st_dcp)
    layouts._safetensors_header(location.at(str(reference_file.parent)), reference_file.name)
    assert len(calls) == 2      # one DCP blob header, one reference header: both through the format's parser
    twice = tmp_path / "twice.safetensors"
    body = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    twice.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 4)
    with pytest.raises(CheckpointError, match="appears twice"):
        layouts._safetensors_header(location.at(str(twice.parent)), twice.name)


def test_no_module_but_the_format_spells_the_header_rules():
    """The limit, the length prefix and the metadata key are used in code only in safetensors_format.py (the
    pickle machine's own 8-byte lengths and names.py's reserved output name are other things)."""
    spellings = [r"100_000_000", r"100 \* 2\*\*20", r"unpack(_from)?\(\"<Q\"", r"[=!]= \"__metadata__\"",
                 r"(pop|get)\(\"__metadata__\""]
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "safetensors_format.py":
            continue
        text = path.read_text()
        found += [f"{path.relative_to(PACKAGE)}: {s}" for s in spellings if re.search(s, text)]
    assert found == [], found
