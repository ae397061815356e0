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
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from streamgroup import deadletters, groupstats
from streamgroup.connection import check_server
from streamgroup.errors import EXIT_CONFIG, EXIT_UNEXPECTED, ConfigError, RedisRefusedError
from streamgroup.keys import StreamKeys, read_shards
from streamgroup.redis_errors import classify, refusal_text
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


@dataclass(frozen=True)
class Target:
    """What a command works on: one logical stream and group, and the keys of its shards (one
    shard: the stream's own keys)."""

    stream: str
    group: str
    shards: list[StreamKeys]

    @property
    def sharded(self) -> bool:
        return len(self.shards) > 1


def _status_table(stats: groupstats.GroupStats, reclaimer_pattern: str, shards: list[groupstats.GroupStats]) -> str:
    lag = "unknown" if stats.lag is None else str(stats.lag)
    age = duration(stats.oldest_pending_age_seconds)
    oldest = f"{age} ({stats.oldest_pending_id})" if stats.pending else NOTHING
    sharded = len(shards) > 1
    lines = [
        f"stream            {stats.stream}{f' ({len(shards)} shards)' if sharded else ''}",
        f"group             {stats.group}{'' if stats.group_exists else ' (does not exist)'}",
        f"stream length     {stats.stream_length}",
        f"lag               {lag}",
        f"pending           {stats.pending}",
        f"oldest pending    {age if sharded and stats.pending else oldest}",
        f"dead letters      {stats.dead_letter_length}",
    ]
    if sharded:
        lines += ["", f"{'SHARD':<6} {'STREAM KEY':<32} {'LENGTH':>9} {'LAG':>9} {'PENDING':>8} {'OLDEST PENDING':>30} "
                  f"{'DEAD':>6}"]  # fmt: skip
        for shard in shards:
            shard_lag = "unknown" if shard.lag is None else str(shard.lag)
            shard_oldest = (
                f"{duration(shard.oldest_pending_age_seconds)} ({shard.oldest_pending_id})"
                if shard.pending
                else NOTHING
            )
            missing = "" if shard.group_exists else "  (no group)"
            lines.append(
                f"{shard.shard:<6} {shard.stream:<32} {shard.stream_length:>9} {shard_lag:>9} {shard.pending:>8} "
                f"{shard_oldest:>30} {shard.dead_letter_length:>6}{missing}"
            )
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


def _stats_document(stats: groupstats.GroupStats, reclaimer_pattern: str) -> dict:
    document = stats.as_dict()
    if not stats.pending:
        document["oldest_pending_age_seconds"] = None
    consumers, reclaimers = _split_reclaimers(stats.consumers, reclaimer_pattern)
    document["consumers"] = [asdict(c) for c in consumers]
    document["reclaimers"] = [asdict(c) for c in reclaimers]
    return document


def _status_json(stats: groupstats.GroupStats, reclaimer_pattern: str, shards: list[groupstats.GroupStats]) -> str:
    """The whole (sums; for the oldest pending entry, the oldest of all) and, under "shards", each shard."""
    document = _stats_document(stats, reclaimer_pattern)
    document["shards"] = [_stats_document(shard, reclaimer_pattern) for shard in shards]
    return json.dumps(document, indent=2)


def _render(stats: groupstats.GroupStats, shards: list[groupstats.GroupStats], args: argparse.Namespace) -> str:
    return _status_json(stats, args.reclaimer, shards) if args.json else _status_table(stats, args.reclaimer, shards)


# ----------------------------------------------------------------------------- status


def _missing(target: Target, shards: list[groupstats.GroupStats]) -> str | None:
    for stats in shards:
        if stats.group_exists:
            continue
        if not stats.stream_exists:
            return f"stream {stats.stream!r} does not exist"
        return f"group {stats.group!r} does not exist on stream {stats.stream!r}"
    return None


async def _collect(client: aioredis.Redis, target: Target) -> tuple[groupstats.GroupStats, list[groupstats.GroupStats]]:
    shards = list(await asyncio.gather(*(groupstats.collect(client, keys) for keys in target.shards)))
    return groupstats.combine(target.stream, target.group, shards), shards


async def status(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    if args.watch is not None:
        return await _watch(client, target, args)
    stats, shards = await _collect(client, target)
    print(_render(stats, shards, args))
    problem = _missing(target, shards)
    if problem:
        raise CommandError(problem, EXIT_NOT_FOUND)
    return 0


async def _watch(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C. A Redis that stops answering is shown, not fatal: watching a drain
    through a failover should not need a restart."""
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    while True:
        stamp = datetime.now(UTC).strftime("%H:%M:%S UTC")
        try:
            stats, shards = await _collect(client, target)
            body = _render(stats, shards, args)
            problem = _missing(target, shards)
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


def _dead_letter_shards(target: Target, args: argparse.Namespace) -> list[StreamKeys]:
    """The shards named by --shard, or all."""
    shard = getattr(args, "shard", None)
    if shard is None:
        return target.shards
    if not 0 <= shard < len(target.shards):
        raise CommandError(f"--shard: there are shards 0 to {len(target.shards) - 1}, not {shard}", EXIT_CONFIG)
    return [target.shards[shard]]


async def _find(
    client: aioredis.Redis, shards: list[StreamKeys], ids: list[str], match: str | None
) -> list[tuple[StreamKeys, list[deadletters.DeadLetter]]]:
    """The selected entries of each shard's dead-letter stream. Named IDs must each be in exactly
    one of them (entry IDs of different streams can be equal: then --shard says which)."""
    found = []
    where: dict[str, list[str]] = {entry_id: [] for entry_id in ids}
    for keys in shards:
        entries, _ = await deadletters.select(client, keys.dead_letter, ids, match)
        if ids:  # which shard holds each named id, before --match narrows the selection
            present, _ = await deadletters.fetch(client, keys.dead_letter, ids)
            for entry in present:
                where[entry.id].append(keys.shard)
        found.append((keys, entries))
    missing = [entry_id for entry_id, held_in in where.items() if not held_in]
    if missing:
        streams = ", ".join(keys.dead_letter for keys in shards)
        raise CommandError(f"not in {streams}: {', '.join(missing)}; nothing changed", EXIT_NOT_FOUND)
    ambiguous = [f"{entry_id} (shards {', '.join(held_in)})" for entry_id, held_in in where.items() if len(held_in) > 1]
    if ambiguous:
        raise CommandError(f"in several shards: {'; '.join(ambiguous)}; say which with --shard", EXIT_CONFIG)
    return found


async def dead_letters_list(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    now = time.time()
    shards = _dead_letter_shards(target, args)
    if args.json:
        entries = [
            {**entry.as_dict(now), "shard": keys.shard, "dead_letter_stream": keys.dead_letter}
            for keys in shards
            async for entry in deadletters.scan(client, keys.dead_letter)
        ]
        print(json.dumps(entries, indent=2))
        return 0
    shard_column = f"{'SHARD':<6} " if target.sharded else ""
    print(f"{shard_column}{'ID':<20} {'ORIGINAL ID':<20} {'DELIVERIES':>10} {'AGE':>9}  ERROR")
    count = 0
    for keys in shards:
        shard = f"{keys.shard:<6} " if target.sharded else ""
        async for entry in deadletters.scan(client, keys.dead_letter):
            error = entry.error.replace("\n", " ")
            error = error if len(error) <= 100 else error[:99] + "…"
            deliveries = NOTHING if entry.deliveries is None else str(entry.deliveries)
            original = entry.original_id or NOTHING
            age = duration(entry.age_seconds(now))
            print(f"{shard}{entry.id:<20} {original:<20} {deliveries:>10} {age:>9}  {error}")
            count += 1
    print(f"({count} in {', '.join(keys.dead_letter for keys in shards)})")
    return 0


async def dead_letters_show(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    shards = _dead_letter_shards(target, args)
    found = [(keys, (await deadletters.fetch(client, keys.dead_letter, [args.id]))[0]) for keys in shards]
    found = [(keys, entries[0]) for keys, entries in found if entries]
    if not found:
        raise CommandError(f"{args.id} is not in {', '.join(keys.dead_letter for keys in shards)}", EXIT_NOT_FOUND)
    if len(found) > 1:
        held_in = ", ".join(keys.shard for keys, _ in found)
        raise CommandError(f"{args.id} is in several shards ({held_in}); say which with --shard", EXIT_CONFIG)
    keys, entry = found[0]
    if args.json:
        print(json.dumps({**entry.as_dict(), "shard": keys.shard, "dead_letter_stream": keys.dead_letter}, indent=2))
        return 0
    print(f"id                {entry.id} (dead-lettered {duration(entry.age_seconds())} ago)")
    if target.sharded:
        print(f"dead-letter key   {keys.dead_letter} (shard {keys.shard})")
    for i in range(0, len(entry.flat) - 1, 2):
        name, value = entry.flat[i], entry.flat[i + 1]
        try:
            shown = value.decode()
        except UnicodeDecodeError:
            shown = repr(value)  # not text: shown as Python bytes, so nothing is hidden
        print(f"{name.decode(errors='replace'):<17} {shown}")
    return 0


async def dead_letters_replay(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    """Each entry goes back into the stream it came from (its x-streamgroup-stream field: its own
    shard), by the script that also removes it from the dead-letter stream beside that shard."""
    _require_selection(args, "replay")
    found = [
        (deadletters.Replayer(client, keys.dead_letter, keys.stream), entries)
        for keys, entries in await _find(client, _dead_letter_shards(target, args), args.ids, args.match)
        if entries
    ]
    total = sum(len(entries) for _, entries in found)
    if not total:
        print("nothing to replay")
        return 0
    targets = sorted({replayer.target(entry) for replayer, entries in found for entry in entries})
    sources = ", ".join(replayer.dead_letter_key for replayer, _ in found)
    if args.dry_run:
        for replayer, entries in found:
            for entry in entries:
                original = entry.original_id or NOTHING
                print(f"would replay {entry.id} (original {original}) into {replayer.target(entry)}")
        print(f"dry run: {total} entries would be replayed into {', '.join(targets)}; nothing changed")
        return 0
    _confirm(f"Replay {total} entries from {sources} into {', '.join(targets)}?", args)
    counts = dict.fromkeys(deadletters.Outcome, 0)
    for replayer, entries in found:
        async for entry, outcome, new_id in replayer.replay(entries):
            counts[outcome] += 1
            if outcome is deadletters.Outcome.REPLAYED:
                original = entry.original_id or NOTHING
                print(f"replayed {entry.id} (original {original}) as {replayer.target(entry)} {new_id}")
            elif outcome is deadletters.Outcome.EMPTY:
                print(f"kept {entry.id}: it has no original fields to replay (an entry deleted while pending)")
    summary = f"replayed {counts[deadletters.Outcome.REPLAYED]}"
    if counts[deadletters.Outcome.GONE]:
        summary += f", {counts[deadletters.Outcome.GONE]} already gone (replayed or purged meanwhile)"
    if counts[deadletters.Outcome.EMPTY]:
        summary += f", {counts[deadletters.Outcome.EMPTY]} kept (nothing to replay)"
    print(summary)
    return 0


async def dead_letters_purge(client: aioredis.Redis, target: Target, args: argparse.Namespace) -> int:
    _require_selection(args, "purge")
    shards = _dead_letter_shards(target, args)
    if args.all and args.match is None:
        # Up to the newest entry of each seen when asking: anything dead-lettered since then stays.
        newest = []
        for keys in shards:
            last = await client.xrevrange(keys.dead_letter, count=1)
            if last:
                newest.append((keys, last[0][0].decode(), await client.xlen(keys.dead_letter)))
        if not newest:
            print("nothing to purge")
            return 0
        count = sum(length for _, _, length in newest)
        upto = ", ".join(f"{keys.dead_letter} up to {last_id}" for keys, last_id, _ in newest)
        _confirm(f"Delete all {count} entries ({upto}) for good?", args)
        for keys, last_id, _ in newest:
            deleted = await deadletters.purge_through(client, keys.dead_letter, last_id)
            print(f"purged {deleted} from {keys.dead_letter}")
        return 0
    found = [(keys, entries) for keys, entries in await _find(client, shards, args.ids, args.match) if entries]
    total = sum(len(entries) for _, entries in found)
    if not total:
        print("nothing to purge")
        return 0
    _confirm(f"Delete {total} entries of {', '.join(keys.dead_letter for keys, _ in found)} for good?", args)
    for keys, entries in found:
        deleted = await deadletters.purge(client, keys.dead_letter, [entry.id for entry in entries])
        print(f"purged {deleted} from {keys.dead_letter}")
    return 0


# ----------------------------------------------------------------------------- wiring

Command = Callable[[aioredis.Redis, Target, argparse.Namespace], Awaitable[int]]


async def _run(command: Command, args: argparse.Namespace) -> int:
    settings: Settings = load_settings()
    overrides = {name: getattr(args, name, None) for name in ("stream", "group")}
    # Through the settings, so the dead-letter stream follows --stream by the services' own rule.
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v})
    target = Target(settings.stream, settings.group, read_shards(settings))
    client = await create_client(settings)  # on a cluster, checks that these keys can work there
    try:
        await check_server(client)
        return await command(client, target, args)
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
    common.add_argument(
        "--shard",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="only shard N's dead-letter stream (default: every shard's; see STREAMGROUP_SHARDS)",
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
        verdict = classify(exc)
        if verdict is not None and verdict.refused:  # a wrong password is a ConnectionError to redis-py
            print(f"streamgroup: Redis refused us: {refusal_text(exc)}", file=sys.stderr)
            code = RedisRefusedError.exit_code
        else:
            print(f"streamgroup: cannot reach redis: {exc}", file=sys.stderr)
            code = EXIT_UNREACHABLE
    except Exception as exc:  # a CLI prints one line, not a traceback
        print(f"streamgroup: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
