"""The default writer count (issue 20 item 2) as a pure rule: CPUs and the predicted peak in, a count and why out."""
import pytest

from streamconv.model import CheckpointMetadata
from streamconv.planning import plan as p
from streamconv.planning.plan import PlanOptions, build_plan
from streamconv.planning.workers import PEAK_ABOVE_BUFFER_BYTES, choose_workers, with_workers
from tests.support.plan_builders import dim0_chunks, tensor

MIB = 2**20
BUFFER = 32 * MIB


def copies(count):
    """Plain copies (no buffer): each writer costs its 1 MiB IO step."""
    return 25 * MIB + count * MIB


def zstd(count):
    """Compressed plain copies: each writer also holds a 3.5 MiB decoder; the module 1 MiB once."""
    return 25 * MIB + MIB + count * 9 * MIB // 2


@pytest.mark.parametrize("cpus,plain,compressed", [
    (1, 2, 2),          # one core: still two writers, one's reads overlap the other's writes
    (2, 2, 2),
    (1.5, 2, 2),        # a cgroup quota of 1.5 CPUs keeps one core busy: the floor, then the minimum
    (16, 16, 12),       # zstd: 26 MiB + 12 x 4.5 MiB = 80 MiB = 32 MiB buffer + 48 MiB
    (64, 16, 12),       # never more than 16
])
def test_one_writer_per_cpu_within_the_memory_bound(cpus, plain, compressed):
    assert choose_workers(None, cpus=cpus, buffer_bytes=BUFFER, peak_bytes_for=copies).count == plain
    assert choose_workers(None, cpus=cpus, buffer_bytes=BUFFER, peak_bytes_for=zstd).count == compressed


def test_a_small_budget_takes_fewer_writers_even_on_many_cores():
    # 4 MiB of buffer: two 2 MiB shares; the bound (52 MiB) holds 5 zstd writers, the shares only 2
    assert choose_workers(None, cpus=16, buffer_bytes=4 * MIB, peak_bytes_for=zstd).count == 2
    assert choose_workers(None, cpus=16, buffer_bytes=MIB, peak_bytes_for=copies).count == 1
    # a cast through the whole buffer by each writer: the peak grows with every writer's share
    heavy = lambda count: 25 * MIB + 12 * MIB + count * (MIB + 8 * MIB)     # noqa: E731
    assert choose_workers(None, cpus=16, buffer_bytes=BUFFER, peak_bytes_for=heavy).count == 4
    assert heavy(4) <= BUFFER + PEAK_ABOVE_BUFFER_BYTES < heavy(5)
    # nothing fits: one writer all the same (the prediction says what it costs)
    assert choose_workers(None, cpus=16, buffer_bytes=BUFFER, peak_bytes_for=lambda n: 10**12).count == 1


def test_an_explicit_count_wins_and_the_reason_says_why():
    given = choose_workers(12, cpus=1, buffer_bytes=MIB, peak_bytes_for=zstd)
    assert (given.count, given.auto, given.reason) == (12, False, "--workers 12")
    chosen = choose_workers(None, cpus=1.5, buffer_bytes=BUFFER, peak_bytes_for=zstd)
    assert chosen.auto
    assert chosen.reason == ("auto: 1.5 CPUs allow 2, --buffer-size 32.0 MiB has 2.0 MiB shares for 16; 2 keep the "
                             "predicted peak (35.0 MiB without per-chunk metadata) within --buffer-size + 48.0 MiB"), \
        chosen.reason


def test_with_workers_uses_the_plan_s_prediction():
    many = CheckpointMetadata(tensors=tuple(tensor(f"model.t{i}", (64, 1024), chunks=dim0_chunks(64, 1024, 4))
                                            for i in range(20)), byte_entries=())
    plain = build_plan(many, PlanOptions())
    chosen = with_workers(plain, None, cpus=16)
    assert chosen.workers == 16 and chosen.workers_reason.startswith("auto: 16 CPUs allow 16")
    assert chosen.peak_bytes == p.with_writers(plain, 16).peak_bytes
    cast = build_plan(many, PlanOptions(dtype="bfloat16"))     # each writer touches its share (256 KiB per tensor)
    assert with_workers(cast, None, cpus=16).workers == 16
    assert with_workers(cast, 3, cpus=16).workers == 3
