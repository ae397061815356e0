"""A small asyncio HTTP server for /metrics, /healthz and /readyz, on the service's own event loop.

Living on the service's loop is deliberate: if the loop is stuck, /healthz stops answering and the
liveness probe notices. A worker can add its own liveness predicate (is_live), e.g. "the
handler pool is not wedged", to turn /healthz into 503 as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest


def _always_live() -> bool:
    return True


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def start_http_server(
    port: int,
    registry: CollectorRegistry,
    is_ready: Callable[[], bool],
    host: str = "0.0.0.0",
    is_live: Callable[[], bool] = _always_live,
) -> asyncio.Server:
    """/healthz answers 503 when is_live() is false (the loop runs but the process is stuck, e.g.
    handler threads hang): the liveness probe then restarts it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (
                b"\r\n",
                b"\n",
                b"",
            ):
                pass
            parts = request_line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else "/"
            if path == "/metrics":
                reply = _response("200 OK", generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                live = is_live()
                reply = _response("200 OK" if live else "503 Service Unavailable", b"ok\n" if live else b"not live\n")
            elif path == "/readyz":
                ready = is_ready()
                reply = _response(
                    "200 OK" if ready else "503 Service Unavailable",
                    b"ready\n" if ready else b"not ready\n",
                )
            else:
                reply = _response("404 Not Found", b"not found\n")
            writer.write(reply)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, host, port)
