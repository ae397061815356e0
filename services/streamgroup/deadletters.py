"""The dead-letter stream as an operator sees it: read its entries, replay them into the stream they
came from, purge them. `streamgroup dead-letters` is the command line over this.

Replay is one Lua script per entry that reads the dead-letter entry, adds its original fields to
the source stream and deletes it from the dead-letter stream, all at once: an entry is removed only
together with its re-add, and an interrupted replay can be run again without losing or doubling an
entry (an entry already replayed is no longer there to be replayed twice). The script declares both
keys, which a Redis Cluster requires to share a hash slot -- as dead-lettering already does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from streamgroup.connection import as_sent
from streamgroup.message import entry_timestamp
from streamgroup.scripts import SCRIPT_MAX_FIELDS
from streamgroup.streams import DEAD_LETTER_FIELDS_PREFIX

PREFIX = DEAD_LETTER_FIELDS_PREFIX.encode()
PAGE = 500  # entries per XRANGE page and per pipeline of replay scripts

# KEYS[1] the source stream, KEYS[2] the dead-letter stream; ARGV[1] the dead-letter entry's id,
# ARGV[2] the bookkeeping prefix. Returns {0} when the entry is gone (replayed or purged already),
# {2} when it holds no original field to replay, {1, new id} when it was replayed. The fields are
# read here, as a flat list, so repeated field names and their order survive.
REPLAY = """
local rows = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #rows == 0 then return {0} end
local flat, args, plen = rows[1][2], {KEYS[1], '*'}, #ARGV[2]
for i = 1, #flat, 2 do
  if string.sub(flat[i], 1, plen) ~= ARGV[2] then
    args[#args + 1] = flat[i]
    args[#args + 1] = flat[i + 1]
  end
end
if #args == 2 then return {2} end
local added = redis.call('XADD', unpack(args))
redis.call('XDEL', KEYS[2], ARGV[1])
return {1, added}
"""


class Outcome(Enum):
    REPLAYED = "replayed"
    GONE = "gone"  # no longer in the dead-letter stream: replayed or purged by an earlier run
    EMPTY = "empty"  # only bookkeeping fields (an entry deleted while pending): nothing to replay


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the dead-letter stream, with its fields as Redis sent them (flat, in order)."""

    id: str
    flat: tuple[bytes, ...]

    def _bookkeeping(self, name: str) -> str | None:
        wanted = PREFIX + name.encode()
        for i in range(0, len(self.flat) - 1, 2):
            if self.flat[i] == wanted:
                return _text(self.flat[i + 1])
        return None

    @property
    def original_id(self) -> str | None:
        return self._bookkeeping("original-id")

    @property
    def source_stream(self) -> str | None:
        return self._bookkeeping("stream")

    @property
    def error(self) -> str:
        return self._bookkeeping("error") or ""

    @property
    def deliveries(self) -> int | None:
        value = self._bookkeeping("deliveries")
        return int(value) if value and value.isdigit() else None

    @property
    def original_fields(self) -> list[tuple[bytes, bytes]]:
        """The fields to replay: all but the bookkeeping ones, repeated names and order kept."""
        pairs = zip(self.flat[::2], self.flat[1::2], strict=True)
        return [(name, value) for name, value in pairs if not name.startswith(PREFIX)]

    def age_seconds(self, now: float | None = None) -> float:
        """How long ago the entry was dead-lettered."""
        return max(0.0, (time.time() if now is None else now) - entry_timestamp(self.id))

    def as_dict(self, now: float | None = None) -> dict:
        return {
            "id": self.id,
            "original_id": self.original_id,
            "stream": self.source_stream,
            "error": self.error,
            "deliveries": self.deliveries,
            "age_seconds": round(self.age_seconds(now), 3),
            "fields": [[_text(name), _text(value)] for name, value in self.original_fields],
        }


def _raw_ranges(client: aioredis.Redis) -> aioredis.Redis:
    """redis-py turns XRANGE replies into dicts, which drops repeated field names: keep them flat."""
    for command in ("XRANGE", "XREVRANGE"):
        client.set_response_callback(command, as_sent)
    return client


def _entry(raw: Sequence) -> DeadLetter:
    entry_id, flat = raw
    return DeadLetter(_text(entry_id), tuple(flat or ()))


async def scan(client: aioredis.Redis, dead_letter_key: str, upto: str = "+") -> AsyncIterator[DeadLetter]:
    """Every entry, oldest first, page by page (up to and including `upto`)."""
    _raw_ranges(client)
    start = "-"
    while True:
        page = await client.xrange(dead_letter_key, start, upto, count=PAGE)
        for raw in page:
            yield _entry(raw)
        if len(page) < PAGE:
            return
        start = "(" + _text(page[-1][0])


async def fetch(client: aioredis.Redis, dead_letter_key: str, ids: Iterable[str]) -> tuple[list[DeadLetter], list[str]]:
    """(the entries with these ids, the ids that are not in the dead-letter stream)."""
    found, missing = [], []
    _raw_ranges(client)
    async with client.pipeline(transaction=False) as pipe:
        wanted = list(dict.fromkeys(ids))
        for entry_id in wanted:
            pipe.xrange(dead_letter_key, entry_id, entry_id)
        replies = await pipe.execute(raise_on_error=False)
    for entry_id, reply in zip(wanted, replies, strict=True):
        if isinstance(reply, Exception):  # an id Redis cannot parse is not in the stream either
            missing.append(entry_id)
        elif reply:
            found.append(_entry(reply[0]))
        else:
            missing.append(entry_id)
    return found, missing


async def select(
    client: aioredis.Redis, dead_letter_key: str, ids: Sequence[str], match: str | None
) -> tuple[list[DeadLetter], list[str]]:
    """The entries named by `ids` (all of them when none is named), narrowed to those whose error
    contains `match`; and the named ids that are missing."""
    if ids:
        entries, missing = await fetch(client, dead_letter_key, ids)
    else:
        entries, missing = [entry async for entry in scan(client, dead_letter_key)], []
    if match is not None:
        entries = [entry for entry in entries if match in entry.error]
    return entries, missing


class Replayer:
    def __init__(self, client: aioredis.Redis, dead_letter_key: str, default_stream: str) -> None:
        self._client, self._dead_letter_key, self._default_stream = client, dead_letter_key, default_stream
        self.dead_letter_key = dead_letter_key
        self._script = client.register_script(REPLAY)

    def target(self, entry: DeadLetter) -> str:
        return entry.source_stream or self._default_stream

    async def replay(self, entries: Sequence[DeadLetter]) -> AsyncIterator[tuple[DeadLetter, Outcome, str | None]]:
        """Replay each entry; yields (entry, outcome, the id it got in the source stream)."""
        for first in range(0, len(entries), PAGE):
            page = entries[first : first + PAGE]
            narrow = [entry for entry in page if len(entry.flat) <= SCRIPT_MAX_FIELDS]
            if narrow:
                replies = await self._run_scripts(narrow)
                for entry, reply in zip(narrow, replies, strict=True):
                    yield entry, *_outcome(reply)
            for entry in page:
                if len(entry.flat) > SCRIPT_MAX_FIELDS:
                    yield entry, *await self._replay_wide(entry)

    async def _run_scripts(self, entries: Sequence[DeadLetter]) -> list:
        """The replay script for each entry, in order: pipelined on one server; one call after the
        other on a Redis Cluster, whose pipelines refuse scripts."""

        def keys(entry: DeadLetter) -> list[str]:
            return [self.target(entry), self._dead_letter_key]

        if isinstance(self._client, RedisCluster):
            return [await self._script(keys=keys(entry), args=[entry.id, PREFIX]) for entry in entries]
        async with self._client.pipeline(transaction=False) as pipe:
            for entry in entries:
                await self._script(keys=keys(entry), args=[entry.id, PREFIX], client=pipe)
            return await pipe.execute()

    async def _replay_wide(self, entry: DeadLetter) -> tuple[Outcome, str | None]:
        # Too wide for Lua's unpack(): the same steps from here, add first. A crash between the two
        # replays this entry a second time on the next run; it never loses it.
        if not await self._client.xrange(self._dead_letter_key, entry.id, entry.id):
            return Outcome.GONE, None
        fields = [part for pair in entry.original_fields for part in pair]
        if not fields:
            return Outcome.EMPTY, None
        added = await self._client.execute_command("XADD", self.target(entry), "*", *fields)
        await self._client.xdel(self._dead_letter_key, entry.id)
        return Outcome.REPLAYED, _text(added)


def _outcome(reply: Sequence) -> tuple[Outcome, str | None]:
    code = int(reply[0])
    if code == 1:
        return Outcome.REPLAYED, _text(reply[1])
    return (Outcome.GONE if code == 0 else Outcome.EMPTY), None


async def purge(client: aioredis.Redis, dead_letter_key: str, ids: Sequence[str]) -> int:
    deleted = 0
    for first in range(0, len(ids), PAGE):
        deleted += int(await client.xdel(dead_letter_key, *ids[first : first + PAGE]))
    return deleted


async def purge_through(client: aioredis.Redis, dead_letter_key: str, last_id: str) -> int:
    """Delete every entry up to and including `last_id`; entries dead-lettered since stay."""
    ms, _, seq = last_id.partition("-")
    return int(await client.xtrim(dead_letter_key, minid=f"{ms}-{int(seq) + 1}", approximate=False))
