"""Megatron-Core `torch_dist` checkpoint folders, recognised from their side files. Reads one small JSON file.

`megatron.core.dist_checkpointing.save` writes a DCP folder (`.metadata`, `__R_K.distcp`) plus:
* `metadata.json` — `{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
  ...}`: how the folder was written. Read here, as JSON, size-limited.
* `common.pt` — `torch.save` of the non-sharded state (training arguments, iteration...): a pickle that may name
  any class. Never read: the weights are all in the DCP part, and the head counts come from `--config-from`.

The folder reads as plain DCP; what the flavor adds is the recognition, which the trainer adapter choice uses
(`planning/trainers/megatron.py`: the weights' names and layouts are the `megatron-gpt` adapter's business).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from ...errors import CheckpointError
from ...fs import location
from . import dcp

METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
TORCH_DIST = "torch_dist"
MAX_METADATA_JSON_BYTES = 64 * 1024     # Megatron's is ~120 bytes; anything large is not it


@dataclass(frozen=True)
class MegatronFolder:
    sharded_backend: str            # "torch_dist"
    backend_version: object         # as written (an int in 0.16)
    has_common: bool                # common.pt present (never read)

    @property
    def note(self) -> str:
        common = (f"{COMMON_FILE} (non-sharded training state, a pickle) is not read" if self.has_common
                  else f"no {COMMON_FILE} beside it")
        return (f"format: Megatron-Core dist checkpoint ({METADATA_JSON}: sharded_backend {self.sharded_backend}, "
                f"version {self.backend_version}); weights come from the DCP files; {common}")


def recognise(checkpoint_dir: str) -> Optional[MegatronFolder]:
    """The folder's Megatron-Core format, or None when it has no Megatron `metadata.json`."""
    where = location.at(checkpoint_dir)
    path = where.join(METADATA_JSON)
    try:
        entry = where.entry(METADATA_JSON)
    except OSError:
        return None
    if entry is None or entry.kind != location.FILE or entry.size > MAX_METADATA_JSON_BYTES:
        return None     # a FIFO is skipped, never waited on
    try:
        data = json.loads(where.read_small(METADATA_JSON, MAX_METADATA_JSON_BYTES))
    except (OSError, ValueError, CheckpointError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("sharded_backend"), str):
        return None
    backend = data["sharded_backend"][:40]
    if backend != TORCH_DIST:
        raise CheckpointError(
            f"{path}: Megatron-Core sharded_backend {backend!r}; only {TORCH_DIST!r} (a DCP folder) is read. "
            "Re-save it in the torch_dist format (Megatron-LM: `--ckpt-format torch_dist`)")
    version = data.get("sharded_backend_version")
    return MegatronFolder(backend, version if isinstance(version, (int, str)) else None,
                          _is_file(where, COMMON_FILE))


def _is_file(where, name: str) -> bool:
    try:
        entry = where.entry(name)
    except OSError:
        return False
    return entry is not None and entry.kind == location.FILE


class MegatronTorchDist(dcp.DcpFolder):
    """A DCP folder with Megatron's `metadata.json`; read as plain DCP."""

    name = "megatron-torch_dist"

    def detect(self, folder: str) -> bool:
        return super().detect(folder) and recognise(folder) is not None


FLAVOR = MegatronTorchDist()
