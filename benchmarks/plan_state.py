"""What a conversion holds per chunk before its first byte: the decoded metadata, the plan and the located chunks,
measured as the OS counts it (VmRSS) on a checkpoint too large to convert here (`metadata_scale.py`'s sparse
671B-parameter folder). Each phase's resident growth is printed in bytes per chunk of the prediction's count
(`plan.PER_CHUNK_BYTES`: every chunk of `.metadata` plus every piece of the plan).

    python -m benchmarks.plan_state /tmp/dsv3-meta

The located chunks cannot be read from sparse files, so this builds the same state `runs.checkpoint.locate_chunks`
leaves (source/located.py `locate_all`): a row of `LocatedChunks` per planned blob, holding what a torch.save
blob of a contiguous tensor says about it, with `locate_all`'s own wanted-blob columns on the way (its transient).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from streamconv import dtypes
from streamconv.model import BlobLocation, StoredTensor, TensorEntry, row_major_strides
from streamconv.fs.cpus import available_cpus
from streamconv.planning.plan import ConversionPlan
from streamconv.planning.workers import with_workers
from streamconv.runs import preparing
from streamconv.source.located import LocatedChunks, place_order, user_of, wanted_blobs


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def located_state(conversion: ConversionPlan) -> LocatedChunks:
    """The located chunks as `locate_all` keeps them (`source.located.LocatedChunks`), built from the plan instead
    of the blobs: the same wanted-blob columns on the way (its transient), then a row per blob."""
    entries = [TensorEntry(t.source_fqn, t.src_dtype, *t.as_stored()) for t in conversion.tensors]
    wanted, _ = wanted_blobs(entries)
    found = LocatedChunks()
    for place in sorted(wanted, key=place_order):
        path, transforms, key = place
        blobs = wanted.pop(place)
        for offset, length, user in zip(blobs.offsets, blobs.lengths, blobs.users):
            entry, chunk = user_of(entries, user)
            sizes = tuple(chunk.sizes)
            nbytes = dtypes.BY_NAME[entry.dtype].itemsize
            for s in sizes:
                nbytes *= s
            data_offset = offset + 1024
            found.add(BlobLocation(path, offset, length, transforms, key),
                      StoredTensor(entry.dtype, sizes, tuple(row_major_strides(sizes)), data_offset, nbytes,
                                   data_offset, nbytes, 0x12345678), entry.fqn)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    args = parser.parse_args(argv)
    phases = [("start", rss_bytes(), time.process_time())]
    prepared = preparing.prepare(args.checkpoint, preparing.Request(no_config=True))
    prepared.reader.close()
    meta = prepared.meta
    phases.append(("metadata", rss_bytes(), time.process_time()))
    conversion = with_workers(preparing.checked_plan(meta, prepared.setup.options, prepared.checkpoint_dir), None,
                              available_cpus())
    phases.append(("plan", rss_bytes(), time.process_time()))
    stored = located_state(conversion)
    phases.append(("located", rss_bytes(), time.process_time()))
    chunks = sum(len(t.chunks) for t in meta.tensors)
    pieces = sum(len(t.pieces) for t in conversion.tensors)
    planned_chunks = len(stored)
    counted = chunks + pieces
    out = {"metadata_chunks": chunks, "plan_pieces": pieces, "located_chunks": planned_chunks, "phases": []}
    for (_, before, cpu0), (name, after, cpu1) in zip(phases, phases[1:]):
        out["phases"].append({"phase": name, "rss_growth_bytes": after - before, "cpu_seconds": round(cpu1 - cpu0, 2),
                              "bytes_per_counted_chunk": round((after - before) / counted)})
    out["total_bytes_per_counted_chunk"] = round((phases[-1][1] - phases[0][1]) / counted)
    out["rss_bytes"] = phases[-1][1]
    out["predicted_peak_bytes"] = conversion.peak_bytes
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
