"""`make run`: an embedded Valkey (unless STREAMGROUP_REDIS_URL is set), one producer, three
consumers and the reclaimer as separate processes, with console logs. The consumers run a quiet
handler (`noop`, unless STREAMGROUP_HANDLER names another) and this prints one progress line every
few seconds, read from Redis, so the services' URLs stay on screen. Ctrl-C stops all of them and
prints a summary."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from streamgroup import groupstats
from streamgroup.devserver import DevServer, free_port
from streamgroup.keys import read_shards
from streamgroup.settings import load_settings
from streamgroup.topology import create_client

CONSUMERS = 3
DEMO_DEFAULTS = {
    "STREAMGROUP_LOG_FORMAT": "console",
    "STREAMGROUP_PRODUCERS": "10",
    "STREAMGROUP_PRODUCER_INTERVAL_MS": "1000",
    "STREAMGROUP_CLAIM_MIN_IDLE_MS": "10000",
    "STREAMGROUP_RECLAIM_INTERVAL_MS": "2000",
    # One log line per message would scroll everything else away; the progress line says it all.
    "STREAMGROUP_HANDLER": "streamgroup.handlers:noop",
}
PROGRESS_EVERY_SECONDS = 5.0


def _spawn(module: str, name: str, env: dict[str, str]) -> subprocess.Popen:
    port = free_port()
    child_env = env | {"STREAMGROUP_CONSUMER_NAME": name, "STREAMGROUP_METRICS_PORT": str(port)}
    print(f"  {name:<12} python -m {module:<24} metrics http://127.0.0.1:{port}/metrics")
    # Own process group: the terminal's Ctrl-C reaches only us, and we stop the children in order.
    return subprocess.Popen([sys.executable, "-m", module], env=child_env, start_new_session=True)


@dataclass(frozen=True, slots=True)
class Totals:
    produced: int
    processed: int
    pending: int
    lag: int | None
    dead_letters: int


async def _totals(env: dict[str, str]) -> Totals:
    os.environ.update(env)
    settings = load_settings()
    client = await create_client(settings)
    try:
        shards = read_shards(settings)  # with STREAMGROUP_SHARDS, all of them added up
        each = [await groupstats.collect(client, keys) for keys in shards]
        stats = groupstats.combine(settings.stream, settings.group, each)
        infos = [await client.xinfo_stream(k.stream) for k in shards] if stats.group_exists else []
    finally:
        await client.aclose()
    produced = sum(int(info["entries-added"]) for info in infos) if infos else stats.stream_length
    # Read by the group and no longer pending: acknowledged, or moved to the dead-letter stream.
    processed = (stats.entries_read or 0) - stats.pending
    return Totals(produced, processed, stats.pending, stats.lag, stats.dead_letter_length)


def _progress(env: dict[str, str], before: Totals | None, seconds: float) -> tuple[str, Totals | None]:
    try:
        now = asyncio.run(_totals(env))
    except Exception as exc:  # Redis busy or away: say so, try again next time
        return f"progress: unavailable ({type(exc).__name__}: {exc})", before
    rate = "" if before is None else f" ({(now.processed - before.processed) / seconds:.1f}/s)"
    line = (
        f"{time.strftime('%H:%M:%S')} progress: produced {now.produced}, processed {now.processed}{rate}, "
        f"lag {now.lag if now.lag is not None else 'unknown'}, pending {now.pending}, "
        f"dead letters {now.dead_letters}"
    )
    return line, now


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C, and a plain `kill` too, stop the stack in order; a shell that started us in the
    # background may have left SIGINT ignored, so set both explicitly.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    env = {**DEMO_DEFAULTS, **os.environ}
    server = None
    if "STREAMGROUP_REDIS_URL" not in os.environ:
        server = DevServer("valkey").start()
        env["STREAMGROUP_REDIS_URL"] = server.url
        print(f"embedded Valkey on {server.url} (data in {server.directory})")
    print("starting (Ctrl-C stops everything):")
    children = [_spawn("streamgroup_reclaimer", "reclaimer", env)]
    children += [_spawn("streamgroup_consumer", f"consumer-{i}", env) for i in range(1, CONSUMERS + 1)]
    children.append(_spawn("streamgroup_producer", "producer", env))
    print(f"progress every {PROGRESS_EVERY_SECONDS:g}s; in another terminal: streamgroup status --watch")
    try:
        totals, last = None, time.monotonic()
        while not any(child.poll() not in (None, 0) for child in children):
            time.sleep(0.5)
            if time.monotonic() - last >= PROGRESS_EVERY_SECONDS:
                line, totals = _progress(env, totals, time.monotonic() - last)
                last = time.monotonic()
                print(line, flush=True)
        print("a service failed; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        print("\nstopping: producer first, then consumers and reclaimer")
    producer, consumers, reclaimer = children[-1:], children[1:-1], children[:1]
    for stage in (producer, consumers, reclaimer):  # stop the inflow first, the reclaimer last
        for child in stage:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in stage:
            child.wait()
    codes = [child.returncode for child in children]
    try:
        final = asyncio.run(_totals(env))
        print(
            f"summary: produced {final.produced}, processed {final.processed}, pending {final.pending}, "
            f"lag {final.lag}, dead letters {final.dead_letters}"
        )
    finally:
        if server is not None:
            server.close()  # and its temporary data directory with it
    sys.exit(0 if all(code == 0 for code in codes) else 1)


if __name__ == "__main__":
    main()
