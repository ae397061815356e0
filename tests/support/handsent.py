"""Commands sent by hand on the connection of the node that serves a key, as the consumer's
GroupReader sends its pipelined XACK + XREADGROUP: the pattern it needs on a cluster."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from streamgroup.topology import KeyConnections

REPLY_TIMEOUT = 90.0


async def send_by_hand(
    connections: KeyConnections, key: str, commands: Sequence[tuple], redirects: list[str] | None = None
) -> object:
    """Send `commands` in one write on the node serving `key`; return the last reply. A MOVED,
    ASK or UNBLOCKED is followed (and its class noted in `redirects`); any other error is raised
    after the connection, which may still owe replies, is closed."""
    for _ in range(16):
        lease = await connections.acquire(key)
        connection = lease.connection
        prepared = lease.prepare(commands)
        try:
            await connection.send_packed_command(connection.pack_commands(prepared), check_health=False)
            async with asyncio.timeout(REPLY_TIMEOUT):  # a BLOCK longer than the socket timeout is fine
                replies = [await connection.read_response(timeout=math.inf) for _ in prepared]
        except BaseException as exc:
            await connections.release(lease, broken=True)
            if await connections.failed(exc):
                if redirects is not None:
                    redirects.append(type(exc).__name__ if not str(exc).startswith("UNBLOCKED") else "UNBLOCKED")
                continue
            raise
        await connections.release(lease)
        return replies[-1]
    raise AssertionError("redirected 16 times")


def read_command(key: str, group: str, consumer: str, start: str = ">", count: int = 100) -> tuple:
    return ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "STREAMS", key, start)


def ids_of(reply: object) -> list[str]:
    """Entry ids of a raw XREADGROUP reply for one stream (RESP2 or RESP3)."""
    if not reply:
        return []
    entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [entry[0].decode() for entry in entries]
