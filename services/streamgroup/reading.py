"""The consumer's reads: XREADGROUP on a connection of its own, sent before the reply is needed.

Sending the next read before handling the batch in hand lets Redis fill it meanwhile, and the
acknowledgements due so far go out in the same write (or alone, with flush(), when no read is
about to go out: they never wait for one). redis-py's pipeline does a round trip in one
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
    acks: list[str]  # acknowledged by this request's XACK (sent first), if any; emptied once its reply is in
    sent_at: float
    reads: bool  # False: a bare XACK
    deadline_seconds: float  # for its replies, from when they are awaited


class GroupReader:
    """Reads for one consumer and acknowledges on the way: ids passed to acknowledge() go out with
    the next read, or on their own with flush(); they count as acknowledged (on_acked, with the
    number Redis acknowledged) once the XACK's reply came back. Reads may be sent before the reply
    to the previous one was taken; replies come back in order."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: StreamKeys,
        consumer: str,
        count: int,
        on_acked: Callable[[Sequence[str], float, int], None],
        timeout_seconds: float,
    ) -> None:
        self._pool = client.connection_pool
        self._keys, self._consumer, self._count = keys, consumer, count
        self._timeout = timeout_seconds
        self._on_acked = on_acked
        self._connection: AbstractConnection | None = None
        self._due: list[str] = []
        self._in_flight: deque[_Request] = deque()
        self._reads_in_flight = 0

    @property
    def reads_in_flight(self) -> int:
        return self._reads_in_flight

    def acknowledge(self, ids: Sequence[str]) -> None:
        self._due.extend(ids)

    async def send(self, start: str, block_ms: int | None, count: int | None = None) -> None:
        """Send a read of up to `count` entries (default: the batch size) after `start`, with the
        acknowledgements due so far in the same write, applied before the read."""
        keys = self._keys
        block = ("BLOCK", block_ms) if block_ms is not None else ()
        read = ("XREADGROUP", "GROUP", keys.group, self._consumer, "COUNT", count or self._count, *block,
                "STREAMS", keys.stream, start)  # fmt: skip
        await self._send(read, self._timeout + (block_ms or 0) / 1000.0)

    async def flush(self) -> None:
        """Send the acknowledgements due now, on their own (no read is about to go out)."""
        if self._due:
            await self._send(None, self._timeout)

    async def _send(self, read: tuple | None, deadline_seconds: float) -> None:
        acks, self._due = self._due, []
        commands: list[tuple] = [("XACK", self._keys.stream, self._keys.group, *acks)] if acks else []
        if read is not None:
            commands.append(read)
        if self._connection is None:
            self._connection = await self._pool.get_connection()
        connection = self._connection
        self._in_flight.append(_Request(acks, time.time(), read is not None, deadline_seconds))
        self._reads_in_flight += read is not None
        try:
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except BaseException:
            await self._failed()
            raise

    async def receive(self) -> list[Entry]:
        """The entries of the oldest read in flight (taking the replies to bare acknowledgements
        sent before it); raises what Redis or the connection raised."""
        assert self._reads_in_flight, "no read was sent"
        while True:
            request = self._in_flight[0]
            reply = await self._take_replies(request)
            self._in_flight.popleft()
            if request.reads:
                self._reads_in_flight -= 1
                return entries_of(reply)

    async def _take_replies(self, request: _Request) -> object:
        connection = self._connection
        assert connection is not None
        try:
            async with asyncio.timeout(request.deadline_seconds):
                if request.acks:
                    acknowledged = await connection.read_response(timeout=math.inf)
                    acks, request.acks = request.acks, []
                    self._on_acked(acks, request.sent_at, int(acknowledged))
                return await connection.read_response(timeout=math.inf) if request.reads else None
        except BaseException as exc:
            await self._failed()
            if isinstance(exc, ResponseError):
                raise_if_wrong_type(exc, self._keys.stream)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {request.deadline_seconds:g} s") from exc
            raise

    async def _failed(self) -> None:
        """Acknowledgements not known to be applied go again with the next read (acknowledging an
        id twice is harmless: the second XACK answers 0). The connection may still owe replies, so
        it is never used again."""
        self._due[:0] = [entry_id for request in self._in_flight for entry_id in request.acks]
        self._in_flight.clear()
        self._reads_in_flight = 0
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)

    async def close(self) -> list[str]:
        """Take the replies still owed (their acknowledgements count), give the connection back,
        and return the ids whose acknowledgement was never applied."""
        with contextlib.suppress(Exception):  # on failure the ids are due again; the caller sends them
            while self._in_flight:
                await self._take_replies(self._in_flight[0])
                self._reads_in_flight -= self._in_flight.popleft().reads
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)
        due, self._due = self._due, []
        return due
