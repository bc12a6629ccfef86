"""`inspect`'s description of how each tensor is split (runs/inspecting.py); the whole verb runs end to end in
tests/end_to_end/test_convert.py and the producer suites."""
from streamconv.model import BlobLocation, Chunk
from streamconv.runs.inspecting import describe_layout


def _chunks(shape, *boxes):
    return [Chunk(offsets=offsets, sizes=sizes, location=BlobLocation("__0_0.distcp", 0, 1))
            for offsets, sizes in boxes] or [Chunk((0,) * len(shape), tuple(shape), BlobLocation("f", 0, 1))]


def test_describe_layout_names_the_split_dims():
    assert describe_layout((4, 6), _chunks((4, 6))) == "whole"
    assert describe_layout((4, 6), _chunks((4, 6), ((0, 0), (4, 6)), ((0, 0), (4, 6)))) == "2 copies"
    assert describe_layout((4, 6), _chunks((4, 6), ((0, 0), (2, 6)), ((2, 0), (2, 6)))) == "2 chunks, dim 0"
    assert describe_layout((4, 6), _chunks((4, 6), ((0, 0), (4, 3)), ((0, 3), (4, 3)))) == "2 chunks, dim 1"
    quarters = [((r, c), (2, 3)) for r in (0, 2) for c in (0, 3)]
    assert describe_layout((4, 6), _chunks((4, 6), *quarters)) == "4 chunks, dims 0,1"
