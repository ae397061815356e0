"""`streamgroup`: the operator's command line. It reads the same STREAMGROUP_* variables as the
services (--stream and --group override theirs).

  status         the stream, its group, consumers and reclaimer at a glance (like
                 kafka-consumer-groups --describe); --watch refreshes it
  dead-letters   list, show, replay into the source stream, or purge dead-lettered entries

Exit codes: 0 done, 1 unexpected error or not confirmed, 2 bad configuration or usage (also: a
change that needs confirmation and has no terminal to ask on), 3 Redis refused us, 4 Redis
unreachable, 5 the stream, group or named dead-letter entry does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup import deadletters, groupstats
from streamgroup.connection import check_server
from streamgroup.errors import EXIT_CONFIG, EXIT_UNEXPECTED, ConfigError, RedisRefusedError
from streamgroup.keys import StreamKeys
from streamgroup.settings import Settings, load_settings
from streamgroup.topology import CLUSTER_OUTAGES, create_client

EXIT_UNREACHABLE = 4
EXIT_NOT_FOUND = 5
NOTHING = "–"  # shown where a number would mislead (no pending entry has no age)
# The chart's reclaimer pods are named <release>-streamgroup-reclaimer-<hash>-<suffix> (their
# consumer name is the pod name), and `make run` names it "reclaimer".
RECLAIMER_PATTERN = "*reclaimer*"


class CommandError(Exception):
    """Ends the command with one line on stderr and the given exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- formatting


def duration(seconds: float) -> str:
    """4.2s, 3m 12s, 2h 05m, 3d 04h: short enough for a table column."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def _split_reclaimers(
    consumers: list[groupstats.ConsumerStats], pattern: str
) -> tuple[list[groupstats.ConsumerStats], list[groupstats.ConsumerStats]]:
    reclaimers = [c for c in consumers if fnmatch.fnmatchcase(c.name, pattern)]
    return [c for c in consumers if c not in reclaimers], reclaimers


def _status_table(stats: groupstats.GroupStats, reclaimer_pattern: str) -> str:
    lag = "unknown" if stats.lag is None else str(stats.lag)
    age = duration(stats.oldest_pending_age_seconds)
    oldest = f"{age} ({stats.oldest_pending_id})" if stats.pending else NOTHING
    lines = [
        f"stream            {stats.stream}",
        f"group             {stats.group}{'' if stats.group_exists else ' (does not exist)'}",
        f"stream length     {stats.stream_length}",
        f"lag               {lag}",
        f"pending           {stats.pending}",
        f"oldest pending    {oldest}",
        f"dead letters      {stats.dead_letter_length}",
    ]
    consumers, reclaimers = _split_reclaimers(stats.consumers, reclaimer_pattern)
    for title, rows, empty in (
        ("CONSUMER", consumers, "(no consumers)"),
        ("RECLAIMER", reclaimers, "(no reclaimer has claimed for this group yet)"),
    ):
        lines += ["", f"{title:<40} {'PENDING':>8} {'IDLE':>10}"]
        lines += [f"{c.name:<40} {c.pending:>8} {duration(c.idle_seconds):>10}" for c in rows]
        if not rows:
            lines.append(empty)
    return "\n".join(lines)


def _status_json(stats: groupstats.GroupStats, reclaimer_pattern: str) -> str:
    document = stats.as_dict()
    if not stats.pending:
        document["oldest_pending_age_seconds"] = None
    consumers, reclaimers = _split_reclaimers(stats.consumers, reclaimer_pattern)
    document["consumers"] = [asdict(c) for c in consumers]
    document["reclaimers"] = [asdict(c) for c in reclaimers]
    return json.dumps(document, indent=2)


# ----------------------------------------------------------------------------- status


def _missing(stats: groupstats.GroupStats) -> str | None:
    if stats.group_exists:
        return None
    if not stats.stream_exists:
        return f"stream {stats.stream!r} does not exist"
    return f"group {stats.group!r} does not exist on stream {stats.stream!r}"


async def status(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    if args.watch is not None:
        return await _watch(client, keys, args)
    stats = await groupstats.collect(client, keys)
    print(_status_json(stats, args.reclaimer) if args.json else _status_table(stats, args.reclaimer))
    problem = _missing(stats)
    if problem:
        raise CommandError(problem, EXIT_NOT_FOUND)
    return 0


async def _watch(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C. A Redis that stops answering is shown, not fatal: watching a drain
    through a failover should not need a restart."""
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    while True:
        stamp = datetime.now(UTC).strftime("%H:%M:%S UTC")
        try:
            stats = await groupstats.collect(client, keys)
            body = _status_json(stats, args.reclaimer) if args.json else _status_table(stats, args.reclaimer)
            problem = _missing(stats)
            if problem:
                body += f"\n\nnote: {problem}"
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            body = f"cannot reach redis: {exc}"
        print(f"{clear}every {args.watch:g}s, {stamp} (Ctrl-C stops)\n{body}\n", flush=True)
        await asyncio.sleep(args.watch)


# ----------------------------------------------------------------------------- dead letters


def _confirm(question: str, args: argparse.Namespace) -> None:
    """Ask on the terminal; refuse when there is none (a script must say --yes)."""
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandError(f"{question} Not done: there is no terminal to confirm on; pass --yes.", EXIT_CONFIG)
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise CommandError("not confirmed; nothing changed", EXIT_UNEXPECTED)


def _require_selection(args: argparse.Namespace, verb: str) -> None:
    if args.ids and args.all:
        raise CommandError(f"{verb}: name entries by ID or use --all, not both", EXIT_CONFIG)
    if not (args.ids or args.all or args.match is not None):
        raise CommandError(f"{verb}: say which entries: IDs, --all, or --match TEXT", EXIT_CONFIG)


async def _selected(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace):
    entries, missing = await deadletters.select(client, keys.dead_letter, args.ids, args.match)
    if missing:
        raise CommandError(f"not in {keys.dead_letter}: {', '.join(missing)}; nothing changed", EXIT_NOT_FOUND)
    return entries


async def dead_letters_list(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    now = time.time()
    if args.json:
        entries = [entry.as_dict(now) async for entry in deadletters.scan(client, keys.dead_letter)]
        print(json.dumps(entries, indent=2))
        return 0
    print(f"{'ID':<20} {'ORIGINAL ID':<20} {'DELIVERIES':>10} {'AGE':>9}  ERROR")
    count = 0
    async for entry in deadletters.scan(client, keys.dead_letter):
        error = entry.error.replace("\n", " ")
        error = error if len(error) <= 100 else error[:99] + "…"
        deliveries = NOTHING if entry.deliveries is None else str(entry.deliveries)
        original = entry.original_id or NOTHING
        print(f"{entry.id:<20} {original:<20} {deliveries:>10} {duration(entry.age_seconds(now)):>9}  {error}")
        count += 1
    print(f"({count} in {keys.dead_letter})")
    return 0


async def dead_letters_show(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    entries, missing = await deadletters.fetch(client, keys.dead_letter, [args.id])
    if missing:
        raise CommandError(f"{args.id} is not in {keys.dead_letter}", EXIT_NOT_FOUND)
    entry = entries[0]
    if args.json:
        print(json.dumps(entry.as_dict(), indent=2))
        return 0
    print(f"id                {entry.id} (dead-lettered {duration(entry.age_seconds())} ago)")
    for i in range(0, len(entry.flat) - 1, 2):
        name, value = entry.flat[i], entry.flat[i + 1]
        try:
            shown = value.decode()
        except UnicodeDecodeError:
            shown = repr(value)  # not text: shown as Python bytes, so nothing is hidden
        print(f"{name.decode(errors='replace'):<17} {shown}")
    return 0


async def dead_letters_replay(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    _require_selection(args, "replay")
    entries = await _selected(client, keys, args)
    replayer = deadletters.Replayer(client, keys.dead_letter, keys.stream)
    if not entries:
        print("nothing to replay")
        return 0
    targets = sorted({replayer.target(entry) for entry in entries})
    if args.dry_run:
        for entry in entries:
            print(f"would replay {entry.id} (original {entry.original_id or NOTHING}) into {replayer.target(entry)}")
        print(f"dry run: {len(entries)} entries would be replayed into {', '.join(targets)}; nothing changed")
        return 0
    _confirm(f"Replay {len(entries)} entries from {keys.dead_letter} into {', '.join(targets)}?", args)
    counts = dict.fromkeys(deadletters.Outcome, 0)
    async for entry, outcome, new_id in replayer.replay(entries):
        counts[outcome] += 1
        if outcome is deadletters.Outcome.REPLAYED:
            print(f"replayed {entry.id} (original {entry.original_id or NOTHING}) as {replayer.target(entry)} {new_id}")
        elif outcome is deadletters.Outcome.EMPTY:
            print(f"kept {entry.id}: it has no original fields to replay (an entry deleted while pending)")
    summary = f"replayed {counts[deadletters.Outcome.REPLAYED]}"
    if counts[deadletters.Outcome.GONE]:
        summary += f", {counts[deadletters.Outcome.GONE]} already gone (replayed or purged meanwhile)"
    if counts[deadletters.Outcome.EMPTY]:
        summary += f", {counts[deadletters.Outcome.EMPTY]} kept (nothing to replay)"
    print(summary)
    return 0


async def dead_letters_purge(client: aioredis.Redis, keys: StreamKeys, args: argparse.Namespace) -> int:
    _require_selection(args, "purge")
    if args.all and args.match is None:
        newest = await client.xrevrange(keys.dead_letter, count=1)
        if not newest:
            print("nothing to purge")
            return 0
        last_id = newest[0][0].decode()
        count = await client.xlen(keys.dead_letter)
        _confirm(f"Delete all {count} entries of {keys.dead_letter} (up to {last_id}) for good?", args)
        # Up to the newest entry seen when asking: anything dead-lettered since then stays.
        deleted = await deadletters.purge_through(client, keys.dead_letter, last_id)
    else:
        entries = await _selected(client, keys, args)
        if not entries:
            print("nothing to purge")
            return 0
        _confirm(f"Delete {len(entries)} entries of {keys.dead_letter} for good?", args)
        deleted = await deadletters.purge(client, keys.dead_letter, [entry.id for entry in entries])
    print(f"purged {deleted} from {keys.dead_letter}")
    return 0


# ----------------------------------------------------------------------------- wiring

Command = Callable[[aioredis.Redis, StreamKeys, argparse.Namespace], Awaitable[int]]


async def _run(command: Command, args: argparse.Namespace) -> int:
    settings: Settings = load_settings()
    overrides = {name: getattr(args, name, None) for name in ("stream", "group")}
    # Through the settings, so the dead-letter stream follows --stream by the services' own rule.
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v})
    keys = StreamKeys.from_settings(settings)
    client = await create_client(settings)  # on a cluster, checks that these keys can work there
    try:
        await check_server(client)
        return await command(client, keys, args)
    finally:
        await client.aclose()


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"between 0.1 and 3600 seconds, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgroup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    status_parser = commands.add_parser("status", help="show stream length, lag, pending, consumers and reclaimer")
    status_parser.add_argument("--stream", help="stream key (default: STREAMGROUP_STREAM)")
    status_parser.add_argument("--group", help="group name (default: STREAMGROUP_GROUP)")
    status_parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    status_parser.add_argument(
        "--reclaimer",
        default=RECLAIMER_PATTERN,
        metavar="PATTERN",
        help=f"consumer names (shell pattern) shown as the reclaimer (default: {RECLAIMER_PATTERN!r}, "
        "which matches the chart's reclaimer pods and make run's)",
    )
    status_parser.add_argument(
        "--watch",
        nargs="?",
        type=_seconds,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    status_parser.set_defaults(handler=status)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--stream",
        default=argparse.SUPPRESS,  # given before or after the action, a subparser must not reset it
        help="the source stream; its dead-letter stream is STREAMGROUP_DEAD_LETTER_STREAM or <stream>:dead",
    )
    dead = commands.add_parser(
        "dead-letters", help="list, show, replay or purge dead-lettered entries", parents=[common]
    )
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", help="id, original id, deliveries, age and error of each entry", parents=[common]
    )
    listing.add_argument("--json", action="store_true", help="print JSON (the original fields too)")
    listing.set_defaults(handler=dead_letters_list)
    show = actions.add_parser("show", help="every field of one entry", parents=[common])
    show.add_argument("id", metavar="ID", help="the entry's id in the dead-letter stream")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=dead_letters_show)
    for name, handler, help_text in (
        ("replay", dead_letters_replay, "add entries back to their source stream (without x-streamgroup-* fields)"),
        ("purge", dead_letters_purge, "delete entries for good"),
    ):
        action = actions.add_parser(name, help=help_text, parents=[common])
        action.add_argument("ids", nargs="*", metavar="ID", help="dead-letter entry ids")
        action.add_argument("--all", action="store_true", help="every entry")
        action.add_argument("--match", metavar="TEXT", help="only entries whose x-streamgroup-error contains TEXT")
        action.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        if name == "replay":
            action.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
        action.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = asyncio.run(_run(args.handler, args))
    except KeyboardInterrupt:
        # Replay and purge change one entry at a time, atomically: running the command again
        # carries on where this one stopped.
        print("\nstreamgroup: interrupted", file=sys.stderr)
        code = 0 if args.command == "status" else 130
    except CommandError as exc:
        print(f"streamgroup: {exc}", file=sys.stderr)
        code = exc.exit_code
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"streamgroup: configuration error: {problem}", file=sys.stderr)
        code = exc.exit_code
    except RedisRefusedError as exc:
        print(f"streamgroup: {exc}", file=sys.stderr)
        code = exc.exit_code
    except (RedisConnectionError, RedisTimeoutError, OSError, *CLUSTER_OUTAGES) as exc:
        print(f"streamgroup: cannot reach redis: {exc}", file=sys.stderr)
        code = EXIT_UNREACHABLE
    except Exception as exc:  # a CLI prints one line, not a traceback
        print(f"streamgroup: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
