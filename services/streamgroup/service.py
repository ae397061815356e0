"""What the three services share at run time: settings, logging, metrics endpoint, signals,
connecting (and reconnecting) to Redis, and turning failures into distinct exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup.backoff import Backoff
from streamgroup.connection import check_server, create_client
from streamgroup.errors import EXIT_OK, EXIT_UNEXPECTED, ConfigError, RedisRefusedError
from streamgroup.health import start_http_server
from streamgroup.keys import StreamKeys
from streamgroup.logs import configure_logging, get_logger
from streamgroup.metrics import Metrics
from streamgroup.settings import Settings, load_settings

log = get_logger("streamgroup.service")

TRANSIENT_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    ReadOnlyError,
)
TRANSIENT_REPLIES = ("NOGROUP", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


@dataclass
class Service:
    """The running process: its settings, Redis client, metrics and shutdown state."""

    name: str
    settings: Settings
    keys: StreamKeys
    metrics: Metrics
    client: aioredis.Redis
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    grace_expired: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: bool = False
    liveness_checks: list[Callable[[], bool]] = field(default_factory=list)

    def add_liveness_check(self, check: Callable[[], bool]) -> None:
        """A check that /healthz runs: when one is false, the process asks to be restarted."""
        self.liveness_checks.append(check)

    def live(self) -> bool:
        return all(check() for check in self.liveness_checks)

    def request_stop(self, reason: str) -> None:
        if self.stopping.is_set():
            log.info("already stopping", signal=reason)
            return
        grace = self.settings.shutdown_grace_seconds
        log.info("stopping: finishing in-flight work", signal=reason, grace_seconds=grace)
        self.stopping.set()
        asyncio.get_running_loop().call_later(grace, _resolve, self.grace_expired)

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early when the service is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Worker(Protocol):
    async def run(self) -> None:
        """Work until service.stopping is set, then return. Called again after a reconnect."""

    async def close(self) -> None:
        """Last words before exit (hand-off of anything still held)."""


def run(name: str, make_worker: Callable[[Service], Worker], group_metrics: bool = False) -> NoReturn:
    """Entry point body of every service: never returns, exits with a code that tells what happened."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        _print_config_errors(name, exc)
        sys.exit(exc.exit_code)
    configure_logging(settings.log_format, settings.log_level, service=name, consumer=settings.consumer_name)
    try:
        code = asyncio.run(_main(name, settings, make_worker, group_metrics))
        # Closing the loop restored the default handlers: a second SIGTERM arriving now must not
        # turn a clean exit into death by signal.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    except ConfigError as exc:  # found while starting, e.g. a handler that cannot be loaded
        _print_config_errors(name, exc)
        code = exc.exit_code
    _exit(code)


def _print_config_errors(name: str, exc: ConfigError) -> None:
    for problem in exc.problems:
        print(f"{name}: configuration error: {problem}", file=sys.stderr)


def _exit(code: int) -> NoReturn:
    logging.shutdown()
    if threading.active_count() > 1:
        # A sync handler abandoned at the end of the grace period is still running on its thread;
        # waiting for it would break the bounded shutdown, and its message is still pending.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


async def _main(name: str, settings: Settings, make_worker: Callable[[Service], Worker], group_metrics: bool) -> int:
    keys = StreamKeys.from_settings(settings)
    metrics = Metrics(keys.stream, keys.group, group_level=group_metrics)
    service = Service(name, settings, keys, metrics, create_client(settings))
    worker = make_worker(service)
    # Each batch makes thousands of short-lived objects that reference counting frees; keep the
    # cyclic collector from re-scanning everything loaded at start-up that often (it cost a quarter
    # of the consumer's CPU at full speed, see docs/benchmarks.md).
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.request_stop, signal.Signals(signum).name)
    http = None
    if settings.metrics_port:
        http = await start_http_server(
            settings.metrics_port, service.metrics.registry, lambda: service.ready, is_live=service.live
        )
    log.info(
        "starting",
        redis=settings.redis_url_redacted,
        stream=keys.stream,
        group=keys.group,
        metrics_port=settings.metrics_port,
    )
    try:
        code = await _serve(service, worker)
        if code == EXIT_OK:
            await _close(service, worker)
        return code
    finally:
        if http is not None:
            http.close()
        await service.client.aclose()
        log.info("stopped")


async def _close(service: Service, worker: Worker) -> None:
    try:
        await worker.close()
    except TRANSIENT_ERRORS as exc:
        log.warning("could not hand off before exit; the reclaimer will take over", error=str(exc))


async def _serve(service: Service, worker: Worker) -> int:
    backoff = Backoff()
    while not service.stopping.is_set():
        try:
            server = await check_server(service.client)
            _set_ready(service, True)
            log.info("connected to redis", server=server)
            backoff.reset()
            await worker.run()
        except (AuthenticationError, AuthorizationError, NoPermissionError) as exc:
            return _refused(RedisRefusedError(f"Redis refused us: {exc}"))
        except RedisRefusedError as exc:
            return _refused(exc)
        except TRANSIENT_ERRORS + (ResponseError,) as exc:
            if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
                keys = service.keys
                return _refused(
                    RedisRefusedError(f"key {keys.stream!r} or {keys.dead_letter!r} exists and is not a stream: {exc}")
                )
            if isinstance(exc, ResponseError) and not str(exc).startswith(TRANSIENT_REPLIES):
                log.exception("unexpected reply from redis")
                return EXIT_UNEXPECTED
            _set_ready(service, False)
            delay = backoff.next_delay()
            log.warning(
                "redis unavailable; retrying",
                error=str(exc) or type(exc).__name__,
                retry_in_seconds=round(delay, 2),
                attempt=backoff.attempt,
            )
            await service.sleep(delay)
    return EXIT_OK


def _set_ready(service: Service, ready: bool) -> None:
    service.ready = ready
    service.metrics.redis_connected.set(1 if ready else 0)


def _refused(exc: RedisRefusedError) -> int:
    log.error("redis refused; not retrying", error=str(exc))
    return exc.exit_code
