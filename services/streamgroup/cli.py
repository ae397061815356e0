"""`streamgroup status`: the state of a stream and group at a glance (like kafka-consumer-groups --describe)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup import groupstats
from streamgroup.connection import check_server, create_client
from streamgroup.errors import EXIT_UNEXPECTED, ConfigError, RedisRefusedError
from streamgroup.keys import StreamKeys
from streamgroup.settings import load_settings

EXIT_UNREACHABLE = 4


def _format_table(stats: groupstats.GroupStats) -> str:
    lag = "unknown" if stats.lag is None else str(stats.lag)
    lines = [
        f"stream            {stats.stream}",
        f"group             {stats.group}{'' if stats.group_exists else ' (does not exist)'}",
        f"stream length     {stats.stream_length}",
        f"lag               {lag}",
        f"pending           {stats.pending}",
        f"oldest pending    {stats.oldest_pending_age_seconds:.1f}s"
        + (f" ({stats.oldest_pending_id})" if stats.oldest_pending_id else ""),
        f"dead letters      {stats.dead_letter_length}",
        "",
        f"{'CONSUMER':<40} {'PENDING':>8} {'IDLE':>10}",
    ]
    lines += [f"{c.name:<40} {c.pending:>8} {c.idle_seconds:>9.1f}s" for c in stats.consumers]
    if not stats.consumers:
        lines.append("(no consumers)")
    return "\n".join(lines)


async def _status(args: argparse.Namespace) -> int:
    settings = load_settings()
    overrides = {name: value for name, value in (("stream", args.stream), ("group", args.group)) if value}
    # Through the settings, so the dead-letter stream follows --stream by the services' own rule.
    keys = StreamKeys.from_settings(settings.model_copy(update=overrides))
    client = create_client(settings)
    try:
        await check_server(client)
        stats = await groupstats.collect(client, keys)
    finally:
        await client.aclose()
    print(json.dumps(stats.as_dict(), indent=2) if args.json else _format_table(stats))
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="streamgroup", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="show stream length, lag, pending and consumers of a group")
    status.add_argument("--stream", help="stream key (default: STREAMGROUP_STREAM)")
    status.add_argument("--group", help="group name (default: STREAMGROUP_GROUP)")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    try:
        code = asyncio.run(_status(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"streamgroup: configuration error: {problem}", file=sys.stderr)
        code = exc.exit_code
    except RedisRefusedError as exc:
        print(f"streamgroup: {exc}", file=sys.stderr)
        code = exc.exit_code
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        print(f"streamgroup: cannot reach redis: {exc}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except Exception as exc:  # a CLI prints one line, not a traceback
        print(f"streamgroup: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
