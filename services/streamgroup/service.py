"""What the three services share at run time: settings, logging, metrics endpoint, signals,
connecting (and reconnecting) to Redis, and turning failures into distinct exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

from streamgroup import topology
from streamgroup.backoff import Backoff
from streamgroup.connection import check_server
from streamgroup.errors import EXIT_OK, ConfigError, RedisRefusedError
from streamgroup.handlers import load_handler
from streamgroup.health import start_http_server
from streamgroup.keys import StreamKeys, read_shards
from streamgroup.logs import configure_logging, get_logger
from streamgroup.metrics import Metrics
from streamgroup.redis_errors import Verdict, classify, is_outage, refusal_text
from streamgroup.settings import Settings, load_settings

log = get_logger("streamgroup.service")

RECOVERED_AFTER_SECONDS = 1.0


@dataclass
class Service:
    """The running process: its settings, Redis client, metrics and shutdown state."""

    name: str
    settings: Settings
    keys: StreamKeys
    metrics: Metrics
    # Made by connect(): in auto mode creating it asks the server whether it is a cluster node.
    client: topology.Client = field(default=None)  # type: ignore[assignment]
    # The stream keys of every shard this process reads (streamgroup.keys.read_shards); with one
    # shard, just `keys`.
    shards: list[StreamKeys] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    grace_expired: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    ready: bool = False
    # Predicates a worker adds (e.g. "the handler pool is not wedged"); /healthz answers 503 when
    # one is false, so Kubernetes restarts the process.
    liveness_checks: list[Callable[[], bool]] = field(default_factory=list)

    def add_liveness_check(self, check: Callable[[], bool]) -> None:
        self.liveness_checks.append(check)

    def is_live(self) -> bool:
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


def run(
    name: str, make_worker: Callable[[Service], Worker], group_metrics: bool = False, handles_messages: bool = False
) -> NoReturn:
    """Entry point body of every service: never returns, exits with a code that tells what happened.
    `handles_messages`: the worker calls STREAMGROUP_HANDLER, which is imported here, so a handler
    that cannot be loaded is a configuration error at once, not once Redis answers."""
    try:
        settings = load_settings()
        if handles_messages:
            load_handler(settings.handler)
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
    shards = read_shards(settings)
    metrics = Metrics(keys.stream, keys.group, group_level=group_metrics, shards=[shard.shard for shard in shards])
    service = Service(name, settings, keys, metrics, shards=shards)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, service.request_stop, signal.Signals(signum).name)
    http = None
    if settings.metrics_port:
        http = await _start_http(service)
    log.info(
        "starting",
        redis=settings.redis_url_redacted,
        mode=settings.redis_mode,
        stream=keys.stream,
        group=keys.group,
        metrics_port=settings.metrics_port,
        **({"shards": [shard.stream for shard in shards]} if len(shards) > 1 else {}),
    )
    try:
        refused_or_stopped = await _connect(service)
        if refused_or_stopped is not None:
            return refused_or_stopped
        worker = make_worker(service)
        # Each batch makes thousands of short-lived objects that reference counting frees; keep the
        # cyclic collector from re-scanning everything loaded at start-up that often (it cost a
        # quarter of the consumer's CPU at full speed, see docs/benchmarks.md).
        gc.freeze()
        gc.set_threshold(10_000, 10, 10)
        code = await _serve(service, worker)
        if code == EXIT_OK:
            await _close(service, worker)
        return code
    finally:
        if http is not None:
            http.close()
        if service.client is not None:
            await service.client.aclose()
        log.info("stopped")


async def _connect(service: Service) -> int | None:
    """Make the client for the configured deployment (topology.create_client), waiting out an
    unreachable server with backoff, not ready, as any outage. A configuration that cannot work
    there (a stream and its dead-letter stream in different cluster slots) raises ConfigError:
    exit 2. None once connected; else the exit code (stopped first, or refused)."""
    backoff = Backoff()
    while not service.stopping.is_set():
        try:
            service.client = await topology.create_client(service.settings)
            return None
        except Exception as exc:
            verdict = classify(exc)
            if verdict is None:
                raise
            if verdict.refused:
                return _refused(service, exc)
            await _wait_out(service, exc, verdict, backoff)
    return EXIT_OK


async def _start_http(service: Service) -> asyncio.Server:
    port = service.settings.metrics_port
    try:
        return await start_http_server(port, service.metrics.registry, lambda: service.ready, is_live=service.is_live)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            problem = f"STREAMGROUP_METRICS_PORT: port {port} is already in use (choose another, or 0 for none)"
        else:
            problem = f"STREAMGROUP_METRICS_PORT: cannot listen on port {port}: {exc.strerror or exc}"
        raise ConfigError([problem]) from None


async def _close(service: Service, worker: Worker) -> None:
    try:
        await worker.close()
    except Exception as exc:
        if not is_outage(exc):
            raise
        log.warning("could not hand off before exit; the reclaimer will take over", error=str(exc))


async def _serve(service: Service, worker: Worker) -> int:
    """Run the worker; wait out every outage with backoff; return an exit code only when stopping
    or when Redis refuses us in a way no retry can change."""
    backoff = Backoff()
    loop = asyncio.get_running_loop()
    while not service.stopping.is_set():
        connected_at = None
        becoming_ready = None
        try:
            server = await check_server(service.client)
            connected_at = time.monotonic()
            if backoff.attempt == 0:
                _set_ready(service, True)
            else:
                # INFO answers during BUSY or OOM while the worker's first command fails at once:
                # ready again only once the worker has kept going for a moment, so readiness and
                # streamgroup_redis_connected do not flicker through an outage.
                becoming_ready = loop.call_later(RECOVERED_AFTER_SECONDS, _set_ready, service, True)
            log.info("connected to redis", server=server)
            await worker.run()
        except Exception as exc:
            if becoming_ready is not None:
                becoming_ready.cancel()
            verdict = classify(exc)
            if verdict is None:
                raise  # not a Redis failure: a bug, and a traceback says where
            if verdict.refused:
                return _refused(service, exc)
            _set_ready(service, False)
            if connected_at is not None and time.monotonic() - connected_at > backoff.cap_seconds:
                backoff.reset()  # it worked for a while: this is a new outage, start again quickly
            await _wait_out(service, exc, verdict, backoff)
    return EXIT_OK


async def _wait_out(service: Service, exc: Exception, verdict: Verdict, backoff: Backoff) -> None:
    """Count and report an outage, then sleep the backoff's next delay (waking early to stop)."""
    service.metrics.redis_errors[verdict.kind].inc()
    delay = backoff.next_delay()
    fields = {
        "error": str(exc) or type(exc).__name__,
        "kind": verdict.kind,
        "retry_in_seconds": round(delay, 2),
        "attempt": backoff.attempt,
    }
    if verdict.expected:
        log.warning("redis unavailable; retrying", **fields)
    else:
        # Exiting would restart us into the same reply (a crash loop): wait it out, loudly.
        log.error("unexpected reply from redis; treating it as an outage and retrying", exc_info=exc, **fields)
    await service.sleep(delay)


def _set_ready(service: Service, ready: bool) -> None:
    service.ready = ready
    service.metrics.redis_connected.set(1 if ready else 0)


def _refused(service: Service, exc: Exception) -> int:
    if "WRONGTYPE" in str(exc) and not isinstance(exc, RedisRefusedError):
        keys = service.keys
        error = f"key {keys.stream!r} or {keys.dead_letter!r} exists and is not a stream: {exc}"
    else:
        error = refusal_text(exc)
    log.error("redis refused; not retrying", error=error)
    return RedisRefusedError.exit_code
