"""The consumer's reads: XREADGROUP on a connection of its own, sent before the reply is needed.

Sending the next read before handling the batch in hand lets Redis fill it meanwhile, and the
acknowledgements due so far go out in the same write. redis-py's pipeline does a round trip in one
await, and its per-call bookkeeping cost more CPU than everything else on the consumer's read path.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup.keys import StreamKeys
from streamgroup.message import Entry
from streamgroup.streams import entries_of, raise_if_wrong_type


@dataclass(slots=True)
class _Request:
    acks: list[str]  # acknowledged by this request's XACK, if any
    sent_at: float
    replies: int
    deadline_seconds: float  # for its reply, from when it is awaited


class GroupReader:
    """Reads for one consumer and acknowledges on the way: ids passed to acknowledge() ride with
    the next read, and count as acknowledged (on_acked) only once its reply came back. Reads may
    be sent before the reply to the previous one was taken; replies come back in order."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: StreamKeys,
        consumer: str,
        count: int,
        on_acked: Callable[[Sequence[str], float], None],
        timeout_seconds: float,
    ) -> None:
        self._pool = client.connection_pool
        self._keys, self._consumer, self._count = keys, consumer, count
        self._timeout = timeout_seconds
        self._on_acked = on_acked
        self._connection: AbstractConnection | None = None
        self._due: list[str] = []
        self._in_flight: deque[_Request] = deque()

    @property
    def reads_in_flight(self) -> int:
        return len(self._in_flight)

    def acknowledge(self, ids: Sequence[str]) -> None:
        self._due.extend(ids)

    async def send(self, start: str, block_ms: int | None) -> None:
        keys, acks = self._keys, self._due
        commands: list[tuple] = [("XACK", keys.stream, keys.group, *acks)] if acks else []
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        commands.append(
            ("XREADGROUP", "GROUP", keys.group, self._consumer, "COUNT", self._count, *block,
             "STREAMS", keys.stream, start)
        )  # fmt: skip
        if self._connection is None:
            self._connection = await self._pool.get_connection()
        connection = self._connection
        self._due = []
        # The acknowledgements take effect before a read that may block: that is when their latency ends.
        request = _Request(acks, time.time(), len(commands), self._timeout + (block_ms or 0) / 1000.0)
        self._in_flight.append(request)
        try:
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except BaseException:
            await self._failed()
            raise

    async def receive(self) -> list[Entry]:
        """The entries of the oldest read in flight; raises what Redis or the connection raised."""
        connection = self._connection
        assert connection is not None and self._in_flight, "nothing was sent"
        request = self._in_flight[0]
        try:
            async with asyncio.timeout(request.deadline_seconds):
                while request.replies > 1:
                    await connection.read_response(timeout=math.inf)
                    request.replies -= 1
                reply = await connection.read_response(timeout=math.inf)
        except BaseException as exc:
            await self._failed()
            if isinstance(exc, ResponseError):
                raise_if_wrong_type(exc, self._keys.stream)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {request.deadline_seconds:g} s") from exc
            raise
        self._in_flight.popleft()
        if request.acks:
            self._on_acked(request.acks, request.sent_at)
        return entries_of(reply)

    async def _failed(self) -> None:
        """Acknowledgements not known to be applied go again with the next read. The connection
        may still owe replies, so it is never used again."""
        self._due[:0] = [entry_id for request in self._in_flight for entry_id in request.acks]
        self._in_flight.clear()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)

    async def close(self) -> list[str]:
        """Take the replies still owed (their acknowledgements count), give the connection back,
        and return the ids whose acknowledgement was never sent."""
        with contextlib.suppress(Exception):  # on failure the ids are due again; the caller sends them
            while self._in_flight:
                await self.receive()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)
        due, self._due = self._due, []
        return due
