"""Tied word embeddings: which output tensor is the duplicate, and a streaming check that it really is one.

When a config ties the input embedding and the output projection, transformers stores the embedding once
and rebuilds `lm_head.weight` from it on load; a checkpoint taken from the live model holds both names. We
drop the head, but only after proving its bytes equal the embedding's: a head that differs means the model
was trained untied, and dropping it would silently change the model.

The check streams: the executor writes the head's planned bytes into a `ComparingSink` that reads the same
range of the embedding back from its finished shard file, in small pieces. Neither tensor is ever whole in
memory.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from .. import dtypes
from ..errors import VerificationError
from ..fs.fastpaths import NONE, FastPaths
from ..planning.plan import TensorPlan
from ..output.sink import ComparingSink, Mismatch

# Output-projection names that a tied config rebuilds from the input embedding, and the names an input
# embedding goes by. A head `P + head` pairs with the one embedding named `P + ... + embedding`.
HEAD_SUFFIXES: Tuple[str, ...] = ("lm_head.weight",)
EMBEDDING_SUFFIXES: Tuple[str, ...] = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight",
                                       "shared.weight")


@dataclass(frozen=True)
class TiedPair:
    head: str        # output name dropped
    embedding: str   # output name kept


def find_tied_pairs(names: Iterable[str], tie: Optional[bool],
                    reference: Optional[Iterable[str]] = None) -> Tuple[Tuple[TiedPair, ...], List[str]]:
    """Pairs (head, embedding) among output `names` whose head should be dropped, and notes.

    `tie` is the config's tie_word_embeddings (None: not stated). With a reference folder, a head the
    reference itself stores is kept whatever the config says (that is how HF saved it); when the config is
    silent, a head missing from the reference beside a present embedding counts as tied.
    """
    names = list(names)
    ref = set(reference) if reference is not None else None
    pairs: List[TiedPair] = []
    notes: List[str] = []
    if tie is False:
        return (), notes
    for head in names:
        suffix = next((s for s in HEAD_SUFFIXES if head.endswith(s)), None)
        if suffix is None:
            continue
        prefix = head[:-len(suffix)]
        embeddings = [n for n in names if n.startswith(prefix) and n != head
                      and any(n.endswith(s) for s in EMBEDDING_SUFFIXES)]
        if len(embeddings) != 1:
            if tie and embeddings:
                notes.append(f"tied embeddings: {head!r} kept, its embedding is ambiguous ({', '.join(embeddings)})")
            continue
        embedding = embeddings[0]
        if ref is not None and head in ref:
            continue                    # the reference stores the head: keep it as HF does
        if tie is None and (ref is None or embedding not in ref):
            continue                    # nothing says they are tied
        pairs.append(TiedPair(head, embedding))
    return tuple(pairs), notes


def as_written_at(head: TensorPlan, embedding: TensorPlan) -> TensorPlan:
    """The head's plan retargeted onto the embedding's place and output dtype, so writing it there would
    reproduce the embedding's bytes exactly when the two are equal."""
    if tuple(head.shape) != tuple(embedding.shape):
        raise VerificationError(
            f"config ties word embeddings, but {head.name!r} has shape {list(head.shape)} and {embedding.name!r} "
            f"{list(embedding.shape)}; use a config with tie_word_embeddings false so both are kept")
    return dataclasses.replace(head, dst_dtype=embedding.dst_dtype, begin=embedding.begin, nbytes=embedding.nbytes)


def verify_tied(executor, head: TensorPlan, embedding: TensorPlan, shard_path: str, *, config_path: str = "",
                fast: FastPaths = NONE) -> int:
    """Stream `head` through `executor` and compare it with `embedding` as already written in `shard_path`.

    Returns the bytes compared; raises VerificationError naming the first differing element.
    """
    target = as_written_at(head, embedding)
    sink = ComparingSink(shard_path, fast=fast)
    try:
        executor.write_tensor(target, sink)
    except Mismatch as exc:
        import numpy as np
        item = dtypes.BY_NAME[target.dst_dtype].itemsize
        element = (exc.offset - target.begin) // item
        where = [int(i) for i in np.unravel_index(element, target.shape)] if target.shape else []
        source = f" in {config_path}" if config_path else ""
        raise VerificationError(
            f"tie_word_embeddings is true{source}, but checkpoint tensors {head.source_fqn!r} and "
            f"{embedding.source_fqn!r} differ (first at element {where}): the model was trained with untied "
            "weights. Convert with a config whose tie_word_embeddings is false so both are kept.") from None
    finally:
        sink.close()
    if sink.compared != target.nbytes:
        raise VerificationError(f"tied-weight check of {head.name!r} compared {sink.compared} of {target.nbytes} bytes")
    return sink.compared
