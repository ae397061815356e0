"""The one place a Redis client is made: URL, password file, TLS; and the server-version gate."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError
from redis.maint_notifications import MaintNotificationsConfig

from streamgroup.errors import RedisRefusedError
from streamgroup.redis_errors import REFUSED, classify, refusal_text
from streamgroup.settings import Settings, read_password_file

MIN_REDIS_VERSION = (7, 0)
MIN_VALKEY_VERSION = (7, 2)


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "decode_responses": False,  # fields may be binary; a bad entry must not break a whole read
        "health_check_interval": 30,
        "socket_connect_timeout": 5,
        # A peer that vanished without closing the connection (a partition, a dead node) is noticed
        # by this, not by TCP keepalive's two hours; the consumer's reads add BLOCK_MS to it.
        "socket_timeout": settings.redis_timeout_ms / 1000.0,
        # No retry inside redis-py: it cannot tell a command that never left from one whose reply
        # is merely late, and re-sending a script or XADD after a slow reply does it twice. A
        # pooled connection the server closed while idle is replaced by the pool before anything
        # is written to it (ConnectionPool.ensure_connection, see maint_notifications_config);
        # every other failure goes to the service's loop, which backs off, reports, and lets the
        # worker resume idempotently.
        "retry": Retry(NoBackoff(), 0),
        # redis-py 8 skips that check on checkout while maintenance notifications are on ("auto"
        # by default): a connection Redis closed while idle (its `timeout`) would then receive
        # the next command and fail. They only matter for Redis Enterprise/Cloud failovers.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    if urlsplit(settings.redis_url.get_secret_value()).scheme != "unix":
        options["socket_keepalive"] = True  # TCP only: redis-py 8's Unix socket connection rejects it
    if settings.redis_password_file is not None:
        options["password"] = read_password_file(settings.redis_password_file)
    if settings.redis_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_ca_file)
    if settings.redis_cert_file is not None and settings.redis_key_file is not None:
        options["ssl_certfile"] = str(settings.redis_cert_file)
        options["ssl_keyfile"] = str(settings.redis_key_file)
    return options


def create_client(settings: Settings) -> aioredis.Redis:
    options = client_options(settings)
    url = settings.redis_url.get_secret_value()
    if "password" in options:
        # redis-py lets the URL's password win over the keyword; the password file must win instead.
        url = url_without_password(url)
    client = aioredis.Redis.from_url(url, **options)
    for command in RAW_REPLIES:
        client.set_response_callback(command, as_sent)
    pool = client.connection_pool
    pool.connection_class = packing_in_c(pool.connection_class)
    return client


RAW_REPLIES = ("XAUTOCLAIM", "XCLAIM")  # parsed by streamgroup.streams, once (XREADGROUP: streamgroup.reading)


def as_sent(response: Any, **_options: Any) -> Any:
    return response


class _HiredisPacking:
    """redis.asyncio packs every command in Python; packing an XACK of 1,000 ids or a pipeline of
    500 XADDs that way cost the consumer and producer a sixth of their CPU. hiredis (a dependency)
    packs in C, as redis-py's synchronous client does when hiredis is installed."""

    def pack_command(self, *args: Any) -> list[bytes]:
        command = args[0]
        if isinstance(command, str):  # "XGROUP CREATE": subcommands go as separate arguments
            args = (*command.encode().split(), *args[1:])
        elif b" " in command:
            args = (*command.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError as exc:
            raise DataError(str(exc)) from exc


@functools.cache
def packing_in_c(connection_class: type) -> type:
    """The pool's connection class (TCP, TLS or Unix socket, as the URL chose) packing with hiredis."""
    return type(f"HiredisPacking{connection_class.__name__}", (_HiredisPacking, connection_class), {})


def url_without_password(url: str) -> str:
    """The URL with no password in its user part or query (the user name stays)."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hostport}" if at else parts.netloc
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2])


async def check_server(client: aioredis.Redis) -> str:
    """Return 'redis 7.0.15' or 'valkey 9.1.2'; raise RedisRefusedError on a server too old for us."""
    try:
        info = await client.info("server")
    except Exception as exc:
        if classify(exc) is REFUSED:
            raise RedisRefusedError(refusal_text(exc)) from exc
        raise
    name, version, problem = judge_server(info)
    if problem:
        raise RedisRefusedError(problem)
    return f"{name} {version}"


def judge_server(info: dict) -> tuple[str, str, str | None]:
    """(server name, version, why it is too old or None) from INFO server."""
    if "valkey_version" in info:
        name, version, minimum = "valkey", str(info["valkey_version"]), MIN_VALKEY_VERSION
    else:
        name, version, minimum = "redis", str(info["redis_version"]), MIN_REDIS_VERSION
    if _version(version) >= minimum:
        return name, version, None
    needed = ".".join(map(str, minimum))
    return (
        name,
        version,
        (
            f"{name} {version} is too old: streamgroup needs {name} >= {needed} "
            "(XAUTOCLAIM that drops deleted entries, lag in XINFO GROUPS)"
        ),
    )
