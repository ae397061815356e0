"""Sharded key names and the partition hash (pure functions; not used by the services yet)."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from streamgroup.keys import StreamKeys, jump_hash, shard_keys, shard_of


def test_one_shard_keeps_every_key_as_today() -> None:
    assert shard_keys("orders", "g", 1) == [StreamKeys("orders", "g", "orders:dead")]
    assert shard_keys("orders", "g", 1, "failed") == [StreamKeys("orders", "g", "failed")]


def test_shards_have_distinct_hash_tags_and_each_dead_letter_stream_shares_its_shards_slot() -> None:
    keys = shard_keys("{orders}", "g", 6)
    assert [k.stream for k in keys] == [f"{{orders:{i}}}" for i in range(6)]
    assert [k.dead_letter for k in keys] == [f"{{orders:{i}}}:dead" for i in range(6)]
    assert all(k.group == "g" for k in keys)
    for k in shard_keys("orders", "g", 64, "failed{x}"):
        assert key_slot(k.stream.encode()) == key_slot(k.dead_letter.encode())
    assert len({key_slot(k.stream.encode()) for k in shard_keys("orders", "g", 64)}) > 60  # spread over slots


@pytest.mark.parametrize("shards", [0, -1])
def test_no_shards_is_an_error(shards: int) -> None:
    with pytest.raises(ValueError):
        shard_keys("orders", "g", shards)
    with pytest.raises(ValueError):
        shard_of("x", shards)


def test_the_partition_hash_is_the_documented_one() -> None:
    # Pinned: a change would send every partition to another shard and break its order.
    assert [shard_of(f"customer-{n}", 6) for n in range(8)] == [shard_of(f"customer-{n}".encode(), 6) for n in range(8)]
    assert [shard_of(f"customer-{n}", 6) for n in range(8)] == PINNED
    assert jump_hash(0, 1) == 0 and jump_hash(2**64 - 1, 1) == 0


PINNED = [1, 2, 0, 2, 0, 3, 1, 0]


def test_values_spread_over_all_shards() -> None:
    counts = collections.Counter(shard_of(f"customer-{n}", 6) for n in range(6000))
    assert set(counts) == set(range(6))
    assert min(counts.values()) > 800  # about 1000 each


@given(st.binary(max_size=64), st.integers(min_value=1, max_value=200))
def test_growing_by_one_shard_moves_values_only_to_the_new_shard(value: bytes, shards: int) -> None:
    before, after = shard_of(value, shards), shard_of(value, shards + 1)
    assert 0 <= before < shards
    assert after in (before, shards)
