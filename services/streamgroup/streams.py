"""Stream and consumer-group commands, each in one place."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ResponseError

from streamgroup.errors import RedisRefusedError
from streamgroup.keys import StreamKeys
from streamgroup.message import Entry, RawEntry, entry_ids

# XAUTOCLAIM replies are left as Redis sent them (see connection.RAW_REPLIES), and XREADGROUP
# goes round redis-py (see streamgroup.reading): redis-py would build a dict of bytes per entry
# only for us to build one of text from it.
HISTORY = "0"  # XREADGROUP from 0: this consumer's own pending entries
NEW = ">"  # XREADGROUP from >: entries never delivered to the group


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def raise_if_wrong_type(exc: ResponseError, key: str) -> None:
    """A key of another type where the stream should be will not fix itself: refuse, do not retry."""
    if "WRONGTYPE" in str(exc):
        raise RedisRefusedError(f"key {key!r} exists and is not a stream: {exc}") from exc


async def ensure_group(client: aioredis.Redis, keys: StreamKeys, start_id: str = "0") -> bool:
    """Create the group at `start_id` unless it exists (`0`: nothing already added is skipped).
    True if created. Where a group that vanished under running services is recreated is the
    caller's choice (the consumer: after the last entry it read)."""
    try:
        await client.xgroup_create(keys.stream, keys.group, id=start_id, mkstream=True)
    except OutOfMemoryError:
        # Under maxmemory Redis refuses XGROUP CREATE even for a group that exists: with one that
        # exists there is nothing to create, and a service can start (the reclaimer's trimming may
        # be what frees memory). Without one, the OOM is an outage like any other.
        if await group_exists(client, keys):
            return False
        raise
    except ResponseError as exc:
        if str(exc).startswith("BUSYGROUP"):
            return False
        raise_if_wrong_type(exc, keys.stream)
        raise
    return True


async def group_exists(client: aioredis.Redis, keys: StreamKeys) -> bool:
    """By XPENDING, which every service's ACL rule grants and which works under maxmemory."""
    try:
        await client.xpending(keys.stream, keys.group)
    except ResponseError as exc:
        if str(exc).startswith("NOGROUP"):
            return False
        raise
    return True


def entries_of(reply: dict | list | None) -> list[Entry]:
    """Entries of a raw XREADGROUP reply for one stream, as sent: {stream: [entry, ...]} in RESP3,
    [[stream, [entry, ...]]] in RESP2."""
    if not reply:
        return []
    return next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]


async def ack(client: aioredis.Redis, keys: StreamKeys, ids: Sequence[str]) -> int:
    """Acknowledge; returns how many Redis acknowledged (ids already acknowledged do not count)."""
    if not ids:
        return 0
    return await client.xack(keys.stream, keys.group, *ids)


async def delivery_counts(
    client: aioredis.Redis, keys: StreamKeys, consumer: str, entries: Sequence[Entry]
) -> dict[str, int]:
    """How often each of this consumer's entries was delivered: XREADGROUP from history and
    XCLAIM do not say, XPENDING does. Every entry of the batch gets its count, however many other
    entries the consumer holds between them: the range is paged through until all are covered."""
    if not entries:
        return {}
    wanted = set(entry_ids(entries))
    ordered = sorted(wanted, key=_id_key)
    if len(ordered) == 1:
        first = last = ordered[0]
        page = 1
    else:
        first, last, page = ordered[0], ordered[-1], max(len(ordered) * 2, 100)
    counts: dict[str, int] = {}
    while True:
        rows = await client.xpending_range(
            keys.stream, keys.group, min=first, max=last, count=page, consumername=consumer
        )
        for row in rows:
            entry_id = _text(row["message_id"])
            if entry_id in wanted:
                counts[entry_id] = int(row["times_delivered"])
        if len(rows) < page or len(counts) == len(wanted):
            return counts
        first = "(" + _text(rows[-1]["message_id"])  # exclusive start: the page after this one


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def autoclaim(
    client: aioredis.Redis,
    keys: StreamKeys,
    consumer: str,
    min_idle_ms: int,
    cursor: str,
    count: int,
) -> tuple[str, list[str], list[str]]:
    """Take over the ids of entries idle for min_idle_ms from any consumer, without counting a
    delivery (JUSTID): nothing is handed to a handler yet, so a crash now must not bring any of
    them closer to the dead-letter stream. Returns (next cursor, ids, ids deleted from the stream
    while pending, which Redis has dropped from the pending list)."""
    reply = await client.execute_command(
        "XAUTOCLAIM", keys.stream, keys.group, consumer, min_idle_ms, cursor, "COUNT", count, "JUSTID"
    )
    next_cursor, claimed, deleted = reply[0], reply[1], reply[2] if len(reply) > 2 else []
    return _text(next_cursor), [_text(entry_id) for entry_id in claimed], [_text(entry_id) for entry_id in deleted]


async def claim_one(
    client: aioredis.Redis, keys: StreamKeys, consumer: str, entry_id: str, acks: Sequence[str] = ()
) -> tuple[Entry | None, int, int]:
    """Claim one entry for handling: XCLAIM counts this delivery (of this entry only) and returns
    its fields; XPENDING says how often it was delivered. `acks`, if any, are acknowledged first in
    the same round trip. Returns (entry, deliveries, acknowledged): entry None if it is no longer
    pending or was deleted from the stream (Redis drops such an entry from the pending list)."""
    async with client.pipeline(transaction=False) as pipe:
        if acks:
            pipe.xack(keys.stream, keys.group, *acks)
        pipe.execute_command("XCLAIM", keys.stream, keys.group, consumer, 0, entry_id)
        pipe.xpending_range(keys.stream, keys.group, min=entry_id, max=entry_id, count=1, consumername=consumer)
        replies = await pipe.execute()
    acknowledged = int(replies[0]) if acks else 0
    claimed, rows = replies[-2], replies[-1]
    if not claimed or claimed[0] is None or claimed[0][1] is None or not rows:
        return None, 0, acknowledged
    return claimed[0], int(rows[0]["times_delivered"]), acknowledged


DEAD_LETTER_FIELDS_PREFIX = "x-streamgroup-"


def dead_letter_fields(entry: RawEntry, keys: StreamKeys, consumer: str, reason: str) -> list[bytes | str]:
    """The entry's original flat field/value list exactly as Redis sent it (bytes, even when they
    are not text; a field name given twice stays twice, in order), then metadata under the
    x-streamgroup- prefix. The metadata comes last, original-id first of it (DEAD_LETTER_WIDE_ACK
    looks for it among the last fields)."""
    p = DEAD_LETTER_FIELDS_PREFIX
    return [
        *(entry.fields or ()),
        f"{p}original-id", entry.id,
        f"{p}stream", keys.stream,
        f"{p}group", keys.group,
        f"{p}consumer", consumer,
        f"{p}deliveries", str(entry.deliveries),
        f"{p}error", reason[:4096],
    ]  # fmt: skip
