"""The proofs the packed planner makes over columns and boxes (planning/proven.py, coverage.py's grid test) refuse
what the general ones refuse: a gap, an overlap, a box or take out of bounds, with the same message."""
import pytest

from streamconv.errors import CoverageError
from streamconv.model import BlobLocation, Chunk, ChunkTable, TensorEntry
from streamconv.planning import coverage, proven
from streamconv.planning.pieces import PieceTable
from streamconv.planning.transforms import Derived, Take, takes_from_rows, whole, rope_half_split


def chunk(offsets, sizes, i=0):
    return Chunk(tuple(offsets), tuple(sizes), BlobLocation(f"__{i}_0.distcp", 100 * i, 10))


def grid(shape, splits):
    """The chunks of `shape` cut into `splits[d]` equal spans along each dim d."""
    import itertools
    spans = [[(k * full // n, full // n) for k in range(n)] for full, n in zip(shape, splits)]
    return [chunk([o for o, _ in cell], [s for _, s in cell], i)
            for i, cell in enumerate(itertools.product(*spans))]


def both_forms(chunks):
    return [tuple(chunks), ChunkTable.of(chunks, len(chunks[0].offsets))]


def refusal(shape, chunks):
    with pytest.raises(CoverageError) as exc:
        coverage.check_coverage("w", shape, chunks)
    return str(exc.value)


def test_a_grid_is_proven_by_its_columns_without_the_corner_test(monkeypatch):
    monkeypatch.setattr(coverage, "_corners_cancel", lambda *a: pytest.fail("the corner test ran"))
    for chunks in both_forms(grid((8, 6, 4), (4, 2, 1))):
        coverage.check_coverage("w", (8, 6, 4), chunks)


@pytest.mark.parametrize("case", ["gap", "overlap", "outside", "duplicate for a gap", "empty box"])
def test_the_grid_test_refuses_what_the_corner_test_refuses(case, monkeypatch):
    """Each layout is refused with the message the general proof gives (which the grid test leaves it to)."""
    shape, chunks = (8, 6), grid((8, 6), (4, 2))
    if case == "gap":
        chunks = chunks[:-1]
    elif case == "overlap":
        chunks[0] = chunk((0, 0), (3, 3))
    elif case == "outside":
        chunks[-1] = chunk((6, 3), (2, 4))
    elif case == "duplicate for a gap":       # as many boxes as cells, every span a grid's, one cell missing
        chunks[-1] = chunks[0]
    else:
        chunks.append(chunk((0, 0), (0, 6)))
        chunks = chunks[1:]
    expected = {"gap": "cover 42 of 48", "overlap": "overlap", "outside": "outside the global shape",
                "duplicate for a gap": "overlap", "empty box": "cover 42 of 48"}[case]
    for chunks_form in both_forms(chunks):
        message = refusal(shape, chunks_form)
        assert expected in message
        monkeypatch.setattr(coverage, "_tiles_as_grid", lambda *a: False)   # the general proof alone
        assert refusal(shape, chunks_form) == message
        monkeypatch.undo()


def test_a_table_is_deduplicated_over_its_columns_as_a_tuple_is():
    chunks = grid((4, 6), (2, 3))
    mixed = [chunks[3], chunks[0], chunk((0, 0), (0, 6), 9),
             Chunk(chunks[3].offsets, chunks[3].sizes, BlobLocation("other", 0, 1))] + chunks
    table = ChunkTable.of(mixed, 2)
    assert list(coverage.dedup_chunks(table)) == list(coverage.dedup_chunks(tuple(mixed)))
    kept = coverage.dedup_chunks(table)
    assert len(kept) == len(chunks) and kept[0].location == chunks[0].location
    assert kept[3].location == chunks[3].location      # the first of equal boxes is kept, not "other"


# -- outputs cut from a source's table ---------------------------------------------------------------------------


def source(shape, chunks):
    return TensorEntry("src", "float32", tuple(shape), ChunkTable.of(chunks, len(shape)))


def plane(src, lead):
    takes = whole(src.fqn, src.shape, lead=lead)
    return Derived(fqn=src.fqn, dtype=src.dtype, shape=src.shape[len(lead):], chunks=src.chunks, sources=(src,),
                   takes=takes)


def rope_rows(src, n_heads):
    takes = takes_from_rows(src.fqn, src.shape, rope_half_split(src.shape[0], n_heads))
    return Derived(fqn=src.fqn, dtype=src.dtype, shape=src.shape, chunks=src.chunks, sources=(src,), takes=takes)


def planned(entry, packed):
    return proven.chunks_and_pieces(entry, "out", proven.Proven(proven.Proven.counted([entry])), packed)


def planned_both_ways(entry):
    """(packed, general): the packed form from the table's columns, the general one from Chunk and Piece objects."""
    return planned(entry, True), planned(entry, False)


def test_a_plane_and_strided_rows_are_cut_from_the_table_as_from_objects(monkeypatch):
    src = source((4, 8, 6), grid((4, 8, 6), (2, 4, 1)))
    rows = source((8, 6), grid((8, 6), (2, 2)))
    for entry in (plane(src, (3,)), rope_rows(rows, 2)):
        (chunks, pieces), (general_chunks, general_pieces) = planned_both_ways(entry)
        assert isinstance(pieces, PieceTable) and isinstance(chunks, ChunkTable)
        assert list(pieces) == list(general_pieces) and list(chunks) == list(general_chunks)
        assert pieces.row_contiguous == all(
            proven.is_contiguous_geometry(p.chunk.sizes, p.sizes, p.src_step, entry.shape) for p in general_pieces)
    # a whole plane is not cut: its pieces are the boxes that hold it
    monkeypatch.setattr(proven, "cut_boxes", lambda *a: pytest.fail("a plane was cut"))
    assert len(planned(plane(src, (0,)), True)[1]) == 4


def refusals(entry, monkeypatch, unproven):
    """The messages both forms refuse `entry` with; `unproven`: its source's chunks taken as proven (so that what
    the output's own proof catches is what is tested)."""
    if unproven:
        monkeypatch.setattr(proven, "check_coverage", lambda *a: None)
    messages = []
    for packed in (True, False):
        with pytest.raises(CoverageError) as exc:
            planned(entry, packed)
        messages.append(str(exc.value))
    assert messages[0] == messages[1]
    return messages[0]


@pytest.mark.parametrize("kind", ["plane", "rows"])
@pytest.mark.parametrize("case", ["gap", "overlap"])
def test_an_output_of_a_source_with_a_gap_or_an_overlap_is_refused_both_ways(kind, case, monkeypatch):
    """With the source's own proof switched off, the output's proof (each take's pieces adding up to it) still
    refuses a plane or rows the stored chunks do not fill exactly once."""
    shape = (4, 8, 6) if kind == "plane" else (8, 6)
    chunks = grid(shape, (2, 4, 1) if kind == "plane" else (2, 2))
    if case == "gap":
        chunks = chunks[1:]
    else:
        grown = tuple(s + 1 if d == len(shape) - 2 else s for d, s in enumerate(chunks[0].sizes))
        chunks.append(chunk((0,) * len(shape), grown, 9))       # over its neighbour by a row
    src = source(shape, chunks)
    entry = plane(src, (0,)) if kind == "plane" else rope_rows(src, 2)
    message = refusals(entry, monkeypatch, unproven=True)
    assert "the stored chunks of 'src' cover" in message


def test_a_take_outside_its_source_or_output_is_refused_both_ways(monkeypatch):
    src = source((4, 8, 6), grid((4, 8, 6), (2, 4, 1)))
    beyond = Derived(fqn="src", dtype="float32", shape=(8, 6), chunks=src.chunks, sources=(src,),
                     takes=(Take("src", (4, 0, 0), (0, 0), (8, 6)),))      # plane 4 of a source of 4
    assert "cover 0 of the 48 elements read at [4, 0, 0]" in refusals(beyond, monkeypatch, unproven=False)
    outside = Derived(fqn="src", dtype="float32", shape=(7, 6), chunks=src.chunks, sources=(src,),
                      takes=(Take("src", (1, 0, 0), (0, 0), (8, 6)),))     # an output smaller than its take
    assert "runs outside [7, 6]" in refusals(outside, monkeypatch, unproven=False)


def test_a_source_that_does_not_tile_is_refused_before_any_output(monkeypatch):
    chunks = grid((4, 8, 6), (2, 4, 1))[1:]
    message = refusals(plane(source((4, 8, 6), chunks), (3,)), monkeypatch, unproven=False)
    assert message.startswith("tensor 'src': chunks cover 168 of 192")
