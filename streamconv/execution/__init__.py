"""The execution layer: moves one tensor's bytes from the checkpoint's files to its place in a shard.

* `workspace` — the one working buffer, the cast that runs in it, cancellation, integrity, progress and writes;
* `geometry`  — how a tensor is cut into bands that fit the buffer, and a stored chunk's dim order;
* `copy`, `band`, `gather`, `strided` — the assemblers, peers that each get a `Workspace`;
* `executor`  — `Executor`, which checks a tensor's chunks and hands it to the first assembler that accepts it.

See docs/architecture.md ("Execution") for how to add an assembler. Nothing is imported here, so a module can
import its siblings without importing the package's other modules.
"""
