"""The default writer count (issue 20 item 2) as a pure rule: CPUs and the memory budget in, a count and why out."""
import pytest

from streamconv.planning.plan import DECODER_BYTES_PER_WRITER
from streamconv.planning.workers import MIN_SHARE_BYTES, choose_workers

MIB = 2**20
DEFAULT_BUFFER = 32 * MIB


@pytest.mark.parametrize("cpus,plain,compressed", [
    (1, 2, 2),          # one core: still two writers, one's reads overlap the other's writes
    (2, 2, 2),
    (1.5, 2, 2),        # a cgroup quota of 1.5 CPUs keeps one core busy: the floor, then the minimum
    (16, 16, 5),        # zstd: 32 MiB holds 5 writers of 2 MiB share + 3.5 MiB decoder
    (64, 16, 5),        # never more than 16
])
def test_one_writer_per_cpu_within_the_default_budget(cpus, plain, compressed):
    assert choose_workers(None, cpus=cpus, buffer_bytes=DEFAULT_BUFFER, compressed=False).count == plain
    assert choose_workers(None, cpus=cpus, buffer_bytes=DEFAULT_BUFFER, compressed=True).count == compressed


def test_the_budget_per_writer_is_its_share_plus_its_decoder():
    assert DECODER_BYTES_PER_WRITER == 7 * MIB // 2 and MIN_SHARE_BYTES == 2 * MIB
    assert choose_workers(None, cpus=16, buffer_bytes=11 * MIB, compressed=True).count == 2
    assert choose_workers(None, cpus=16, buffer_bytes=11 * MIB - 1, compressed=True).count == 1
    assert choose_workers(None, cpus=16, buffer_bytes=11 * MIB, compressed=False).count == 5


@pytest.mark.parametrize("buffer_bytes", [64 * 1024, MIB, 4 * MIB - 1])
def test_a_small_budget_takes_one_writer_even_on_many_cores(buffer_bytes):
    for compressed in (False, True):
        assert choose_workers(None, cpus=16, buffer_bytes=buffer_bytes, compressed=compressed).count == 1


def test_an_explicit_count_wins_and_the_reason_says_why():
    given = choose_workers(12, cpus=1, buffer_bytes=MIB, compressed=True)
    assert (given.count, given.auto, given.reason) == (12, False, "--workers 12")
    chosen = choose_workers(None, cpus=1.5, buffer_bytes=DEFAULT_BUFFER, compressed=True)
    assert chosen.auto
    assert chosen.reason == ("auto: 1.5 CPUs allow 2; --buffer-size 32.0 MiB allows 5 "
                             "(2.0 MiB share + 3.5 MiB zstd decoder each)"), chosen.reason
