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
from collections.abc import Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup.keys import StreamKeys
from streamgroup.message import Entry
from streamgroup.streams import entries_of, raise_if_wrong_type


class GroupReader:
    """Reads for one consumer and acknowledges on the way: ids passed to acknowledge() ride with
    the next read, and count as acknowledged (on_acked) only once its reply came back."""

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
        self._sent_acks: list[str] = []
        self._sent_at = 0.0
        self._reply_deadline_seconds = timeout_seconds
        self._replies_owed = 0

    @property
    def awaiting_reply(self) -> bool:
        return self._replies_owed > 0

    def acknowledge(self, ids: Sequence[str]) -> None:
        self._due.extend(ids)

    async def send(self, start: str, block_ms: int | None) -> None:
        if self._replies_owed:
            raise RuntimeError("the previous read's reply was not taken")
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
        self._due, self._sent_acks = [], acks
        self._reply_deadline_seconds = self._timeout + (block_ms or 0) / 1000.0
        # The acknowledgements take effect before a read that may block: that is when their latency ends.
        self._sent_at = time.time()
        try:
            await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        except BaseException:
            await self._failed()
            raise
        self._replies_owed = len(commands)

    async def receive(self) -> list[Entry]:
        """The entries the read sent last returned; raises what Redis or the connection raised."""
        connection = self._connection
        assert connection is not None and self._replies_owed, "nothing was sent"
        try:
            async with asyncio.timeout(self._reply_deadline_seconds):
                while self._replies_owed > 1:
                    await connection.read_response(timeout=math.inf)
                    self._replies_owed -= 1
                reply = await connection.read_response(timeout=math.inf)
            self._replies_owed = 0
        except BaseException as exc:
            await self._failed()
            if isinstance(exc, ResponseError):
                raise_if_wrong_type(exc, self._keys.stream)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {self._reply_deadline_seconds:g} s") from exc
            raise
        acks, self._sent_acks = self._sent_acks, []
        if acks:
            self._on_acked(acks, self._sent_at)
        return entries_of(reply)

    async def _failed(self) -> None:
        """The acknowledgements may not have been applied: they go again with the next read. The
        connection may still owe replies, so it is never used again."""
        self._due[:0] = self._sent_acks
        self._sent_acks, self._replies_owed = [], 0
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.disconnect(nowait=True)
            await self._pool.release(connection)

    async def close(self) -> list[str]:
        """Take any reply still owed (its acknowledgements count), give the connection back, and
        return the ids whose acknowledgement was never sent."""
        if self._replies_owed:
            with contextlib.suppress(Exception):  # on failure the ids are due again; the caller sends them
                await self.receive()
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await self._pool.release(connection)
        due, self._due = self._due, []
        return due
