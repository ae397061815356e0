"""Arbitrary entries (binary, empty, huge, unicode field names and values) through produce ->
consume -> dead-letter: text reaches the handler unchanged, everything else is dead-lettered
byte for byte, and the consumer never stops."""

from __future__ import annotations

import json

import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from support.accounting import GROUP, STREAM
from support.processes import wait_for

blobs = st.one_of(
    st.text(max_size=50).map(str.encode),
    st.binary(max_size=50),
    st.sampled_from([b"", b"\xff", b"\xc3\x28", "é中🙂".encode(), b"\x00" * 3]),
)
entries = st.dictionaries(blobs, blobs, min_size=1, max_size=5)


def _is_text(fields: dict[bytes, bytes]) -> bool:
    try:
        for key, value in fields.items():
            key.decode()
            value.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_arbitrary_entries_are_handled_or_dead_lettered_never_lost(services, redis_url) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    consumer = services.start("consumer", name="sturdy", HANDLER="support.handlers:record_fields", BLOCK_MS=100)
    added = 0

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fields=entries)
    @example(fields={b"payload": b"x" * 1_000_000})
    @example(fields={b"poison": b"1"})
    @example(fields={b"": b""})
    def check(fields: dict[bytes, bytes]) -> None:
        nonlocal added
        entry_id = raw.xadd(STREAM, fields).decode()
        added += 1

        def settled() -> bool:
            group = next(g for g in raw.xinfo_groups(STREAM) if g["name"] == GROUP.encode())
            return group["entries-read"] == added and group["pending"] == 0

        wait_for(settled, timeout=15, interval=0.02, what=f"entry {entry_id} settled")
        handled = raw.get(f"fields:{entry_id}")
        dead = [f for _, f in raw.xrange(f"{STREAM}:dead") if f[b"x-streamgroup-original-id"] == entry_id.encode()]
        if _is_text(fields) and b"poison" not in fields:
            assert handled is not None and not dead
            assert json.loads(handled) == {k.decode(): v.decode() for k, v in fields.items()}
        else:
            assert handled is None and len(dead) == 1
            kept = {k: v for k, v in dead[0].items() if not k.startswith(b"x-streamgroup-")}
            assert kept == {k: v for k, v in fields.items() if not k.startswith(b"x-streamgroup-")}
        assert consumer.alive(), consumer.output[-2000:]

    check()
    assert added >= 60
