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


async def ensure_group(client: aioredis.Redis, keys: StreamKeys) -> bool:
    """Create the group at the start of the stream (so nothing already added is skipped). True if created."""
    try:
        await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
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
    if not ids:
        return 0
    return await client.xack(keys.stream, keys.group, *ids)


async def delivery_counts(
    client: aioredis.Redis, keys: StreamKeys, consumer: str, entries: Sequence[Entry]
) -> dict[str, int]:
    """How often each of this consumer's entries was delivered: XREADGROUP from history and
    XAUTOCLAIM do not say, XPENDING does."""
    if not entries:
        return {}
    ordered = sorted(entry_ids(entries), key=_id_key)
    rows = await client.xpending_range(
        keys.stream, keys.group, min=ordered[0], max=ordered[-1], count=len(ordered) * 2 + 10, consumername=consumer
    )
    return {_text(row["message_id"]): int(row["times_delivered"]) for row in rows}


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
) -> tuple[str, list[Entry], list[str]]:
    """Take over entries idle for min_idle_ms from any consumer. Returns (next cursor, entries, deleted ids)."""
    reply = await client.xautoclaim(keys.stream, keys.group, consumer, min_idle_ms, start_id=cursor, count=count)
    next_cursor, claimed, deleted = reply[0], reply[1], reply[2] if len(reply) > 2 else []
    return _text(next_cursor), claimed, [_text(entry_id) for entry_id in deleted]


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
