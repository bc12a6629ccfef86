"""Comparing a conversion that read from or wrote into object storage with the local conversion of the same
checkpoint, file for file (the gs:// tests; `streamconv` run as a user runs it)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict


def run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamconv", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def files_of(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def same_output(mine: Dict[str, bytes], theirs: Dict[str, bytes]) -> None:
    """Every file equal byte for byte, except in the record the `checkpoint` line (a URL on one side, a path on
    the other) and a stat fingerprint (no CRC-32s recorded: tied to files' mtimes locally, to objects' versions in
    a bucket). A content fingerprint (CRC-32s) is the same wherever the checkpoint is stored."""
    assert sorted(mine) == sorted(theirs)
    for name in mine:
        if name == "streamconv.json":
            a, b = json.loads(mine[name]), json.loads(theirs[name])
            for record in (a, b):
                record.pop("checkpoint", None)
                if record["source"]["fingerprint"].startswith("stat1-"):
                    record["source"].pop("fingerprint")
            assert a == b
        else:
            assert mine[name] == theirs[name], name
