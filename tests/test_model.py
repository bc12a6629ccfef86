"""model.ChunkTable: a tensor's chunks in columns, read as the tuple of Chunks it replaces."""
import pickle

from streamconv.model import BlobLocation, Chunk, ChunkTable
from streamconv.planning.coverage import check_coverage, dedup_chunks

CHUNKS = (Chunk((2, 0), (2, 3), BlobLocation("__1_0.distcp", 64, 1600)),
          Chunk((0, 0), (2, 3), BlobLocation("__0_0.distcp", 0, 1600, ("stream.zstd/1",))),
          Chunk((2, 0), (2, 3), BlobLocation("__2_0.distcp", 0, 1600)),       # replicated: a second copy
          Chunk((4, 0), (0, 3), BlobLocation("__3_0.distcp", 0, 1500)))       # empty (FSDP2's idle rank)


def test_a_table_reads_as_its_chunks():
    table = ChunkTable.of(CHUNKS, 2)
    assert len(table) == 4 and table == CHUNKS and tuple(table) == CHUNKS and table[-1] == CHUNKS[-1]
    assert table[1:3] == CHUNKS[1:3] and table.box(1) == ((0, 0), (2, 3))
    assert table.transformed and not ChunkTable.of(CHUNKS[2:], 2).transformed
    assert len(table.places) == 4 and len(table.boxes) == 4 * 4 and len(table.blobs) == 2 * 4
    assert pickle.loads(pickle.dumps(table)) == CHUNKS
    assert hash(table) == hash(CHUNKS)


def test_dedup_of_a_table_is_a_sorted_view_sharing_its_columns():
    table = ChunkTable.of(CHUNKS, 2)
    kept = dedup_chunks(table)
    assert isinstance(kept, ChunkTable) and kept.boxes is table.boxes
    assert kept == dedup_chunks(CHUNKS) == (CHUNKS[1], CHUNKS[0])
    check_coverage("w", (4, 3), kept)
    assert kept.select([1]) == (CHUNKS[0],)


def _located(chunks):
    return [(c.location.relative_path, c.location.offset, c.location.length, c.offsets, c.sizes) for c in chunks]


def test_a_table_lists_where_its_chunks_are_without_making_them():
    """`located()` (what the shard fingerprints read) says what the Chunks say, for a table and for a view."""
    table = ChunkTable.of(CHUNKS, 2)
    assert list(table.located()) == _located(CHUNKS)
    view = table.select([3, 0])
    assert list(view.located()) == _located((CHUNKS[3], CHUNKS[0]))


def test_a_shard_fingerprint_reads_a_table_as_its_chunks():
    from streamconv.output import ledger
    from streamconv.planning.plan import ShardPlan, TensorPlan
    def shard(chunks):
        t = TensorPlan(name="w", source_fqn="model.w", src_dtype="float32", dst_dtype="float32", shape=(4, 3),
                       chunks=chunks, begin=8, nbytes=48)
        return ShardPlan(filename="model.safetensors", header=b"{}", tensors=(t,))
    kept = (CHUNKS[1], CHUNKS[0])
    table = dedup_chunks(ChunkTable.of(CHUNKS, 2))
    assert ledger.shard_fingerprint(shard(table)) == ledger.shard_fingerprint(shard(kept))
    assert ledger.shard_fingerprint(shard(table)) != ledger.shard_fingerprint(shard((CHUNKS[0], CHUNKS[1])))
