"""The bucketed training stream: every global micro-batch is one bucket, every image comes every epoch,
and the order is a pure function of (seed, epoch)."""

from __future__ import annotations

import pytest

from pictor.train.bucket_stream import BucketStream, check_group

WIDE, TALL, SQUARE = (32, 16), (16, 32), (24, 24)
ITEMS = [WIDE] * 7 + [TALL] * 3 + [SQUARE] * 12 + [WIDE] * 2  # 9 wide, 3 tall, 12 square


def test_each_micro_batch_is_one_bucket_and_each_epoch_shows_every_image() -> None:
    stream = BucketStream(ITEMS, group=4, seed=0)
    assert stream.epoch_length == 4 * (3 + 1 + 3)  # ceil(9/4) + ceil(3/4) + ceil(12/4) groups
    for epoch in range(3):
        order = [stream.index(epoch * stream.epoch_length + k) for k in range(stream.epoch_length)]
        for start in range(0, len(order), 4):
            assert len({ITEMS[i] for i in order[start : start + 4]}) == 1
        assert set(order) == set(range(len(ITEMS)))
        # the filled-up groups repeat images of their own bucket only: 3 wide and 1 tall repeats
        assert len(order) - len(ITEMS) == 4


def test_the_order_is_seeded_per_epoch_and_stable() -> None:
    a, b = BucketStream(ITEMS, 4, seed=0), BucketStream(ITEMS, 4, seed=0)
    n = a.epoch_length
    assert [a.index(k) for k in range(2 * n)] == [b.index(k) for k in range(2 * n)]
    assert [a.index(k) for k in range(n)] != [a.index(n + k) for k in range(n)]
    assert [a.index(k) for k in range(n)] != [BucketStream(ITEMS, 4, seed=1).index(k) for k in range(n)]
    # read out of order (as DataLoader workers and a resume do): the same answers
    assert [b.index(k) for k in reversed(range(2 * n))] == [a.index(k) for k in reversed(range(2 * n))]


def test_a_group_that_divides_every_bucket_repeats_nothing() -> None:
    stream = BucketStream([WIDE] * 6 + [TALL] * 3, group=3, seed=2)
    order = [stream.index(k) for k in range(stream.epoch_length)]
    assert sorted(order) == list(range(9))
    assert stream.small_buckets() == {}
    assert BucketStream([WIDE] * 6 + [TALL] * 2, group=3, seed=2).small_buckets() == {TALL: 2}


def test_resuming_with_another_micro_batch_is_refused() -> None:
    assert check_group(8, 8, 64) is None
    assert check_group(None, 8, 64) is None
    message = check_group(8, 4, 64)
    assert message is not None and "resume with the run's own --batch-size" in message
    assert check_group(8, 8, 60) is not None
    with pytest.raises(ValueError, match="group must be >= 1"):
        BucketStream(ITEMS, 0, 0)
