"""A snapshot of a stream and one of its groups, as Redis reports it (XINFO, XPENDING, XLEN)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamgroup.keys import StreamKeys
from streamgroup.message import entry_timestamp


@dataclass(frozen=True, slots=True)
class ConsumerStats:
    name: str
    pending: int
    idle_seconds: float


@dataclass(frozen=True, slots=True)
class GroupStats:
    stream: str
    group: str
    stream_length: int
    group_exists: bool
    lag: int | None  # None: Redis does not know (after XGROUP SETID, deletions or trims)
    pending: int
    oldest_pending_id: str | None
    oldest_pending_age_seconds: float  # since the oldest pending entry was added (its ID), not since delivery
    last_delivered_id: str | None
    entries_read: int | None
    dead_letter_length: int
    oldest_pending_idle_seconds: float = 0.0  # see oldest_pending_idle for its bound
    consumers: list[ConsumerStats] = field(default_factory=list)
    stream_exists: bool = True
    shard: str = "0"  # see StreamKeys.shard

    def active_consumers(self, within_seconds: float, besides: str = "") -> int:
        """Consumers seen within the last `within_seconds`, not counting `besides` (the reclaimer)."""
        return sum(1 for c in self.consumers if c.idle_seconds <= within_seconds and c.name != besides)

    def as_dict(self) -> dict:
        return asdict(self)


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# XPENDING rows looked at for the oldest idle time, so a huge pending list costs a bounded reply.
IDLE_SCAN_ROWS = 100
DEFAULT_CLAIM_MIN_IDLE_MS = 60_000


async def oldest_pending_idle(client: aioredis.Redis, keys: StreamKeys, claim_min_idle_ms: int) -> float:
    """The largest idle time (since last delivery) among pending entries, in seconds.

    Bounded: first the entries idle at least the claim window (XPENDING ... IDLE), at most
    IDLE_SCAN_ROWS of them, so any entry past the window is reported as past it; when there is
    none, the largest idle among the IDLE_SCAN_ROWS oldest pending entries (all within the window).
    """
    for idle in (claim_min_idle_ms, None):
        rows = await client.xpending_range(keys.stream, keys.group, "-", "+", IDLE_SCAN_ROWS, idle=idle)
        if rows:
            return max(int(row["time_since_delivered"]) for row in rows) / 1000.0
    return 0.0


async def collect(
    client: aioredis.Redis, keys: StreamKeys, claim_min_idle_ms: int = DEFAULT_CLAIM_MIN_IDLE_MS
) -> GroupStats:
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xlen(keys.dead_letter)
        pipe.xinfo_groups(keys.stream)
        stream_length, dead_letter_length, groups = await pipe.execute(raise_on_error=False)
    # "no such key" from XINFO GROUPS: the stream does not exist yet. Anything else fails the call:
    # on a cluster each node's part of the pipeline fails on its own (a connection error there
    # comes back as a reply).
    stream_exists = not (type(groups) is ResponseError and "no such key" in str(groups))
    for reply in (stream_length, dead_letter_length, *([groups] if stream_exists else [])):
        if isinstance(reply, Exception):
            raise reply
    group = None
    if stream_exists:
        group = next((g for g in groups if _text(g["name"]) == keys.group), None)
    if group is None:
        return GroupStats(
            stream=keys.stream,
            group=keys.group,
            stream_length=stream_length,
            group_exists=False,
            lag=None,
            pending=0,
            oldest_pending_id=None,
            oldest_pending_age_seconds=0.0,
            last_delivered_id=None,
            entries_read=None,
            dead_letter_length=dead_letter_length,
            stream_exists=stream_exists,
            shard=keys.shard,
        )

    async with client.pipeline(transaction=False) as pipe:
        pipe.xinfo_consumers(keys.stream, keys.group)
        pipe.xpending(keys.stream, keys.group)
        consumers, summary = await pipe.execute()
    oldest = _text(summary.get("min")) if summary.get("pending") else None
    idle = await oldest_pending_idle(client, keys, claim_min_idle_ms) if oldest else 0.0
    now = time.time()
    return GroupStats(
        stream=keys.stream,
        group=keys.group,
        stream_length=stream_length,
        group_exists=True,
        lag=group.get("lag"),
        pending=int(summary.get("pending") or 0),
        oldest_pending_id=oldest,
        oldest_pending_age_seconds=max(0.0, now - entry_timestamp(oldest)) if oldest else 0.0,
        last_delivered_id=_text(group.get("last-delivered-id")),
        entries_read=group.get("entries-read"),
        dead_letter_length=dead_letter_length,
        oldest_pending_idle_seconds=idle,
        consumers=[
            ConsumerStats(_text(c["name"]) or "", int(c["pending"]), int(c["idle"]) / 1000.0) for c in consumers
        ],
        shard=keys.shard,
    )


def combine(stream: str, group: str, shards: list[GroupStats]) -> GroupStats:
    """One logical stream's view over its shards: lengths, lag and pending summed (lag unknown
    if any shard's is), the oldest pending entry the oldest of all (its ID is then the shard's,
    see the per-shard rows), consumers merged by name (pending summed, idle the least)."""
    if len(shards) == 1:
        return shards[0]
    oldest = max(shards, key=lambda s: (s.pending > 0, s.oldest_pending_age_seconds))
    consumers: dict[str, ConsumerStats] = {}
    for stats in shards:
        for c in stats.consumers:
            seen = consumers.get(c.name)
            consumers[c.name] = (
                c
                if seen is None
                else ConsumerStats(c.name, seen.pending + c.pending, min(seen.idle_seconds, c.idle_seconds))
            )
    lags = [s.lag for s in shards]
    reads = [s.entries_read for s in shards if s.group_exists]
    return GroupStats(
        stream=stream,
        group=group,
        stream_length=sum(s.stream_length for s in shards),
        group_exists=all(s.group_exists for s in shards),
        lag=None if any(lag is None for lag in lags) else sum(lags),
        pending=sum(s.pending for s in shards),
        oldest_pending_id=oldest.oldest_pending_id if oldest.pending else None,
        oldest_pending_age_seconds=max(s.oldest_pending_age_seconds for s in shards),
        last_delivered_id=None,  # IDs of different streams do not compare
        entries_read=None if any(r is None for r in reads) else sum(reads),
        dead_letter_length=sum(s.dead_letter_length for s in shards),
        oldest_pending_idle_seconds=max(s.oldest_pending_idle_seconds for s in shards),
        consumers=sorted(consumers.values(), key=lambda c: c.name),
        stream_exists=any(s.stream_exists for s in shards),
        shard="",
    )
