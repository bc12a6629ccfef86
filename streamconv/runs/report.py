"""Progress and reports. Library code never prints: it calls a `Reporter`, and the CLI picks one."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional


class Reporter:
    """Silent by default. `start` gets the total bytes to write, `advance` the bytes just written."""

    def start(self, total_bytes: int, description: str = "") -> None:
        pass

    def advance(self, n_bytes: int) -> None:
        pass

    def note(self, message: str) -> None:
        """A line worth showing a person (e.g. 'config.json copied from ...')."""

    committed_output = None

    def committed(self, output: str) -> None:
        """The finished output is in place (called inside the commit): an interrupt from now on must not
        be reported as 'nothing was committed'."""
        self.committed_output = output

    def close(self) -> None:
        pass


class TqdmReporter(Reporter):
    """A byte progress bar on stderr, for terminals."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._bar = None

    def start(self, total_bytes: int, description: str = "") -> None:
        from tqdm import tqdm
        # Decimal units (MB, MB/s = 10**6 bytes), as in the summary and --json: tqdm labels MiB as "MB".
        self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=description,
                         file=self.stream, dynamic_ncols=True, mininterval=0.2)

    def advance(self, n_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(n_bytes)

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CollectingReporter(Reporter):
    """Keeps notes; for --json runs and tests."""

    def __init__(self):
        self.notes: List[str] = []
        self.total_bytes = 0
        self.done_bytes = 0

    def start(self, total_bytes: int, description: str = "") -> None:
        self.total_bytes = total_bytes

    def advance(self, n_bytes: int) -> None:
        self.done_bytes += n_bytes

    def note(self, message: str) -> None:
        self.notes.append(message)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, as the OS counts it.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: Linux carries ru_maxrss across exec, so a converter
    started by a process that had imported torch would report torch's memory as its own. Other POSIX systems:
    ru_maxrss. Windows has no `resource` module (imported here, not at the top, so `import streamconv` works
    there): 0, meaning unknown.
    """
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


@dataclass
class ConversionReport:
    checkpoint: str
    output: str
    tensors: int
    shards: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    predicted_peak_bytes: int
    buffer_bytes: int
    max_shard_bytes: int
    skipped: Dict[str, int] = field(default_factory=dict)
    renamed: int = 0
    cast: Dict[str, int] = field(default_factory=dict)       # "float32->bfloat16": tensor count
    copied_files: List[str] = field(default_factory=list)
    dropped_tied: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    verified_bytes: int = 0     # bytes read back and compared with the checkpoint (--verify)
    crc_checked_bytes: int = 0  # checkpoint bytes whose CRC-32 was checked (--crc, --verify)
    verified_tensors: int = 0   # tensors read back and found equal to the checkpoint (--verify)
    crc_checked_chunks: int = 0  # checkpoint chunks whose CRC-32 was checked (--crc, --verify)
    config_from: Optional[str] = None                         # folder the config and tokenizer came from
    layout: Optional[str] = None                              # name mapping applied to match that folder
    unmatched_names: List[str] = field(default_factory=list)  # output names the reference folder lacks
    missing_names: List[str] = field(default_factory=list)    # reference names the output lacks
    fast_paths: List[str] = field(default_factory=list)       # fast IO paths used (see fastpaths.py)
    already_converted: bool = False     # the output already held this conversion: nothing was written
    kept_bytes: int = 0         # of bytes_written, the shards a resumed run kept from the interrupted one
    resumed: bool = False       # the run continued an interrupted one's staging folder (--resume)
    workers: int = 0            # writer threads (`--workers`, or chosen: planning/workers.py); 0: none ran
    workers_reason: str = ""    # how that count was chosen
    task_peak_rss_bytes: int = 0  # the largest peak RSS of a process that wrote shards for the driver (--ray)

    @property
    def mb_per_s(self) -> float:
        """MB (10**6 bytes) per second written by this run: shards kept by --resume are not counted."""
        written = self.bytes_written - self.kept_bytes
        return written / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mb_per_s"] = round(self.mb_per_s, 1)
        d["seconds"] = round(self.seconds, 3)
        return d
